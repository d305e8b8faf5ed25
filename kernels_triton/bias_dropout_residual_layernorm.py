"""Bias + dropout + residual + LayerNorm, forward and backward, for both BERT layer orders.

One kernel pair, specialised by constexpr flags, covers the four uses in a layer:

* post-LN sub-block end: ``y = LN(residual + dropout(x + bias))``;
* pre-LN attention end with the FFN's LayerNorm fused: ``z = residual + dropout(x + bias)``,
  ``y = LN(z)``, both returned (``return_sum=True``);
* pre-LN FFN end: ``z = residual + dropout(x + bias)`` (:func:`bias_dropout_residual`; the next
  LayerNorm belongs to the next layer);
* a plain LayerNorm (:func:`layer_norm`, the pre-LN attention input).

``branch_scale`` multiplies the branch after its dropout: ``residual + s * dropout(x + bias)``
(progressive layer dropping's 1 / keep probability; 1 otherwise).

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
    finish_column_sum,
    reduction_programs,
    require_seed,
    row_dropout_keep,
    row_tile,
    seed_tensor,
)


@triton.jit
def _fwd_kernel(
    X, BIAS, RES, W, B, Z, Y, MEAN, RSTD,
    M, N, stride_x, stride_res, stride_z, stride_y, eps, dropout_p, branch_scale, SEED,
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
            keep = row_dropout_keep(tl.load(SEED), rows, cols, N, dropout_p)
            x = tl.where(keep, x * (branch_scale / (1.0 - dropout_p)), 0.0)
        else:
            x = x * branch_scale
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
    M, N, rows_per_program, stride_dy, stride_dz, stride_saved, stride_dres, stride_dx, dropout_p,
    branch_scale, SEED,
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
    if HAS_DROPOUT:
        seed = tl.load(SEED)
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
            dx = dz * branch_scale
            if HAS_DROPOUT:
                keep = row_dropout_keep(seed, rows, cols, N, dropout_p)
                dx = tl.where(keep, dz * (branch_scale / (1.0 - dropout_p)), 0.0)
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
def _dropout_mask_kernel(OUT, M, N, dropout_p, SEED, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    keep = row_dropout_keep(tl.load(SEED), rows, cols, N, dropout_p)
    tl.store(OUT + rows.to(tl.int64)[:, None] * N + cols[None, :], keep.to(tl.int8),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


# ----------------------------------------------------------------------------- launchers


def _forward(x, bias, residual, weight, ln_bias, eps, dropout_p, seed, return_sum, invertible, out_dtype,
             branch_scale=1.0):
    """(z, y, mean, rstd): z (residual's shape) None when neither returned nor needed by the
    backward; y, and mean and rstd (fp32 per row), None without a LayerNorm."""
    check_tensors(x, bias, residual, weight, ln_bias, seed)
    has_branch, has_ln = x is not None, weight is not None
    require_seed(dropout_p if has_branch else 0.0, seed)
    n = residual.shape[-1]
    res2 = residual.reshape(-1, n)
    x2 = x.reshape(-1, n) if has_branch else None
    m = res2.shape[0]
    store_sum = not has_ln or return_sum or not invertible
    z = torch.empty_like(res2) if store_sum else None
    y = torch.empty(m, n, device=res2.device, dtype=out_dtype) if has_ln else None
    mean, rstd = (torch.empty(m, device=res2.device, dtype=torch.float32) if has_ln else None
                  for _ in range(2))
    ptrs = [t if t is not None else res2 for t in (x2, bias, res2, weight, ln_bias, z, y, mean, rstd)]
    block_n, rows, warps = row_tile(n)
    _fwd_kernel[(cdiv(m, rows),)](
        *ptrs,
        m, n, ptrs[0].stride(0), res2.stride(0), n, n, float(eps), dropout_p, float(branch_scale),
        res2 if seed is None else seed,
        ROWS=rows, BLOCK_N=block_n, HAS_BRANCH=has_branch, HAS_DROPOUT=has_branch and dropout_p > 0.0,
        HAS_LN=has_ln, STORE_SUM=store_sum, num_warps=warps,
    )
    z = None if z is None else z.view(residual.shape)
    y = None if y is None else y.view(residual.shape)
    return z, y, mean, rstd


def _kept(z, y, weight, ln_bias, mean, rstd, invertible):
    """What the backward keeps: (z or y, gamma, beta, mean, rstd), None where not needed."""
    has_ln = weight is not None
    saved = None if not has_ln else (y if invertible else z)
    return (saved, weight, ln_bias if invertible else None, mean if has_ln and not invertible else None,
            rstd if has_ln else None)


def _backward(dz_in, dy, saved, weight, ln_bias, mean, rstd, has_branch, invertible, deterministic, p, seed,
              x_dtype, bias_dtype, res_dtype, branch_scale=1.0):
    """(dx, dbias, dresidual, dgamma, dbeta), None where there is no such input. Without a LayerNorm
    dresidual is dz_in itself."""
    require_seed(p if has_branch else 0.0, seed)
    has_ln = weight is not None
    n = saved.shape[-1] if has_ln else dz_in.shape[-1]
    shape = (dy if has_ln else dz_in).shape
    dy2 = dy.contiguous().view(-1, n) if has_ln else None
    dz2 = dz_in.contiguous().view(-1, n) if dz_in is not None else None
    m = (dy2 if has_ln else dz2).shape[0]
    device = (dy2 if has_ln else dz2).device
    block_n, rows, warps = row_tile(n)
    programs = reduction_programs(m, rows, device)
    rows_per_program = cdiv(cdiv(m, programs), rows) * rows
    programs = cdiv(m, rows_per_program)
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
        m, n, rows_per_program, n, n, n, n, n, p, float(branch_scale), dres if seed is None else seed,
        ROWS=rows, BLOCK_N=block_n, HAS_BRANCH=has_branch, HAS_DROPOUT=has_branch and p > 0.0,
        HAS_LN=has_ln, HAS_DZ=dz2 is not None, INVERTIBLE=invertible, ATOMIC=not deterministic,
        num_warps=warps,
    )
    grad_x = dx.view(shape) if has_branch else None
    grad_bias = finish_column_sum(dbias, bias_dtype) if has_branch else None
    grad_w = finish_column_sum(dw, weight.dtype) if has_ln else None
    grad_b = finish_column_sum(db, weight.dtype) if has_ln else None
    return grad_x, grad_bias, dres.view(shape), grad_w, grad_b


def _outputs(z, y, has_ln, return_sum):
    if has_ln:
        return (z, y) if return_sum else y
    return z


def _incoming(grads, has_ln, return_sum):
    """(dz, dy) from the gradients of what the caller got (see :func:`_outputs`)."""
    if has_ln:
        return tuple(grads) if return_sum else (None, grads[0])
    return grads[0], None


class BiasDropoutResidualLayerNormFunction(torch.autograd.Function):
    """Returns y, (z, y) with return_sum, or z when weight is None (no LayerNorm). x and bias may
    both be None (plain LayerNorm of ``residual``)."""

    @staticmethod
    def forward(ctx, x, bias, residual, weight, ln_bias, eps, dropout_p, seed, return_sum, invertible,
                deterministic, out_dtype, branch_scale):
        z, y, mean, rstd = _forward(x, bias, residual, weight, ln_bias, eps, dropout_p, seed, return_sum,
                                    invertible, out_dtype, branch_scale)
        ctx.save_for_backward(*_kept(z, y, weight, ln_bias, mean, rstd, invertible))
        ctx.options = (x is not None, invertible, deterministic, dropout_p, seed,
                       None if x is None else x.dtype, None if bias is None else bias.dtype, residual.dtype,
                       branch_scale)
        ctx.return_sum = return_sum
        return _outputs(z, y, weight is not None, return_sum)

    @staticmethod
    def backward(ctx, *grads):
        saved, weight, ln_bias, mean, rstd = ctx.saved_tensors
        dz, dy = _incoming(grads, weight is not None, ctx.return_sum)
        return (*_backward(dz, dy, saved, weight, ln_bias, mean, rstd, *ctx.options),
                None, None, None, None, None, None, None, None)


# --------------------------------------------------------------------- torch.compile: custom ops
# As in attention.py: inside a torch.compile graph the op is a custom op pair the graph calls as it
# is (one graph for the whole model, no Triton in Dynamo's tracing); eager calls take the
# autograd.Function above (less overhead per call). Custom ops cannot return None or an input, so
# absent tensors travel as empty ones and the no-LayerNorm dresidual (the incoming dz itself) is
# returned by the autograd formula, not the op.

def _none_if_empty(t):
    return None if t is None or t.numel() == 0 else t


@torch.library.custom_op("kernels_triton::bias_dropout_residual_layernorm", mutates_args=())
def _op(x: Optional[Tensor], bias: Optional[Tensor], residual: Tensor, weight: Optional[Tensor],  # noqa: UP045
        ln_bias: Optional[Tensor], eps: float, dropout_p: float, seed: Optional[Tensor], return_sum: bool,  # noqa: UP045
        invertible: bool, deterministic: bool,
        out_dtype: Optional[torch.dtype],  # noqa: UP045
        branch_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    z, y, mean, rstd = _forward(x, bias, residual, weight, ln_bias, eps, dropout_p, seed, return_sum,
                                invertible, out_dtype, branch_scale)
    return tuple(residual.new_empty(0) if t is None else t for t in (z, y, mean, rstd))


@_op.register_fake
def _(x, bias, residual, weight, ln_bias, eps, dropout_p, seed, return_sum, invertible, deterministic,
      out_dtype, branch_scale=1.0):
    has_ln = weight is not None
    store_sum = not has_ln or return_sum or not invertible
    rows = residual.numel() // residual.shape[-1]
    z = residual.new_empty(residual.shape) if store_sum else residual.new_empty(0)
    y = residual.new_empty(residual.shape, dtype=out_dtype) if has_ln else residual.new_empty(0)
    mean, rstd = (residual.new_empty(rows if has_ln else 0, dtype=torch.float32) for _ in range(2))
    return z, y, mean, rstd


@torch.library.custom_op("kernels_triton::bias_dropout_residual_layernorm_backward", mutates_args=())
def _backward_op(dz: Optional[Tensor], dy: Optional[Tensor], saved: Optional[Tensor],  # noqa: UP045
                 weight: Optional[Tensor], ln_bias: Optional[Tensor], mean: Optional[Tensor],  # noqa: UP045
                 rstd: Optional[Tensor], has_branch: bool, invertible: bool, deterministic: bool,  # noqa: UP045
                 dropout_p: float, seed: Optional[Tensor], x_dtype: Optional[torch.dtype],  # noqa: UP045
                 bias_dtype: Optional[torch.dtype], res_dtype: torch.dtype,  # noqa: UP045
                 branch_scale: float = 1.0) -> list[Tensor]:
    grads = _backward(dz, dy, saved, weight, ln_bias, mean, rstd, has_branch, invertible, deterministic,
                      dropout_p, seed, x_dtype, bias_dtype, res_dtype, branch_scale)
    if weight is None:
        grads = grads[:2]  # dresidual is dz: the autograd formula passes it on
    return [g for g in grads if g is not None]


@_backward_op.register_fake
def _(dz, dy, saved, weight, ln_bias, mean, rstd, has_branch, invertible, deterministic, dropout_p, seed,
      x_dtype, bias_dtype, res_dtype, branch_scale=1.0):
    like = dy if weight is not None else dz
    grads = []
    if has_branch:
        grads += [like.new_empty(like.shape, dtype=x_dtype), like.new_empty(like.shape[-1], dtype=bias_dtype)]
    if weight is not None:
        grads += [like.new_empty(like.shape, dtype=res_dtype), torch.empty_like(weight),
                  torch.empty_like(weight)]
    return grads


def _setup_context(ctx, inputs, output):
    (x, bias, residual, weight, ln_bias, _eps, dropout_p, seed, return_sum, invertible, deterministic,
     _out_dtype, branch_scale) = inputs
    z, y, mean, rstd = (_none_if_empty(t) for t in output)
    ctx.save_for_backward(*_kept(z, y, weight, ln_bias, mean, rstd, invertible), seed)
    ctx.options = (x is not None, invertible, deterministic, dropout_p, None if x is None else x.dtype,
                   None if bias is None else bias.dtype, residual.dtype, branch_scale)
    ctx.return_sum = return_sum


def _op_backward(ctx, dz, dy, dmean, drstd):
    saved, weight, ln_bias, mean, rstd, seed = ctx.saved_tensors
    (has_branch, invertible, deterministic, dropout_p, x_dtype, bias_dtype, res_dtype,
     branch_scale) = ctx.options
    has_ln = weight is not None
    if has_ln and not ctx.return_sum:
        dz = None  # z was kept for the backward, not returned
    grads = _backward_op(dz, dy if has_ln else None, saved, weight, ln_bias, mean, rstd, has_branch,
                         invertible, deterministic, dropout_p, seed, x_dtype, bias_dtype, res_dtype,
                         branch_scale)
    grad_x, grad_bias = (grads[0], grads[1]) if has_branch else (None, None)
    rest = grads[2:] if has_branch else grads
    grad_res, grad_w, grad_b = rest if has_ln else (dz, None, None)
    return grad_x, grad_bias, grad_res, grad_w, grad_b, None, None, None, None, None, None, None, None


_op.register_autograd(_op_backward, setup_context=_setup_context)


def _apply(x, bias, residual, weight, ln_bias, eps, dropout_p, seed, return_sum, invertible, deterministic,
           out_dtype, branch_scale=1.0):
    """Eager: the autograd.Function; inside a torch.compile graph: the custom op."""
    seed = dropout_seed(dropout_p if x is not None else 0.0, seed, residual.device)
    if not torch.compiler.is_compiling():
        return BiasDropoutResidualLayerNormFunction.apply(x, bias, residual, weight, ln_bias, eps,
                                                          float(dropout_p), seed, return_sum, invertible,
                                                          deterministic, out_dtype, float(branch_scale))
    z, y, _, _ = _op(x, bias, residual, weight, ln_bias, float(eps), float(dropout_p), seed, return_sum,
                     invertible, deterministic, out_dtype, float(branch_scale))
    return _outputs(z, y, weight is not None, return_sum)


def bias_dropout_residual_layernorm(x, bias, residual, weight, ln_bias, eps=1e-12, dropout_p=0.0, *,
                                    seed=None, return_sum=False, invertible=False, deterministic=True,
                                    out_dtype=None, branch_scale=1.0):
    """``LN(residual + branch_scale * dropout(x + bias))`` over the last dimension; with
    ``return_sum`` also the sum itself (``(z, y)``, pre-LN). y has ``out_dtype`` (default x's
    dtype), z residual's dtype."""
    return _apply(x, bias, residual, weight, ln_bias, eps, dropout_p, seed, return_sum, invertible,
                  deterministic, out_dtype or x.dtype, branch_scale)


def bias_dropout_residual(x, bias, residual, dropout_p=0.0, *, seed=None, deterministic=True,
                          branch_scale=1.0):
    """``residual + branch_scale * dropout(x + bias)`` in residual's dtype (the pre-LN FFN end)."""
    return _apply(x, bias, residual, None, None, 0.0, dropout_p, seed, False, False, deterministic, None,
                  branch_scale)


def layer_norm(x, weight, bias, eps=1e-12, *, invertible=False, deterministic=True, out_dtype=None):
    """LayerNorm over the last dimension; output in ``out_dtype`` (default x's dtype)."""
    return _apply(None, None, x, weight, bias, eps, 0.0, None, False, invertible, deterministic,
                  out_dtype or x.dtype)


def row_dropout_mask(seed: int | Tensor, rows: int, cols: int, dropout_p: float, device) -> torch.Tensor:
    """The keep-mask bool [rows, cols] these kernels use for ``seed`` on a [rows, cols] input."""
    out = torch.empty(rows, cols, device=device, dtype=torch.int8)
    check_tensors(out)
    block_n, tile_rows, _ = row_tile(cols)
    _dropout_mask_kernel[(cdiv(rows, tile_rows),)](out, rows, cols, float(dropout_p),
                                                          seed_tensor(seed, device), ROWS=tile_rows,
                                                          BLOCK_N=block_n)
    return out.bool()


def _dropout_ref(t: torch.Tensor, dropout_p: float, dropout_mask: torch.Tensor | None) -> torch.Tensor:
    if dropout_p == 0.0:
        return t
    if dropout_mask is None:
        return F.dropout(t, dropout_p)
    return t.masked_fill(~dropout_mask.view(t.shape), 0.0) / (1.0 - dropout_p)


def bias_dropout_residual_layernorm_ref(x, bias, residual, weight, ln_bias, eps=1e-12, dropout_p=0.0,
                                       dropout_mask=None, return_sum=False, branch_scale=1.0):
    """PyTorch reference; ``dropout_mask`` (bool, x's shape or [rows, cols]) replays the kernel's."""
    z = residual + branch_scale * _dropout_ref(x + bias, dropout_p, dropout_mask)
    y = F.layer_norm(z, z.shape[-1:], weight, ln_bias, eps)
    return (z, y) if return_sum else y


def bias_dropout_residual_ref(x, bias, residual, dropout_p=0.0, dropout_mask=None, branch_scale=1.0):
    return residual + branch_scale * _dropout_ref(x + bias, dropout_p, dropout_mask)


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
