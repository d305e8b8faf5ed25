"""Fused multi-tensor Adam/AdamW step: every fp32 parameter tensor of a bucket in one kernel launch.

The rule is :class:`bertrecipes.optim.Adam`'s::

    adam_w_mode:      p = p * (1 - lr*weight_decay)        else  g = g + weight_decay*p
    m = b1*m + (1 - b1)*g;  v = b2*v + (1 - b2)*g^2
    p = p - step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps)     (bias correction; step_size = lr/(1 - b1^t))
    p = p - lr * m / (sqrt(v) + eps)                             (without)

One program per chunk of one tensor reads g, p, m, v once and writes p, m, v once (the gradient
times an optional device scalar ``grad_scale``: unscaling and clipping fold into that read), where the
``torch._foreach_*`` version makes about a dozen passes. The tensors are reached through the same
address tables as the fused LAMB step (:mod:`kernels_triton.lamb`). A set overflow flag
(``found_inf``, on the device) makes the kernel write nothing, so an fp16 overflow skips the step
without the host reading the flag.

Run its tests on a CPU: ``TRITON_INTERPRET=1 pytest tests/test_adam_fused.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels_triton.lamb import (
    CHUNK,
    NUM_WARPS,
    _chunk,
    _load_grad,
    _prepare,
    _store_mask,
)


@triton.jit
def _adam_kernel(TENSOR_OF_CHUNK, CHUNK_START, NUMEL, ALIGNED, P_ADDR, G_ADDR, M_ADDR, V_ADDR, SKIP,
                 GRAD_SCALE, beta1, beta2, eps, weight_decay, decay, step_size, bias_correction2_sqrt,
                 ADAM_W: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                 BLOCK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(TENSOR_OF_CHUNK + c)
    if tl.load(ALIGNED + t) != 0:  # the same branch for the whole program (see lamb._chunk)
        _adam(c, t, CHUNK_START, NUMEL, P_ADDR, G_ADDR, M_ADDR, V_ADDR, SKIP, GRAD_SCALE, beta1, beta2, eps,
              weight_decay, decay, step_size, bias_correction2_sqrt, ADAM_W, HAS_SKIP, HAS_GRAD_SCALE, BLOCK,
              True)
    else:
        _adam(c, t, CHUNK_START, NUMEL, P_ADDR, G_ADDR, M_ADDR, V_ADDR, SKIP, GRAD_SCALE, beta1, beta2, eps,
              weight_decay, decay, step_size, bias_correction2_sqrt, ADAM_W, HAS_SKIP, HAS_GRAD_SCALE, BLOCK,
              False)


@triton.jit
def _adam(c, t, CHUNK_START, NUMEL, P_ADDR, G_ADDR, M_ADDR, V_ADDR, SKIP, GRAD_SCALE, beta1, beta2, eps,
          weight_decay, decay, step_size, bias_correction2_sqrt, ADAM_W: tl.constexpr, HAS_SKIP: tl.constexpr,
          HAS_GRAD_SCALE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    offs, mask, p_ptr, g_ptr, m_ptr, v_ptr = _chunk(c, t, CHUNK_START, NUMEL, P_ADDR, G_ADDR, M_ADDR, V_ADDR,
                                                    BLOCK, ALIGNED)
    g = _load_grad(g_ptr + offs, mask, GRAD_SCALE, HAS_GRAD_SCALE)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    if ADAM_W:
        p = p * decay
    else:
        g = g + weight_decay * p
    m = beta1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + (1.0 - beta1) * g
    v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + (1.0 - beta2) * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    store = _store_mask(mask, SKIP, HAS_SKIP)
    tl.store(m_ptr + offs, m, mask=store)
    tl.store(v_ptr + offs, v, mask=store)
    tl.store(p_ptr + offs, p, mask=store)


def fused_adam_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                    exp_avg_sqs: list[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, adam_w_mode: bool, step_size: float, bias_correction2_sqrt: float,
                    found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
                    validate: bool = True) -> None:
    """One Adam step of these tensors, in place (see the module docstring). ``step_size`` and
    ``bias_correction2_sqrt`` carry the bias correction (``lr/(1 - b1^t)`` and ``sqrt(1 - b2^t)``, or
    ``lr`` and 1 without it). ``found_inf``, ``grad_scale`` and ``validate``: as in
    :func:`kernels_triton.lamb.fused_lamb_step`."""
    _, table, args, skip, scale = _prepare("Adam", params, grads, exp_avgs, exp_avg_sqs, found_inf,
                                           grad_scale, validate)
    n_chunks = table["tensor_of_chunk"].numel()
    unused = table["numel"]  # a placeholder pointer for an absent scalar (its constexpr switch is off)
    _adam_kernel[(n_chunks,)](*args, unused if skip is None else skip, unused if scale is None else scale,
                              float(beta1), float(beta2), float(eps), float(weight_decay),
                              float(1.0 - lr * weight_decay), float(step_size), float(bias_correction2_sqrt),
                              ADAM_W=bool(adam_w_mode), HAS_SKIP=skip is not None,
                              HAS_GRAD_SCALE=scale is not None, BLOCK=CHUNK, num_warps=NUM_WARPS)


__all__ = ["fused_adam_step"]
