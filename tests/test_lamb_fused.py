"""The fused Triton LAMB step (``Lamb(fused=True)``, kernels_triton.lamb) against the same float64
per-tensor reference as the foreach implementation: every test of tests/test_lamb.py runs again
with the fused step, plus tensors spanning several chunks (the per-tensor norms are sums of chunk
partials) and an empty tensor. Without a GPU the kernels run in Triton's interpreter."""

from __future__ import annotations

import importlib

import pytest
import test_lamb
import torch
from triton_kernels import (
    assert_same_optimizer_state,
    cpu_case,
    force_fused_optimizer,
    fused_and_foreach,
    load_kernels,
)

from bertrecipes.optim import Lamb

kt, DEVICE = load_kernels()
fused_lamb = importlib.import_module("kernels_triton.lamb")

from test_lamb import (  # noqa: E402  (collected here again, with the fused step patched in)
    test_matches_float64_reference,
    test_multiple_param_groups_with_different_settings_and_missing_grads,
    test_no_grads_at_all_gives_no_coeffs,
    test_overflow_flag_skips_the_step_exactly,
    test_overflow_on_the_first_step_leaves_no_state,
    test_param_without_grad_has_no_state_and_is_unchanged,
    test_state_dict_round_trip_continues_identically,
    test_trust_ratio_clamps,
    test_zero_norm_param_uses_unclamped_unit_coeff,
    test_zero_update_norm_uses_unit_coeff,
)

__all__ = [
    "test_matches_float64_reference",
    "test_multiple_param_groups_with_different_settings_and_missing_grads",
    "test_no_grads_at_all_gives_no_coeffs",
    "test_overflow_flag_skips_the_step_exactly",
    "test_overflow_on_the_first_step_leaves_no_state",
    "test_param_without_grad_has_no_state_and_is_unchanged",
    "test_state_dict_round_trip_continues_identically",
    "test_trust_ratio_clamps",
    "test_zero_norm_param_uses_unclamped_unit_coeff",
    "test_zero_update_norm_uses_unit_coeff",
]


@pytest.fixture(autouse=True)
def fused_step(monkeypatch, request):
    if not cpu_case(request):
        yield
        return
    calls = force_fused_optimizer(monkeypatch, test_lamb, Lamb)
    yield
    # every test that stepped with gradients went through the Triton step
    assert all(n > 0 for n in calls)


def _steps_match_reference(params, gen, steps: int) -> None:
    """``steps`` fused LAMB steps with random gradients, each against the float64 reference:
    parameters, moments and trust ratios."""
    settings = test_lamb._defaults(weight_decay=0.01)
    reference = test_lamb.ReferenceLamb(params, [settings] * len(params))
    opt = Lamb(params, **settings, fused=True)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        reference.step(grads)
        test_lamb._assert_matches(params, reference)
        want = torch.tensor(reference.coeffs, dtype=torch.float64)
        torch.testing.assert_close(opt.last_coeffs.double(), want, rtol=1e-5, atol=1e-6)


def test_tensors_spanning_several_chunks_match_the_reference():
    chunk = fused_lamb.CHUNK
    gen = torch.Generator().manual_seed(11)
    shapes = [(3 * chunk + 17,), (2, chunk), (0,), (5,)]
    _steps_match_reference([torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes], gen, 3)


