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

import torch

from bertrecipes.errors import ConfigError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"precision.dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def autocast_context(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the forward pass in precision ``name`` (a no-op for fp32)."""
    dtype = autocast_dtype(name)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class LossScaler:
    """DeepSpeed's dynamic loss scaler (``dynamic=True``) or a static scale, kept on the device.

    The running state (scale, hysteresis budget, clean steps since the last overflow, overflow count)
    lives in 0-d tensors on the training device, and :meth:`update` takes the step's ``found_inf`` flag
    as a device tensor, so the scale for the next backward is known without the host ever reading a
    gradient. Host reads (the ``scale`` property, :meth:`state_dict`) are for logs and checkpoints.
    :meth:`update` also accepts a Python bool (tests, tools).
    """

    def __init__(self, scale: float = 1.0, dynamic: bool = False, scale_window: int = 1000,
                 hysteresis: int = 2, min_scale: float = 1.0, scale_factor: float = 2.0,
                 device: torch.device | str = "cpu", raise_error_at_min_scale: bool = False) -> None:
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.scale_window = int(scale_window)
        self.hysteresis = int(hysteresis)
        self.min_scale = float(min_scale)
        self.scale_factor = float(scale_factor)
        self.static_scale = None if dynamic else float(scale)
        device = torch.device(device)
        self._scale = torch.tensor(float(scale), dtype=torch.float32, device=device)
        self._hysteresis_left = torch.tensor(self.hysteresis, dtype=torch.int64, device=device)
        self._steps_since_overflow = torch.zeros((), dtype=torch.int64, device=device)
        self._overflows = torch.zeros((), dtype=torch.int64, device=device)
        # set when an overflow finds the dynamic scale already at min_scale, with no hysteresis left
        self.at_min_scale = torch.zeros((), dtype=torch.bool, device=device)

    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu") -> LossScaler:
        """Build from a precision config (fp16 only scales; other dtypes get scale 1, static)."""
        if cfg.dtype != "fp16":
            return cls(scale=1.0, dynamic=False, device=device)
        if cfg.loss_scale < 0:
            raise ConfigError(
                f"precision.loss_scale must be 0 (dynamic) or > 0 (static), got {cfg.loss_scale}"
            )
        if cfg.loss_scale > 0:
            return cls(scale=float(cfg.loss_scale), dynamic=False, device=device)
        for name in ("loss_scale_window", "hysteresis"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"precision.{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.min_loss_scale <= 0:
            raise ConfigError(f"precision.min_loss_scale must be > 0, got {cfg.min_loss_scale}")
        if not 0 <= cfg.initial_scale_power <= 127:  # 2**128 is no longer a finite fp32 number
            raise ConfigError(f"precision.initial_scale_power must be in [0, 127] (the scale starts at "
                              f"2**initial_scale_power), got {cfg.initial_scale_power}")
        return cls(
            scale=float(2.0 ** cfg.initial_scale_power),
            dynamic=True,
            scale_window=cfg.loss_scale_window,
            hysteresis=cfg.hysteresis,
            min_scale=float(cfg.min_loss_scale),
            device=device,
            raise_error_at_min_scale=bool(cfg.get("raise_error_at_min_scale", True)),
        )

    @property
    def dynamic(self) -> bool:
        """DeepSpeed's dynamic scaling (else a static scale, ``static_scale``)."""
        return self.static_scale is None

    @property
    def enabled(self) -> bool:
        """Whether gradients need unscaling (known on the host: dynamic, or a static scale != 1)."""
        return self.dynamic or self.static_scale != 1.0

    @property
    def scale_tensor(self) -> torch.Tensor:
        """The current scale as a 0-d fp32 device tensor (multiply the loss by it; no host sync)."""
        return self._scale

    @property
    def scale(self) -> float:
        """The current scale on the host (a device read unless the scale is static)."""
        return self.static_scale if self.static_scale is not None else float(self._scale)

    @property
    def overflows(self) -> int:
        return int(self._overflows)

    def update(self, overflow: torch.Tensor | bool) -> None:
        """Record one optimizer step's outcome (``overflow``: any non-finite gradient, as a bool or a
        device tensor) and adjust the scale, entirely on the device."""
        found = torch.as_tensor(overflow, device=self._scale.device).to(torch.bool)
        self._overflows.add_(found.to(torch.int64))
        # a static scale only counts overflows; the clean-step count drives the dynamic scale alone
        clean_steps = torch.where(found, 0, self._steps_since_overflow + int(self.dynamic))
        if self.dynamic:
            tolerate = found & (self._hysteresis_left > 1)  # spend hysteresis; the scale stays
            back_off = found & ~tolerate
            self.at_min_scale.copy_(back_off & (self._scale <= self.min_scale))
            grow = ~found & (clean_steps % self.scale_window == 0)
            scale = torch.where(back_off, torch.clamp(self._scale / self.scale_factor, min=self.min_scale),
                                self._scale)
            self._scale.copy_(torch.where(grow, scale * self.scale_factor, scale))
            hysteresis = torch.where(tolerate, self._hysteresis_left - 1, self._hysteresis_left)
            self._hysteresis_left.copy_(torch.where(grow, self.hysteresis, hysteresis))
        self._steps_since_overflow.copy_(clean_steps)

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "dynamic": self.dynamic,
            "hysteresis_left": int(self._hysteresis_left),
            "steps_since_overflow": int(self._steps_since_overflow),
            "overflows": self.overflows,
        }

    def load_state_dict(self, state: dict) -> bool:
        """Continue a saved scaler: its overflow count always; its scale and counters only when it is
        the same kind as this one (both dynamic, or the same static scale), so that a precision
        setting changed on resume (a static scale, fp32 to fp16) takes effect. Returns whether the
        scale was restored."""
        self._overflows.fill_(int(state["overflows"]))
        if bool(state.get("dynamic")) != self.dynamic or (
                not self.dynamic and float(state["scale"]) != self.static_scale):
            return False
        self._scale.fill_(float(state["scale"]))
        self._hysteresis_left.fill_(min(int(state["hysteresis_left"]), self.hysteresis))
        self._steps_since_overflow.fill_(int(state["steps_since_overflow"]))
        return True
