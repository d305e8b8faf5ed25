"""The pre-training engine: build everything from the config, then one readable training loop.

``train(cfg)`` is what ``python -m bertrecipes.pretrain`` calls. The optimizer step reads top to
bottom in :func:`train`: micro-batches (forward, scaled backward), then at the accumulation
boundary :class:`OptimizerStep`: unscale, global-norm check (an fp16 overflow skips the step), clip,
LR update, step, zero, all without the host waiting for the GPU. Logging and checkpointing are
"if due" lines around it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import random
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from bertrecipes import distributed as dist
from bertrecipes.atomic import write_text_atomic
from bertrecipes.checkpoint import (
    LATEST_FILE,
    STATE_FILE,
    VOCAB_FILE,
    CheckpointError,
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from bertrecipes.config import PretrainConfig, refuse_unknown_keys, resolve_batch_sizes
from bertrecipes.data import PretrainingLoader
from bertrecipes.data.build import build_pretraining_dataset, build_run_eval_dataset
from bertrecipes.data.dataset import CONTINUOUS, WHOLE_BATCHES
from bertrecipes.data.tokenizer import read_vocab
from bertrecipes.errors import ConfigError, UserError
from bertrecipes.evaluation import eval_share, evaluate_pretraining
from bertrecipes.interop import load_into_model, load_model_state
from bertrecipes.interop.load import normalize_ckpt_type
from bertrecipes.layer_drop import ProgressiveLayerDrop
from bertrecipes.metrics import MetricsFile, NullLogger, Throughput, finite_or_none, measure_peak_tflops
from bertrecipes.model import (
    BertConfig,
    BertForPreTraining,
    BertModel,
    LayerFactory,
    Unpadded,
    pretraining_loss,
    training_flops_per_sample,
)
from bertrecipes.optim import build_param_groups
from bertrecipes.precision import LossScaler, autocast_context, autocast_dtype

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"


@dataclass
class TrainState:
    """Counters saved in checkpoints. ``global_step`` counts accumulation boundaries (optimizer
    steps attempted); ``schedule_step`` counts the steps the LR schedule has advanced (fp16
    overflow skips do not advance it)."""

    global_step: int = 0
    schedule_step: int = 0
    skipped_steps: int = 0
    epoch: int = 0
    last_global_data_samples: int = 0
    # the init_from checkpoint's step count: progressive layer dropping's keep ratio continues from it
    pld_step_offset: int = 0


# --------------------------------------------------------------------------- set-up helpers


def device_problem(name: str) -> str | None:
    """What is wrong with the device ``name`` on this machine, or None. The wording names no option:
    each command line puts its own in front (``device=...`` or ``--device ...``)."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return f"must be auto, cpu, cuda or cuda:N, got {name!r}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available on this machine (use auto or cpu)"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        return f"this machine has {count} GPU{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})"
    return None


def pick_device(name: str) -> torch.device:
    problem = device_problem(name)
    if problem is not None:
        raise ConfigError(f"device={name}: {problem}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank_streams(seed: int, ctx: dist.DistContext) -> None:
    """Give each rank its own random stream (seed + rank) once the model is built: every rank builds
    the same initial weights from ``seed``, then draws its own dropout masks (with one stream, ranks
    would drop the same units of their different batches). Rank 0 keeps ``seed``'s stream, so one
    process runs as it always has."""
    if ctx.rank:
        seed_everything(seed + ctx.rank)


def rank_rng_states(ctx: dist.DistContext) -> list[dict] | None:
    """Every rank's random state, in rank order, on rank 0 (a collective: every rank calls it). The
    ranks' states drift apart (unpadded shapes differ, so dropout draws differ), so a checkpoint
    keeps them all."""
    return dist.gather_to_main(capture_rng_state(), ctx)


def restore_rank_rng(payload: dict[str, Any], ctx: dist.DistContext) -> None:
    """Give this rank the random state it had when ``payload`` was saved; at another world size,
    every rank gets rank 0's (the run continues, with other dropout masks than an uninterrupted one)."""
    states = payload.get("rng_ranks")
    if states is not None and len(states) == ctx.world_size:
        restore_rng_state(states[ctx.rank])
        return
    restore_rng_state(payload["rng"])
    if ctx.enabled or (states is not None and len(states) != ctx.world_size):
        log.warning("%s was saved by %s process(es) and this run has %d: every rank continues from rank 0's "
                    "random state, so dropout masks (if dropout is on) differ from an uninterrupted run's",
                    payload["path"],
                    len(states) if states is not None else "an unknown number of", ctx.world_size)


def prepare_output_dir(path: str | Path) -> Path:
    """Create ``path`` and prove it is writable, or fail naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir {path} is not writable: {e.strerror or e}") from e
    return path


def vocab_multiple(model_cfg: DictConfig) -> int:
    """``model.pad_vocab_to_multiple_of``, checked."""
    multiple = model_cfg.get("pad_vocab_to_multiple_of", 1)
    if not isinstance(multiple, int) or multiple < 1:
        raise ConfigError(f"model.pad_vocab_to_multiple_of must be a positive integer, got {multiple!r}")
    return multiple


def build_model_config(model_cfg: DictConfig, tokenizer_vocab_size: int, max_seq_length: int) -> BertConfig:
    fields = OmegaConf.to_container(model_cfg, resolve=True)
    fields.pop("pad_vocab_to_multiple_of", None)
    multiple = vocab_multiple(model_cfg)
    vocab_size = fields.pop("vocab_size") or -(-tokenizer_vocab_size // multiple) * multiple
    if vocab_size < tokenizer_vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab_size} tokens); use null (= tokenizer size) or a padded size >= it"
        )
    if max_seq_length > fields["max_position_embeddings"]:
        raise ConfigError(
            f"max_seq_length={max_seq_length} exceeds model.max_position_embeddings="
            f"{fields['max_position_embeddings']}"
        )
    try:
        return BertConfig(vocab_size=vocab_size, **fields)
    except ValueError as e:
        raise ConfigError(f"model config: {e}") from e


def load_model_weights(model: torch.nn.Module, checkpoint: dict, source: str) -> None:
    """Load a checkpoint's model weights, naming the file and the mismatch on failure."""
    state = checkpoint["model"]
    ours = model.state_dict()
    for name in ("bert.embeddings.word_embeddings.weight",):
        if name in state and state[name].shape[0] != ours[name].shape[0]:
            raise CheckpointError(
                f"{source}: vocabulary size {state[name].shape[0]} in the checkpoint, but the model "
                f"is configured for {ours[name].shape[0]} (set model.vocab_size or use the matching "
                f"tokenizer)"
            )
    mismatched = [f"{name} {tuple(value.shape)} in the checkpoint, {tuple(ours[name].shape)} in the model"
                  for name, value in state.items() if name in ours and value.shape != ours[name].shape]
    if mismatched:
        raise CheckpointError(f"{source} does not match the model: {'; '.join(mismatched[:4])}"
                              + (f" (and {len(mismatched) - 4} more)" if len(mismatched) > 4 else ""))
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )


# What a resumed run must keep of the model: everything but dropout and the initialisation's spread.
ARCHITECTURE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
                     "pre_layer_norm")


