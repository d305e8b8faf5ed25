"""scripts/bench_layer.py on a machine without a GPU: ``--help`` works (nothing GPU- or
triton-specific is imported for it), a timing run refuses with a clear message instead of a traceback,
and ``--check --device cpu`` runs the GPU check's rule in Triton's interpreter at a tiny shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_layer.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_options():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--dtype", "--json", "--check", "--flags", "--impls"):
        assert option in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the benchmark would run")
def test_refuses_without_cuda():
    result = run_script("--check")
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_check_rule_passes_in_the_interpreter(tmp_path):
    """--check at a tiny shape on the CPU: the Triton layer (padded, unpadded, every memory flag) and
    attention are within twice torch's own fp16 error of the fp32 reference, and the JSON says so."""
    pytest.importorskip("triton")
    out = tmp_path / "check.json"
    result = run_script("--check", "--device", "cpu", "--check-dtypes", "fp16", "--json", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    cases = {r["case"] for r in rows}
    assert {"fp16 post-LN unpadded", "fp16 pre-LN unpadded", "fp16 post-LN flags=all",
            "fp16 attention, dropout replayed"} <= cases
    assert all(r["ok"] for r in rows)
    assert {r["tensor"] for r in rows if r["case"] == "fp16 post-LN unpadded"} >= {"out", "dx",
                                                                                  "output.dense.weight"}


def test_timing_is_refused_on_the_cpu():
    result = run_script("--device", "cpu")
    assert result.returncode == 2 and "--check only" in result.stderr
