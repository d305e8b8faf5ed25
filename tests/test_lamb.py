"""Tests for bertrecipes.optim.Lamb against an independent float64, per-tensor reference of the LAMB rule."""

from __future__ import annotations

import io
import math

import pytest
import torch

from bertrecipes.optim import Lamb

SHAPES = [(4, 8), (8,), (), (1,), (3, 2, 5)]


class ReferenceLamb:
    """Textbook per-tensor LAMB in float64 (DeepSpeed FusedLamb semantics), one Python loop per tensor."""

    def __init__(self, params: list[torch.Tensor], settings: list[dict]) -> None:
        self.params = [p.detach().to(torch.float64).clone() for p in params]
        self.settings = settings
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = [0] * len(self.params)
        self.coeffs: list[float] = []

    def step(self, grads: list[torch.Tensor | None]) -> None:
        self.coeffs = []
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            s = self.settings[i]
            beta1, beta2 = s["betas"]
            g = grad.to(torch.float64)
            p = self.params[i]
            self.t[i] += 1
            t = self.t[i]
            self.m[i] = beta1 * self.m[i] + (1 - beta1) * g
            self.v[i] = beta2 * self.v[i] + (1 - beta2) * g * g
            u = self.m[i] / (self.v[i].sqrt() + s["eps"]) + s["weight_decay"] * p
            p_norm = math.sqrt(float((p * p).sum()))
            u_norm = math.sqrt(float((u * u).sum()))
            if p_norm != 0.0 and u_norm != 0.0:
                coeff = min(max(p_norm / u_norm, s["min_coeff"]), s["max_coeff"])
            else:
                coeff = 1.0
            if s["bias_correction"]:
                step_size = s["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
            else:
                step_size = s["lr"]
            self.params[i] = p - step_size * coeff * u
            self.coeffs.append(coeff)


def _defaults(**overrides) -> dict:
    settings = dict(
        lr=1e-2,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        bias_correction=True,
        max_coeff=10.0,
        min_coeff=0.01,
    )
    settings.update(overrides)
    return settings


def _make_params(generator: torch.Generator, shapes=SHAPES) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def _random_grads(params, generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=generator) for p in params]


