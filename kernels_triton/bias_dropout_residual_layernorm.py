"""Bias + dropout + residual + LayerNorm, forward and backward, for both BERT layer orders.

One kernel pair, specialised by constexpr flags, covers the four uses in a layer:

* post-LN sub-block end: ``y = LN(residual + dropout(x + bias))``;
* pre-LN attention end with the FFN's LayerNorm fused: ``z = residual + dropout(x + bias)``,
  ``y = LN(z)``, both returned (``return_sum=True``);
* pre-LN FFN end: ``z = residual + dropout(x + bias)`` (:func:`bias_dropout_residual`; the next
  LayerNorm belongs to the next layer);
* a plain LayerNorm (:func:`layer_norm`, the pre-LN attention input).

Rows are normalised over the last dimension in fp32, each output cast once at store. Dropout is
Philox keyed by ``seed`` with the element's flat index as counter (:func:`row_dropout_mask`
materialises it for tests). Column reductions (dgamma, dbeta, dbias) are per-program fp32 partials
summed in a fixed order, or fp32 atomics with ``deterministic=False`` (``stochastic_mode``).

``invertible=True`` is DeepSpeed's ``normalize_invertible``: the backward keeps only the LayerNorm
output ``y`` (which the next projection keeps anyway), gamma, beta and rstd, and recovers
``x_hat = (y - beta) / gamma``; without it the LayerNorm input and the mean are kept. The recovery
needs every gamma to be non-zero (a zero gamma gives inf/nan gradients) and is as exact as ``y``'s
dtype.

Run its tests on a CPU: ``TRITON_INTERPRET=1 pytest tests/test_triton_layernorm.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from kernels_triton.utils import (
    check_tensors,
    finish_column_sum,
    new_seed,
    reduction_programs,
    row_dropout_keep,
    row_tile,
)


@triton.jit
def _fwd_kernel(
    X, BIAS, RES, W, B, Z, Y, MEAN, RSTD,
    M, N, stride_x, stride_res, stride_z, stride_y, eps, dropout_p, seed,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_LN: tl.constexpr, STORE_SUM: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(RES + rows64[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_DROPOUT:
            x = tl.where(row_dropout_keep(seed, rows, cols, N, dropout_p), x * (1.0 / (1.0 - dropout_p)), 0.0)
        z += x
    if STORE_SUM:
        tl.store(Z + rows64[:, None] * stride_z + cols[None, :], z.to(Z.dtype.element_ty), mask=mask)
    if HAS_LN:
        mean = tl.sum(z, 1) / N
        diff = tl.where(mask, z - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / N + eps)
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = diff * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _bwd_kernel(
    DY, DZ, SAVED, W, B, MEAN, RSTD, DRES, DX, DW, DB, DBIAS,
    M, N, rows_per_program, stride_dy, stride_dz, stride_saved, stride_dres, stride_dx, dropout_p, seed,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_LN: tl.constexpr, HAS_DZ: tl.constexpr, INVERTIBLE: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Each program walks one chunk of rows; SAVED is the LayerNorm output (INVERTIBLE) or input."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_LN:
        w = tl.load(W + cols, mask=col_ok, other=1.0).to(tl.float32)
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_N], tl.float32)
    acc_db = tl.zeros([BLOCK_N], tl.float32)
    acc_dbias = tl.zeros([BLOCK_N], tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, ROWS):
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        dz = tl.zeros([ROWS, BLOCK_N], tl.float32)
        if HAS_LN:
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
            dy = dy.to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            saved = tl.load(SAVED + rows64[:, None] * stride_saved + cols[None, :], mask=mask, other=0.0)
            if INVERTIBLE:
                x_hat = (saved.to(tl.float32) - b[None, :]) / w[None, :]
            else:
                mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
                x_hat = (saved.to(tl.float32) - mean[:, None]) * rstd[:, None]
            x_hat = tl.where(mask, x_hat, 0.0)
            g = dy * w[None, :]
            c1 = tl.sum(x_hat * g, 1) / N
            c2 = tl.sum(g, 1) / N
            dz = tl.where(mask, (g - x_hat * c1[:, None] - c2[:, None]) * rstd[:, None], 0.0)
            acc_dw += tl.sum(dy * x_hat, 0)
            acc_db += tl.sum(dy, 0)
        if HAS_DZ:
            dz_in = tl.load(DZ + rows64[:, None] * stride_dz + cols[None, :], mask=mask, other=0.0)
            dz += dz_in.to(tl.float32)
        if HAS_LN:  # without a LayerNorm the residual's gradient is DZ itself: nothing to write
            dres = dz.to(DRES.dtype.element_ty)
            tl.store(DRES + rows64[:, None] * stride_dres + cols[None, :], dres, mask=mask)
        if HAS_BRANCH:
            dx = dz
            if HAS_DROPOUT:
                keep = row_dropout_keep(seed, rows, cols, N, dropout_p)
                dx = tl.where(keep, dz * (1.0 / (1.0 - dropout_p)), 0.0)
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            acc_dbias += tl.sum(dx, 0)
    if ATOMIC:
        if HAS_LN:
            tl.atomic_add(DW + cols, acc_dw, mask=col_ok)
            tl.atomic_add(DB + cols, acc_db, mask=col_ok)
        if HAS_BRANCH:
            tl.atomic_add(DBIAS + cols, acc_dbias, mask=col_ok)
    else:
        if HAS_LN:
            tl.store(DW + pid * N + cols, acc_dw, mask=col_ok)
            tl.store(DB + pid * N + cols, acc_db, mask=col_ok)
        if HAS_BRANCH:
            tl.store(DBIAS + pid * N + cols, acc_dbias, mask=col_ok)


@triton.jit
def _dropout_mask_kernel(OUT, M, N, dropout_p, seed, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    keep = row_dropout_keep(seed, rows, cols, N, dropout_p)
    tl.store(OUT + rows.to(tl.int64)[:, None] * N + cols[None, :], keep.to(tl.int8),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


# ----------------------------------------------------------------------------- launchers


class BiasDropoutResidualLayerNormFunction(torch.autograd.Function):
    """Returns y, (z, y) with return_sum, or z when weight is None (no LayerNorm). x and bias may
    both be None (plain LayerNorm of ``residual``)."""

    @staticmethod
    def forward(ctx, x, bias, residual, weight, ln_bias, eps, dropout_p, seed, return_sum, invertible,
                deterministic, out_dtype):
        check_tensors(x, bias, residual, weight, ln_bias)
        has_branch, has_ln = x is not None, weight is not None
        n = residual.shape[-1]
        res2 = residual.reshape(-1, n)
        x2 = x.reshape(-1, n) if has_branch else None
        m = res2.shape[0]
        store_sum = not has_ln or return_sum or not invertible
        z = torch.empty_like(res2) if store_sum else None
        y = torch.empty(m, n, device=res2.device, dtype=out_dtype) if has_ln else None
        mean, rstd = (torch.empty(m, device=res2.device, dtype=torch.float32) for _ in range(2))
        ptrs = [t if t is not None else res2 for t in (x2, bias, res2, weight, ln_bias, z, y, mean, rstd)]
        block_n, rows, warps = row_tile(n)
        _fwd_kernel[(triton.cdiv(m, rows),)](
            *ptrs,
            m, n, ptrs[0].stride(0), res2.stride(0), n, n, float(eps), dropout_p, seed,
            ROWS=rows, BLOCK_N=block_n, HAS_BRANCH=has_branch, HAS_DROPOUT=has_branch and dropout_p > 0.0,
            HAS_LN=has_ln, STORE_SUM=store_sum, num_warps=warps,
        )
        saved = None if not has_ln else (y if invertible else z)
        ctx.save_for_backward(saved, weight, ln_bias if invertible else None,
                              mean if has_ln and not invertible else None, rstd if has_ln else None)
        ctx.options = (has_branch, has_ln, return_sum, invertible, deterministic, dropout_p, seed,
                       None if x is None else x.dtype, None if bias is None else bias.dtype, residual.dtype)
        z = None if z is None else z.view(residual.shape)
        y = None if y is None else y.view(residual.shape)
        if has_ln:
            return (z, y) if return_sum else y
        return z

    @staticmethod
    def backward(ctx, *grads):
        saved, weight, ln_bias, mean, rstd = ctx.saved_tensors
        has_branch, has_ln, return_sum, invertible, deterministic, p, seed, x_dtype, bias_dtype, res_dtype = \
            ctx.options
        if has_ln:
            dz_in, dy = grads if return_sum else (None, grads[0])
        else:
            dz_in, dy = grads[0], None
        n = saved.shape[-1] if has_ln else dz_in.shape[-1]
        shape = (dy if has_ln else dz_in).shape
        dy2 = dy.contiguous().view(-1, n) if has_ln else None
        dz2 = dz_in.contiguous().view(-1, n) if dz_in is not None else None
        m = (dy2 if has_ln else dz2).shape[0]
        device = (dy2 if has_ln else dz2).device
        block_n, rows, warps = row_tile(n)
        programs = reduction_programs(m, rows, device)
        rows_per_program = triton.cdiv(triton.cdiv(m, programs), rows) * rows
        programs = triton.cdiv(m, rows_per_program)
        partial_shape = (n,) if not deterministic else (programs, n)

        def partial() -> torch.Tensor:
            return torch.zeros(partial_shape, device=device, dtype=torch.float32)

        dres = torch.empty(m, n, device=device, dtype=res_dtype) if has_ln else dz2
        dx = torch.empty(m, n, device=device, dtype=x_dtype) if has_branch else None
        dw, db = (partial(), partial()) if has_ln else (None, None)
        dbias = partial() if has_branch else None
        ptrs = [t if t is not None else dres for t in (dy2, dz2, saved, weight, ln_bias, mean, rstd, dres, dx,
                                                        dw, db, dbias)]
        _bwd_kernel[(programs,)](
            *ptrs,
            m, n, rows_per_program, n, n, n, n, n, p, seed,
            ROWS=rows, BLOCK_N=block_n, HAS_BRANCH=has_branch, HAS_DROPOUT=has_branch and p > 0.0,
            HAS_LN=has_ln, HAS_DZ=dz2 is not None, INVERTIBLE=invertible, ATOMIC=not deterministic,
            num_warps=warps,
        )
        grad_x = dx.view(shape) if has_branch else None
        grad_bias = finish_column_sum(dbias, bias_dtype) if has_branch else None
        grad_w = finish_column_sum(dw, weight.dtype) if has_ln else None
        grad_b = finish_column_sum(db, weight.dtype) if has_ln else None
        return (grad_x, grad_bias, dres.view(shape), grad_w, grad_b,
                None, None, None, None, None, None, None)


def _seed(dropout_p: float, seed: int | None) -> tuple[float, int]:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p), (new_seed() if seed is None and dropout_p > 0 else int(seed or 0))


def bias_dropout_residual_layernorm(x, bias, residual, weight, ln_bias, eps=1e-12, dropout_p=0.0, *,
                                    seed=None, return_sum=False, invertible=False, deterministic=True,
                                    out_dtype=None):
    """``LN(residual + dropout(x + bias))`` over the last dimension; with ``return_sum`` also the
    sum itself (``(z, y)``, pre-LN). y has ``out_dtype`` (default x's dtype), z residual's dtype."""
    p, seed = _seed(dropout_p, seed)
    return BiasDropoutResidualLayerNormFunction.apply(
        x, bias, residual, weight, ln_bias, eps, p, seed, return_sum, invertible, deterministic,
        out_dtype or x.dtype)


def bias_dropout_residual(x, bias, residual, dropout_p=0.0, *, seed=None, deterministic=True):
    """``residual + dropout(x + bias)`` in residual's dtype (the pre-LN FFN end)."""
    p, seed = _seed(dropout_p, seed)
    return BiasDropoutResidualLayerNormFunction.apply(
        x, bias, residual, None, None, 0.0, p, seed, False, False, deterministic, None)


def layer_norm(x, weight, bias, eps=1e-12, *, invertible=False, deterministic=True, out_dtype=None):
    """LayerNorm over the last dimension; output in ``out_dtype`` (default x's dtype)."""
    return BiasDropoutResidualLayerNormFunction.apply(
        None, None, x, weight, bias, eps, 0.0, 0, False, invertible, deterministic, out_dtype or x.dtype)


def row_dropout_mask(seed: int, rows: int, cols: int, dropout_p: float, device) -> torch.Tensor:
    """The keep-mask bool [rows, cols] these kernels use for ``seed`` on a [rows, cols] input."""
    out = torch.empty(rows, cols, device=device, dtype=torch.int8)
    check_tensors(out)
    block_n, tile_rows, _ = row_tile(cols)
    _dropout_mask_kernel[(triton.cdiv(rows, tile_rows),)](out, rows, cols, float(dropout_p), seed,
                                                          ROWS=tile_rows, BLOCK_N=block_n)
    return out.bool()


def _dropout_ref(t: torch.Tensor, dropout_p: float, dropout_mask: torch.Tensor | None) -> torch.Tensor:
    if dropout_p == 0.0:
        return t
    if dropout_mask is None:
        return F.dropout(t, dropout_p)
    return t.masked_fill(~dropout_mask.view(t.shape), 0.0) / (1.0 - dropout_p)


def bias_dropout_residual_layernorm_ref(x, bias, residual, weight, ln_bias, eps=1e-12, dropout_p=0.0,
                                       dropout_mask=None, return_sum=False):
    """PyTorch reference; ``dropout_mask`` (bool, x's shape or [rows, cols]) replays the kernel's."""
    z = residual + _dropout_ref(x + bias, dropout_p, dropout_mask)
    y = F.layer_norm(z, z.shape[-1:], weight, ln_bias, eps)
    return (z, y) if return_sum else y


def bias_dropout_residual_ref(x, bias, residual, dropout_p=0.0, dropout_mask=None):
    return residual + _dropout_ref(x + bias, dropout_p, dropout_mask)


class BiasDropoutResidualLayerNorm(nn.Module):
    """``LN(residual + dropout(x + bias))`` with the LayerNorm's own gamma/beta (post-LN)."""

    def __init__(self, hidden: int, eps: float = 1e-12, dropout_p: float = 0.0, invertible: bool = False,
                 deterministic: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.eps, self.dropout_p = eps, dropout_p
        self.invertible, self.deterministic = invertible, deterministic

    def forward(self, x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return bias_dropout_residual_layernorm(
            x, bias, residual, self.weight, self.bias, self.eps, self.dropout_p if self.training else 0.0,
            invertible=self.invertible, deterministic=self.deterministic)
