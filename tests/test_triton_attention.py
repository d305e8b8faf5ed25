"""Flash attention (kernels_triton.attention) against its PyTorch reference: outputs and dq/dk/dv,
padding masks, ragged blocks, dropout replay and statistics, varlen == padded, the
``recompute_output`` and ``deterministic`` options. Without a GPU the kernels run in Triton's
interpreter (conftest.py selects it), on small shapes."""

from __future__ import annotations

import pytest
import torch
from saved_tensors import saved_bytes
from triton_kernels import load_kernels

kt, DEVICE = load_kernels()


def qkv_inputs(batch, seq, heads, head_dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(batch, seq, heads, head_dim, generator=g) for _ in range(4))
    return [t.to(DEVICE, dtype) for t in (q, k, v)], grad.to(DEVICE, dtype)


def padding_mask(lengths, seq):
    return (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).to(DEVICE)


def run(fn, tensors, grad, *args, **kwargs):
    """Output and input gradients of fn(*tensors, *args) for one grad_output."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, *args, **kwargs)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def assert_all_close(got, want, atol=2e-5, rtol=2e-5):
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "batch, seq, heads, head_dim, lengths",
    [
        (2, 7, 2, 16, [7, 4]),  # one ragged block
        (2, 33, 3, 32, [33, 20]),  # two blocks, the last one row long
        (1, 33, 2, 48, None),  # head_dim not a power of two (masked BLOCK_D)
        (1, 17, 1, 64, [9]),
    ],
)
def test_attention_matches_reference(batch, seq, heads, head_dim, lengths):
    (q, k, v), grad = qkv_inputs(batch, seq, heads, head_dim)
    mask = padding_mask(lengths, seq) if lengths else None
    got = run(kt.flash_attention, (q, k, v), grad, mask)
    want = run(kt.attention_ref, (q, k, v), grad, mask)
    assert_all_close(got, want)


def test_packed_qkv_and_atomic_dq_match_reference():
    (q, k, v), grad = qkv_inputs(2, 33, 2, 32, seed=1)
    mask = padding_mask([33, 12], 33)
    want = run(kt.attention_ref, (q, k, v), grad, mask)
    qkv = torch.stack([q, k, v], dim=2)  # [B, S, 3, heads, head_dim], as the layer's projection
    out, dqkv = run(kt.flash_attention_qkvpacked, (qkv,), grad, mask, deterministic=False)
    assert_all_close([out, *dqkv.unbind(2)], want)


def test_dropout_mask_replays_in_reference():
    (q, k, v), grad = qkv_inputs(2, 33, 2, 16, seed=2)
    mask, p, seed = padding_mask([33, 25], 33), 0.3, 1234
    got = run(kt.flash_attention, (q, k, v), grad, mask, p, seed=seed)
    keep = kt.attention_dropout_mask(seed, 2, 2, 33, p, DEVICE)
    want = run(kt.attention_ref, (q, k, v), grad, mask, p, keep)
    assert_all_close(got, want)


def test_dropout_rate_and_seeds():
    p = 0.25
    keep = kt.attention_dropout_mask(7, 2, 2, 64, p, DEVICE)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(keep, kt.attention_dropout_mask(7, 2, 2, 64, p, DEVICE))
    assert not torch.equal(keep, kt.attention_dropout_mask(8, 2, 2, 64, p, DEVICE))
    # Heads draw from different Philox streams: their masks agree only by chance.
    agree = (keep[0, 0] == keep[0, 1]).float().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.05

    (q, k, v), _ = qkv_inputs(1, 7, 2, 16, seed=3)
    out_a = kt.flash_attention(q, k, v, None, p, seed=11)
    assert torch.equal(out_a, kt.flash_attention(q, k, v, None, p, seed=11))
    assert not torch.equal(out_a, kt.flash_attention(q, k, v, None, p, seed=12))
    torch.manual_seed(5)
    out_b = kt.flash_attention(q, k, v, None, p)  # seed drawn from torch's generator
    torch.manual_seed(5)
    assert torch.equal(out_b, kt.flash_attention(q, k, v, None, p))


def test_a_seed_tensor_changed_after_the_forward_does_not_change_the_backward():
    """A seed given as a tensor is the kernels' own copy: the backward replays the forward's mask
    even when the caller's tensor changes in between (as a CUDA-graph input updated in place)."""
    (q, k, v), grad = qkv_inputs(2, 33, 2, 16, seed=8)
    want = run(kt.flash_attention, (q, k, v), grad, None, 0.3, seed=7)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    seed = torch.tensor([7], device=DEVICE)
    out = kt.flash_attention(*leaves, None, 0.3, seed=seed)
    seed += 1
    out.backward(grad)
    for got, expected in zip([out.detach()] + [t.grad for t in leaves], want, strict=True):
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="dropout_p=0.3 needs a seed tensor"):  # the ops, called bare
        torch.ops.kernels_triton.flash_attention(q, k, v, None, None, 0, 0.3, 0.25, None, False, True)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_varlen_equals_padded_on_real_tokens(dropout_p):
    lengths, seq, heads, head_dim = [7, 33, 20], 33, 2, 16
    (q, k, v), grad = qkv_inputs(3, seq, heads, head_dim, seed=4)
    mask = padding_mask(lengths, seq)
    grad = grad * mask[:, :, None, None]  # padded query rows must not feed the real keys' gradients
    padded = run(kt.flash_attention, (q, k, v), grad, mask, dropout_p, seed=99)
    cu_seqlens = torch.tensor([0, 7, 40, 60], dtype=torch.int32, device=DEVICE)
    packed = [t[mask] for t in (q, k, v)]  # [total, heads, head_dim]
    varlen = run(kt.flash_attention_varlen, packed, grad[mask], cu_seqlens, seq, dropout_p, seed=99)
    assert_all_close(varlen, [t[mask] for t in padded], atol=1e-6, rtol=1e-6)



