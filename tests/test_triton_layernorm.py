"""Bias + dropout + residual + LayerNorm (kernels_triton.bias_dropout_residual_layernorm) against
PyTorch: the post-LN form, the pre-LN form returning the sum and the next LayerNorm, the plain
residual form and the plain LayerNorm; every output and gradient, dropout replay and statistics,
``normalize_invertible`` and the deterministic reductions. Without a GPU the kernels run in Triton's
interpreter (conftest.py selects it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from saved_tensors import saved_bytes
from triton_kernels import load_kernels

kt, DEVICE = load_kernels()
EPS = 1e-12
NAMES = ["out", "dx", "dbias", "dresidual", "dgamma", "dbeta"]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def inputs(shape, seed=0):
    """x, bias, residual, gamma (kept away from 0 for the invertible form), beta."""
    hidden = shape[-1]
    gamma = 1.0 + 0.5 * randn(hidden, seed=seed + 3)
    return randn(*shape, seed=seed), randn(hidden, seed=seed + 1), randn(*shape, seed=seed + 2), gamma, \
        randn(hidden, seed=seed + 4)


def run(fn, tensors, grads, *args, **kwargs):
    """Outputs (one or a tuple) and input gradients of fn for the given grad_outputs."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, *args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grads if isinstance(grads, tuple) else (grads,))
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def assert_all_close(got, want, names, atol=2e-5, rtol=2e-5):
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")



