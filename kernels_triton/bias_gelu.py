"""Bias + exact (erf) GELU, forward and backward, and the FFN's ``gelu(x + b) @ W^T`` built on it.

``y = gelu(x + b)`` with ``gelu(u) = u * Phi(u) = 0.5 u (1 + erf(u / sqrt 2))`` and
``gelu'(u) = Phi(u) + u * phi(u)``. The backward also reduces ``db = sum_rows(dx)`` in fp32: per-program
partial sums added in a fixed order (deterministic), or fp32 atomics (``deterministic=False``,
DeepSpeed's ``stochastic_mode``).

:func:`bias_gelu_linear` is where DeepSpeed's ``gelu_checkpoint`` pays off: the GELU output [rows,
intermediate] is the input of the FFN's second projection, which normally keeps it for its weight
gradient. With ``checkpoint=True`` only the pre-activation is kept and the GELU is recomputed in the
backward; without, both are kept (DeepSpeed's default).

Run its tests on a CPU: ``TRITON_INTERPRET=1 pytest tests/test_triton_bias_gelu.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from kernels_triton.utils import check_tensors, finish_column_sum, interpreter_tiles, reduction_programs

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu(u):
    return 0.5 * u * (1.0 + tl.erf(u * _SQRT1_2))


@triton.jit
def _gelu_grad(u):
    cdf = 0.5 * (1.0 + tl.erf(u * _SQRT1_2))
    return cdf + u * tl.exp(-0.5 * u * u) * _INV_SQRT_2PI


@triton.jit
def _bias_gelu_fwd_kernel(X, BIAS, Y, M, N, stride_x, stride_y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = _gelu(x + b[None, :])
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY, X, BIAS, DX, DBIAS, M, N, rows_per_program, stride_dy, stride_x, stride_dx,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Grid (column blocks, row chunks): each program walks its chunk of rows for one column block,
    writes dx and keeps an fp32 partial of dbias for its chunk."""
    pid_r = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    b = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    row_start = pid_r * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dx = dy * _gelu_grad(x + b[None, :])
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dbias += tl.sum(dx, 0)  # masked entries have dy = 0
    if ATOMIC:
        tl.atomic_add(DBIAS + cols, dbias, mask=col_ok)
    else:
        tl.store(DBIAS + pid_r * N + cols, dbias, mask=col_ok)


# ----------------------------------------------------------------------------- launchers


def _tile(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the elementwise tiles."""
    if interpreter_tiles():
        return 16, triton.next_power_of_2(n_cols), 1
    return 16, min(256, triton.next_power_of_2(n_cols)), 4


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) over the last dimension of x, in x's dtype (computed in fp32)."""
    check_tensors(x, bias)
    x2 = x.reshape(-1, x.shape[-1])
    m, n = x2.shape
    y = torch.empty_like(x2)
    block_m, block_n, warps = _tile(n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _bias_gelu_fwd_kernel[grid](x2, bias, y, m, n, x2.stride(0), y.stride(0),
                                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y.view(x.shape)


def bias_gelu_backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, deterministic: bool = True):
    """(dx, dbias) of y = gelu(x + bias); dbias in bias's dtype, reduced in fp32."""
    dy2 = dy.contiguous().view(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    m, n = x2.shape
    dx = torch.empty_like(x2)
    block_m, block_n, warps = _tile(n)
    column_programs = triton.cdiv(n, block_n)
    programs = reduction_programs(m, block_m, x.device, column_programs)
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), block_m) * block_m
    programs = triton.cdiv(m, rows_per_program)
    shape = (n,) if not deterministic else (programs, n)
    partial = torch.zeros(shape, device=x.device, dtype=torch.float32)
    _bias_gelu_bwd_kernel[(column_programs, programs)](
        dy2, x2, bias, dx, partial, m, n, rows_per_program, dy2.stride(0), x2.stride(0), dx.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, ATOMIC=not deterministic, num_warps=warps)
    return dx.view(x.shape), finish_column_sum(partial, bias.dtype)


class BiasGeluFunction(torch.autograd.Function):
    """y = gelu(x + bias); keeps x (the pre-activation) and bias."""

    @staticmethod
    def forward(ctx, x, bias, deterministic):
        ctx.save_for_backward(x, bias)
        ctx.deterministic = deterministic
        return bias_gelu_forward(x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, dbias = bias_gelu_backward(dy, x, bias, ctx.deterministic)
        return dx, dbias, None


class BiasGeluLinearFunction(torch.autograd.Function):
    """out = gelu(x + bias) @ weight^T (no output bias: the caller fuses it downstream).

    checkpoint=False keeps (x, bias, weight, gelu output); checkpoint=True keeps (x, bias, weight)
    and recomputes the GELU output in the backward for the weight gradient.
    """

    @staticmethod
    def forward(ctx, x, bias, weight, checkpoint, deterministic):
        act = bias_gelu_forward(x, bias)
        out = torch.matmul(act, weight.to(act.dtype).t())
        ctx.save_for_backward(x, bias, weight, None if checkpoint else act)
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, dout):
        x, bias, weight, act = ctx.saved_tensors
        if act is None:
            act = bias_gelu_forward(x, bias)
        dout = dout.contiguous()
        dout2 = dout.view(-1, dout.shape[-1])
        dweight = (dout2.t() @ act.reshape(-1, act.shape[-1])).to(weight.dtype)
        dact = torch.matmul(dout, weight.to(dout.dtype))
        dx, dbias = bias_gelu_backward(dact, x, bias, ctx.deterministic)
        return dx, dbias, dweight, None, None


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
    """gelu(x + bias), exact erf GELU."""
    return BiasGeluFunction.apply(x, bias, deterministic)


def bias_gelu_linear(x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor, checkpoint: bool = False,
                     deterministic: bool = True) -> torch.Tensor:
    """gelu(x + bias) @ weight^T; ``checkpoint`` recomputes the GELU output in the backward."""
    return BiasGeluLinearFunction.apply(x, bias, weight, checkpoint, deterministic)


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias)


def bias_gelu_linear_ref(x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(x + bias), weight)


class BiasGelu(nn.Module):
    """gelu(x + bias) with its own bias (e.g. after a ``Linear(bias=False)``)."""

    def __init__(self, features: int, deterministic: bool = True):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(features))
        self.deterministic = deterministic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_gelu(x, self.bias, self.deterministic)