def _assert_matches(params, reference: ReferenceLamb) -> None:
    for p, ref in zip(params, reference.params, strict=True):
        torch.testing.assert_close(p.detach().to(torch.float64), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_matches_float64_reference(bias_correction: bool, weight_decay: float) -> None:
    gen = torch.Generator().manual_seed(0)
    params = _make_params(gen)
    settings = _defaults(weight_decay=weight_decay, bias_correction=bias_correction)
    reference = ReferenceLamb(params, [settings] * len(params))
    opt = Lamb(params, **settings)
    for _ in range(6):
        grads = _random_grads(params, gen)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        reference.step(grads)
        _assert_matches(params, reference)
        assert opt.last_coeffs is not None
        assert opt.last_coeffs.dtype == torch.float32
        torch.testing.assert_close(
            opt.last_coeffs.to(torch.float64),
            torch.tensor(reference.coeffs, dtype=torch.float64),
            rtol=1e-5,
            atol=1e-6,
        )


def test_multiple_param_groups_with_different_settings_and_missing_grads() -> None:
    gen = torch.Generator().manual_seed(1)
    weights = _make_params(gen, [(4, 8), (3, 2, 5)])
    small = _make_params(gen, [(8,), (), (1,)])
    group_a = _defaults(lr=2e-2, weight_decay=0.01, bias_correction=True)
    group_b = _defaults(
        lr=5e-3,
        betas=(0.8, 0.99),
        eps=1e-6,
        weight_decay=0.0,
        bias_correction=False,
        max_coeff=2.0,
        min_coeff=0.1,
    )
    opt = Lamb(
        [
            {"params": weights, **group_a},
            {"params": small, **group_b},
        ],
        lr=123.0,  # overridden by both groups; would blow the comparison up if leaked
    )
    all_params = weights + small
    reference = ReferenceLamb(all_params, [group_a] * 2 + [group_b] * 3)
    for step in range(5):
        grads: list[torch.Tensor | None] = _random_grads(all_params, gen)
        # Parameter 3 (the 0-d one) gets no gradient on odd steps: it must be skipped and its own step counter
        # must lag behind the others.
        if step % 2 == 1:
            grads[3] = None
        for p, g in zip(all_params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
        reference.step(grads)
        _assert_matches(all_params, reference)
        torch.testing.assert_close(
            opt.last_coeffs.to(torch.float64),
            torch.tensor(reference.coeffs, dtype=torch.float64),
            rtol=1e-5,
            atol=1e-6,
        )
    assert opt.state[all_params[3]]["step"] == 3
    assert opt.state[all_params[0]]["step"] == 5


def test_param_without_grad_has_no_state_and_is_unchanged() -> None:
    gen = torch.Generator().manual_seed(2)
    used, unused = _make_params(gen, [(5,), (5,)])
    before = unused.detach().clone()
    opt = Lamb([used, unused])
    used.grad = torch.randn(5, generator=gen)
    opt.step()
    assert torch.equal(unused, before)
    assert len(opt.state[unused]) == 0
    assert opt.last_coeffs.shape == (1,)


def test_no_grads_at_all_gives_no_coeffs() -> None:
    opt = Lamb([torch.nn.Parameter(torch.ones(3))])
    opt.step()
    assert opt.last_coeffs is None


def test_zero_norm_param_uses_unclamped_unit_coeff() -> None:
    # ||p|| == 0 would give a ratio of 0 (then clamped up to min_coeff); LAMB instead uses exactly 1.0.
    gen = torch.Generator().manual_seed(3)
    zero = torch.nn.Parameter(torch.zeros(6))
    grad = torch.randn(6, generator=gen)
    zero.grad = grad.clone()
    lr, eps = 0.1, 1e-8
    opt = Lamb([zero], lr=lr, eps=eps, weight_decay=0.3, bias_correction=False, min_coeff=0.5, max_coeff=0.7)
    opt.step()
    assert opt.last_coeffs.tolist() == [1.0]
    # Step 1: m = (1-b1) g, v = (1-b2) g^2, and wd*p == 0, so u = m / (sqrt(v) + eps).
    g64 = grad.to(torch.float64)
    u = 0.1 * g64 / ((0.001 * g64 * g64).sqrt() + eps)
    torch.testing.assert_close(zero.detach().to(torch.float64), -lr * u, rtol=1e-5, atol=1e-7)


def test_zero_update_norm_uses_unit_coeff() -> None:
    param = torch.nn.Parameter(torch.full((4,), 2.0))
    param.grad = torch.zeros(4)
    opt = Lamb([param], weight_decay=0.0, min_coeff=0.5, max_coeff=0.7)
    opt.step()
    assert opt.last_coeffs.tolist() == [1.0]
    assert torch.equal(param.detach(), torch.full((4,), 2.0))


@pytest.mark.parametrize(
    ("scale", "expected_coeff"),
    [(1e4, 10.0), (1e-6, 0.01)],
    ids=["clamped_at_max", "clamped_at_min"],
)
def test_trust_ratio_clamps(scale: float, expected_coeff: float) -> None:
    gen = torch.Generator().manual_seed(4)
    # On step 1, |u_i| = |g_i| / (|g_i| + eps) ~= 1 so ||u|| ~= sqrt(n); ||p|| / ||u|| ~= scale.
    param = torch.nn.Parameter(torch.full((16,), scale))
    grad = torch.randn(16, generator=gen)
    param.grad = grad.clone()
    lr = 1e-3
    opt = Lamb([param], lr=lr, bias_correction=False, max_coeff=10.0, min_coeff=0.01)
    before = param.detach().to(torch.float64).clone()
    opt.step()
    assert opt.last_coeffs.tolist() == [pytest.approx(expected_coeff, rel=1e-6)]
    g64 = grad.to(torch.float64)
    u = 0.1 * g64 / ((0.001 * g64 * g64).sqrt() + 1e-8)
    change = param.detach().to(torch.float64) - before
    # fp32 spacing at 1e4 is ~1e-3, so compare the change at the precision the parameter can hold.
    atol = 2e-3 if scale > 1 else 1e-9
    torch.testing.assert_close(change, -lr * expected_coeff * u, rtol=1e-5, atol=atol)


def test_state_dict_round_trip_continues_identically() -> None:
    gen = torch.Generator().manual_seed(5)
    params = _make_params(gen)
    settings = _defaults(weight_decay=0.01)
    grads_per_step = [_random_grads(params, gen) for _ in range(6)]

    def run(opt: Lamb, ps, steps) -> None:
        for grads in steps:
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opt.step()

    uninterrupted = Lamb(params, **settings)
    run(uninterrupted, params, grads_per_step)

    # Same seed, same first draws: identical starting weights.
    params_b = _make_params(torch.Generator().manual_seed(5))
    first = Lamb(params_b, **settings)
    run(first, params_b, grads_per_step[:3])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params_b], "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed_params = [torch.nn.Parameter(p.clone()) for p in checkpoint["params"]]
    resumed = Lamb(resumed_params, lr=999.0)  # hyperparameters must come back from the checkpoint
    resumed.load_state_dict(checkpoint["opt"])
    assert resumed.param_groups[0]["lr"] == settings["lr"]
    assert all(resumed.state[p]["step"] == 3 for p in resumed_params)
    run(resumed, resumed_params, grads_per_step[3:])

    for p, q in zip(params, resumed_params, strict=True):
        assert torch.equal(p.detach(), q.detach())
    assert torch.equal(uninterrupted.last_coeffs, resumed.last_coeffs)


def step_with_a_skip(opt, reference, params, clean, grads, nonfinite=None) -> None:
    """One step of ``opt`` (preceded, when ``nonfinite`` gradients are given, by a step flagged as
    overflowed and undone) and the same step of ``reference``, which never sees the overflow."""
    if nonfinite is not None:
        for p, g in zip(params, nonfinite, strict=True):
            p.grad = g
        opt.step(found_inf=torch.ones(1))
        opt.undo_skipped_step()
    for p, q, g in zip(params, clean, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step(found_inf=torch.zeros(1))
    reference.step()


def assert_same_state(opt, reference, params, clean, steps: int) -> None:
    """Weights, moments and counters equal bit for bit."""
    for p, q in zip(params, clean, strict=True):
        assert torch.equal(p.detach(), q.detach())
        assert opt.state[p]["step"] == reference.state[q]["step"] == steps
        assert torch.equal(opt.state[p]["exp_avg"], reference.state[q]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], reference.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("overflow_at", [0, 2])
def test_overflow_flag_skips_the_step_exactly(overflow_at: int) -> None:
    """A step given a set ``found_inf`` (gradients full of inf/NaN, as after an fp16 overflow) and then
    ``undo_skipped_step`` leaves the optimizer exactly as one that never saw that step: the same
    weights, moments, counters and trust ratios, bit for bit, then and after further steps. A clear
    flag changes nothing. The flag is a tensor; the fused step reads it on the device only (so the
    caller, who reads it later, undoes the counters)."""
    gen = torch.Generator().manual_seed(11)
    params = _make_params(gen)
    clean = [torch.nn.Parameter(p.detach().clone()) for p in params]
    settings = _defaults(weight_decay=0.01)
    opt, reference = Lamb(params, **settings), Lamb(clean, **settings)
    for step in range(5):
        grads = _random_grads(params, gen)
        nonfinite = [torch.full_like(p, float("nan")).reshape(-1).index_fill(0, torch.tensor([0]),
                                                                             float("inf")).view_as(p)
                     for p in params]
        step_with_a_skip(opt, reference, params, clean, grads, nonfinite if step == overflow_at else None)
        assert_same_state(opt, reference, params, clean, step + 1)
        assert torch.equal(opt.last_coeffs, reference.last_coeffs)


def test_overflow_on_the_first_step_leaves_no_state() -> None:
    params = _make_params(torch.Generator().manual_seed(12))
    before = [p.detach().clone() for p in params]
    opt = Lamb(params, **_defaults())
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.step(found_inf=torch.ones(1))
    opt.undo_skipped_step()
    assert len(opt.state) == 0 and opt.last_coeffs is None
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))


