"""scripts/bench_host.py: the eager step's host work with every Triton launch stubbed out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_host.py"


def test_counts_every_launch_of_a_layer_and_runs_none(tmp_path):
    """With dropout on, a Triton layer's forward launches attention, bias+GELU and two
    bias+dropout+residual+LayerNorm kernels (4), its backward the attention preprocess, dK/dV and
    dQ kernels, bias+GELU's and the two LayerNorms' (6): 10 per layer, stubbed (a 3-layer step takes
    milliseconds, not the interpreter's seconds); the PyTorch layers launch none."""
    out = tmp_path / "host.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--layers", "3", "--steps", "2", "--warmup", "1",
                             "--impls", "triton,torch", "--json", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(out.read_text())
    rows = {r["impl"]: r for r in record["rows"]}
    assert record["kind"] == "host" and record["args"]["layers"] == 3
    assert rows["triton"]["triton_launches_per_step"] == 30
    assert rows["torch"]["triton_launches_per_step"] == 0
    assert all(r["ms_per_step"] > 0 and r["python_calls_per_step"] > 0 for r in rows.values())
    assert rows["triton"]["ms_per_step"] < 1000  # the kernels did not run (interpreted, they take seconds)
