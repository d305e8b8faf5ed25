"""Flash attention for BERT self-attention: ``softmax(q k^T * scale + mask) v`` with attention-prob
dropout, forward and backward, without ever holding the [S, S] score matrix in memory.

* Forward: one program per (query block, batch*head); online softmax over key blocks, fp32
  accumulation, saves the log-sum-exp (base 2) per query row for the backward.
* Backward (FlashAttention-2 split): ``delta = rowsum(dO * O)``; one program per key block
  accumulates dK, dV over all query blocks; dQ either by a second pass over key blocks per query
  block (deterministic) or by fp32 atomics from the dK/dV pass (``deterministic=False``, DeepSpeed's
  ``stochastic_mode``: one pass fewer, run-to-run bit differences).
* Dropout: Philox keyed by (seed, batch*heads + head) with counter ``row * max_seqlen + col``; the
  mask is never stored, the backward regenerates it. :func:`attention_dropout_mask` materialises
  it with the same expression so :func:`attention_ref` can replay it in tests.
* Layouts: padded ``[B, S, heads, head_dim]`` (any strides with a unit last stride, e.g. views of
  one packed QKV projection) with an optional key-padding mask (True = real token), or unpadded
  ``[total, heads, head_dim]`` with ``cu_seqlens`` [B+1] (int32) and ``max_seqlen``. The same token
  gets the same dropout bits in both layouts when ``max_seqlen`` equals the padded length.
* ``recompute_output`` (DeepSpeed's ``attn_dropout_checkpoint``): keep only q, k, v for the
  backward and recompute the output and log-sum-exp there, instead of keeping them.
* Tiles: :func:`default_blocks` per head size and dtype; a table of tuned ones for this GPU
  (``scripts/tune_attention.py``) is read from ``$KERNELS_TRITON_ATTENTION_BLOCKS`` when set,
  per head size, dtype and the sequence length's power of two.

Run its tests on a CPU: ``TRITON_INTERPRET=1 pytest tests/test_triton_attention.py``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn

from kernels_triton.utils import (
    cdiv,
    check_tensors,
    dropout_seed,
    interpreter_tiles,
    next_power_of_2,
    require_seed,
    seed_tensor,
)

LOG2E = 1.4426950408889634


@triton.jit
def _dropout_keep(seed, bh, rows, cols, max_seqlen, dropout_p):
    # (batch, head) goes into the high word of Philox's 64-bit key, so the int32 counters
    # (row * max_seqlen + col) of different heads never share a stream.
    key = seed + bh.to(tl.int64) * 4294967296
    return tl.rand(key, rows[:, None] * max_seqlen + cols[None, :]) > dropout_p


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE, MASK, CU_SEQLENS,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
    stride_mb, stride_lb, stride_lh,
    nheads, max_seqlen, qk_scale, dropout_p, SEED,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    if IS_VARLEN:
        seq_start = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - seq_start
    else:
        seq_start = 0
        seqlen = max_seqlen
    if pid_m * BLOCK_M >= seqlen:
        return
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen
    d_ok = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    tile_mask = row_ok[:, None] & d_ok[None, :]
    q_rows = Q + b64 * stride_qb + h * stride_qh + (seq_start + rows)[:, None] * stride_qs
    q = tl.load(q_rows + offs_d[None, :], mask=tile_mask, other=0.0)
    k_base = K + b64 * stride_kb + h * stride_kh + seq_start * stride_ks
    v_base = V + b64 * stride_vb + h * stride_vh + seq_start * stride_vs

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n
        in_seq = cols < seqlen
        key_ok = in_seq
        if HAS_MASK:
            key_ok = key_ok & (tl.load(MASK + b64 * stride_mb + cols, mask=in_seq, other=0) != 0)
        kv_mask = in_seq[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: avoid inf - inf
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts dropped probabilities too
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, rows, cols, max_seqlen, dropout_p), p, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # A row whose keys are all masked gets output 0 and lse = +inf (so its backward p is 0).
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out / (1.0 - dropout_p)
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_safe))
    o_rows = Out + b64 * stride_ob + h * stride_oh + (seq_start + rows)[:, None] * stride_os
    tl.store(o_rows + offs_d[None, :], out.to(Out.dtype.element_ty), mask=tile_mask)
    tl.store(LSE + b64 * stride_lb + h * stride_lh + seq_start + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, DELTA, CU_SEQLENS,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_lb, stride_lh,
    nheads, max_seqlen,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    if IS_VARLEN:
        seq_start = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - seq_start
    else:
        seq_start = 0
        seqlen = max_seqlen
    if pid_m * BLOCK_M >= seqlen:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
    b64 = b.to(tl.int64)
    o_rows = Out + b64 * stride_ob + h * stride_oh + (seq_start + rows)[:, None] * stride_os
    do_rows = DO + b64 * stride_dob + h * stride_doh + (seq_start + rows)[:, None] * stride_dos
    o = tl.load(o_rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + seq_start + rows, delta, mask=rows < seqlen)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, MASK, CU_SEQLENS, DQ, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_mb, stride_lb, stride_lh,
    nheads, max_seqlen, sm_scale, qk_scale, dropout_p, SEED,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DQ_PASS: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """DQ_PASS=False: one program per key block, dK and dV over all query blocks (plus dQ by fp32
    atomics when ATOMIC_DQ). DQ_PASS=True: one program per query block, dQ over all key blocks."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    if IS_VARLEN:
        seq_start = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - seq_start
    else:
        seq_start = 0
        seqlen = max_seqlen
    fixed = BLOCK_M if DQ_PASS else BLOCK_N
    if pid * fixed >= seqlen:
        return
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_base = Q + b64 * stride_qb + h * stride_qh + seq_start * stride_qs
    k_base = K + b64 * stride_kb + h * stride_kh + seq_start * stride_ks
    v_base = V + b64 * stride_vb + h * stride_vh + seq_start * stride_vs
    do_base = DO + b64 * stride_dob + h * stride_doh + seq_start * stride_dos
    lse_base = LSE + b64 * stride_lb + h * stride_lh + seq_start
    delta_base = DELTA + b64 * stride_lb + h * stride_lh + seq_start
    dq_base = DQ + b64 * stride_dqb + h * stride_dqh + seq_start * stride_dqs
    inv_keep = 1.0 / (1.0 - dropout_p)

    if DQ_PASS:
        rows = pid * BLOCK_M + offs_m
        row_ok = rows < seqlen
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, seqlen, BLOCK_N):
            cols = start_n + offs_n
            in_seq = cols < seqlen
            key_ok = in_seq
            if HAS_MASK:
                key_ok = key_ok & (tl.load(MASK + b64 * stride_mb + cols, mask=in_seq, other=0) != 0)
            kv_mask = in_seq[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.where(key_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                dp = tl.where(_dropout_keep(seed, bh, rows, cols, max_seqlen, dropout_p), dp * inv_keep, 0.0)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        dq = (dq * sm_scale).to(DQ.dtype.element_ty)
        tl.store(dq_base + rows[:, None] * stride_dqs + offs_d[None, :], dq, mask=q_mask)
    else:
        cols = pid * BLOCK_N + offs_n
        in_seq = cols < seqlen
        key_ok = in_seq
        if HAS_MASK:
            key_ok = key_ok & (tl.load(MASK + b64 * stride_mb + cols, mask=in_seq, other=0) != 0)
        kv_mask = in_seq[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, seqlen, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < seqlen
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.where(key_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, bh, rows, cols, max_seqlen, dropout_p)
                p_kept = tl.where(keep, p * inv_keep, 0.0)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            else:
                p_kept = p
            dv = tl.dot(tl.trans(p_kept.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
            if ATOMIC_DQ:
                dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * sm_scale
                tl.atomic_add(dq_base + rows[:, None] * stride_dqs + offs_d[None, :], dq, mask=q_mask)
        dk_base = DK + b64 * stride_dkb + h * stride_dkh + seq_start * stride_dks
        dv_base = DV + b64 * stride_dvb + h * stride_dvh + seq_start * stride_dvs
        dk = (dk * sm_scale).to(DK.dtype.element_ty)
        tl.store(dk_base + cols[:, None] * stride_dks + offs_d[None, :], dk, mask=kv_mask)
        dv = dv.to(DV.dtype.element_ty)
        tl.store(dv_base + cols[:, None] * stride_dvs + offs_d[None, :], dv, mask=kv_mask)


@triton.jit
def _dropout_mask_kernel(OUT, SEED, max_seqlen, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    seed = tl.load(SEED)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, max_seqlen, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, bh, rows, cols, max_seqlen, dropout_p)
        out = OUT + bh.to(tl.int64) * max_seqlen * max_seqlen + rows[:, None] * max_seqlen + cols[None, :]
        tl.store(out, keep.to(tl.int8), mask=(rows < max_seqlen)[:, None] & (cols < max_seqlen)[None, :])


# ----------------------------------------------------------------------------- launchers

BLOCKS_ENV = "KERNELS_TRITON_ATTENTION_BLOCKS"
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def default_blocks(head_dim: int, dtype: torch.dtype) -> dict[str, tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel. Small blocks under the interpreter so
    a 33-token test crosses a block border; on a GPU, sizes after the Triton fused-attention tutorial."""
    if interpreter_tiles():
        return {"fwd": (32, 32, 1, 1), "dkdv": (32, 32, 1, 1), "dq": (32, 32, 1, 1)}
    stages = 2 if dtype == torch.float32 or head_dim > 64 else 3
    if head_dim <= 64:
        return {"fwd": (128, 64, 4, stages), "dkdv": (32, 128, 4, stages), "dq": (128, 32, 4, stages)}
    return {"fwd": (128, 64, 8, stages), "dkdv": (32, 64, 4, stages), "dq": (64, 32, 4, stages)}


def blocks_key(head_dim: int, dtype: torch.dtype, max_seqlen: int) -> str:
    """The key of a tuned-blocks table: head size, dtype and the sequence length's power of two."""
    return f"{head_dim},{DTYPE_NAMES.get(dtype, str(dtype))},{next_power_of_2(max(1, max_seqlen))}"


@functools.cache
def tuned_blocks(path: str | None) -> dict[str, dict[str, tuple[int, int, int, int]]]:
    """The table ``scripts/tune_attention.py`` writes: ``{key: {kernel: [BLOCK_M, BLOCK_N, warps,
    stages]}}`` (keys from :func:`blocks_key`)."""
    if not path:
        return {}
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{BLOCKS_ENV}={path}: cannot read a tuned-blocks table: {e}") from e
    return {key: {kernel: tuple(int(x) for x in blocks) for kernel, blocks in kernels.items()}
            for key, kernels in table.items()}


def _blocks(head_dim: int, dtype: torch.dtype, max_seqlen: int = 0) -> dict[str, tuple[int, int, int, int]]:
    """The blocks a launch uses: the defaults, with what a tuned table (``$KERNELS_TRITON_ATTENTION_BLOCKS``,
    written by ``scripts/tune_attention.py`` on the GPU itself) has for this shape laid over them."""
    blocks = default_blocks(head_dim, dtype)
    if interpreter_tiles():
        return blocks
    return blocks | tuned_blocks(os.environ.get(BLOCKS_ENV)).get(blocks_key(head_dim, dtype, max_seqlen), {})


class _Layout:
    """Shapes and strides of one call: padded [B, S, H, D] or unpadded [total, H, D] + cu_seqlens."""

    def __init__(self, q: torch.Tensor, key_padding_mask, cu_seqlens, max_seqlen):
        self.varlen = cu_seqlens is not None
        self.nheads, self.head_dim = q.shape[-2], q.shape[-1]
        if self.varlen:
            if q.dim() != 3 or cu_seqlens.dtype != torch.int32:
                raise ValueError("varlen attention takes q, k, v [total, heads, head_dim], int32 cu_seqlens")
            self.batch, self.max_seqlen = cu_seqlens.numel() - 1, int(max_seqlen)
        else:
            if q.dim() != 4:
                raise ValueError(f"attention takes q, k, v [batch, seq, heads, head_dim]: {tuple(q.shape)}")
            self.batch, self.max_seqlen = q.shape[0], q.shape[1]
        mask = key_padding_mask
        self.mask = None if mask is None else mask.to(torch.bool).contiguous().view(torch.uint8)
        self.cu_seqlens = cu_seqlens

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        return (0, t.stride(0), t.stride(1)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def new_rowstat(self, like: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """An fp32 per-(head, row) buffer (lse, delta) and its (batch, head) strides."""
        if self.varlen:
            total = like.shape[0]
            return torch.empty(self.nheads, total, device=like.device, dtype=torch.float32), 0, total
        s = self.max_seqlen
        buf = torch.empty(self.batch, self.nheads, s, device=like.device, dtype=torch.float32)
        return buf, self.nheads * s, s

    def common(self, q: torch.Tensor, dropout_p: float):
        dummy = q
        block_d = max(16, next_power_of_2(self.head_dim))
        flags = dict(HEAD_DIM=self.head_dim, BLOCK_D=block_d, IS_VARLEN=self.varlen,
                     HAS_MASK=self.mask is not None, HAS_DROPOUT=dropout_p > 0.0,
                     DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        mask = self.mask if self.mask is not None else dummy
        cu = self.cu_seqlens if self.varlen else dummy
        stride_mb = self.mask.stride(0) if self.mask is not None else 0
        return mask, cu, stride_mb, flags


def _forward(layout: _Layout, q, k, v, scale: float, dropout_p: float, seed: Optional[Tensor]):  # noqa: UP045
    require_seed(dropout_p, seed)
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse, stride_lb, stride_lh = layout.new_rowstat(q)
    mask, cu, stride_mb, flags = layout.common(q, dropout_p)
    block_m, block_n, warps, stages = _blocks(layout.head_dim, q.dtype, layout.max_seqlen)["fwd"]
    grid = (cdiv(layout.max_seqlen, block_m), layout.batch * layout.nheads)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, mask, cu,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(o),
        stride_mb, stride_lb, stride_lh,
        layout.nheads, layout.max_seqlen, scale * LOG2E, dropout_p, q if seed is None else seed,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **flags,
    )
    return o, lse


def _backward(layout: _Layout, do, q, k, v, o, lse, dq, dk, dv, scale, dropout_p, seed, deterministic):
    """Writes the gradients into dq, dk, dv (which may be views of one packed buffer)."""
    require_seed(dropout_p, seed)
    delta, stride_lb, stride_lh = layout.new_rowstat(q)
    mask, cu, stride_mb, flags = layout.common(q, dropout_p)
    blocks = _blocks(layout.head_dim, q.dtype, layout.max_seqlen)
    bh = layout.batch * layout.nheads
    pre_m = blocks["dq"][0]
    _attn_bwd_preprocess_kernel[(cdiv(layout.max_seqlen, pre_m), bh)](
        o, do, delta, cu, *layout.strides(o), *layout.strides(do), stride_lb, stride_lh,
        layout.nheads, layout.max_seqlen,
        HEAD_DIM=layout.head_dim, BLOCK_M=pre_m, BLOCK_D=flags["BLOCK_D"], IS_VARLEN=layout.varlen,
    )
    dq_target = dq if deterministic else torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    args = (q, k, v, do, lse, delta, mask, cu, dq_target, dk, dv,
            *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(do),
            *layout.strides(dq_target), *layout.strides(dk), *layout.strides(dv),
            stride_mb, stride_lb, stride_lh,
            layout.nheads, layout.max_seqlen, scale, scale * LOG2E, dropout_p, q if seed is None else seed)
    block_m, block_n, warps, stages = blocks["dkdv"]
    _attn_bwd_kernel[(cdiv(layout.max_seqlen, block_n), bh)](
        *args, BLOCK_M=block_m, BLOCK_N=block_n, DQ_PASS=False, ATOMIC_DQ=not deterministic,
        num_warps=warps, num_stages=stages, **flags)
    if deterministic:
        block_m, block_n, warps, stages = blocks["dq"]
        _attn_bwd_kernel[(cdiv(layout.max_seqlen, block_m), bh)](
            *args, BLOCK_M=block_m, BLOCK_N=block_n, DQ_PASS=True, ATOMIC_DQ=False,
            num_warps=warps, num_stages=stages, **flags)
    else:
        dq.copy_(dq_target)


def _attention_forward(q_or_qkv, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    """(output, log-sum-exp) of (q, k, v) or of a packed (qkv, None, None)."""
    check_tensors(q_or_qkv, k, v, key_padding_mask, cu_seqlens, seed)
    q, k_, v_ = q_or_qkv.unbind(-3) if k is None else (q_or_qkv, k, v)
    layout = _Layout(q, key_padding_mask, cu_seqlens, max_seqlen)
    return _forward(layout, q, k_, v_, scale, dropout_p, seed)


def _attention_backward(do, q_or_qkv, k, v, key_padding_mask, cu_seqlens, o, lse, max_seqlen, dropout_p,
                        scale, seed, deterministic):
    """The input gradients: one packed dqkv for a packed qkv (k None), else (dq, dk, dv). o and lse
    None: recomputed here (``recompute_output``)."""
    do = do.contiguous()
    packed = k is None
    q, k, v = q_or_qkv.unbind(-3) if packed else (q_or_qkv, k, v)
    layout = _Layout(q, key_padding_mask, cu_seqlens, max_seqlen)
    if o is None:
        o, lse = _forward(layout, q, k, v, scale, dropout_p, seed)
    grads = (torch.empty_like(q_or_qkv),) if packed else tuple(torch.empty_like(t) for t in (q, k, v))
    dq, dk, dv = grads[0].unbind(-3) if packed else grads
    _backward(layout, do, q, k, v, o, lse, dq, dk, dv, scale, dropout_p, seed, deterministic)
    return grads


class FlashAttentionFunction(torch.autograd.Function):
    """(q, k, v) or (qkv, None, None) -> attention output; see the module docstring. A packed qkv
    [B, S, 3, heads, head_dim] or [total, 3, heads, head_dim] (a view of one fused projection) gets
    one packed gradient, written in place by the kernels: no scatter of three gradients."""

    @staticmethod
    def forward(ctx, q_or_qkv, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed,
                recompute_output, deterministic):
        o, lse = _attention_forward(q_or_qkv, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p,
                                    scale, seed)
        kept = (None, None) if recompute_output else (o, lse)
        ctx.save_for_backward(q_or_qkv, k, v, key_padding_mask, cu_seqlens, *kept)
        ctx.options = (max_seqlen, dropout_p, scale, seed, deterministic)
        return o

    @staticmethod
    def backward(ctx, do):
        q_or_qkv, k, v, key_padding_mask, cu_seqlens, o, lse = ctx.saved_tensors
        max_seqlen, dropout_p, scale, seed, deterministic = ctx.options
        grads = _attention_backward(do, q_or_qkv, k, v, key_padding_mask, cu_seqlens, o, lse, max_seqlen,
                                    dropout_p, scale, seed, deterministic)
        return *grads, *(None,) * (10 if k is None else 8)


# --------------------------------------------------------------------- torch.compile: custom ops
# Inside a torch.compile graph the attention is a pair of custom ops (forward, backward) that the
# graph calls as they are, so the whole model is one graph (no break per layer) and the Triton
# launches stay out of Dynamo's tracing. Eager calls take FlashAttentionFunction, which costs less
# per call; both run the same launchers.


@torch.library.custom_op("kernels_triton::flash_attention", mutates_args=())
def _attention_op(q_or_qkv: Tensor, k: Optional[Tensor], v: Optional[Tensor],  # noqa: UP045
                  key_padding_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],  # noqa: UP045
                  max_seqlen: int, dropout_p: float, scale: float, seed: Optional[Tensor],  # noqa: UP045
                  recompute_output: bool, deterministic: bool) -> tuple[Tensor, Tensor]:
    return _attention_forward(q_or_qkv, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale,
                              seed)


@_attention_op.register_fake
def _(q_or_qkv, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed, recompute_output,
      deterministic):
    q = q_or_qkv.select(-3, 0) if k is None else q_or_qkv
    nheads = q.shape[-2]
    if cu_seqlens is not None:
        lse = q.new_empty((nheads, q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], nheads, q.shape[1]), dtype=torch.float32)
    return q.new_empty(q.shape), lse


@torch.library.custom_op("kernels_triton::flash_attention_backward", mutates_args=())
def _attention_backward_op(do: Tensor, q_or_qkv: Tensor, k: Optional[Tensor], v: Optional[Tensor],  # noqa: UP045
                           key_padding_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],  # noqa: UP045
                           o: Optional[Tensor], lse: Optional[Tensor], max_seqlen: int,  # noqa: UP045
                           dropout_p: float, scale: float, seed: Optional[Tensor],  # noqa: UP045
                           deterministic: bool) -> list[Tensor]:
    return list(_attention_backward(do, q_or_qkv, k, v, key_padding_mask, cu_seqlens, o, lse, max_seqlen,
                                    dropout_p, scale, seed, deterministic))


@_attention_backward_op.register_fake
def _(do, q_or_qkv, k, v, *args):
    if k is None:
        return [torch.empty_like(q_or_qkv)]
    return [torch.empty_like(t) for t in (q_or_qkv, k, v)]


def _attention_setup_context(ctx, inputs, output):
    q_or_qkv, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed, recompute, det = inputs
    kept = (None, None) if recompute else output
    ctx.save_for_backward(q_or_qkv, k, v, key_padding_mask, cu_seqlens, seed, *kept)
    ctx.options = (max_seqlen, dropout_p, scale, det)


def _attention_op_backward(ctx, do, dlse):
    q_or_qkv, k, v, key_padding_mask, cu_seqlens, seed, o, lse = ctx.saved_tensors
    max_seqlen, dropout_p, scale, deterministic = ctx.options
    grads = _attention_backward_op(do, q_or_qkv, k, v, key_padding_mask, cu_seqlens, o, lse, max_seqlen,
                                   dropout_p, scale, seed, deterministic)
    if k is None:
        grads = [grads[0], None, None]
    return *grads, *(None,) * 8


_attention_op.register_autograd(_attention_op_backward, setup_context=_attention_setup_context)


def _attention(q_or_qkv, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed,
               recompute_output, deterministic):
    """The one entry of the public functions: eager, or the custom op inside a torch.compile graph."""
    head_dim = q_or_qkv.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    seed = dropout_seed(dropout_p, seed, q_or_qkv.device)
    if torch.compiler.is_compiling():
        o, _ = _attention_op(q_or_qkv, k, v, key_padding_mask, cu_seqlens, max_seqlen or 0, float(dropout_p),
                             scale, seed, recompute_output, deterministic)
        return o
    return FlashAttentionFunction.apply(q_or_qkv, k, v, key_padding_mask, cu_seqlens, max_seqlen,
                                        float(dropout_p), scale, seed, recompute_output, deterministic)


def flash_attention(q, k, v, key_padding_mask=None, dropout_p=0.0, softmax_scale=None, seed=None,
                    recompute_output=False, deterministic=True):
    """Attention of q, k, v [B, S, heads, head_dim]; key_padding_mask bool [B, S], True = real key.
    ``seed`` (an int, or a one-integer tensor) fixes the dropout mask (default: drawn from torch's
    generator of the inputs' device, on the device)."""
    return _attention(q, k, v, key_padding_mask, None, None, dropout_p, softmax_scale, seed,
                      recompute_output, deterministic)


def flash_attention_qkvpacked(qkv, key_padding_mask=None, dropout_p=0.0, softmax_scale=None, seed=None,
                              recompute_output=False, deterministic=True):
    """Attention of qkv [B, S, 3, heads, head_dim] (a view of one fused QKV projection)."""
    return _attention(qkv, None, None, key_padding_mask, None, None, dropout_p, softmax_scale, seed,
                      recompute_output, deterministic)


def flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, seed=None,
                           recompute_output=False, deterministic=True):
    """Attention of unpadded q, k, v [total, heads, head_dim]; sequence i is the tokens
    ``cu_seqlens[i]:cu_seqlens[i+1]`` (int32, [B+1]), none longer than ``max_seqlen``."""
    return _attention(q, k, v, None, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed,
                      recompute_output, deterministic)


def flash_attention_varlen_qkvpacked(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     seed=None, recompute_output=False, deterministic=True):
    """Attention of unpadded qkv [total, 3, heads, head_dim] (a view of one fused QKV projection
    of packed tokens); ``cu_seqlens`` and ``max_seqlen`` as :func:`flash_attention_varlen`."""
    return _attention(qkv, None, None, None, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed,
                      recompute_output, deterministic)


def attention_dropout_mask(seed: int | Tensor, batch: int, nheads: int, seqlen: int, dropout_p: float,
                           device: torch.device | str) -> torch.Tensor:
    """The keep-mask bool [B, heads, S, S] the kernels use for ``seed`` (for tests: replay it in
    :func:`attention_ref`). For varlen calls, pass ``max_seqlen`` as ``seqlen``."""
    out = torch.empty(batch, nheads, seqlen, seqlen, device=device, dtype=torch.int8)
    check_tensors(out)
    block = 32 if interpreter_tiles() else 64
    _dropout_mask_kernel[(cdiv(seqlen, block), batch * nheads)](
        out, seed_tensor(seed, device), seqlen, float(dropout_p), BLOCK_M=block, BLOCK_N=block)
    return out.bool()


def attention_ref(q, k, v, key_padding_mask=None, dropout_p=0.0, dropout_mask=None, softmax_scale=None):
    """Plain PyTorch attention over [B, S, heads, head_dim] in the inputs' dtype; with
    ``dropout_mask`` (bool [B, heads, S, S], True = keep) the dropout is replayed exactly."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        if dropout_mask is None:
            probs = F.dropout(probs, dropout_p)
        else:
            probs = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


class FlashSelfAttention(nn.Module):
    """Self-attention core over a packed QKV projection (no parameters)."""

    def __init__(self, dropout_p: float = 0.0, recompute_output: bool = False, deterministic: bool = True):
        super().__init__()
        self.dropout_p, self.recompute_output, self.deterministic = dropout_p, recompute_output, deterministic

    def forward(self, qkv: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.dropout_p if self.training else 0.0
        return flash_attention_qkvpacked(qkv, key_padding_mask, p, recompute_output=self.recompute_output,
                                         deterministic=self.deterministic)