def check_resumed_architecture(saved: dict[str, Any], now: BertConfig) -> None:
    """Refuse a resume whose model settings change the architecture the checkpoint was trained with
    (another head count loads the same tensors and silently computes something else); a changed
    dropout applies, with a warning."""
    was = saved.get("model_config") or {}
    changed = [f"model.{key}={was[key]} (now {getattr(now, key)})" for key in ARCHITECTURE_KEYS
               if key in was and was[key] != getattr(now, key)]
    if changed:
        raise ConfigError(f"resume=true but the run was saved with {', '.join(changed)}: a resumed run keeps "
                          "its architecture (give the saved values, or start a new run with init_from)")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if key in was and was[key] != getattr(now, key):
            log.warning("model.%s was %s when the run was saved and is %s now: it applies from here on",
                        key, was[key], getattr(now, key))


def optimizer_state_to_continue(cfg: DictConfig, init_from: Any, model_config: BertConfig) -> dict | None:
    """The optimizer and loss-scaler state of ``init_from`` that this run continues
    (``load_optimizer_states``), or None for a fresh optimizer. It continues only on the same
    architecture and vocabulary rows, one tensor of moments per parameter; true asks for it and makes
    its absence an error, null takes it when there is one."""
    wanted = cfg.load_optimizer_states
    if init_from is None:
        if wanted and not cfg.resume:
            log.warning("load_optimizer_states=true does nothing without init_from")
        return None
    if wanted is False:
        return None
    saved = init_from.training_state
    problem = None
    if saved is None or not saved.get("optimizer"):
        problem = (f"{init_from.source} is not a bertrecipes checkpoint with an optimizer state (its weights "
                   "load; DeepSpeed's, NVIDIA's, Hugging Face and TensorFlow optimizer states do not)")
    else:
        was = saved.get("model_config") or {}
        changed = [f"{key} {was[key]} there, {getattr(model_config, key)} here"
                   for key in ("vocab_size", *ARCHITECTURE_KEYS)
                   if key in was and was[key] != getattr(model_config, key)]
        if changed:
            problem = (f"{init_from.source} has another architecture ({', '.join(changed)}), so its "
                       "optimizer moments do not fit this model")
    if problem is None:
        return saved
    if wanted:
        raise ConfigError(f"load_optimizer_states=true but {problem}: give load_optimizer_states=false "
                          "to start with a fresh optimizer")
    log.info("init_from's optimizer state is not continued (%s): a fresh optimizer", problem)
    return None


def unpad_options(kernel_cfg: DictConfig) -> tuple[bool, int]:
    """``(kernel.unpad, kernel.unpad_bucket)``, checked: the model-level options of the kernel group
    (a config made by hand may leave them out: no unpadding, no bucket)."""
    unpad, bucket = bool(kernel_cfg.get("unpad", False)), kernel_cfg.get("unpad_bucket", 0)
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 0:
        raise ConfigError(f"kernel.unpad_bucket must be a non-negative integer (0 = no rounding, e.g. 256), "
                          f"got {bucket!r}")
    if bucket and not unpad:
        log.warning("kernel.unpad_bucket=%d does nothing with kernel.unpad=false (the batch stays padded)",
                    bucket)
    return unpad, bucket


def build_layer_factory(kernel_cfg: DictConfig) -> LayerFactory | None:
    """The transformer-layer implementation ``kernel.name`` selects (None = plain PyTorch)."""
    if kernel_cfg.name == "torch":
        return None
    if kernel_cfg.name == "triton":
        try:
            from kernels_triton import LAYER_FLAGS, make_layer_factory
        except ImportError as e:
            raise ConfigError(f"kernel=triton needs triton and kernels_triton's layer: {e}") from e
        # the layer's own options (the rest of the group, such as unpad, is the model's)
        return make_layer_factory(**{name: bool(kernel_cfg[name]) for name in LAYER_FLAGS})
    raise ConfigError(f"kernel.name must be torch or triton, got {kernel_cfg.name!r}")


def layer_drop_settings(cfg: DictConfig) -> dict | None:
    """The run's progressive layer dropping settings as a checkpoint keeps them (None: off)."""
    pld = cfg.progressive_layer_drop
    return {"theta": float(pld.theta), "gamma": float(pld.gamma)} if pld.enabled else None


def build_layer_drop(cfg: DictConfig, ctx: dist.DistContext) -> ProgressiveLayerDrop | None:
    """The run's progressive layer dropping (``progressive_layer_drop.enabled``), or None; its
    settings are checked here, before any data work."""
    pld = cfg.progressive_layer_drop
    if not pld.enabled:
        return None
    if cfg.compile:
        raise ConfigError("progressive_layer_drop.enabled=true runs a different set of layers in every "
                          "micro-batch, which torch.compile would recompile for: use compile=false with it")
    if cfg.distributed.strategy == "fsdp" and ctx.enabled:
        raise ConfigError("progressive_layer_drop.enabled=true with distributed.strategy=fsdp: each rank "
                          "skips its own layers, and FSDP gathers a layer's weights with every rank; use "
                          "distributed.strategy=ddp (with distributed.zero_stage=1 to shard the optimizer)")
    if not cfg.model.pre_layer_norm:
        log.warning("progressive_layer_drop on a post-LN model: DeepSpeed's recipe and the PLD paper use "
                    "pre-LN (model.pre_layer_norm=true), which they found keeps training stable when "
                    "layers are skipped")
    return ProgressiveLayerDrop(cfg.model.num_hidden_layers, pld.theta, pld.gamma, cfg.seed)


def check_triton_device(cfg: DictConfig, device: torch.device) -> None:
    """``kernel=triton`` and ``optimizer.fused=true`` launch Triton kernels: they need CUDA tensors,
    or Triton's interpreter (``TRITON_INTERPRET=1``) on a CPU. Said before any work, not at the first
    forward or step."""
    if device.type == "cuda":
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        if cfg.kernel.name == "triton" and cfg.precision.dtype == "bf16":
            log.warning("kernel=triton precision=bf16 in Triton's interpreter (TRITON_INTERPRET=1): the "
                        "interpreter computes bf16 matrix products wrongly, so this run's gradients are "
                        "wrong; on a CPU use precision=fp32 or fp16 with kernel=triton (on a GPU bf16 is "
                        "right)")
        return
    wanted = [knob for knob, on in (("kernel=triton", cfg.kernel.name == "triton"),
                                    ("optimizer.fused=true", cfg.optimizer.get("fused") is True)) if on]
    if wanted:
        raise ConfigError(f"{' and '.join(wanted)} run Triton kernels, which need a CUDA device (this run is "
                          f"on {device}): use kernel=torch / optimizer.fused=null, or set TRITON_INTERPRET=1 "
                          f"to run them (slowly) in Triton's interpreter")


