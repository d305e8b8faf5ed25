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

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn

from kernels_triton.utils import (
    cdiv,
    check_tensors,
    finish_column_sum,
    interpreter_tiles,
    next_power_of_2,
    reduction_programs,
)

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
        return 16, next_power_of_2(n_cols), 1
    return 16, min(256, next_power_of_2(n_cols)), 4


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) over the last dimension of x, in x's dtype (computed in fp32)."""
    check_tensors(x, bias)
    x2 = x.reshape(-1, x.shape[-1])
    m, n = x2.shape
    y = torch.empty_like(x2)
    block_m, block_n, warps = _tile(n)
    grid = (cdiv(m, block_m), cdiv(n, block_n))
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
    column_programs = cdiv(n, block_n)
    programs = reduction_programs(m, block_m, x.device, column_programs)
    rows_per_program = cdiv(cdiv(m, programs), block_m) * block_m
    programs = cdiv(m, rows_per_program)
    shape = (n,) if not deterministic else (programs, n)
    partial = torch.zeros(shape, device=x.device, dtype=torch.float32)
    _bias_gelu_bwd_kernel[(column_programs, programs)](
        dy2, x2, bias, dx, partial, m, n, rows_per_program, dy2.stride(0), x2.stride(0), dx.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, ATOMIC=not deterministic, num_warps=warps)
    return dx.view(x.shape), finish_column_sum(partial, bias.dtype)


def _linear_forward(x, bias, weight):
    """(gelu(x + bias) @ weight^T, the GELU output)."""
    act = bias_gelu_forward(x, bias)
    return torch.matmul(act, weight.to(act.dtype).t()), act


def _linear_backward(dout, x, bias, weight, act, deterministic):
    """(dx, dbias, dweight); act None: recomputed here (``checkpoint``)."""
    if act is None:
        act = bias_gelu_forward(x, bias)
    dout = dout.contiguous()
    dout2 = dout.view(-1, dout.shape[-1])
    dweight = (dout2.t() @ act.reshape(-1, act.shape[-1])).to(weight.dtype)
    dact = torch.matmul(dout, weight.to(dout.dtype))
    dx, dbias = bias_gelu_backward(dact, x, bias, deterministic)
    return dx, dbias, dweight


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
        out, act = _linear_forward(x, bias, weight)
        ctx.save_for_backward(x, bias, weight, None if checkpoint else act)
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, dout):
        x, bias, weight, act = ctx.saved_tensors
        return *_linear_backward(dout, x, bias, weight, act, ctx.deterministic), None, None


# --------------------------------------------------------------------- torch.compile: custom ops
# As in attention.py: a torch.compile graph calls these custom ops as they are (one graph for the
# whole model, no Triton in Dynamo's tracing); eager calls take the autograd.Functions above.


@torch.library.custom_op("kernels_triton::bias_gelu", mutates_args=())
def _gelu_op(x: Tensor, bias: Tensor, deterministic: bool) -> Tensor:
    return bias_gelu_forward(x, bias)


@_gelu_op.register_fake
def _(x, bias, deterministic):
    return torch.empty_like(x)


@torch.library.custom_op("kernels_triton::bias_gelu_backward", mutates_args=())
def _gelu_backward_op(dy: Tensor, x: Tensor, bias: Tensor, deterministic: bool) -> tuple[Tensor, Tensor]:
    return bias_gelu_backward(dy, x, bias, deterministic)


@_gelu_backward_op.register_fake
def _(dy, x, bias, deterministic):
    return torch.empty_like(x), torch.empty_like(bias)


def _gelu_setup_context(ctx, inputs, output):
    x, bias, deterministic = inputs
    ctx.save_for_backward(x, bias)
    ctx.deterministic = deterministic


def _gelu_op_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    return *_gelu_backward_op(dy, x, bias, ctx.deterministic), None


_gelu_op.register_autograd(_gelu_op_backward, setup_context=_gelu_setup_context)


@torch.library.custom_op("kernels_triton::bias_gelu_linear", mutates_args=())
def _linear_op(x: Tensor, bias: Tensor, weight: Tensor, checkpoint: bool,
               deterministic: bool) -> tuple[Tensor, Tensor]:
    return _linear_forward(x, bias, weight)


@_linear_op.register_fake
def _(x, bias, weight, checkpoint, deterministic):
    return x.new_empty((*x.shape[:-1], weight.shape[0])), torch.empty_like(x)


@torch.library.custom_op("kernels_triton::bias_gelu_linear_backward", mutates_args=())
def _linear_backward_op(dout: Tensor, x: Tensor, bias: Tensor, weight: Tensor,
                        act: Optional[Tensor], deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:  # noqa: UP045
    return _linear_backward(dout, x, bias, weight, act, deterministic)


@_linear_backward_op.register_fake
def _(dout, x, bias, weight, act, deterministic):
    return torch.empty_like(x), torch.empty_like(bias), torch.empty_like(weight)


def _linear_setup_context(ctx, inputs, output):
    x, bias, weight, checkpoint, deterministic = inputs
    ctx.save_for_backward(x, bias, weight, None if checkpoint else output[1])
    ctx.deterministic = deterministic


def _linear_op_backward(ctx, dout, dact):
    x, bias, weight, act = ctx.saved_tensors
    return *_linear_backward_op(dout, x, bias, weight, act, ctx.deterministic), None, None


_linear_op.register_autograd(_linear_op_backward, setup_context=_linear_setup_context)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
    """gelu(x + bias), exact erf GELU."""
    if torch.compiler.is_compiling():
        return _gelu_op(x, bias, deterministic)
    return BiasGeluFunction.apply(x, bias, deterministic)


def bias_gelu_linear(x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor, checkpoint: bool = False,
                     deterministic: bool = True) -> torch.Tensor:
    """gelu(x + bias) @ weight^T; ``checkpoint`` recomputes the GELU output in the backward."""
    if torch.compiler.is_compiling():
        return _linear_op(x, bias, weight, checkpoint, deterministic)[0]
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
