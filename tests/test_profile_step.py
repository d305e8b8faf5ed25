"""scripts/profile_step.py on the CPU: the profiler's window holds exactly the recorded optimizer
steps (one ``Lamb.step`` per step, as many loss backward passes as micro-batches per step), and the
JSON names the run and its per-step figures."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
profile_step = pytest.importorskip("profile_step")


def test_window_holds_the_recorded_steps(tmp_path, data_cache, monkeypatch):
    out = tmp_path / "profile.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert profile_step.main(["--device", "cpu", "--model", "tiny", "--seq", "32", "--micro", "2",
                              "--impl", "torch", "--skip", "1", "--steps", "2", "--top", "400",
                              "--cache-dir", str(data_cache), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert (summary["model"], summary["seq"], summary["micro"], summary["impl"]) == ("tiny", 32, 2, "torch")
    assert summary["wall_ms_per_step"] > 0 and summary["gpu_busy"] is None
    calls = {e["name"]: e["calls"] for e in summary["top"]}
    assert calls["Optimizer.step#Lamb.step"] == 1.0
    assert calls["aten::gelu_backward"] == 3.0  # bert_tiny: 2 layers + the MLM head, one micro-batch
    assert not list(scratch.glob("profile_step_*"))  # the run's working directory is gone


def test_kernel_time_counts_device_rows_only():
    """Host rows (an ``aten::`` op, a custom op, ``Optimizer.step#...``) carry the device time of
    the kernels they launched, and a user annotation's GPU-side span covers the whole step: only
    device rows that are not annotations are kernels, or their time would be counted twice."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEventAvg

    def event(device_type, annotation=False):
        e = FunctionEventAvg()
        e.device_type, e.is_user_annotation = device_type, annotation
        return e

    assert profile_step.is_kernel(event(DeviceType.CUDA))
    assert not profile_step.is_kernel(event(DeviceType.CUDA, annotation=True))  # ProfilerStep#3 on the GPU
    assert not profile_step.is_kernel(event(DeviceType.CPU))  # kernels_triton::flash_attention
