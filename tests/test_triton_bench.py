"""scripts/bench_layer.py on a machine without a GPU: ``--help`` works (nothing GPU- or
triton-specific is imported for it) and a run refuses with a clear message instead of a traceback."""

from __future__ import annotations

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
