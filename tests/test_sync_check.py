"""scripts/sync_check.py's counting, on the CPU: CUDA's sync debug mode is stood in for by a
warning with its text raised whenever the host takes a tensor's truth value. In a CPU run LAMB uses
its foreach ops, which cannot skip an overflowed step on the device, so they read the step's
overflow flag that way, once per optimizer step (the fused Triton step on a GPU does not). The count
per optimizer step must come out as exactly one, attributed to that line, whatever the run's
length."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
sync_check = pytest.importorskip("sync_check")

from bertrecipes.optim import lamb  # noqa: E402


def test_one_counted_sync_per_optimizer_step_named_by_its_line(monkeypatch, tmp_path):
    real_bool = torch.Tensor.__bool__

    def truth_value(self):
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=2)
        return real_bool(self)

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    monkeypatch.setattr(torch.Tensor, "__bool__", truth_value)
    overrides = ["model=bert_tiny", "max_seq_length=32", "max_predictions_per_seq=5", "train_batch_size=4",
                 "train_micro_batch_size_per_gpu=2", "checkpoint_at_end=false", "progress_bar=false",
                 "device=cpu"]
    short = sync_check.count_syncs(overrides, 2, tmp_path)
    long = sync_check.count_syncs(overrides, 4, tmp_path)
    per_step = {where: (long[where] - short.get(where, 0)) / 2 for where in long}
    per_step = {where: n for where, n in per_step.items() if n}
    line = next(i for i, text in enumerate(Path(lamb.__file__).read_text().splitlines(), 1)
                if "if bool(found_inf):" in text)
    ((where, count),) = per_step.items()
    assert where.startswith(f"lamb.py:{line} ") and count == 1


def test_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert sync_check.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
