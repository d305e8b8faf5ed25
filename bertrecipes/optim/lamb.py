"""LAMB optimizer with DeepSpeed FusedLamb semantics, written with multi-tensor ``torch._foreach_*`` ops.

For every parameter tensor ``p`` with gradient ``g`` at its step ``t`` (a per-parameter counter from 1)::

    m = b1*m + (1 - b1)*g
    v = b2*v + (1 - b2)*g^2
    u = m / (sqrt(v) + eps) + weight_decay*p
    coeff = clamp(||p|| / ||u||, min_coeff, max_coeff)  if ||p|| != 0 and ||u|| != 0  else 1.0
    step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)        if bias_correction            else lr
    p -= step_size * coeff * u

Norms are L2 norms over the whole tensor. The trust ratio is applied in every group, including groups with
``weight_decay == 0`` (DeepSpeed does the same; BERT's no-decay group of biases/LayerNorm weights is still
trust-ratio scaled).

``fused`` picks the implementation: ``None`` (default) uses the two-kernel Triton step
(:mod:`kernels_triton.lamb`) for fp32 tensors on a CUDA device when Triton is installed, and the
``torch._foreach_*`` ops otherwise; ``True`` requires the Triton step (an error says why it cannot
run); ``False`` always uses foreach. Both keep the same state, so checkpoints move freely between them.

The step is free of host<->device synchronisation: step counters are Python ints (so the bias corrections are
host floats), and the per-tensor trust ratios stay on the device as one tensor that is applied through a
foreach op taking a list of 0-d tensors. ``step(found_inf=..., grad_scale=...)`` takes the training loop's
overflow flag and its unscale-and-clip factor as device tensors (``bertrecipes.engine.OptimizerStep``):
the Triton step honours both on the device, the foreach ops read the flag on the host.

This module also holds the small helpers shared with :mod:`bertrecipes.optim.adam`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

# Only full-precision master weights are supported: optimizer state and math stay in fp32 (or fp64), because
# running the update in fp16/bf16 would silently lose the small updates late in training.
SUPPORTED_PARAM_DTYPES = (torch.float32, torch.float64)

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


@dataclass
class _Bucket:
    """Tensors that can go through one set of foreach calls: same device, dtype and step count."""

    step: int
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    # Position of each tensor among all tensors stepped in this optimizer.step() call, so results computed
    # per bucket can be put back in parameter order.
    order: list[int] = field(default_factory=list)


def _validate_betas(betas: Any) -> tuple[float, float]:
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must both be in [0, 1), got {betas!r}")
    return float(beta1), float(beta2)


def _validate_common(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """Checks shared by Lamb and Adam; the ``not x >= y`` form also rejects NaN."""
    if isinstance(lr, torch.Tensor):
        raise TypeError(f"lr must be a Python float (a tensor lr would force a host sync), got {lr!r}")
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    _validate_betas(betas)
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def _collect_buckets(
    optimizer: Optimizer, group: dict[str, Any], first_order: int, optimizer_name: str
) -> tuple[list[_Bucket], int]:
    """Bucket the group's parameters that have gradients, initialising state and advancing step counters.

    Returns the buckets and the running count of stepped tensors (for parameter-order bookkeeping).
    """
    buckets: dict[tuple[torch.device, torch.dtype, int], _Bucket] = {}
    stepped: list[torch.Tensor] = []
    for param in group["params"]:
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise RuntimeError(
                f"{optimizer_name} does not support sparse gradients; got one for a parameter of shape "
                f"{tuple(param.shape)} (use a dense embedding, e.g. nn.Embedding(sparse=False))"
            )
        if param.dtype not in SUPPORTED_PARAM_DTYPES:
            raise TypeError(
                f"{optimizer_name} expects fp32 (or fp64) master weights, got a {param.dtype} parameter of "
                f"shape {tuple(param.shape)}; keep an fp32 copy of the weights for the optimizer"
            )
        if param.is_complex():
            raise TypeError(f"{optimizer_name} does not support complex parameters, got {param.dtype}")
        stepped.append(param)

    # Advance counters only once every parameter passed the checks, so a rejected step changes no state.
    order = first_order
    for param in stepped:
        state = optimizer.state[param]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] = int(state["step"]) + 1
        key = (param.device, param.dtype, state["step"])
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket(step=state["step"])
        bucket.params.append(param)
        bucket.grads.append(param.grad)
        bucket.exp_avgs.append(state["exp_avg"])
        bucket.exp_avg_sqs.append(state["exp_avg_sq"])
        bucket.order.append(order)
        order += 1
    return list(buckets.values()), order


def _steps_to_int(optimizer: Optimizer) -> None:
    """Normalise loaded step counters to Python ints.

    Checkpoints written by optimizers that keep ``step`` as a tensor (torch's own, or older versions of this
    one) load fine; converting here, once, keeps the per-step code free of tensor reads.
    """
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            state["step"] = int(step)


def _undo_counters(optimizer: Optimizer, params: list[torch.Tensor]) -> None:
    """Take back one step of these parameters' counters; state a skipped first step created (zeros,
    never written) goes, as if the parameter had never been stepped."""
    for param in params:
        state = optimizer.state[param]
        state["step"] = int(state["step"]) - 1
        if state["step"] == 0:
            del optimizer.state[param]


def _scale_grads(bucket: _Bucket, grad_scale: torch.Tensor | None) -> None:
    """The foreach path's ``grad_scale``: multiply the bucket's gradients in place."""
    if grad_scale is not None:
        torch._foreach_mul_(bucket.grads, grad_scale)


def _update_moments(bucket: _Bucket, beta1: float, beta2: float, grads: list[torch.Tensor]) -> None:
    torch._foreach_mul_(bucket.exp_avgs, beta1)
    torch._foreach_add_(bucket.exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(bucket.exp_avg_sqs, beta2)
    torch._foreach_addcmul_(bucket.exp_avg_sqs, grads, grads, value=1.0 - beta2)


class _ForeachOptimizer(Optimizer):
    """What Lamb and Adam share: groups validated (overrides on top of defaults) before they are
    registered, so a rejected group leaves the optimizer unchanged; step counters kept as Python ints
    after loading; the closure protocol of ``step``."""

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        _validate_common(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._validate_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        _steps_to_int(self)

    def _skip_on_host(self, found_inf: torch.Tensor | None, stepped: list[torch.Tensor], on_device: bool,
                      previous_coeffs: torch.Tensor | None = None) -> bool:
        """Decide, after the step counters of ``stepped`` advanced, whether this step stops here.

        Without ``found_inf`` it never does. When the update can skip on the device (``on_device``) it
        does not stop either, and the step is remembered so :meth:`undo_skipped_step` can put the
        counters back. Otherwise the flag is read on the host (the one sync of such a step) and a set
        flag undoes the counters at once and stops the step."""
        self._maybe_skipped: tuple[list[torch.Tensor], torch.Tensor | None] | None = None
        if found_inf is None:
            return False
        if on_device:
            self._maybe_skipped = (stepped, previous_coeffs)
            return False
        if bool(found_inf):
            _undo_counters(self, stepped)
            return True
        return False

    def undo_skipped_step(self) -> None:
        """The last step was given a set ``found_inf`` and skipped on the device (it wrote nothing): put
        its step counters back (dropping state it created) and restore ``last_coeffs``, so the
        optimizer is exactly as if that step had never been called."""
        pending = getattr(self, "_maybe_skipped", None)
        if pending is None:
            return
        stepped, previous_coeffs = pending
        _undo_counters(self, stepped)
        if hasattr(self, "last_coeffs"):
            self.last_coeffs = previous_coeffs
        self._maybe_skipped = None

    def _use_fused(self, bucket: _Bucket) -> bool:
        """Whether this bucket takes the fused Triton step (``self.fused``: None auto, True, False)."""
        if self.fused is False:
            return False
        reason = _fused_unavailable(bucket, explicit=bool(self.fused))
        if reason is None:
            return True
        if self.fused:
            raise RuntimeError(f"{type(self).__name__}(fused=True) cannot run: {reason} "
                               f"(use fused=null to fall back to foreach)")
        return False

    @staticmethod
    def _run_closure(closure: Callable[[], float] | None) -> float | None:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class Lamb(_ForeachOptimizer):
    """LAMB (layer-wise adaptive moments) with DeepSpeed FusedLamb's update rule; see the module docstring.

    Args:
        params: parameters or param-group dicts. Every group may override any of the keyword options below.
        lr: learning rate (>= 0).
        betas: coefficients of the running averages of the gradient and its square, each in [0, 1).
        eps: added to ``sqrt(v)`` for numerical stability (> 0).
        weight_decay: decoupled weight decay folded into the update before the trust ratio (>= 0).
        bias_correction: scale the step by ``sqrt(1 - b2^t) / (1 - b1^t)``.
        max_coeff, min_coeff: clamp range of the trust ratio ``||p|| / ||u||``,
            ``0 <= min_coeff <= max_coeff``.
        fused: ``None`` (auto), ``True`` or ``False``: the Triton two-kernel step; see the module docstring.

    After each :meth:`step`, ``last_coeffs`` holds the trust ratios actually applied, as a 1-D fp32 tensor on
    the parameters' device, one entry per parameter tensor that had a gradient, in param-group then parameter
    order. It is ``None`` before the first step and after a step in which no parameter had a gradient.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
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
            max_coeff=max_coeff,
            min_coeff=min_coeff,
        )
        # Validate the defaults up front: a group that overrides everything would otherwise hide bad defaults
        # until a later add_param_group.
        self._validate_group(defaults)
        self.last_coeffs: torch.Tensor | None = None
        super().__init__(params, defaults)

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        _ForeachOptimizer._validate_group(group)
        min_coeff, max_coeff = group["min_coeff"], group["max_coeff"]
        if not 0.0 <= min_coeff <= max_coeff:
            raise ValueError(
                f"need 0 <= min_coeff <= max_coeff, got min_coeff={min_coeff}, max_coeff={max_coeff}"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, found_inf: torch.Tensor | None = None,
             grad_scale: torch.Tensor | None = None) -> float | None:
        """One LAMB step. ``found_inf`` (a one-element device tensor, the step's overflow flag) skips the
        step when set: the fused Triton step reads it on the device and writes nothing, so the host
        never waits for it; the foreach ops read it on the host (one sync). After a device-side skip
        the step counters have already advanced on the host: :meth:`undo_skipped_step` puts them back
        once the caller has read the flag. ``grad_scale`` (a one-element device tensor) multiplies every
        gradient first: the fused step folds it into its read of the gradients, the foreach ops
        multiply the gradients in place."""
        loss = self._run_closure(closure)
        previous_coeffs = self.last_coeffs
        plan: list[tuple[dict[str, Any], _Bucket, bool]] = []
        n_stepped = 0
        for group in self.param_groups:
            buckets, n_stepped = _collect_buckets(self, group, n_stepped, type(self).__name__)
            plan += [(group, bucket, self._use_fused(bucket)) for bucket in buckets]
        stepped = [p for _, bucket, _ in plan for p in bucket.params]
        all_fused = all(fused for *_, fused in plan)
        if self._skip_on_host(found_inf, stepped, on_device=all_fused, previous_coeffs=previous_coeffs):
            return loss
        if not all_fused:
            found_inf = None  # already read on the host, and it was clear
        coeff_pieces = []
        for group, bucket, fused in plan:
            if fused:
                coeffs = self._fused_step_bucket(group, bucket, found_inf, grad_scale)
            else:
                _scale_grads(bucket, grad_scale)
                coeffs = self._step_bucket(group, bucket)
            coeff_pieces.append((bucket.order, coeffs))
        self.last_coeffs = _in_param_order(coeff_pieces, n_stepped)
        return loss

    @staticmethod
    def _fused_step_bucket(group: dict[str, Any], bucket: _Bucket, found_inf: torch.Tensor | None = None,
                           grad_scale: torch.Tensor | None = None) -> torch.Tensor:
        from kernels_triton.lamb import fused_lamb_step

        beta1, beta2 = group["betas"]
        return fused_lamb_step(bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs,
                               beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                               step_size=_step_size(group, bucket.step), min_coeff=group["min_coeff"],
                               max_coeff=group["max_coeff"], found_inf=found_inf, grad_scale=grad_scale,
                               validate=False)  # _fused_unavailable checked these tensors

    @staticmethod
    def _step_bucket(group: dict[str, Any], bucket: _Bucket) -> torch.Tensor:
        """Apply the LAMB update to one bucket; return its trust ratios (1-D, parameter dtype)."""
        beta1, beta2 = group["betas"]
        weight_decay = group["weight_decay"]
        _update_moments(bucket, beta1, beta2, bucket.grads)

        # Build u in a single fresh buffer list, reusing it through each stage, so the transient memory is
        # one copy of the parameters rather than one per intermediate.
        updates = torch._foreach_sqrt(bucket.exp_avg_sqs)
        torch._foreach_add_(updates, group["eps"])
        torch._foreach_reciprocal_(updates)
        torch._foreach_mul_(updates, bucket.exp_avgs)
        if weight_decay != 0.0:
            torch._foreach_add_(updates, bucket.params, alpha=weight_decay)

        param_norms = torch.stack(torch._foreach_norm(bucket.params))
        update_norms = torch.stack(torch._foreach_norm(updates))
        # Zero norms make the ratio 0, inf or NaN; torch.where discards those lanes, so no branch on the host.
        ratio = (param_norms / update_norms).clamp(min=group["min_coeff"], max=group["max_coeff"])
        usable = (param_norms != 0) & (update_norms != 0)
        coeffs = torch.where(usable, ratio, torch.ones_like(ratio))

        step_size = _step_size(group, bucket.step)

        # A list of 0-d tensors broadcasts per tensor in foreach ops, applying each tensor's own scale without
        # copying the coefficients to the host. (On CUDA this op takes torch's per-tensor fallback because
        # the operand shapes differ; it still launches asynchronously and never synchronises.)
        scales = coeffs * (-step_size)
        torch._foreach_addcmul_(bucket.params, updates, list(scales.unbind()))
        return coeffs


