"""Multi-process training on PyTorch's own engine: torchrun sets the environment, we join it.

    torchrun --nnodes N --nproc_per_node G -m bertrecipes.pretrain +phase=seq128 ...

NCCL on GPUs, gloo on CPUs. Each process owns one device (``cuda:LOCAL_RANK``); gradients are
averaged by DistributedDataParallel at accumulation boundaries only; rank 0 alone logs and writes
files. ``distributed.zero_stage=1`` shards the optimizer state across ranks with PyTorch's
``ZeroRedundancyOptimizer`` (whole tensors per rank, so LAMB's per-tensor trust ratio is unchanged);
checkpoints hold the consolidated state, so they resume at any world size. Collective operations
time out after ``distributed.timeout_minutes``, so a rank that dies makes the others fail instead of
waiting forever (torchrun also stops the surviving workers when one exits with an error).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bertrecipes.errors import ConfigError


@dataclass
class DistributedConfig:
    backend: str | None = None  # null = nccl on CUDA, gloo on CPU
    timeout_minutes: float = 10.0  # collective timeout: a dead rank fails the others after this
    zero_stage: int = 0  # 0 = replicated optimizer state; 1 = state sharded across ranks (ZeRO-1)
    bucket_cap_mb: int = 25  # DDP gradient bucket size


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: DistributedConfig, device: torch.device) -> DistContext:
    """Join the process group torchrun describes in the environment (a no-op for one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    backend = cfg.backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"distributed.backend must be nccl, gloo or null (auto), got {backend!r}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=cfg.timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return ctx


def device_for_rank(device: torch.device, ctx: DistContext) -> torch.device:
    """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    return device


def wrap_model(model: nn.Module, ctx: DistContext, cfg: DistributedConfig) -> nn.Module:
    if not ctx.enabled:
        return model
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=cfg.bucket_cap_mb)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on micro-steps that are not accumulation boundaries."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def build_optimizer(make_optimizer: Callable, param_groups: list[dict], ctx: DistContext,
                    cfg: DistributedConfig) -> torch.optim.Optimizer:
    """The configured optimizer, sharded across ranks when ``zero_stage == 1``."""
    if cfg.zero_stage not in (0, 1):
        raise ConfigError(f"distributed.zero_stage must be 0 or 1, got {cfg.zero_stage}")
    if cfg.zero_stage == 0 or not ctx.enabled:
        return make_optimizer(param_groups)
    # Imported here: torch.distributed.optim scripts its functional optimizers on import (slow, noisy).
    from torch.distributed.optim import ZeroRedundancyOptimizer

    first, *rest = param_groups
    zero = ZeroRedundancyOptimizer(first["params"], optimizer_class=make_optimizer,
                                   weight_decay=first["weight_decay"])
    for group in rest:
        zero.add_param_group(group)
    return zero


def optimizer_state_for_checkpoint(optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict | None:
    """The full optimizer state on rank 0 (a collective under ZeRO: every rank must call it)."""
    if _is_zero(optimizer):
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if ctx.is_main else None
    return optimizer.state_dict() if ctx.is_main else None


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state (LAMB's trust ratios live there)."""
    return optimizer.optim if _is_zero(optimizer) else optimizer


def _is_zero(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__ == "ZeroRedundancyOptimizer"


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= ctx.world_size
    return tensor


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (for a coordinated stop)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