def test_fused_and_foreach_steps_agree_and_share_state():
    gen = torch.Generator().manual_seed(12)
    shapes = [(fused_lamb.CHUNK + 3,), (7, 9), ()]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    runs = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = Lamb(params, lr=1e-2, weight_decay=0.01, fused=fused)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        runs[fused] = (params, opt)
    for a, b in zip(runs[True][0], runs[False][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the state layout is the same: the fused optimizer's state continues in a foreach one
    foreach = Lamb([torch.nn.Parameter(p.detach().clone()) for p in runs[True][0]], fused=False)
    foreach.load_state_dict(runs[True][1].state_dict())
    assert all(foreach.state[p]["step"] == 4 for p in foreach.param_groups[0]["params"])


def test_non_fp32_is_refused_naming_the_dtype():
    param = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    param.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="fp32 parameters, these are torch.float64"):
        Lamb([param], fused=True).step()
    Lamb([param], fused=None).step()  # auto falls back to foreach


def test_fused_must_be_a_boolean_or_null():
    with pytest.raises(ValueError, match="fused must be null.*'yes'"):
        Lamb([torch.nn.Parameter(torch.ones(1))], fused="yes")


def test_address_tables_are_built_once_for_the_same_memory(monkeypatch):
    """Steps over the same weights, moments and gradient buffers reuse one address table (no host
    work, no copies); other tensors get their own, and the updates stay the reference's."""
    import kernels_triton.lamb as fused

    builds = []
    original = fused._build_table

    def build(quads, device):
        builds.append(1)
        return original(quads, device)

    monkeypatch.setattr(fused, "_build_table", build)
    fused._TABLES.clear()  # earlier tests' tensors may have had these addresses
    gen = torch.Generator().manual_seed(12)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((300,), (7, 9))]
    settings = test_lamb._defaults()
    reference = test_lamb.ReferenceLamb(params, [settings] * len(params))
    opt = Lamb(params, **settings, fused=True)
    for p in params:
        p.grad = torch.empty_like(p)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad.copy_(g)  # the same gradient buffers every step
        opt.step()
        reference.step(grads)
        test_lamb._assert_matches(params, reference)
    assert len(builds) == 1
    others = [torch.nn.Parameter(torch.randn(5, generator=gen))]
    others[0].grad = torch.randn(5, generator=gen)
    Lamb(others, fused=True).step()
    assert len(builds) == 2


def test_direct_call_checks_its_tensors():
    """Called directly (not from the optimizer, which checks first), the launchers refuse what the
    kernels cannot address: here a non-contiguous moment buffer."""
    import kernels_triton.adam as fused_adam
    import kernels_triton.lamb as fused_lamb

    p, g, m = (torch.zeros(4, 3) for _ in range(3))
    v = torch.zeros(3, 4).t()
    options = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        fused_lamb.fused_lamb_step([p], [g], [m], [v], **options, step_size=1e-3, min_coeff=0.01,
                                   max_coeff=10.0)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        fused_adam.fused_adam_step([p], [g], [m], [v], **options, lr=1e-3, adam_w_mode=True, step_size=1e-3,
                                   bias_correction2_sqrt=1.0)


def test_tensors_aligned_or_not_take_their_path_and_match_the_reference():
    """A tensor whose four pointers are 16-byte aligned and whose size is a multiple of 4 is flagged
    for the vectorised path; a view one float into its storage, or an odd size, takes the plain
    one. Both kinds in one step match the float64 reference."""
    gen = torch.Generator().manual_seed(12)
    storage = torch.randn(4101, generator=gen) * 0.1
    params = [torch.nn.Parameter(torch.randn(2, 2048, generator=gen) * 0.1),  # aligned
              torch.nn.Parameter(storage[1:]),  # 4100 floats from 4 bytes past an aligned address
              torch.nn.Parameter(torch.randn(4099, generator=gen) * 0.1)]  # not a multiple of 4
    fused_lamb._TABLES.clear()
    _steps_match_reference(params, gen, 2)
    assert params[1].data_ptr() % 16 == 4 and params[0].data_ptr() % 16 == 0 == params[2].data_ptr() % 16
    tables = fused_lamb._TABLES.values()
    assert tables and all(table["aligned"].tolist() == [1, 0, 0] for table in tables)


def test_on_device_fused_step_matches_foreach_on_aligned_and_unaligned_tensors():
    """The kernels (on a GPU compiled, and vectorised where a tensor is aligned) against the foreach
    step (itself held to the float64 reference) on the same tensors and gradients."""
    fused, foreach = fused_and_foreach(Lamb, test_lamb._defaults(weight_decay=0.01), DEVICE)
    assert_same_optimizer_state(fused, foreach)
    torch.testing.assert_close(fused.last_coeffs, foreach.last_coeffs, rtol=1e-5, atol=1e-6)