def _step_size(group: dict[str, Any], step: int) -> float:
    if not group["bias_correction"]:
        return group["lr"]
    beta1, beta2 = group["betas"]
    return group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def _fused_unavailable(bucket: _Bucket, explicit: bool) -> str | None:
    """Why the Triton step cannot take this bucket, or None if it can. Off CUDA it runs only when
    asked for explicitly under ``TRITON_INTERPRET=1`` (the tests' way; far too slow otherwise)."""
    device, dtype = bucket.params[0].device, bucket.params[0].dtype
    if dtype != torch.float32:
        return f"the Triton step takes fp32 parameters, these are {dtype}"
    try:
        from kernels_triton.utils import INTERPRET
    except ImportError as e:
        return f"triton is not installed ({e})"
    if device.type != "cuda" and not (explicit and INTERPRET):
        return f"the parameters are on {device}, not a CUDA device"
    tensors = (*bucket.params, *bucket.grads, *bucket.exp_avgs, *bucket.exp_avg_sqs)
    if any(isinstance(t, DTensor) for t in tensors):
        return "the parameters are sharded DTensors (FSDP); their norms need collectives"
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return "some gradients or parameters are not contiguous fp32 tensors"
    return None


def _in_param_order(pieces: list[tuple[list[int], torch.Tensor]], count: int) -> torch.Tensor | None:
    """Concatenate per-bucket coefficient tensors into one fp32 tensor in parameter order."""
    if count == 0:
        return None
    if len(pieces) == 1:
        return pieces[0][1].detach().to(torch.float32)
    target_device = pieces[0][1].device
    ordered: list[torch.Tensor | None] = [None] * count
    for order, coeffs in pieces:
        coeffs = coeffs.detach().to(device=target_device, dtype=torch.float32)
        for position, value in zip(order, coeffs.unbind(), strict=True):
            ordered[position] = value
    return torch.stack(ordered)  # type: ignore[arg-type]
