"""scripts/sync_check.py's counting, on the CPU: CUDA's sync debug mode is stood in for by a
warning with its text raised from the one operation of the engine's step that synchronises on a GPU
(``torch.isfinite`` of the gradient norm, the fp16 overflow check). The count per optimizer step
must come out as exactly one, attributed to that line of the engine, whatever the run's length."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
sync_check = pytest.importorskip("sync_check")

from bertrecipes import engine  # noqa: E402


def test_one_counted_sync_per_optimizer_step_named_by_its_line(monkeypatch, tmp_path):
    real_isfinite = torch.isfinite

    def isfinite(x):
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=2)
        return real_isfinite(x)

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    monkeypatch.setattr(torch, "isfinite", isfinite)
    overrides = ["model=bert_tiny", "max_seq_length=32", "max_predictions_per_seq=5", "train_batch_size=4",
                 "train_micro_batch_size_per_gpu=2", "checkpoint_at_end=false", "progress_bar=false",
                 "device=cpu"]
    short = sync_check.count_syncs(overrides, 2, tmp_path)
    long = sync_check.count_syncs(overrides, 4, tmp_path)
    assert sum(short.values()) == 2 and sum(long.values()) == 4
    (where,) = long
    line = next(i for i, text in enumerate(Path(engine.__file__).read_text().splitlines(), 1)
                if "torch.isfinite(" in text)
    assert where.startswith(f"engine.py:{line} ")


def test_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert sync_check.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