def build_from_config(group: str, node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate`` a leaf object, turning a constructor's ValueError into a ConfigError that names
    the config group (Hydra would otherwise bury it in an InstantiationException)."""
    try:
        return instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"{group}: {cause}") from e
        raise


class OptimizerStep:
    """The accumulation boundary, without the host waiting for the GPU.

    Each call: take the global norm of the (loss-scaled) gradients, flag an overflow (a non-finite
    norm) on the device, unscale and clip to ``max_grad_norm``, set the LR for
    ``state.schedule_step``, step the optimizer with the flag, update the loss scale (a device
    tensor) from the flag on the device, zero the gradients. An overflowed step is skipped: weights,
    optimizer state and LR schedule as if it had not happened, and the scale backs off (DeepSpeed's
    rules).

    Unscaling and clipping are one factor per step, computed on the device; an optimizer whose
    ``step`` takes ``grad_scale`` (this package's, fused) applies it as it reads the gradients, so
    neither costs a pass over them.

    The host learns the flag one step late: it is copied to pinned memory behind the step and read
    at the start of the next call (or by :meth:`resolve`, before logs and checkpoints), by which time
    the GPU has long finished it, so the next step's work is already queued and the GPU never drains.
    Only then do ``state.schedule_step``/``skipped_steps`` move and the optimizer's counters of a
    skipped step go back, so every step is computed with exactly the values a synchronous loop would
    use. The skip itself needs an optimizer whose ``step`` takes ``found_inf`` and honours it on the
    device (this package's LAMB and Adam with their fused Triton steps); others read the flag at once
    (one sync).

    ``keep_grads``: the gradients are allocated once (zeros) and zeroed in place after each step,
    never set to None. A CUDA-graph replay (``compile_mode=reduce-overhead``) reuses its output
    memory, and autograd would otherwise keep a micro-batch's gradient outputs as the ``.grad``
    themselves, to be overwritten by the next micro-batch's replay; kept gradients only have the
    outputs added to them.
    """

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scaler: LossScaler,
                 schedule, state: TrainState, max_grad_norm: float, keep_grads: bool = False) -> None:
        self.keep_grads = keep_grads
        if keep_grads:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self.params, self.optimizer, self.scaler = params, optimizer, scaler
        self.schedule, self.state, self.max_grad_norm = schedule, state, max_grad_norm
        self.local = dist.local_optimizer(optimizer)
        accepted = inspect.signature(self.local.step).parameters
        self.takes_flag = "found_inf" in accepted
        self.takes_grad_scale = self.takes_flag and "grad_scale" in accepted
        self._pending: tuple[torch.Tensor, Any, int] | None = None
        self._host: torch.Tensor | None = None
        self.last_skipped = False  # whether the last resolved step was skipped (an overflow)

    @property
    def loss_scale(self) -> torch.Tensor | float:
        """Multiply the loss by this before backward (a device tensor unless the scale is static)."""
        static = self.scaler.static_scale
        return static if static is not None else self.scaler.scale_tensor

    def __call__(self) -> torch.Tensor:
        """Run the step; returns the global gradient norm (a device tensor; non-finite on overflow)."""
        self.resolve()  # the previous step's outcome, already computed on the GPU
        grads = [p.grad for p in self.params if p.grad is not None]
        sharded = isinstance(grads[0], DTensor)  # FSDP: scalars must be DTensors or host numbers
        # The norm of the scaled gradients, unscaled after: the same value bit for bit while the scale
        # is a power of two (dynamic scales always are), and one pass over the gradients fewer.
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        found_inf = ~torch.isfinite(dist.full(grad_norm))
        factor: torch.Tensor | float = 1.0  # what every gradient gets multiplied by: unscale, clip
        if self.scaler.enabled:
            factor = (1.0 / self.scaler.static_scale if self.scaler.static_scale is not None
                      else torch.reciprocal(self.scaler.scale_tensor))
            if sharded and isinstance(factor, torch.Tensor):
                factor = float(factor)  # a host read; FSDP's foreach LAMB reads the flag anyway
            grad_norm = grad_norm * factor
        if self.max_grad_norm > 0:
            factor = factor * torch.clamp(self.max_grad_norm / (grad_norm + 1e-6), max=1.0)
        set_lr(self.optimizer, float(self.schedule(self.state.schedule_step)))
        if self.takes_grad_scale and not sharded and isinstance(factor, torch.Tensor):
            self.optimizer.step(found_inf=found_inf, grad_scale=factor)  # folded into the kernel's read
        else:
            if isinstance(factor, torch.Tensor) or factor != 1.0:
                torch._foreach_mul_(grads, factor)
            if self.takes_flag:
                self.optimizer.step(found_inf=found_inf)
            elif not bool(found_inf):  # an optimizer that cannot skip on the device: read the flag now
                self.optimizer.step()
        self.scaler.update(found_inf)
        self.optimizer.zero_grad(set_to_none=not self.keep_grads)
        self._post(torch.stack([found_inf.to(torch.float32), self.scaler.scale_tensor,
                                self.scaler.at_min_scale.to(torch.float32)]))
        return grad_norm

    def _post(self, outcome: torch.Tensor) -> None:
        """Start copying (overflow flag, scale, at-minimum flag) to the host behind the step's kernels."""
        if outcome.device.type != "cuda":
            self._pending = (outcome.cpu(), None, self.state.global_step)
            return
        if self._host is None:
            self._host = torch.empty(len(outcome), dtype=torch.float32, pin_memory=True)
        self._host.copy_(outcome, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._pending = (self._host, done, self.state.global_step)

    def resolve(self) -> None:
        """Account for the last step on the host: advance the schedule, or count the skip, take the
        optimizer's counters back and warn. Waits only for that step's own kernels."""
        if self._pending is None:
            return
        host, done, step = self._pending
        self._pending = None
        if done is not None:
            done.synchronize()
        overflow, scale, at_min_scale = host.tolist()  # the host copy: no device read
        self.last_skipped = bool(overflow)
        if not overflow:
            self.state.schedule_step += 1
            return
        self.state.skipped_steps += 1
        if self.takes_flag and hasattr(self.local, "undo_skipped_step"):
            self.local.undo_skipped_step()
        log.warning("step %d: gradient overflow, step skipped; loss scale now %g", step, scale)
        if at_min_scale and self.scaler.raise_error_at_min_scale:
            raise UserError(
                f"step {step}: the gradients overflowed with the fp16 loss scale already at its minimum "
                f"(precision.min_loss_scale={self.scaler.min_scale:g}), so every later step would be "
                "skipped too: the run has diverged. Resume from an earlier checkpoint with a lower "
                "optimizer.lr, or use precision=bf16 (precision.raise_error_at_min_scale=false carries "
                "on regardless)")


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device,
                    model: BertModel) -> tuple[dict[str, torch.Tensor], Unpadded | None]:
    """Copy a loader batch to ``device`` (asynchronously from pinned memory), with the real-token
    layout ``model`` (the encoder) runs it with, if it unpads (:meth:`BertModel.layout`): found on
    the CPU copy of the mask first, so the GPU never waits for it. On a GPU, what is not pinned yet
    (the layout, a batch built here) is pinned first: a copy from pageable memory may make the host
    wait for the device."""
    def pinned(t: torch.Tensor) -> torch.Tensor:
        return t if device.type != "cuda" or t.is_pinned() else t.pin_memory()

    layout = model.layout(batch["attention_mask"])
    if layout is not None:
        layout = replace(layout, indices=pinned(layout.indices),
                         cu_seqlens=pinned(layout.cu_seqlens), mask=pinned(layout.mask))
        layout = layout.to(device, non_blocking=True)
    return {k: pinned(v).to(device, non_blocking=True) for k, v in batch.items()}, layout


def uses_cuda_graphs(compile: bool, compile_mode: str, unpad: bool = False, unpad_bucket: int = 0) -> bool:
    """Whether the compiled model replays CUDA graphs (``compile_mode=reduce-overhead``). With
    ``unpad`` and no ``unpad_bucket`` it warns: the packed token count changes every micro-batch,
    and each new count records a graph of its own."""
    graphs = bool(compile) and compile_mode == "reduce-overhead"
    if graphs and unpad and not unpad_bucket:
        log.warning("compile_mode=reduce-overhead with kernel.unpad=true: the number of real tokens "
                    "changes every micro-batch and each new number records a CUDA graph of its own "
                    "(slow, and each keeps its memory); set kernel.unpad_bucket (e.g. 256: one graph "
                    "per bucket of token counts) or kernel.unpad=false (one graph)")
    return graphs


def graph_step_marker(graphs: bool) -> Callable[[], None]:
    """What a training loop calls before each forward: with CUDA graphs (:func:`uses_cuda_graphs`),
    ``torch.compiler.cudagraph_mark_step_begin`` (a new step begins, so the CUDA graphs may reuse the
    previous step's output memory: the loops keep none of it, and the gradients are kept apart,
    ``OptimizerStep(keep_grads=True)``), else nothing."""
    if graphs:
        return torch.compiler.cudagraph_mark_step_begin
    return lambda: None


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits.

    A stop signal often comes more than once: Slurm signals every process of the job step while
    torchrun forwards its own SIGTERM to its workers, and a wrapper such as ``timeout`` in the process
    group passes it on again. Repeats change nothing, so the checkpoint is still saved; only a second
    Ctrl-C (SIGINT after a SIGINT) means "stop now, without saving"."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None  # the first one received
        self.interrupts = 0  # SIGINTs received
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:  # Ctrl-C again: the user will not wait for the save
                raise KeyboardInterrupt
        if self.requested:  # the same stop asked again (by the scheduler, torchrun, a wrapper)
            return
        log.warning("signal %s: will save a checkpoint and stop at the end of this step (a second Ctrl-C "
                    "stops at once, without it)", signum)
        self.requested, self.signal = True, signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # stopping on SIGTERM: a late repeat of it must not kill the exit that reports the stop
            signal.signal(sig, signal.SIG_IGN if self.requested and sig == signal.SIGTERM else handler)


# --------------------------------------------------------------------------- training


def elastic_restart(cfg: DictConfig, checkpoint_dir: Path, ctx: dist.DistContext) -> bool:
    """Under ``torchrun --max-restarts``, a restarted worker group (``ctx.attempt`` > 0, agreed by
    every rank, on every node) continues the run: from its latest checkpoint, as ``resume=true`` does
    (``cfg.resume`` is set), or, when the failed attempt wrote none, from the start, over that
    attempt's files. Returns whether this is such a fresh start over a failed attempt."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0) > 0 and ctx.is_main and \
            os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        log.warning("torchrun --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the launcher's "
                    "environment: restarted workers may meet the failed attempt's stale rendezvous keys and "
                    "hang or fail to connect (see README, Many GPUs)")
    restarts = ctx.attempt
    if restarts <= 0 or cfg.resume:
        return False
    if (checkpoint_dir / LATEST_FILE).is_file():
        log.warning("torchrun restart %d: continuing from the latest checkpoint in %s (as resume=true)",
                    restarts, checkpoint_dir)
        cfg.resume = True
        return False
    log.warning("torchrun restart %d: the failed attempt saved no checkpoint in %s; starting over",
                restarts, checkpoint_dir)
    return True


def train(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Pre-train as ``cfg`` says; returns a summary (final step, last logged metrics, paths)."""
    output_dir = prepare_output_dir(output_dir or cfg.output_dir)
    checkpoint_dir = output_dir / CHECKPOINT_SUBDIR
    device = pick_device(cfg.device)
    ctx = dist.init_distributed(cfg.distributed, device)
    try:
        dist.same_output_dir(output_dir, ctx)
        return _train(cfg, output_dir, checkpoint_dir, dist.device_for_rank(device, ctx), ctx,
                      starting_over=elastic_restart(cfg, checkpoint_dir, ctx))
    finally:
        dist.shutdown(ctx)


def stopped_before_its_first_checkpoint(output_dir: Path, checkpoint_dir: Path) -> bool:
    """Whether ``output_dir`` holds a run (its config.yaml or metrics.jsonl) that has no complete
    checkpoint: it was killed before its first save finished."""
    started = (output_dir / "config.yaml").is_file() or (output_dir / "metrics.jsonl").is_file()
    complete = (checkpoint_dir / LATEST_FILE).is_file() or (checkpoint_dir / STATE_FILE).is_file() or \
        bool(list_checkpoints(checkpoint_dir))
    return started and not complete


def warn_if_saved_before_rescale_after_warmup(checkpoint_file: str | Path, cfg: DictConfig) -> None:
    """A run saved when ``warmup_linear`` decayed as (1 - x)/(1 - warmup), before
    ``scheduler.rescale_after_warmup`` existed, now gets 1 - x unless told: say so on resume."""
    saved_config = Path(checkpoint_file).parent / "config.yaml"
    if not saved_config.is_file():
        return
    scheduler = OmegaConf.load(saved_config).get("scheduler") or {}
    if str(scheduler.get("_target_", "")).endswith(".WarmupLinear") and \
            "rescale_after_warmup" not in scheduler and not cfg.scheduler.get("rescale_after_warmup", False):
        log.warning("the run was saved when warmup_linear decayed as (1 - x)/(1 - warmup); it now decays as "
                    "1 - x (Google BERT's and BingBertSquad's): give scheduler.rescale_after_warmup=true to "
                    "keep the saved run's rates")


def logged_eval(metrics: Path, step: int) -> bool:
    """Whether ``metrics`` (a run's metrics.jsonl) holds the held-out evaluation of ``step``."""
    if not metrics.is_file():
        return False
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step") == step and "eval_loss" in record:
            return True
    return False


def data_identity(dataset) -> dict[str, Any]:
    """What fixes the training data, for a resumed run to compare: the count of instances, the
    vocabulary, and the content of three of them (first, middle, last). Content, not the preparation
    settings, which name the corpus files' paths and times: the same data staged elsewhere matches."""
    n = len(dataset)
    sample = dataset.get_batch(sorted({0, n // 2, n - 1}), epoch=0)
    digest = hashlib.sha256()
    for key in sorted(sample):
        digest.update(key.encode())
        digest.update(sample[key].numpy().tobytes())
    return {"num_instances": n, "vocab_sha256": (dataset.manifest or {}).get("vocab_sha256"),
            "sample_sha256": digest.hexdigest()[:16]}


def saved_data_order(saved: dict[str, Any]) -> str:
    """The order of the data a checkpoint's run read: runs saved before the key existed cut every epoch
    to whole global micro-batches (`whole_batches`), later ones read one continuous stream."""
    return (saved.get("client_state") or {}).get("data_order", WHOLE_BATCHES)


def check_resumed_data(cfg: DictConfig, saved: dict[str, Any], now: dict[str, Any], state: TrainState,
                       micro: int, world: int) -> None:
    """A resumed run continues the saved one's position in the data: the same data and seed (they
    fix the order); in the `whole_batches` order of older runs, also a micro-batch x world size that
    divides the samples already consumed."""
    client = saved.get("client_state") or {}
    if "seed" in client and client["seed"] != cfg.seed:
        raise ConfigError(f"resume=true but the run was saved with seed={client['seed']} (now {cfg.seed}): "
                          "the seed fixes the order of the data, so a resumed run must keep it (give the "
                          "saved value)")
    was = client.get("data") or {}  # ``now``: this run's data_identity
    differences = []
    if was.get("num_instances", now["num_instances"]) != now["num_instances"]:
        differences.append(f"{was['num_instances']} instances then, {now['num_instances']} now")
    if was.get("vocab_sha256", now["vocab_sha256"]) != now["vocab_sha256"]:
        differences.append("another vocabulary")
    if not differences and was.get("sample_sha256", now["sample_sha256"]) != now["sample_sha256"]:
        differences.append("other instances")
    if differences:
        raise ConfigError(f"resume=true but the training data is not the saved run's "
                          f"({', '.join(differences)}): its position in the data would mean other samples; "
                          "resume with the data overrides it was saved with (its config.yaml), or start a "
                          "new run with init_from")
    consumed = state.last_global_data_samples
    if saved_data_order(saved) == WHOLE_BATCHES and consumed % (micro * world):
        fits = [m for m in range(1, 2 * micro + 1) if consumed % (m * world) == 0][-3:]
        advice = (f"resume with a micro-batch that divides it (such as {', '.join(map(str, fits))}, with "
                  "train_batch_size to match)" if fits else
                  "resume on as many ranks as the run was saved with")
        raise ConfigError(f"resume=true but the run has consumed {consumed} samples, not a multiple of "
                          f"train_micro_batch_size_per_gpu={micro} x {world} ranks, and was saved before "
                          "the data became one continuous stream (its epochs are cut to whole micro-"
                          f"batches), so the next micro-batch cannot start where it stopped: {advice}")


def restore_optimizer_and_scaler(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                 scaler: LossScaler, saved: dict[str, Any], target: str,
                                 occasion: str = "resume") -> None:
    """Load a checkpoint's optimizer and loss-scaler state, keeping this run's settings: a
    hyperparameter (weight decay, betas, eps, LAMB's min/max_coeff, bias correction) or a precision
    setting changed on resume takes effect, with a warning naming it. ``target`` names this run's
    optimizer in the error when the saved state is another optimizer's; ``occasion`` (resume or
    init_from) says why the state is loaded."""
    remedy = ("resume with the optimizer the run was saved with" if occasion == "resume" else
              "use the optimizer that run used, or load_optimizer_states=false for a fresh one")
    configured = [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
                  for group in optimizer.param_groups]
    saved_optimizer = saved["optimizer"] or {}
    if saved_optimizer.get("format") == "fqn":  # FSDP's, keyed by parameter name
        saved_optimizer = saved_optimizer.get("state") or {}
    saved_groups = saved_optimizer.get("param_groups") or []
    saved_keys = set().union(*(g.keys() for g in saved_groups)) - {"params", "lr", "initial_lr"}
    missing = sorted(set().union(*(c.keys() for c in configured)) - saved_keys) if saved_groups else []
    if missing:  # torch would load it, and the first step would fail on the missing settings
        raise CheckpointError(f"{saved['path']}: its optimizer state does not fit this run's optimizer "
                              f"({target}): it has no {', '.join(missing)}, so another optimizer saved it; "
                              f"{remedy}")
    try:
        dist.load_optimizer_state(model, optimizer, saved["optimizer"])
    except UserError:  # a strategy that cannot load this state: said as it is
        raise
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{saved['path']}: its optimizer state does not fit this run's optimizer "
                              f"({target}), so another optimizer saved it ({e}); {remedy}") from e
    saved["optimizer"] = None  # loaded: let the copy go (gigabytes for BERT-large)
    changed: dict[str, tuple[Any, Any]] = {}
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        for key, value in settings.items():
            if key in group and group[key] != value:
                changed.setdefault(key, (group[key], value))
            group[key] = value
    if changed:
        log.warning("%s with optimizer settings other than the saved ones, which now apply: %s",
                    "resuming" if occasion == "resume" else "continuing init_from's optimizer state",
                    ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
    if not scaler.load_state_dict(saved["scaler"]):
        def described(dynamic: bool, scale: float) -> str:
            return (f"a dynamic loss scale at {scale:g}" if dynamic else
                    f"a static loss scale of {scale:g}" if scale != 1.0 else "no loss scaling")

        log.warning("the run was saved with %s; this run's precision settings give %s, which now applies",
                    described(bool(saved["scaler"].get("dynamic")), float(saved["scaler"]["scale"])),
                    described(scaler.dynamic, scaler.scale))


def check_run_settings(cfg: DictConfig, output_dir: Path, starting_over: bool = False) -> None:
    """What the schema's types cannot reject, said before any work: unknown keys, out-of-range
    values, a phase without the checkpoint it continues, an output_dir that holds another run (not
    when ``starting_over`` a failed attempt of this one, see :func:`elastic_restart`)."""
    refuse_unknown_keys(cfg, PretrainConfig)
    for key, low, note in (("steps_per_print", 1, ""), ("checkpoint_steps", 0, " (0 = off)"),
                           ("max_predictions_per_seq", 1, ""),
                           ("max_seq_length", 5, " ([CLS] A [SEP] B [SEP] with one token each)"),
                           ("keep_last_checkpoints", 0, " (0 = keep all)"),
                           ("max_grad_norm", 0, " (0 = off)"),
                           ("eval_steps", 0, " (0 = evaluate after the last step only)")):
        if not cfg[key] >= low:
            raise ConfigError(f"{key} must be >= {low}, got {cfg[key]}{note}")
    for key, note in (("eval_batch_size", ""), ("max_eval_samples", ""),
                      ("total_training_steps", " (null = max_steps)")):
        if cfg[key] is not None and cfg[key] < 1:
            raise ConfigError(f"{key} must be a positive integer or null{note}, got {cfg[key]}")
    if cfg.init_from_required and not cfg.init_from and not cfg.resume:
        raise ConfigError(f"job {cfg.job_name} continues an earlier phase: give init_from=<its checkpoint "
                          "directory or file> (+phase=seq512: the seq128 run's checkpoints/), or "
                          "resume=true to continue this run")
    if not cfg.resume and not starting_over:  # a second run into the same directory would mix its
        # checkpoints and metrics in
        earlier = [name for name in (CHECKPOINT_SUBDIR, "metrics.jsonl") if (output_dir / name).exists()]
        if earlier:
            raise ConfigError(f"output_dir {output_dir} already holds a run ({', '.join(earlier)}): continue "
                              "it with resume=true (which starts it over if it stopped before its first "
                              "checkpoint), or give another output_dir (by default each run gets a new "
                              "time-stamped one)")


def _train(cfg: DictConfig, output_dir: Path, checkpoint_dir: Path, device: torch.device,
           ctx: dist.DistContext, starting_over: bool = False) -> dict[str, Any]:
    batch = resolve_batch_sizes(cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu,
                                cfg.gradient_accumulation_steps, ctx.world_size)
    if cfg.max_steps <= 0:
        raise ConfigError(f"max_steps must be positive, got {cfg.max_steps}")
    check_run_settings(cfg, output_dir, starting_over)
    if cfg.compile_mode not in dist.COMPILE_MODES:
        raise ConfigError(f"compile_mode must be one of {', '.join(dist.COMPILE_MODES)}, "
                          f"got {cfg.compile_mode!r}")
    check_triton_device(cfg, device)
    layer_drop = build_layer_drop(cfg, ctx)
    vocab_multiple(cfg.model)
    total_steps = cfg.total_training_steps or cfg.max_steps
    precision = cfg.precision.dtype
    autocast_dtype(precision)  # validates the name
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision=bf16 but this GPU does not support bfloat16; use precision=fp16")

    resume_from = None
    if cfg.resume and stopped_before_its_first_checkpoint(output_dir, checkpoint_dir):
        saved = OmegaConf.load(output_dir / "config.yaml") if (output_dir / "config.yaml").is_file() else {}
        if saved.get("checkpoint_steps") == 0 and saved.get("checkpoint_at_end") is False:
            raise ConfigError(f"resume=true but the run in {output_dir} saves no checkpoints "
                              "(checkpoint_steps=0, checkpoint_at_end=false): there is nothing to resume; "
                              "give another output_dir")
        if cfg.init_from_required and not cfg.init_from:
            raise ConfigError(f"resume=true but the run in {output_dir} stopped before it saved a "
                              f"checkpoint, so it starts over, and job {cfg.job_name} continues an earlier "
                              "phase: give init_from=<its checkpoint directory> as the first attempt did")
        log.warning("resume=true but the run in %s stopped before it saved a checkpoint: starting it over "
                    "(its metrics.jsonl is replaced)", output_dir)
        starting_over = True
    elif cfg.resume:
        if not checkpoint_dir.is_dir():
            raise CheckpointError(
                f"resume=true but no checkpoint in {checkpoint_dir}: the directory does not exist "
                f"(set output_dir to the directory of the run to continue)"
            )
        try:
            resume_from = load_checkpoint(checkpoint_dir)
        except CheckpointError as e:
            raise CheckpointError(f"resume=true but {e}") from e
    init_from = None
    if cfg.init_from and resume_from is None:
        init_from = load_model_state(cfg.init_from, cfg.ckpt_type, cfg.origin_bert_config_file,
                                     keep_training_state=cfg.load_optimizer_states is not False)

    resolved_config = OmegaConf.to_yaml(cfg, resolve=True)
    if ctx.is_main and resume_from is None:  # before the data build, which can take hours: a run stopped
        # in it is then known as one that stopped before its first checkpoint (resume=true starts it over)
        write_text_atomic(output_dir / "config.yaml", resolved_config)

    seed_everything(cfg.seed)
    with dist.main_rank_first(ctx, "data"):  # rank 0 builds (or finds) the data cache; the others read it
        dataset = build_pretraining_dataset(cfg)
        eval_dataset = build_run_eval_dataset(cfg, dataset.vocab_file) if cfg.eval_data else None
    if eval_dataset is not None:  # too small for the world size: say so now, not after training
        eval_share(len(eval_dataset), cfg.max_eval_samples, ctx.world_size)
    if init_from is not None and init_from.vocab_file is not None and Path(init_from.vocab_file).is_file() \
            and read_vocab(init_from.vocab_file) != read_vocab(dataset.vocab_file):
        raise ConfigError(f"init_from={cfg.init_from} was trained with the vocabulary "
                          f"{init_from.vocab_file}, and this run's data uses another ({dataset.vocab_file}): "
                          "its embedding rows would stand for other tokens; give "
                          + ("data.vocab_file its vocabulary" if "vocab_file" in cfg.data else
                             f"data from text with its vocabulary (data=text_files data.paths=[...] "
                             f"data.vocab_file={init_from.vocab_file})"))
    model_config = build_model_config(cfg.model, dataset.vocab_size, cfg.max_seq_length)
    if resume_from is not None:
        check_resumed_architecture(resume_from, model_config)
    init_optimizer = optimizer_state_to_continue(cfg, init_from, model_config)
    unpad, unpad_bucket = unpad_options(cfg.kernel)
    raw_model = BertForPreTraining(model_config, layer_factory=build_layer_factory(cfg.kernel),
                                   unpad=unpad, unpad_bucket=unpad_bucket).to(device)
    schedule = build_from_config("scheduler", cfg.scheduler, base_lr=cfg.optimizer.lr,
                                 total_steps=total_steps)
    scaler = LossScaler.from_config(cfg.precision, device)
    state = TrainState()

    if init_from is not None:
        report = load_into_model(raw_model, init_from)  # fits a padded vocabulary; encoder must match
        if report.missing_keys:
            log.warning("%s has no %s: those start from random initialisation", init_from.source,
                        report.missing_keys)
        if not cfg.rewarmup and init_from.global_step is not None:
            state.schedule_step = init_from.global_step  # continue where the previous phase left off
        if init_from.global_step is not None and normalize_ckpt_type(cfg.ckpt_type) == "DS":
            state.pld_step_offset = init_from.global_step  # as DeepSpeed restores its global step
        log.info("initialised model weights from %s (%s; schedule step %d)", init_from.source,
                 cfg.ckpt_type, state.schedule_step)
    if resume_from is not None:
        load_model_weights(raw_model, resume_from, resume_from["path"])

    # DDP wraps the model; FSDP shards its parameters in place, so the optimizer comes after.
    seed_rank_streams(cfg.seed, ctx)
    model = dist.wrap_model(raw_model, ctx, cfg.distributed, compile=cfg.compile,
                            compile_mode=cfg.compile_mode, find_unused_parameters=layer_drop is not None)
    make_optimizer = build_from_config("optimizer", cfg.optimizer, _partial_=True)
    try:  # the constructor runs here (a partial): its ValueError is a bad optimizer setting
        optimizer = dist.build_optimizer(make_optimizer,
                                         build_param_groups(raw_model, cfg.optimizer.weight_decay),
                                         ctx, cfg.distributed)
    except UserError:  # a distributed setting the optimizer cannot run under: said as it is
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer: {e}") from e
    if init_optimizer is not None:
        try:
            restore_optimizer_and_scaler(raw_model, optimizer, scaler, init_optimizer, cfg.optimizer._target_,
                                         occasion="init_from")
            log.info("continuing the optimizer state of %s", init_from.source)
        except UserError as e:  # another optimizer's, or a strategy that cannot load it: required, or fresh
            if cfg.load_optimizer_states:
                raise
            log.info("init_from's optimizer state is not continued (%s): a fresh optimizer", e)
        init_from.training_state = init_optimizer = None  # loaded (or not): let the copy go
    if resume_from is not None:
        restore_optimizer_and_scaler(raw_model, optimizer, scaler, resume_from, cfg.optimizer._target_)
        warn_if_saved_before_rescale_after_warmup(resume_from["path"], cfg)
        state = TrainState(**resume_from["train_state"])
        log.info("resumed from %s at step %d", resume_from["path"], state.global_step)
        saved_pld, now_pld = resume_from.get("layer_drop"), layer_drop_settings(cfg)
        if saved_pld != now_pld:
            log.warning("progressive_layer_drop was %s when the run was saved and is %s now: the layers run "
                        "from here on differ from an uninterrupted run's", saved_pld or "off",
                        now_pld or "off")
        saved_total = resume_from["scheduler"].get("total_steps")
        if saved_total is not None and saved_total != total_steps:
            log.warning("the LR schedule's horizon was %d steps when the run was saved and is %d now "
                        "(total_training_steps=%s, max_steps=%d): its rates from here on differ from an "
                        "uninterrupted run's; give total_training_steps=%d to keep the horizon",
                        saved_total, total_steps, cfg.total_training_steps, cfg.max_steps, saved_total)

    micro = batch.train_micro_batch_size_per_gpu
    identity = data_identity(dataset)  # saved with every checkpoint, compared on resume
    data_order = CONTINUOUS
    if resume_from is not None:
        check_resumed_data(cfg, resume_from, identity, state, micro, ctx.world_size)
        data_order = saved_data_order(resume_from)
        if data_order != CONTINUOUS:
            log.info("the run was saved reading its data with each epoch cut to whole micro-batches "
                     "(micro-batch x world size %d); it goes on that way", micro * ctx.world_size)
    if len(dataset) < micro * ctx.world_size:
        raise ConfigError(f"the training data has {len(dataset)} instances, fewer than one micro-batch on "
                          f"every rank (train_micro_batch_size_per_gpu={micro} x {ctx.world_size} ranks): "
                          "give more data or a smaller micro-batch")
    loader = PretrainingLoader(
        dataset, batch.train_micro_batch_size_per_gpu, seed=cfg.seed, rank=ctx.rank,
        world_size=ctx.world_size, start_sample=state.last_global_data_samples,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory and device.type == "cuda", order=data_order,
    )
    batches = iter(loader)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    # Rank 0 alone writes metrics, config and dashboards.
    if ctx.is_main:
        logger = instantiate(cfg.logger, run_config=config_dict, output_dir=str(output_dir),
                             default_name=cfg.job_name, _recursive_=False, _convert_="all")
        metrics_file = MetricsFile(output_dir / "metrics.jsonl",
                                   truncate_after_step=state.global_step if resume_from else
                                   0 if starting_over else None)
    else:
        logger, metrics_file = NullLogger(), None

    flops_per_sample = training_flops_per_sample(model_config, cfg.max_seq_length,
                                                 cfg.max_predictions_per_seq)
    peak_tflops = cfg.peak_tflops or measure_peak_tflops(device, autocast_dtype(precision))
    if device.type == "cuda":  # max_memory_gb is the training's, not the matmul probe's
        torch.cuda.reset_peak_memory_stats(device)
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = uses_cuda_graphs(cfg.compile, cfg.compile_mode, unpad, unpad_bucket)
    # with layer dropping, kept gradients: a layer skipped for a whole step gets zeros, not none, so
    # the optimizer steps it as DeepSpeed's does
    step_optimizer = OptimizerStep(params, optimizer, scaler, schedule, state, cfg.max_grad_norm,
                                   keep_grads=graphs or layer_drop is not None)
    mark_graph_step = graph_step_marker(graphs)
    accum = batch.gradient_accumulation_steps
    log.info(
        "model: %.1fM parameters; batch %d = micro %d x accumulation %d x world %d; %d steps on %s, %s",
        sum(p.numel() for p in params) / 1e6, batch.train_batch_size, batch.train_micro_batch_size_per_gpu,
        accum, ctx.world_size, cfg.max_steps, device, precision,
    )

    def checkpoint(tag: str) -> None:
        step_optimizer.resolve()  # the last step's outcome decides the counters saved
        # collectives under ZeRO/FSDP: every rank gathers, rank 0 writes
        model_state = dist.model_state_for_checkpoint(raw_model)
        optimizer_state = dist.optimizer_state_for_checkpoint(raw_model, optimizer, ctx)
        rng_ranks = rank_rng_states(ctx)
        if ctx.is_main:
            save_checkpoint(
                checkpoint_dir, tag,
                state={"model": model_state, "optimizer": optimizer_state, "rng_ranks": rng_ranks,
                       "layer_drop": layer_drop_settings(cfg),
                       "scheduler": {"schedule_step": state.schedule_step, "total_steps": total_steps},
                       "scaler": scaler.state_dict(),
                       "train_state": asdict(state), "model_config": model_config.to_dict(),
                       "world_size": ctx.world_size},
                # DeepSpeed bing_bert's names for the data position, for users' own tooling.
                client_state={"epoch": state.epoch, "last_global_step": state.global_step,
                              "last_global_data_samples": state.last_global_data_samples,
                              "vocab_file": str(dataset.vocab_file), "seed": cfg.seed,
                              "data": identity, "data_order": data_order},
                config_yaml=resolved_config, keep_last=cfg.keep_last_checkpoints,
                files={VOCAB_FILE: dataset.vocab_file},
            )
        dist.barrier(ctx)

    def evaluate() -> dict[str, Any]:
        """Score the held-out set; its record goes to metrics.jsonl and the logger like a step's."""
        scores = evaluate_pretraining(raw_model, eval_dataset, device=device, precision=precision,
                                      batch_size=cfg.eval_batch_size or batch.train_micro_batch_size_per_gpu,
                                      max_samples=cfg.max_eval_samples, ctx=ctx,
                                      progress=cfg.progress_bar and ctx.is_main)
        record = {"step": state.global_step, "samples": state.last_global_data_samples, **scores}
        if metrics_file is not None:
            metrics_file.write(record)
        logger.log(record, step=state.global_step)
        log.info("step %d: eval loss %s, MLM accuracy %.4f, NSP accuracy %.4f (%d sequences)",
                 state.global_step, scores["eval_loss"], scores["eval_mlm_accuracy"],
                 scores["eval_nsp_accuracy"], scores["eval_samples"])
        return record

    model.train()
    throughput = Throughput(device)
    real_tokens = 0
    throughput.reset(state.last_global_data_samples, real_tokens)
    tokens_at_last_log, real_tokens_logged = 0, 0.0
    layers_run, forwards = 0, 0  # since the last record: layers the micro-batches ran, micro-batches
    progress = tqdm(total=cfg.max_steps, initial=state.global_step, desc=cfg.job_name, unit="step",
                    disable=not (cfg.progress_bar and ctx.is_main), dynamic_ncols=True)
    last_record: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    first_step = state.global_step
    last_saved_step = state.global_step if resume_from else -1
    if resume_from is not None and eval_dataset is not None and cfg.eval_steps and \
            state.global_step % cfg.eval_steps == 0 and state.global_step < cfg.max_steps:
        # the checkpoint comes before its step's evaluation: a run stopped during that evaluation
        # has none on record, so it is done now (rank 0 reads the record; every rank evaluates)
        missing = torch.tensor(float(ctx.is_main and not logged_eval(output_dir / "metrics.jsonl",
                                                                     state.global_step)))
        if dist.all_reduce_sum(missing.to(device), ctx).item():
            log.info("step %d's evaluation was not finished when the run stopped: evaluating now",
                     state.global_step)
            with throughput.paused():  # samples/s and MFU count training time only
                last_eval = evaluate()
    if resume_from is not None:  # last before the loop: nothing else draws from the restored stream
        restore_rank_rng(resume_from, ctx)
    try:
        with StopRequest() as stop:
            stopping = False  # a signal on any rank stops every rank at the same step
            vote = dist.StopVote(ctx, device)
            while state.global_step < cfg.max_steps:
                if vote(stop.requested):
                    stopping = True
                    break
                # ---- one optimizer step: accumulate `accum` micro-batches (gradients are
                # all-reduced across ranks on the last one only)
                loss_sum = torch.zeros(3, device=device)
                for micro_step in range(accum):
                    mark_graph_step()
                    host_batch = next(batches)
                    real_tokens += int(host_batch["length"].sum())  # on the host copy: no GPU sync
                    micro, layout = batch_to_device(host_batch, device, raw_model.bert)
                    boundary = micro_step == accum - 1
                    layer_keep = None
                    if layer_drop is not None:  # drawn for the global micro-batch: any world size alike
                        layer_keep = layer_drop.draw(state.global_step + state.pld_step_offset,
                                                     micro_step * ctx.world_size + ctx.rank)
                        layers_run += sum(keep > 0.0 for keep in layer_keep)
                    forwards += 1
                    with dist.no_sync(model, sync=boundary), autocast_context(precision, device):
                        mlm_logits, nsp_logits = model(
                            micro["input_ids"], micro["token_type_ids"], micro["attention_mask"],
                            micro["masked_lm_positions"], unpadded=layout, layer_keep=layer_keep,
                        )
                        loss, mlm_loss, nsp_loss = pretraining_loss(
                            mlm_logits, nsp_logits, micro["masked_lm_labels"], micro["next_sentence_labels"]
                        )
                        (loss * (step_optimizer.loss_scale / accum)).backward()
                    loss_sum += torch.stack([loss, mlm_loss, nsp_loss]).detach()
                state.last_global_data_samples += batch.train_batch_size
                state.epoch = loader.epoch
                state.global_step += 1

                # ---- unscale, overflow check, clip, LR, step, zero (no host sync; see OptimizerStep)
                grad_norm = step_optimizer()
                progress.update(1)

                # ---- logging and checkpoints, when due
                is_last = state.global_step >= cfg.max_steps
                if state.global_step % cfg.steps_per_print == 0 or is_last:
                    step_optimizer.resolve()  # this step's skip decides skipped_steps
                    # losses averaged over ranks; tokens summed over ranks
                    reduced = torch.cat([loss_sum / accum, torch.tensor(
                        [real_tokens - tokens_at_last_log, layers_run], device=device, dtype=loss_sum.dtype)])
                    reduced = dist.all_reduce_mean(reduced, ctx).tolist()  # one read of the device
                    losses = reduced[:3]
                    global_tokens = real_tokens_logged + reduced[3] * ctx.world_size
                    samples_per_sec, tokens_per_sec = throughput.rates(state.last_global_data_samples,
                                                                       global_tokens)
                    record = {
                        "step": state.global_step,
                        "samples": state.last_global_data_samples,
                        "epoch": state.epoch,
                        "loss": finite_or_none(losses[0]),
                        "mlm_loss": finite_or_none(losses[1]),
                        "nsp_loss": finite_or_none(losses[2]),
                        "lr": optimizer.param_groups[0]["lr"],
                        "grad_norm": finite_or_none(float(dist.full(grad_norm))),
                        "samples_per_sec": samples_per_sec,
                        "tokens_per_sec": tokens_per_sec,
                        "skipped_steps": state.skipped_steps,
                    }
                    if precision == "fp16":
                        record["loss_scale"] = scaler.scale
                    window_flops = flops_per_sample
                    if layer_drop is not None:  # the last step's keep ratio; the share of layers run
                        steps_before = state.global_step - 1 + state.pld_step_offset
                        record["pld_theta"] = layer_drop.theta_at(steps_before)
                        mean_layers = reduced[4] / forwards  # per micro-batch, over the ranks
                        record["pld_layers"] = mean_layers / model_config.num_hidden_layers
                        window_flops = training_flops_per_sample(
                            model_config, cfg.max_seq_length, cfg.max_predictions_per_seq, layers=mean_layers)
                    layers_run, forwards = 0, 0
                    has_coeffs = hasattr(dist.local_optimizer(optimizer), "last_coeffs")  # LAMB's
                    coeffs = getattr(dist.local_optimizer(optimizer), "last_coeffs", None)
                    # the same decision on every rank (the skip comes from the full gradient norm), so
                    # ZeRO's collective below runs on all of them or none
                    if has_coeffs and step_optimizer.last_skipped:  # no trust ratios: no update
                        record.update(lamb_coeff_min=None, lamb_coeff_max=None, lamb_coeff_mean=None)
                    elif dist.is_zero(optimizer) and has_coeffs:
                        stats = dist.spread_stats(coeffs, ctx, device)  # each rank has its shard's
                        if stats is not None:
                            record.update(lamb_coeff_min=stats[0], lamb_coeff_max=stats[1],
                                          lamb_coeff_mean=stats[2])
                    elif coeffs is not None and coeffs.numel():
                        coeffs = dist.full(coeffs)
                        record.update(lamb_coeff_min=float(coeffs.min()), lamb_coeff_max=float(coeffs.max()),
                                      lamb_coeff_mean=float(coeffs.mean()))
                    if device.type == "cuda":
                        record["tflops"] = samples_per_sec * window_flops / 1e12
                        if peak_tflops:
                            record["mfu"] = record["tflops"] / peak_tflops
                        record["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    if metrics_file is not None:
                        metrics_file.write(record)
                    logger.log(record, step=state.global_step)
                    progress.set_postfix(loss=f"{losses[0]:.4f}", samples_s=f"{samples_per_sec:.1f}")
                    last_record = record
                    tokens_at_last_log, real_tokens_logged = real_tokens, global_tokens
                    throughput.reset(state.last_global_data_samples, global_tokens)
                if cfg.checkpoint_steps and state.global_step % cfg.checkpoint_steps == 0:
                    checkpoint(f"global_step{state.global_step}")
                    last_saved_step = state.global_step
                # after the checkpoint, so a failed evaluation loses no training
                if eval_dataset is not None and cfg.eval_steps and not is_last and \
                        state.global_step % cfg.eval_steps == 0:
                    with throughput.paused():  # samples/s and MFU count training time only
                        last_eval = evaluate()
            step_optimizer.resolve()
            if last_saved_step != state.global_step and (cfg.checkpoint_at_end or stopping):
                checkpoint(f"global_step{state.global_step}")
            if eval_dataset is not None and not stopping and state.global_step > first_step and \
                    last_eval.get("step") != state.global_step:
                last_eval = evaluate()
            if stopping and ctx.is_main:  # once, not once per rank
                log.warning("stopped at step %d on request; resume with resume=true output_dir=%s",
                            state.global_step, output_dir)
    finally:
        # the loader's worker processes stop here, however the run ends: they ignore SIGTERM (see
        # PretrainingLoader), so left to the interpreter's exit they would be waited for forever
        batches.close()
        progress.close()
        if metrics_file is not None:
            metrics_file.close()
        logger.finish()
    return {
        "global_step": state.global_step,
        "output_dir": str(output_dir),
        "checkpoint_dir": str(checkpoint_dir),
        "last_metrics": last_record,
        "last_eval": last_eval,
        "stop_signal": (stop.signal or signal.SIGTERM) if stopping else None,  # another rank's, if not ours
        "train_state": asdict(state),
    }


def run_and_report(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any] | None:
    """``train`` with user errors printed as one line (no traceback) and exit status 2; a run stopped
    by a signal exits with 128 + its number, as if killed by it, so a job chain or a scheduler does not
    take it for a finished one."""
    try:
        summary = train(cfg, output_dir)
    except UserError as e:
        report_user_error(e)
    exit_on_stop(summary)
    return summary


def report_user_error(error: UserError) -> NoReturn:
    """Log ``error`` in one line and exit with status 2. In a sweep (``-m``) raise it again instead, as
    one of Hydra's compact errors: Hydra then marks this job failed, runs the others, and at the end
    exits 1 with the job's overrides and this one line (no traceback)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import CompactHydraException
    from hydra.types import RunMode

    log.error("%s", error)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise type("SweepJobError", (CompactHydraException,), {})(str(error)) from None
    raise SystemExit(2) from None


def exit_on_stop(summary: dict[str, Any]) -> None:
    """Exit with 128 + the signal's number if the run ``summary`` describes was stopped by one."""
    if summary.get("stop_signal"):
        raise SystemExit(128 + int(summary["stop_signal"]))


__all__ = ["TrainState", "exit_on_stop", "report_user_error", "train", "run_and_report"]