def test_recompute_output_changes_what_is_saved_not_the_result():
    batch, seq, heads, head_dim = 2, 33, 2, 16
    (q, k, v), grad = qkv_inputs(batch, seq, heads, head_dim, seed=5)
    mask = padding_mask([33, 30], seq)
    results, kept = {}, {}
    for recompute in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, kept[recompute] = saved_bytes(
            lambda: kt.flash_attention(*leaves, mask, 0.1, seed=3, recompute_output=recompute))  # noqa: B023
        out.backward(grad)
        results[recompute] = [out.detach()] + [t.grad for t in leaves]
    for a, b in zip(results[False], results[True], strict=True):
        assert torch.equal(a, b)
    output_bytes = batch * seq * heads * head_dim * 4
    lse_bytes = batch * heads * seq * 4
    assert kept[False] - kept[True] == output_bytes + lse_bytes


def test_deterministic_grads_are_bitwise_reproducible():
    (q, k, v), grad = qkv_inputs(2, 33, 2, 16, seed=6)
    first = run(kt.flash_attention, (q, k, v), grad, None, 0.1, seed=5)
    second = run(kt.flash_attention, (q, k, v), grad, None, 0.1, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    stochastic = run(kt.flash_attention, (q, k, v), grad, None, 0.1, seed=5, deterministic=False)
    assert_all_close(stochastic, first, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype):
    if dtype == torch.bfloat16 and kt.INTERPRET:
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly; bf16 runs on a GPU (bench --check)")
    (q, k, v), grad = qkv_inputs(2, 33, 2, 32, seed=7)
    mask = padding_mask([33, 17], 33)
    ref = run(kt.attention_ref, (q, k, v), grad, mask)
    lowp = [t.to(dtype) for t in (q, k, v)]
    same_dtype = run(kt.attention_ref, lowp, grad.to(dtype), mask)
    kernel = run(kt.flash_attention, lowp, grad.to(dtype), mask)
    for name, a, b, r in zip(["out", "dq", "dk", "dv"], kernel, same_dtype, ref, strict=True):
        torch_err = (b.float() - r).abs().max().item()
        assert (a.float() - r).abs().max().item() <= 2 * torch_err + 1e-3, name