def test_loads_tensor_step_counters() -> None:
    # Checkpoints from optimizers that store `step` as a tensor (torch's convention) must load and continue.
    gen = torch.Generator().manual_seed(6)
    params = _make_params(gen, [(3,)])
    opt = Lamb(params)
    params[0].grad = torch.randn(3, generator=gen)
    opt.step()
    state = opt.state_dict()
    for param_state in state["state"].values():
        param_state["step"] = torch.tensor(float(param_state["step"]))
    other = Lamb(params)
    other.load_state_dict(state)
    other.step()
    assert other.state[params[0]]["step"] == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1e-3}, "lr must be >= 0"),
        ({"lr": float("nan")}, "lr must be >= 0"),
        ({"betas": (1.0, 0.999)}, "betas must both be in"),
        ({"betas": (0.9, -0.1)}, "betas must both be in"),
        ({"betas": 0.9}, "betas must be a pair"),
        ({"eps": 0.0}, "eps must be > 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"min_coeff": -0.1}, "min_coeff"),
        ({"min_coeff": 2.0, "max_coeff": 1.0}, "min_coeff=2.0, max_coeff=1.0"),
    ],
)
def test_constructor_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Lamb([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_param_group_override_is_validated() -> None:
    opt = Lamb([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="eps must be > 0, got -1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "eps": -1.0})
    assert len(opt.param_groups) == 1


def test_sparse_gradients_are_rejected() -> None:
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    opt = Lamb(embedding.parameters())
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_low_precision_params_are_rejected() -> None:
    param = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    param.grad = torch.ones(2, dtype=torch.float16)
    with pytest.raises(TypeError, match="torch.float16"):
        Lamb([param]).step()
