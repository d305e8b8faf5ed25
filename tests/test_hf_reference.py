"""scripts/hf_reference.py's HFUserStep (the benchmarks' Hugging Face user) with gradient
accumulation, against torch.optim.AdamW stepped by hand on the summed gradient."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
hf_reference = pytest.importorskip("hf_reference")


def test_accumulation_steps_once_per_window_on_the_mean_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    user = hf_reference.HFUserStep(model, torch.device("cpu"), "fp32", lr=1e-2, weight_decay=0.01,
                                   accumulation=2)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
    batches = [torch.randn(5, 4) for _ in range(4)]
    for i, x in enumerate(batches):
        before = [p.detach().clone() for p in model.parameters()]
        user.update(model(x).pow(2).mean())
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
        assert moved == (i % 2 == 1)  # the optimizer runs at the end of each window of 2
        if i % 2 == 1:
            loss = sum(reference(b).pow(2).mean() for b in batches[i - 1:i + 1]) / 2
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            for p, q in zip(model.parameters(), reference.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
