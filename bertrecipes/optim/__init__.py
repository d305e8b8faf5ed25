"""Optimizers, learning-rate schedules and param-group construction for BERT pre-training."""

from bertrecipes.optim.adam import Adam
from bertrecipes.optim.lamb import Lamb
from bertrecipes.optim.param_groups import build_param_groups
from bertrecipes.optim.schedules import (
    ConstantLR,
    WarmupExpDecayExp,
    WarmupLinear,
    WarmupPoly,
    warmup_exp_decay_exp,
    warmup_linear,
    warmup_poly,
)

__all__ = [
    "Adam",
    "ConstantLR",
    "Lamb",
    "WarmupExpDecayExp",
    "WarmupLinear",
    "WarmupPoly",
    "build_param_groups",
    "warmup_exp_decay_exp",
    "warmup_linear",
    "warmup_poly",
]
