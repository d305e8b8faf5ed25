"""Multi-process training on PyTorch's own engine: torchrun sets the environment, we join it.

    torchrun --nnodes N --nproc_per_node G -m bertrecipes.pretrain +phase=seq128 ...

NCCL on GPUs, gloo on CPUs. Each process owns one device (``cuda:LOCAL_RANK``); gradients are
averaged by DistributedDataParallel at accumulation boundaries only; rank 0 alone logs and writes
files. ``distributed.zero_stage=1`` shards the optimizer state across ranks with PyTorch's
``ZeroRedundancyOptimizer`` (whole tensors per rank, so LAMB's per-tensor trust ratio is unchanged).
``distributed.strategy=fsdp`` shards parameters, gradients and optimizer state with FSDP2
(``fully_shard`` per transformer layer, then the whole model), for models that outgrow one GPU;
LAMB's norms are then DTensor reductions over the full tensors, so the update is the same.
Checkpoints hold full (consolidated) states, so they resume at any world size. Collective operations
time out after ``distributed.timeout_minutes``, so a rank that dies makes the others fail instead of
waiting forever (torchrun also stops the surviving workers when one exits with an error).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    strategy: str = "ddp"  # ddp (replicated parameters) | fsdp (FSDP2: parameters sharded too)
    bucket_cap_mb: int = 25  # DDP gradient bucket size


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # torchrun --max-restarts: which attempt this is, agreed by every rank. torchelastic counts
    # restarts per node (a node whose workers did not fail relaunches them with its count unchanged),
    # so each rank's TORCHELASTIC_RESTART_COUNT alone can disagree; this is their maximum.
    attempt: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: DistributedConfig, device: torch.device) -> DistContext:
    """Join the process group torchrun describes in the environment (a no-op for one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if world_size == 1:
        return DistContext(attempt=restarts)
    ctx = DistContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not ctx.is_main:  # rank 0 tells the story; the others speak only to warn (N ranks, not N copies)
        logging.getLogger("bertrecipes").setLevel(logging.WARNING)
    backend = cfg.backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"distributed.backend must be nccl, gloo or null (auto), got {backend!r}")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"distributed.backend=nccl needs CUDA devices and this run is on {device.type}: "
                          "use gloo or null (auto)")
    if not dist.is_initialized():
        # NCCL binds each process to its own GPU, which must be named with its index
        device_id = device_for_rank(device, ctx) if device.type == "cuda" else None
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=cfg.timeout_minutes),
                                device_id=device_id)
    ctx.attempt = _largest_over_ranks(restarts, device_for_rank(device, ctx) if backend == "nccl" else None)
    return ctx


def same_output_dir(output_dir: Path, ctx: DistContext) -> None:
    """Refuse ranks that resolved different run directories (several nodes' time-stamped defaults)."""
    same_on_every_rank(str(output_dir.resolve()), "output_dirs",
                       "on several nodes give output_dir=<a directory every node shares> (the default is "
                       "time-stamped by each node's launcher)", ctx)


def _largest_over_ranks(value: int, device: torch.device | None) -> int:
    """The largest of every rank's ``value`` (a collective: every rank calls it), on ``device`` (NCCL's
    GPU) or the CPU."""
    count = torch.tensor([value], dtype=torch.int64, device=device or "cpu")
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def same_on_every_rank(value: str, what: str, advice: str, ctx: DistContext) -> None:
    """Refuse, on every rank alike, a ``value`` (a path, a setting) that the ranks resolved
    differently; ``what`` names it and ``advice`` says how to make them agree. (One all-reduce of a
    digest; each rank names its own value.)"""
    if not ctx.enabled:
        return
    digest = int.from_bytes(hashlib.sha256(value.encode()).digest()[:7], "big")
    span = torch.tensor([digest, -digest], dtype=torch.int64)
    dist.all_reduce(span, op=dist.ReduceOp.MAX)
    if span[0].item() != -span[1].item():  # the largest digest is not the smallest: they differ
        raise ConfigError(f"the ranks resolved different {what} (rank {ctx.rank}: {value}): {advice}")


def device_for_rank(device: torch.device, ctx: DistContext | None = None) -> torch.device:
    """The process's GPU, with its index, made the current device: ``cuda`` becomes
    ``cuda:LOCAL_RANK`` under torchrun, else the current device; ``cuda:N`` stays. Triton launches
    its kernels on the current device's stream and CUDA events record there, so a run on
    ``cuda:1`` must make it current. Any other device is returned as it is."""
    if device.type != "cuda":
        return device
    if ctx is not None and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
    elif device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def wrap_model(model: nn.Module, ctx: DistContext, cfg: DistributedConfig,
               compile: bool = False, compile_mode: str = "default",
               find_unused_parameters: bool = False) -> nn.Module:
    """DDP-wrap, or FSDP-shard in place (then the optimizer must be built afterwards), and compile
    (``torch.compile`` with ``compile_mode``). ``find_unused_parameters``: DDP's, for a forward that
    may leave parameters out (progressive layer dropping)."""
    if compile_mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    if cfg.strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"distributed.strategy must be ddp or fsdp, got {cfg.strategy!r}")
    if ctx.enabled and cfg.strategy == "fsdp":
        if cfg.zero_stage:
            raise ConfigError("distributed.zero_stage=1 is for strategy=ddp; fsdp shards the optimizer "
                              "state already")
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        return torch.compile(model, mode=compile_mode) if compile else model
    if compile:
        model = torch.compile(model, mode=compile_mode)
    if not ctx.enabled:
        return model
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=cfg.bucket_cap_mb,
                                   find_unused_parameters=find_unused_parameters)


