"""Tests for bertrecipes.optim.Adam against a float64 per-tensor reference and torch.optim.AdamW."""

from __future__ import annotations

import math

import pytest
import torch
from test_lamb import assert_same_state, step_with_a_skip

from bertrecipes.optim import Adam

SHAPES = [(4, 8), (8,), (), (3, 2, 5)]


def reference_adam(
    params: list[torch.Tensor],
    grads_per_step: list[list[torch.Tensor]],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    adam_w_mode: bool,
) -> list[torch.Tensor]:
    """Adam written out per tensor in float64, straight from the formulas in bertrecipes.optim.adam."""
    beta1, beta2 = betas
    ps = [p.detach().to(torch.float64).clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, grad in enumerate(grads):
            g = grad.to(torch.float64)
            if adam_w_mode:
                ps[i] = ps[i] - lr * weight_decay * ps[i]
            else:
                g = g + weight_decay * ps[i]
            ms[i] = beta1 * ms[i] + (1 - beta1) * g
            vs[i] = beta2 * vs[i] + (1 - beta2) * g * g
            if bias_correction:
                m_hat = ms[i] / (1 - beta1**t)
                v_hat = vs[i] / (1 - beta2**t)
                ps[i] = ps[i] - lr * m_hat / (v_hat.sqrt() + eps)
            else:
                ps[i] = ps[i] - lr * ms[i] / (vs[i].sqrt() + eps)
    return ps


def _setup(seed: int, steps: int) -> tuple[list[torch.nn.Parameter], list[list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]
    grads = [[torch.randn(shape, generator=gen) for shape in SHAPES] for _ in range(steps)]
    return params, grads


def _run(opt: torch.optim.Optimizer, params, grads_per_step) -> None:
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_matches_float64_reference(bias_correction: bool, adam_w_mode: bool) -> None:
    params, grads = _setup(0, steps=6)
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    expected = reference_adam(
        params, grads, **settings, bias_correction=bias_correction, adam_w_mode=adam_w_mode
    )
    opt = Adam(params, **settings, bias_correction=bias_correction, adam_w_mode=adam_w_mode)
    _run(opt, params, grads)
    for p, ref in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach().to(torch.float64), ref, rtol=1e-5, atol=1e-6)


def test_matches_torch_adamw() -> None:
    params, grads = _setup(1, steps=8)
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    settings = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    _run(Adam(params, **settings, bias_correction=True, adam_w_mode=True), params, grads)
    _run(torch.optim.AdamW(torch_params, **settings, foreach=False), torch_params, grads)
    for ours, theirs in zip(params, torch_params, strict=True):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)


def test_l2_mode_leaves_caller_gradient_untouched() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    grad = torch.tensor([0.5, -1.0, 2.0])
    param.grad = grad.clone()
    Adam([param], weight_decay=0.5, adam_w_mode=False).step()
    assert torch.equal(param.grad, grad)


def test_per_group_settings_and_state_round_trip() -> None:
    params, grads = _setup(2, steps=5)

    def groups(ps: list[torch.nn.Parameter]) -> list[dict]:
        return [
            {"params": ps[:2], "weight_decay": 0.1},
            {"params": ps[2:], "weight_decay": 0.0, "bias_correction": False, "lr": 5e-3},
        ]

    expected_a = reference_adam(params[:2], [g[:2] for g in grads], 1e-2, (0.9, 0.999), 1e-8, 0.1, True, True)
    expected_b = reference_adam(
        params[2:], [g[2:] for g in grads], 5e-3, (0.9, 0.999), 1e-8, 0.0, False, True
    )

    first = Adam(groups(params), lr=1e-2)
    _run(first, params, grads[:2])
    state = first.state_dict()
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = Adam(groups(resumed_params), lr=1.0)
    resumed.load_state_dict(state)
    _run(resumed, resumed_params, grads[2:])

    for p, ref in zip(resumed_params, expected_a + expected_b, strict=True):
        torch.testing.assert_close(p.detach().to(torch.float64), ref, rtol=1e-5, atol=1e-6)
    assert math.isclose(resumed.param_groups[1]["lr"], 5e-3)


def test_tensors_larger_than_a_chunk_match_the_reference() -> None:
    """Tensors of several thousand elements (several of the fused step's 4096-element chunks, and a
    ragged last one) next to tiny ones."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(97, 131), (5,), (3, 4099)]
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]
    grads = [[torch.randn(shape, generator=gen) for shape in shapes] for _ in range(3)]
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    expected = reference_adam(params, grads, **settings, bias_correction=True, adam_w_mode=True)
    _run(Adam(params, **settings), params, grads)
    for p, ref in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach().to(torch.float64), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overflow_at", [0, 2])
def test_overflow_flag_skips_the_step_exactly(overflow_at: int) -> None:
    """A step given a set ``found_inf`` (non-finite gradients), then ``undo_skipped_step`` once the
    caller has read the flag, leaves the optimizer exactly as one that never saw that step."""
    params, grads = _setup(4, steps=4)
    clean = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, reference = Adam(params, lr=1e-2, weight_decay=0.1), Adam(clean, lr=1e-2, weight_decay=0.1)
    for step, step_grads in enumerate(grads):
        nonfinite = [torch.full_like(p, float("nan")) for p in params] if step == overflow_at else None
        step_with_a_skip(opt, reference, params, clean, step_grads, nonfinite)
        assert_same_state(opt, reference, params, clean, step + 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "lr must be >= 0, got -1.0"),
        ({"betas": (0.9, 1.5)}, "betas must both be in"),
        ({"eps": -1e-8}, "eps must be > 0"),
        ({"weight_decay": -0.01}, "weight_decay must be >= 0"),
    ],
)
def test_constructor_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Adam([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_sparse_gradients_are_rejected() -> None:
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        Adam(embedding.parameters()).step()


def test_fused_true_refuses_what_it_cannot_run() -> None:
    param = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    param.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"Adam\(fused=True\) cannot run: .*fp32"):
        Adam([param], fused=True).step()
    with pytest.raises(ValueError, match="fused must be null"):
        Adam([param], fused="yes")
