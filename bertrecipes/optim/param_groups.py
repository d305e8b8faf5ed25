"""Split a model's parameters into weight-decay and no-decay optimizer param groups (BERT convention).

Biases and LayerNorm weights are not decayed: decaying them only shrinks shifts/scales toward zero without the
regularising effect weight decay has on weight matrices.
"""

from __future__ import annotations

from typing import Any

import torch

# Name patterns cover LayerNorms that are not nn.LayerNorm instances (e.g. fused or custom implementations
# named like Hugging Face / Megatron checkpoints).
_NO_DECAY_NAME_PARTS = ("LayerNorm", "layer_norm")


def _is_no_decay_name(name: str) -> bool:
    return name.endswith("bias") or any(part in name for part in _NO_DECAY_NAME_PARTS)


def build_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Return a ``"decay"`` group and a ``"no_decay"`` group (``weight_decay`` 0.0) for an optimizer.

    Each group is ``{"params": [...], "weight_decay": float, "name": "decay" | "no_decay"}``.

    No-decay parameters are those whose name ends in ``bias``, contains ``LayerNorm`` or ``layer_norm``, or
    that belong to a ``torch.nn.LayerNorm`` module. Frozen parameters (``requires_grad=False``) are left out,
    tied parameters appear once (``named_parameters`` deduplicates them) and empty groups are dropped.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")

    layer_norm_param_ids = {
        id(param)
        for module in model.modules()
        if isinstance(module, torch.nn.LayerNorm)
        for param in module.parameters(recurse=False)
    }

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in layer_norm_param_ids or _is_no_decay_name(name):
            no_decay.append(param)
        else:
            decay.append(param)

    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [group for group in groups if group["params"]]