def is_fsdp(model: nn.Module) -> bool:
    return hasattr(getattr(model, "_orig_mod", model), "set_requires_gradient_sync")


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the full value of ``t`` (gathers a DTensor under FSDP)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state_for_checkpoint(model: nn.Module) -> dict:
    """Full model state dict (a collective under FSDP: every rank must call it; rank 0 gets it)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options())
    return model.state_dict()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on micro-steps that are not
    accumulation boundaries."""
    if is_fsdp(model):
        getattr(model, "_orig_mod", model).set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def build_optimizer(make_optimizer: Callable, param_groups: list[dict], ctx: DistContext,
                    cfg: DistributedConfig) -> torch.optim.Optimizer:
    """The configured optimizer, sharded across ranks when ``zero_stage == 1``."""
    if cfg.zero_stage not in (0, 1):
        raise ConfigError(f"distributed.zero_stage must be 0 or 1, got {cfg.zero_stage} (for ZeRO-3's "
                          "sharded parameters use distributed.strategy=fsdp)")
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


def optimizer_state_for_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer,
                                   ctx: DistContext) -> dict | None:
    """The full optimizer state on rank 0 (a collective under ZeRO and FSDP: every rank calls it).

    FSDP's is keyed by parameter name (``{"format": "fqn", "state": ...}``); the others use
    torch's standard layout (parameter indices).
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=_full_options())
        return {"format": "fqn", "state": state} if ctx.is_main else None
    if is_zero(optimizer):
        optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if ctx.is_main else None


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a checkpoint's optimizer state whatever strategy and world size wrote it."""
    if saved.get("format") == "fqn":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if is_zero(optimizer):
            raise ConfigError("an FSDP checkpoint's optimizer state cannot be loaded with "
                              "distributed.zero_stage=1: run with zero_stage=0 or strategy=fsdp")
        set_optimizer_state_dict(model, optimizer, saved["state"],
                                 options=StateDictOptions(full_state_dict=True))
        return
    if is_fsdp(model):
        raise ConfigError("strategy=fsdp loads only an optimizer state written with strategy=fsdp (this "
                          "checkpoint holds a DDP/single-process one): run with strategy=ddp")
    optimizer.load_state_dict(saved)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state (LAMB's trust ratios live there)."""
    return optimizer.optim if is_zero(optimizer) else optimizer


def spread_stats(values: torch.Tensor | None, ctx: DistContext,
                 device: torch.device) -> tuple[float, float, float] | None:
    """(min, max, mean) of ``values`` spread over the ranks, each holding its own part (ZeRO-1's
    shards; a part may be empty); None when no rank holds any. A collective: every rank calls it."""
    part = (values if values is not None else torch.empty(0)).to(device=device, dtype=torch.float32)
    low = part.min() if part.numel() else torch.tensor(float("inf"), device=device)
    high = part.max() if part.numel() else torch.tensor(float("-inf"), device=device)
    total = torch.stack([part.sum(), torch.tensor(float(part.numel()), device=device)])
    if ctx.enabled:
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    count = float(total[1])
    return None if count == 0 else (float(low), float(high), float(total[0]) / count)


def is_zero(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is ZeRO-1's (each rank steps its own shard of the parameters)."""
    return type(optimizer).__name__ == "ZeroRedundancyOptimizer"


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        all_reduce_sum(tensor, ctx)
        tensor /= ctx.world_size
    return tensor


class StopVote:
    """Agree across ranks on stopping (a signal on any rank stops every rank at the same step)
    without a host sync per step: each call starts an all-reduce (MAX) of this rank's flag and
    returns the previous call's result, which the devices finished long before. Every rank reads the
    same results in the same order, so all stop together, one step after the first rank asked."""

    def __init__(self, ctx: DistContext, device: torch.device) -> None:
        self.ctx, self.device = ctx, device
        self._pending: tuple[torch.Tensor, Any] | None = None

    def __call__(self, flag: bool) -> bool:
        if not self.ctx.enabled:
            return flag
        decided = False
        if self._pending is not None:
            host, done = self._pending
            if done is not None:
                done.synchronize()
            decided = host.tolist()[0] > 0  # the host copy: no device read
        on_cuda = self.device.type == "cuda"
        vote = torch.tensor([1.0 if flag else 0.0], pin_memory=on_cuda).to(self.device, non_blocking=True)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        host = torch.empty(1, pin_memory=on_cuda)
        host.copy_(vote, non_blocking=on_cuda)
        done = None
        if on_cuda:
            done = torch.cuda.Event()
            done.record()
        self._pending = (host, done)
        return decided


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (a blocking all-reduce; ``flag`` itself in one process)."""
    if not ctx.enabled:
        return flag
    vote = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` (any picklable value), in rank order, on rank 0; None on the others."""
    if not ctx.enabled:
        return [obj]
    gathered = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


@contextlib.contextmanager
def main_rank_first(ctx: DistContext, name: str, hours: float = 48.0):
    """Run the block on rank 0 first and on the other ranks after it, as a barrier on each side
    would, but with the others waiting on the rendezvous store instead of a collective: work that can
    take longer than ``distributed.timeout_minutes`` (building the data cache from a raw corpus) does
    not fail the run. If rank 0 fails instead, torchrun stops the others."""
    key = f"bertrecipes/{name}/{ctx.attempt}"
    store = dist.distributed_c10d._get_default_store() if ctx.enabled else None
    if store is not None and not ctx.is_main:
        store.wait([key], datetime.timedelta(hours=hours))
    yield
    if store is not None and ctx.is_main:
        store.set(key, "done")


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