@pytest.mark.parametrize("shape", [(2, 7, 64), (3, 33, 96)])
@pytest.mark.parametrize("invertible", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_post_ln_matches_reference(shape, invertible, deterministic):
    tensors, grad = inputs(shape), randn(*shape, seed=9)
    got = run(kt.bias_dropout_residual_layernorm, tensors, grad, EPS,
              invertible=invertible, deterministic=deterministic)
    want = run(kt.bias_dropout_residual_layernorm_ref, tensors, grad, EPS)
    assert_all_close(got, want, NAMES)


@pytest.mark.parametrize("invertible", [False, True])
def test_pre_ln_sum_and_next_layernorm_with_replayed_dropout(invertible):
    shape, p, seed = (3, 33, 96), 0.25, 77
    tensors = inputs(shape, seed=10)
    grads = (randn(*shape, seed=20), randn(*shape, seed=21))  # through the sum and through LN(sum)
    got = run(kt.bias_dropout_residual_layernorm, tensors, grads, EPS, p, seed=seed, return_sum=True,
              invertible=invertible)
    keep = kt.row_dropout_mask(seed, 3 * 33, 96, p, DEVICE)
    want = run(kt.bias_dropout_residual_layernorm_ref, tensors, grads, EPS, p, keep, return_sum=True)
    assert_all_close(got, want, ["sum", *NAMES])


def test_post_ln_replayed_dropout():
    shape, p, seed = (2, 7, 64), 0.4, 5
    tensors, grad = inputs(shape, seed=30), randn(*shape, seed=31)
    got = run(kt.bias_dropout_residual_layernorm, tensors, grad, EPS, p, seed=seed)
    keep = kt.row_dropout_mask(seed, 14, 64, p, DEVICE)
    want = run(kt.bias_dropout_residual_layernorm_ref, tensors, grad, EPS, p, keep)
    assert_all_close(got, want, NAMES)


def test_bias_dropout_residual_matches_reference():
    shape, p, seed = (3, 33, 96), 0.1, 8
    x, bias, residual, _, _ = inputs(shape, seed=40)
    grad = randn(*shape, seed=41)
    got = run(kt.bias_dropout_residual, (x, bias, residual), grad, p, seed=seed, deterministic=False)
    keep = kt.row_dropout_mask(seed, 99, 96, p, DEVICE)
    want = run(kt.bias_dropout_residual_ref, (x, bias, residual), grad, p, keep)
    assert_all_close(got, want, ["out", "dx", "dbias", "dresidual"])


@pytest.mark.parametrize("return_sum", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_branch_scale_multiplies_the_dropped_out_branch(return_sum, p):
    """``residual + s * dropout(x + bias)`` (progressive layer dropping's 1 / keep), with its
    gradients, in the LayerNorm forms and the plain residual form."""
    shape, seed, scale = (3, 33, 96), 11, 1 / 0.55
    tensors = inputs(shape, seed=70)
    keep = kt.row_dropout_mask(seed, 99, 96, p, DEVICE) if p else None
    grads = (randn(*shape, seed=71), randn(*shape, seed=72)) if return_sum else randn(*shape, seed=71)
    got = run(kt.bias_dropout_residual_layernorm, tensors, grads, EPS, p, seed=seed, return_sum=return_sum,
              branch_scale=scale)
    want = run(kt.bias_dropout_residual_layernorm_ref, tensors, grads, EPS, p, keep, return_sum=return_sum,
               branch_scale=scale)
    assert_all_close(got, want, (["sum"] if return_sum else []) + NAMES)
    unscaled = run(kt.bias_dropout_residual_layernorm_ref, tensors, grads, EPS, p, keep,
                   return_sum=return_sum)
    assert not torch.allclose(got[0], unscaled[0], atol=1e-3)  # the scale changes the result
    x, bias, residual = tensors[:3]
    grad = randn(*shape, seed=73)
    got = run(kt.bias_dropout_residual, (x, bias, residual), grad, p, seed=seed, branch_scale=scale)
    want = run(kt.bias_dropout_residual_ref, (x, bias, residual), grad, p, keep, branch_scale=scale)
    assert_all_close(got, want, ["out", "dx", "dbias", "dresidual"])


@pytest.mark.parametrize("invertible", [False, True])
def test_layer_norm_matches_torch(invertible):
    x, gamma, beta = randn(3, 33, 96, seed=50) * 3 + 1, 1.0 + randn(96, seed=51), randn(96, seed=52)
    grad = randn(3, 33, 96, seed=53)
    got = run(kt.layer_norm, (x, gamma, beta), grad, EPS, invertible=invertible)
    want = run(lambda x, w, b: F.layer_norm(x, (96,), w, b, EPS), (x, gamma, beta), grad)
    assert_all_close(got, want, ["out", "dx", "dgamma", "dbeta"])


def test_dropout_rate_and_seeds():
    p, rows, cols = 0.3, 64, 96
    keep = kt.row_dropout_mask(3, rows, cols, p, DEVICE)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / keep.numel()) ** 0.5
    assert torch.equal(keep, kt.row_dropout_mask(3, rows, cols, p, DEVICE))
    assert not torch.equal(keep, kt.row_dropout_mask(4, rows, cols, p, DEVICE))

    x, bias, residual, gamma, beta = inputs((2, 7, 64), seed=60)
    args = (x, bias, residual, gamma, beta, EPS, p)
    out = kt.bias_dropout_residual_layernorm(*args, seed=1)
    assert torch.equal(out, kt.bias_dropout_residual_layernorm(*args, seed=1))
    assert not torch.equal(out, kt.bias_dropout_residual_layernorm(*args, seed=2))
    torch.manual_seed(0)
    drawn = kt.bias_dropout_residual_layernorm(*args)  # seed drawn from torch's generator
    torch.manual_seed(0)
    assert torch.equal(drawn, kt.bias_dropout_residual_layernorm(*args))


@pytest.mark.parametrize("return_sum", [False, True])
def test_normalize_invertible_changes_what_is_saved_not_the_result(return_sum):
    """The LayerNorm output feeds a projection, which keeps it anyway (as in a layer): the
    invertible form keeps only that, the other form the LayerNorm input as well."""
    shape = (3, 33, 96)
    tensors = (*inputs(shape, seed=70), randn(96, 96, seed=73))
    grads = (randn(*shape, seed=71), randn(*shape, seed=72))[: 2 if return_sum else 1]

    def block(x, bias, residual, gamma, beta, w_next, invertible):
        out = kt.bias_dropout_residual_layernorm(x, bias, residual, gamma, beta, EPS, 0.1, seed=3,
                                                 return_sum=return_sum, invertible=invertible)
        return (out[0], F.linear(out[1], w_next)) if return_sum else (F.linear(out, w_next),)

    results, kept = {}, {}
    for invertible in (False, True):
        leaves = [t.clone().requires_grad_() for t in tensors]
        outs, kept[invertible] = saved_bytes(lambda: block(*leaves, invertible))  # noqa: B023
        torch.autograd.backward(outs, grads)
        results[invertible] = [o.detach() for o in outs] + [t.grad for t in leaves]
    for i, (a, b) in enumerate(zip(results[False], results[True], strict=True)):
        if i < len(grads):
            assert torch.equal(a, b)  # the forward is the same computation
        else:  # x_hat is recovered from y instead of recomputed from the sum: rounding differs
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    rows, hidden = 3 * 33, 96
    # Without: the LayerNorm input [rows, hidden] and the mean [rows]. With: beta [hidden].
    assert kept[False] - kept[True] == rows * hidden * 4 + rows * 4 - hidden * 4


def test_deterministic_reductions_are_bitwise_reproducible():
    tensors, grad = inputs((3, 33, 96), seed=80), randn(3, 33, 96, seed=81)
    first = run(kt.bias_dropout_residual_layernorm, tensors, grad, EPS, 0.1, seed=4)
    second = run(kt.bias_dropout_residual_layernorm, tensors, grad, EPS, 0.1, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype):
    tensors, grad = inputs((2, 7, 96), seed=90), randn(2, 7, 96, seed=91)
    ref = run(kt.bias_dropout_residual_layernorm_ref, [t.double() for t in tensors], grad.double(), EPS)
    lowp = [t.to(dtype) for t in tensors]
    same_dtype = run(kt.bias_dropout_residual_layernorm_ref, lowp, grad.to(dtype), EPS)
    kernel = run(kt.bias_dropout_residual_layernorm, lowp, grad.to(dtype), EPS)
    for name, a, b, r in zip(NAMES, kernel, same_dtype, ref, strict=True):
        assert a.dtype == dtype, name
        torch_err = (b.double() - r).abs().max().item()
        assert (a.double() - r).abs().max().item() <= 2 * torch_err + 1e-3, name
