"""Bias + exact GELU (kernels_triton.bias_gelu) against ``F.gelu(x + b)``: output, dx and dbias on
odd shapes, both reductions, fp16/bf16 within twice torch's own error, and ``gelu_checkpoint``
(:func:`bias_gelu_linear` with ``checkpoint``) changing what is saved, not what is computed. Without
a GPU the kernels run in Triton's interpreter (conftest.py selects it)."""

from __future__ import annotations

import pytest
import torch
from saved_tensors import saved_bytes
from triton_kernels import load_kernels

kt, DEVICE = load_kernels()


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def run(fn, tensors, grad, *args, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, *args, **kwargs)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]



@pytest.mark.parametrize("shape", [(2, 7, 96), (3, 33, 64), (5, 40)])
@pytest.mark.parametrize("deterministic", [True, False])
def test_bias_gelu_matches_reference(shape, deterministic):
    x, bias, grad = randn(*shape, seed=1) * 2, randn(shape[-1], seed=2), randn(*shape, seed=3)
    got = run(kt.bias_gelu, (x, bias), grad, deterministic)
    want = run(kt.bias_gelu_ref, (x, bias), grad)
    for name, a, b in zip(["y", "dx", "dbias"], got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_deterministic_dbias_is_bitwise_reproducible():
    x, bias, grad = randn(3, 33, 64, seed=4), randn(64, seed=5), randn(3, 33, 64, seed=6)
    first = run(kt.bias_gelu, (x, bias), grad)
    second = run(kt.bias_gelu, (x, bias), grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype):
    x, bias, grad = randn(2, 7, 96, seed=7) * 2, randn(96, seed=8), randn(2, 7, 96, seed=9)
    ref = run(kt.bias_gelu_ref, (x.double(), bias.double()), grad.double())
    same_dtype = run(kt.bias_gelu_ref, (x.to(dtype), bias.to(dtype)), grad.to(dtype))
    kernel = run(kt.bias_gelu, (x.to(dtype), bias.to(dtype)), grad.to(dtype))
    for name, a, b, r in zip(["y", "dx", "dbias"], kernel, same_dtype, ref, strict=True):
        assert a.dtype == dtype
        torch_err = (b.double() - r).abs().max().item()
        assert (a.double() - r).abs().max().item() <= 2 * torch_err + 1e-5, name


@pytest.mark.parametrize("checkpoint", [False, True])
def test_bias_gelu_linear_matches_reference(checkpoint):
    x, bias, weight = randn(2, 33, 96, seed=10), randn(96, seed=11), randn(64, 96, seed=12) * 0.1
    grad = randn(2, 33, 64, seed=13)
    got = run(kt.bias_gelu_linear, (x, bias, weight), grad, checkpoint)
    want = run(kt.bias_gelu_linear_ref, (x, bias, weight), grad)
    for name, a, b in zip(["out", "dx", "dbias", "dweight"], got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_gelu_checkpoint_changes_what_is_saved_not_the_result():
    rows, inner = 2 * 33, 96
    x, bias, weight = randn(2, 33, inner, seed=14), randn(inner, seed=15), randn(64, inner, seed=16) * 0.1
    grad = randn(2, 33, 64, seed=17)
    results, kept = {}, {}
    for checkpoint in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, bias, weight)]
        out, kept[checkpoint] = saved_bytes(lambda: kt.bias_gelu_linear(*leaves, checkpoint))  # noqa: B023
        out.backward(grad)
        results[checkpoint] = [out.detach()] + [t.grad for t in leaves]
    for a, b in zip(results[False], results[True], strict=True):
        assert torch.equal(a, b)
    assert kept[False] - kept[True] == rows * inner * 4  # the GELU output, fp32
