"""Learning-rate schedules for BERT pre-training: bing_bert's warmup/decay factors and the schedule objects.

The plain functions return a multiplicative factor; the schedule objects turn it into a learning rate::

    lr(step) = base_lr * factor(step) + lr_offset

Schedule objects are stateless: ``schedule(step)`` is the learning rate for the optimizer step taken after
``step`` optimizer steps have completed in the phase (so the first optimizer step of a phase uses
``schedule(0)``). With warmup, ``schedule(0)`` is therefore just ``lr_offset`` (factor 0), as in bing_bert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _check_total_steps(total_steps: int) -> None:
    if not total_steps > 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")


def _check_warmup(warmup: float, name: str) -> None:
    # warmup == 1 would divide by zero in the decay branch of warmup_linear and means "never decay".
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {warmup}")


def _check_step(step: int) -> None:
    if not step >= 0:
        raise ValueError(f"step must be >= 0 (optimizer steps completed so far), got {step}")


def warmup_exp_decay_exp(
    global_step: int,
    decay_rate: float,
    decay_steps: float,
    total_steps: int,
    warmup: float = 0.002,
    degree: float = 2.0,
) -> float:
    """bing_bert's ``warmup_exp_decay_exp`` factor: polynomial warmup, then exponential decay.

    With ``x = global_step / total_steps``::

        warmup == 0  ->  1.0   (bing_bert's convention: no warmup also means no decay)
        x < warmup   ->  (x / warmup) ** degree
        otherwise    ->  decay_rate ** ((global_step - warmup * total_steps) / decay_steps)
    """
    _check_total_steps(total_steps)
    _check_warmup(warmup, "warmup")
    _check_degree(degree, "the warmup is (x/warmup)**degree")
    if not decay_rate > 0.0:
        raise ValueError(f"decay_rate must be > 0, got {decay_rate}")
    if not decay_steps > 0:
        raise ValueError(f"decay_steps must be > 0, got {decay_steps}")
    x = global_step / total_steps
    if warmup == 0.0:
        return 1.0
    if x < warmup:
        return (x / warmup) ** degree
    return decay_rate ** ((global_step - warmup * total_steps) / decay_steps)


def warmup_linear(global_step: int, total_steps: int, warmup: float = 0.002,
                  rescale_after_warmup: bool = False) -> float:
    """BERT's linear warmup to 1, then linear decay to 0 at ``total_steps`` (clamped at 0 beyond it).

    With ``x = global_step / total_steps``::

        x < warmup  ->  x / warmup
        otherwise   ->  max(1 - x, 0)                          Google BERT, BingBertSquad
                        max((1 - x) / (1 - warmup), 0)         rescale_after_warmup: Hugging Face, NVIDIA

    Google BERT's decay (and the ``warmup_linear`` of BingBertSquad and pytorch-pretrained-BERT) runs
    from the first step, so the factor drops from 1 to ``1 - warmup`` when warmup ends; the rescaled
    decay of Hugging Face's ``get_linear_schedule_with_warmup`` and NVIDIA's ``LinearWarmUpScheduler``
    starts at 1 there instead.
    """
    _check_total_steps(total_steps)
    _check_warmup(warmup, "warmup")
    x = global_step / total_steps
    if x < warmup:
        return x / warmup
    return max((1.0 - x) / (1.0 - warmup) if rescale_after_warmup else 1.0 - x, 0.0)


def warmup_poly(global_step: int, total_steps: int, warmup: float = 0.2843, degree: float = 0.5) -> float:
    """NVIDIA DeepLearningExamples' ``PolyWarmUpScheduler`` factor (its BERT pre-training schedule):
    linear warmup, then polynomial decay to 0 at ``total_steps``.

    NVIDIA's step count is the step being taken (1 for the first), so with
    ``x = (global_step + 1) / total_steps``::

        x < warmup  ->  x / warmup
        otherwise   ->  max(1 - x, 0) ** degree
    """
    _check_total_steps(total_steps)
    _check_warmup(warmup, "warmup")
    _check_degree(degree, "the decay is (1 - x)**degree")
    x = (global_step + 1) / total_steps
    if x < warmup:
        return x / warmup
    return max(1.0 - x, 0.0) ** degree


def _check_degree(degree: float, what: str) -> None:
    if not (math.isfinite(degree) and degree > 0.0):
        raise ValueError(f"degree must be a finite float > 0 ({what}), got {degree}")


def _check_base_lr(base_lr: float, lr_offset: float) -> None:
    if not base_lr >= 0.0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr}")
    if not (math.isfinite(lr_offset) and lr_offset >= 0.0):
        raise ValueError(f"lr_offset must be a finite float >= 0 (added to every step's rate), "
                         f"got {lr_offset}")


@dataclass(frozen=True)
class WarmupExpDecayExp:
    """``lr = base_lr * warmup_exp_decay_exp(step, decay_rate, decay_step, total_steps, warmup_proportion,
    degree) + lr_offset`` (bing_bert's ``EE`` schedule)."""

    base_lr: float
    total_steps: int
    warmup_proportion: float = 0.002
    decay_rate: float = 0.99
    decay_step: int = 1000
    degree: float = 2.0
    lr_offset: float = 0.0

    def __post_init__(self) -> None:
        _check_base_lr(self.base_lr, self.lr_offset)
        _check_total_steps(self.total_steps)
        _check_warmup(self.warmup_proportion, "warmup_proportion")
        if not self.decay_rate > 0.0:
            raise ValueError(f"decay_rate must be > 0, got {self.decay_rate}")
        if not self.decay_step > 0:
            raise ValueError(f"decay_step must be > 0, got {self.decay_step}")
        _check_degree(self.degree, "the warmup is (x/warmup)**degree")

    def __call__(self, step: int) -> float:
        _check_step(step)
        factor = warmup_exp_decay_exp(
            step, self.decay_rate, self.decay_step, self.total_steps, self.warmup_proportion, self.degree
        )
        return self.base_lr * factor + self.lr_offset


@dataclass(frozen=True)
class WarmupLinear:
    """``lr = base_lr * warmup_linear(step, total_steps, warmup_proportion, rescale_after_warmup)
    + lr_offset``."""

    base_lr: float
    total_steps: int
    warmup_proportion: float = 0.01
    lr_offset: float = 0.0
    rescale_after_warmup: bool = False

    def __post_init__(self) -> None:
        _check_base_lr(self.base_lr, self.lr_offset)
        _check_total_steps(self.total_steps)
        _check_warmup(self.warmup_proportion, "warmup_proportion")

    def __call__(self, step: int) -> float:
        _check_step(step)
        return self.base_lr * warmup_linear(step, self.total_steps, self.warmup_proportion,
                                            self.rescale_after_warmup) + self.lr_offset


@dataclass(frozen=True)
class WarmupPoly:
    """``lr = base_lr * warmup_poly(step, total_steps, warmup_proportion, degree) + lr_offset`` (NVIDIA's
    ``PolyWarmUpScheduler``; its phase 1 uses warmup 0.2843 of 7038 steps, phase 2 0.128 of 1563)."""

    base_lr: float
    total_steps: int
    warmup_proportion: float = 0.2843
    degree: float = 0.5
    lr_offset: float = 0.0

    def __post_init__(self) -> None:
        _check_base_lr(self.base_lr, self.lr_offset)
        _check_total_steps(self.total_steps)
        _check_warmup(self.warmup_proportion, "warmup_proportion")
        _check_degree(self.degree, "the decay is (1 - x)**degree")

    def __call__(self, step: int) -> float:
        _check_step(step)
        return self.base_lr * warmup_poly(step, self.total_steps, self.warmup_proportion,
                                          self.degree) + self.lr_offset


@dataclass(frozen=True)
class ConstantLR:
    """``lr = base_lr + lr_offset``. ``total_steps`` is accepted (and ignored) so every schedule is built the
    same way from config."""

    base_lr: float
    total_steps: int = 0
    lr_offset: float = 0.0

    def __post_init__(self) -> None:
        _check_base_lr(self.base_lr, self.lr_offset)
        if not self.total_steps >= 0:
            raise ValueError(f"total_steps must be >= 0, got {self.total_steps}")

    def __call__(self, step: int) -> float:
        _check_step(step)
        return self.base_lr + self.lr_offset
