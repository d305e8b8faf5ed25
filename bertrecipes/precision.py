"""Training precision: autocast context and DeepSpeed-style loss scaling.

* fp32: no autocast, no scaling.
* bf16: autocast to bfloat16; fp32 weights, no scaling (bf16 has fp32's exponent range).
* fp16: autocast to float16 over fp32 master weights; the loss is multiplied by a loss scale so
  small gradients survive fp16, and gradients are divided by it before clipping and the optimizer
  step. ``loss_scale: 0`` selects DeepSpeed's dynamic scaler: start at ``2**initial_scale_power``;
  an overflow (any non-finite gradient) skips the step and, once ``hysteresis`` overflows have been
  seen, halves the scale (never below ``min_loss_scale``); after ``loss_scale_window`` steps
  without overflow the scale doubles and the hysteresis budget is restored. A ``loss_scale > 0``
  is a static scale: overflows still skip the step, the scale never changes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"precision.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def autocast_context(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the forward pass in precision ``name`` (a no-op for fp32)."""
    dtype = autocast_dtype(name)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class LossScaler:
    """DeepSpeed's dynamic loss scaler (``dynamic=True``) or a static scale.

    The scaler only keeps the scale; the engine multiplies the loss by ``scale``, detects an
    overflow from the (non-finite) global gradient norm and calls :meth:`update`.
    """

    scale: float = 1.0
    dynamic: bool = False
    scale_window: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    scale_factor: float = 2.0
    # running state
    hysteresis_left: int = 2
    steps_since_overflow: int = 0
    overflows: int = 0

    @classmethod
    def from_config(cls, cfg) -> LossScaler:
        """Build from a precision config (fp16 only scales; other dtypes get scale 1, static)."""
        if cfg.dtype != "fp16":
            return cls(scale=1.0, dynamic=False)
        if cfg.loss_scale < 0:
            raise ValueError(
                f"precision.loss_scale must be 0 (dynamic) or > 0 (static), got {cfg.loss_scale}"
            )
        if cfg.loss_scale > 0:
            return cls(scale=float(cfg.loss_scale), dynamic=False)
        for name in ("loss_scale_window", "hysteresis"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"precision.{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.min_loss_scale <= 0:
            raise ValueError(f"precision.min_loss_scale must be > 0, got {cfg.min_loss_scale}")
        return cls(
            scale=float(2.0 ** cfg.initial_scale_power),
            dynamic=True,
            scale_window=cfg.loss_scale_window,
            hysteresis=cfg.hysteresis,
            min_scale=float(cfg.min_loss_scale),
            hysteresis_left=cfg.hysteresis,
        )

    @property
    def enabled(self) -> bool:
        return self.dynamic or self.scale != 1.0

    def update(self, overflow: bool) -> None:
        """Record one optimizer step's outcome and adjust the scale."""
        if overflow:
            self.overflows += 1
            self.steps_since_overflow = 0
            if not self.dynamic:
                return
            if self.hysteresis_left > 1:
                self.hysteresis_left -= 1  # tolerate this one; the scale stays
            else:
                self.scale = max(self.scale / self.scale_factor, self.min_scale)
            return
        if not self.dynamic:
            return
        self.steps_since_overflow += 1
        if self.steps_since_overflow % self.scale_window == 0:
            self.scale *= self.scale_factor
            self.hysteresis_left = self.hysteresis

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "dynamic": self.dynamic,
            "hysteresis_left": self.hysteresis_left,
            "steps_since_overflow": self.steps_since_overflow,
            "overflows": self.overflows,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.steps_since_overflow = int(state["steps_since_overflow"])
        self.overflows = int(state["overflows"])
