"""Adam / AdamW written with multi-tensor ``torch._foreach_*`` ops (the role of DeepSpeed's FusedAdam).

Per parameter tensor ``p`` with gradient ``g`` at its step ``t`` (a per-parameter counter starting at 1)::

    adam_w_mode=False (L2):        g = g + weight_decay*p
    adam_w_mode=True (decoupled):  p = p - lr*weight_decay*p          (as torch.optim.AdamW, before the step)
    m = b1*m + (1 - b1)*g
    v = b2*v + (1 - b2)*g^2
    bias_correction=True:   p = p - lr * m_hat / (sqrt(v_hat) + eps)
                            with m_hat = m/(1 - b1^t), v_hat = v/(1 - b2^t)
    bias_correction=False:  p = p - lr * m / (sqrt(v) + eps)

With ``bias_correction=True, adam_w_mode=True`` this is exactly ``torch.optim.AdamW``. Step counters are
Python ints, so the bias corrections are host floats and the step never synchronises with the device.

``fused`` picks the implementation as for :class:`~bertrecipes.optim.Lamb`: ``None`` (default) runs the
one-kernel Triton step (:mod:`kernels_triton.adam`) for fp32 tensors on a CUDA device when Triton is
installed and the ``torch._foreach_*`` ops otherwise; ``True`` requires the Triton step; ``False``
always uses foreach. Both keep the same state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from bertrecipes.optim.lamb import (
    ParamsT,
    _Bucket,
    _collect_buckets,
    _ForeachOptimizer,
    _scale_grads,
    _update_moments,
)


class Adam(_ForeachOptimizer):
    """Multi-tensor Adam with decoupled (AdamW) or L2 weight decay; see the module docstring.

    Args:
        params: parameters or param-group dicts. Every group may override any of the keyword options below.
        lr: learning rate (>= 0).
        betas: coefficients of the running averages of the gradient and its square, each in [0, 1).
        eps: added to ``sqrt(v_hat)`` (or ``sqrt(v)`` without bias correction) for numerical stability (> 0).
        weight_decay: weight decay coefficient (>= 0).
        bias_correction: divide the moments by ``1 - beta^t``.
        adam_w_mode: decoupled weight decay (AdamW) if True, L2 penalty added to the gradient if False.
        fused: ``None`` (auto), ``True`` or ``False``: the Triton one-kernel step; see the module docstring.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        adam_w_mode: bool = True,
        fused: bool | None = None,
    ) -> None:
        if fused not in (None, True, False):
            raise ValueError(f"fused must be null (auto), true or false, got {fused!r}")
        self.fused = fused
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            adam_w_mode=adam_w_mode,
        )
        self._validate_group(defaults)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, found_inf: torch.Tensor | None = None,
             grad_scale: torch.Tensor | None = None) -> float | None:
        """One step. A set ``found_inf`` (the step's overflow flag, a one-element device tensor) skips it,
        leaving the optimizer exactly as it was: the fused Triton step reads the flag on the device
        (:meth:`undo_skipped_step` then takes the counters back, once the caller has read it), the
        foreach ops read it on the host (one sync). ``grad_scale``: as in :meth:`Lamb.step`."""
        loss = self._run_closure(closure)
        n_stepped = 0
        plan = []
        for group in self.param_groups:
            buckets, n_stepped = _collect_buckets(self, group, n_stepped, type(self).__name__)
            plan += [(group, bucket, self._use_fused(bucket)) for bucket in buckets]
        all_fused = all(fused for *_, fused in plan)
        if self._skip_on_host(found_inf, [p for _, b, _ in plan for p in b.params], on_device=all_fused):
            return loss
        for group, bucket, fused in plan:
            if fused:
                self._fused_step_bucket(group, bucket, found_inf if all_fused else None, grad_scale)
            else:
                _scale_grads(bucket, grad_scale)
                self._step_bucket(group, bucket)
        return loss

    @staticmethod
    def _fused_step_bucket(group: dict[str, Any], bucket: _Bucket, found_inf: torch.Tensor | None = None,
                           grad_scale: torch.Tensor | None = None) -> None:
        from kernels_triton.adam import fused_adam_step

        beta1, beta2 = group["betas"]
        lr, t = group["lr"], bucket.step
        if group["bias_correction"]:
            step_size, bias_correction2_sqrt = lr / (1.0 - beta1**t), math.sqrt(1.0 - beta2**t)
        else:
            step_size, bias_correction2_sqrt = lr, 1.0
        fused_adam_step(bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs, lr=lr, beta1=beta1,
                        beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                        adam_w_mode=group["adam_w_mode"], step_size=step_size,
                        bias_correction2_sqrt=bias_correction2_sqrt, found_inf=found_inf,
                        grad_scale=grad_scale, validate=False)  # _fused_unavailable checked these

    @staticmethod
    def _step_bucket(group: dict[str, Any], bucket: _Bucket) -> None:
        beta1, beta2 = group["betas"]
        lr, weight_decay = group["lr"], group["weight_decay"]

        grads = bucket.grads
        if weight_decay != 0.0:
            if group["adam_w_mode"]:
                torch._foreach_mul_(bucket.params, 1.0 - lr * weight_decay)
            else:
                # Out of place: p.grad belongs to the caller (gradient clipping/logging may read it later).
                grads = torch._foreach_add(grads, bucket.params, alpha=weight_decay)

        _update_moments(bucket, beta1, beta2, grads)

        denom = torch._foreach_sqrt(bucket.exp_avg_sqs)
        if group["bias_correction"]:
            t = bucket.step
            bias_correction1 = 1.0 - beta1**t
            bias_correction2 = 1.0 - beta2**t
            # sqrt(v_hat) = sqrt(v) / sqrt(1 - b2^t); eps is added after the correction, as in AdamW.
            torch._foreach_div_(denom, math.sqrt(bias_correction2))
            step_size = lr / bias_correction1
        else:
            step_size = lr
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(bucket.params, bucket.exp_avgs, denom, value=-step_size)
