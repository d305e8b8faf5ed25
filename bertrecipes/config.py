"""Typed configuration schema and batch-size arithmetic.

Every config group (model, optimizer, scheduler, precision, kernel, data, logger) has a dataclass
schema registered in Hydra's ConfigStore as ``<group>/<name>_schema``; each YAML option lists its
schema first in its defaults, so a misspelled key, in a file or on the command line, is an error
that names the key instead of a silently ignored value.

Knobs keep the names users know from DeepSpeed's bing_bert (``train_batch_size``,
``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``max_grad_norm``,
``loss_scale``, ``initial_scale_power``, ``min_coeff``/``max_coeff``, ``steps_per_print``).
"""

from __future__ import annotations

import datetime
import difflib
import itertools
import os
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from bertrecipes.data.config import register_data_configs
from bertrecipes.distributed import DistributedConfig
from bertrecipes.errors import ConfigError
from bertrecipes.layer_drop import ProgressiveLayerDropConfig


def config_dir() -> str:
    """The Hydra config directory: ``conf/`` of the source tree (a clone, an editable install), else
    the copy an installed wheel carries as ``bertrecipes/conf``."""
    package = Path(__file__).resolve().parent
    source_tree = package.parent / "conf"
    return str(source_tree if (source_tree / "pretrain.yaml").is_file() else package / "conf")

# --------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """BERT architecture (names of Google's bert_config.json). vocab_size null = the tokenizer's,
    rounded up to a multiple of ``pad_vocab_to_multiple_of``."""

    vocab_size: int | None = None
    # with vocab_size null: extra embedding rows (never a label) up to a multiple of this, as bing_bert
    # and NVIDIA's BERT pad 30522 to 30528 (8: row strides tensor cores take in fp16/bf16); 1 = none
    pad_vocab_to_multiple_of: int = 1
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pre_layer_norm: bool = False


# --------------------------------------------------------------------------- optimizer


@dataclass
class LambConfig:
    _target_: str = "bertrecipes.optim.Lamb"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    bias_correction: bool = True
    max_coeff: float = 10.0
    min_coeff: float = 0.01
    fused: bool | None = None  # null = Triton step on CUDA when available; true = require; false = foreach


@dataclass
class AdamConfig:
    _target_: str = "bertrecipes.optim.Adam"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    bias_correction: bool = True
    adam_w_mode: bool = True
    fused: bool | None = None  # null = Triton step on CUDA when available; true = require; false = foreach


# --------------------------------------------------------------------------- scheduler
# base_lr (= optimizer.lr) and total_steps (= total_training_steps) are passed when the schedule
# is built, so they are set in one place only.


@dataclass
class WarmupExpDecayExpConfig:
    _target_: str = "bertrecipes.optim.WarmupExpDecayExp"
    warmup_proportion: float = 0.002
    decay_rate: float = 0.99
    decay_step: int = 1000
    degree: float = 2.0
    lr_offset: float = 0.0


@dataclass
class WarmupLinearConfig:
    _target_: str = "bertrecipes.optim.WarmupLinear"
    warmup_proportion: float = 0.01
    lr_offset: float = 0.0
    # false: decay 1 - x from the first step (Google BERT, BingBertSquad); true: (1 - x) / (1 - warmup),
    # 1 when warmup ends (Hugging Face's get_linear_schedule_with_warmup, NVIDIA's run_squad.py)
    rescale_after_warmup: bool = False


@dataclass
class WarmupPolyConfig:
    _target_: str = "bertrecipes.optim.WarmupPoly"
    warmup_proportion: float = 0.2843  # NVIDIA's phase 1 (phase 2: 0.128)
    degree: float = 0.5
    lr_offset: float = 0.0


@dataclass
class ConstantConfig:
    _target_: str = "bertrecipes.optim.ConstantLR"
    lr_offset: float = 0.0


# --------------------------------------------------------------------------- precision


@dataclass
class PrecisionConfig:
    """Training precision. fp16 uses fp32 master weights and DeepSpeed's loss scaler."""

    dtype: str = "fp32"  # fp32 | fp16 | bf16
    loss_scale: float = 0.0  # 0 = dynamic; > 0 = static scale (fp16 only)
    initial_scale_power: int = 16  # dynamic scale starts at 2**initial_scale_power
    loss_scale_window: int = 1000  # overflow-free steps before the scale doubles
    hysteresis: int = 2  # overflows tolerated before the scale is lowered
    min_loss_scale: float = 1.0
    # an overflow with the dynamic scale already at min_loss_scale stops the run (DeepSpeed's
    # DynamicLossScaler does the same by default): every later step would be skipped too
    raise_error_at_min_scale: bool = True


# --------------------------------------------------------------------------- kernel


@dataclass
class KernelConfig:
    """Which transformer-layer implementation runs. Changes speed and memory, never results.

    The flags keep DeepSpeed's transformer-kernel names; the torch kernel ignores them.
    """

    name: str = "torch"  # torch | triton
    normalize_invertible: bool = False  # keep only LayerNorm outputs; recover inputs in backward
    gelu_checkpoint: bool = False  # keep only the pre-activation; recompute GELU in backward
    attn_dropout_checkpoint: bool = False  # recompute attention dropout rather than keep it
    stochastic_mode: bool = False  # allow faster non-deterministic reductions
    unpad: bool = False  # run the encoder on real tokens only (packed rows); results unchanged
    # with unpad: round the packed row count up to a multiple of this (0 = exact), so CUDA graphs
    # (compile_mode=reduce-overhead) see a few fixed shapes; results unchanged
    unpad_bucket: int = 0


# --------------------------------------------------------------------------- logger


@dataclass
class NoLoggerConfig:
    _target_: str = "bertrecipes.metrics.NullLogger"


@dataclass
class WandbLoggerConfig:
    _target_: str = "bertrecipes.metrics.WandbLogger"
    project: str = "bertrecipes"
    entity: str | None = None
    name: str | None = None  # default: job_name
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str | None = None  # online | offline | disabled; null = offline when no API key


# --------------------------------------------------------------------------- top level


@dataclass
class PretrainConfig:
    model: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    precision: Any = MISSING
    kernel: Any = MISSING
    data: Any = MISSING
    logger: Any = MISSING

    job_name: str = "bert_pretrain"
    seed: int = 42
    device: str = "auto"  # auto (CUDA if available, else CPU) | cpu | cuda | cuda:N
    output_dir: str = MISSING  # runs/<job_name>/<time> by default (conf/pretrain.yaml)

    # Batch arithmetic: train_batch_size = micro x accumulation x world_size; give any two.
    train_batch_size: int | None = None
    train_micro_batch_size_per_gpu: int | None = None
    gradient_accumulation_steps: int | None = None

    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    max_steps: int = 100  # optimizer steps to run in this phase
    total_training_steps: int | None = None  # schedule horizon; null = max_steps
    max_grad_norm: float = 1.0  # global-norm clip; 0 disables

    steps_per_print: int = 10
    progress_bar: bool = True
    checkpoint_steps: int = 0  # save every N steps (0 = only at the end)
    keep_last_checkpoints: int = 3
    checkpoint_at_end: bool = True  # also save after the last step (benchmarks turn it off)
    resume: bool = False  # continue the run in output_dir from its latest checkpoint
    init_from: str | None = None  # checkpoint to take the model weights from (new phase)
    init_from_required: bool = False  # a phase that continues another (seq512) sets it: init_from is due
    # what init_from is: DS (bertrecipes, DeepSpeed or NVIDIA) | HF (Hugging Face) | TF (Google BERT)
    ckpt_type: str = "DS"
    origin_bert_config_file: str | None = None  # bert_config.json / config.json for HF and TF imports
    rewarmup: bool = True  # with init_from: restart the LR schedule (warmup) at step 0
    # with init_from: also take its optimizer state (LAMB moments, step counts) and loss scale, as
    # DeepSpeed's load_checkpoint does for bing_bert's phase 2. true: required (a bertrecipes checkpoint
    # of this architecture and optimizer); null: when init_from has them, else a fresh optimizer
    load_optimizer_states: bool | None = False
    peak_tflops: float | None = None  # for MFU; null = measured with a large matmul on GPU
    compile: bool = False  # torch.compile the model (speed only; results equal within rounding)
    # torch.compile's mode: default | reduce-overhead (CUDA graphs: fixed shapes, so kernel.unpad=false
    # or kernel.unpad_bucket)
    # | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # DeepSpeed's progressive layer dropping (bertrecipes.layer_drop): enabled, theta, gamma
    progressive_layer_drop: ProgressiveLayerDropConfig = field(default_factory=ProgressiveLayerDropConfig)

    # Held-out evaluation (bertrecipes.evaluation): MLM and NSP loss and accuracy on fixed instances
    # made from eval_data with the training vocabulary, logged as eval_* beside the training metrics.
    eval_data: list[str] = field(default_factory=list)  # files/dirs/globs, any local corpus format
    eval_steps: int = 0  # evaluate every N optimizer steps; 0 = only after the last step
    eval_batch_size: int | None = None  # sequences per forward; null = train_micro_batch_size_per_gpu
    max_eval_samples: int | None = None  # score the first N held-out instances; null = all


def refuse_unknown_keys(cfg: Any, schema: type) -> None:
    """A key the schema lacks (added with Hydra's ``+key=...``, which its own typo message suggests)
    would be silently ignored: name it instead. Top-level keys, and the keys of every group or block
    built from a schema (``+kernel.foo=1``, ``+progressive_layer_drop.thta=0.5``)."""
    known = {f.name for f in fields(schema)}
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {', '.join(unknown)} (added with +key=...?); nothing "
                          f"reads them. Valid keys: {', '.join(sorted(known))}")
    _refuse_unknown_nested(cfg, "")


def _refuse_unknown_nested(node: Any, prefix: str) -> None:
    for key in node:
        child = node._get_node(key)
        if not OmegaConf.is_dict(child):
            continue
        schema = OmegaConf.get_type(child)
        name = f"{prefix}{key}"
        if is_dataclass(schema):
            known = {f.name for f in fields(schema)}
            unknown = sorted(f"{name}.{k}" for k in child if k not in known)
            if unknown:
                raise ConfigError(f"unknown key(s) {', '.join(unknown)} (added with +key=...?); nothing "
                                  f"reads them. Valid keys of {name}: {', '.join(sorted(known))}")
        _refuse_unknown_nested(child, f"{name}.")


def check_command_line(config_name: str, argv: list[str] | None = None) -> None:
    """Check a Hydra entry point's command line (default: ``sys.argv[1:]``) before Hydra composes
    ``config_name``: an unknown key in a ``key=value`` override, or an unknown option of a config group,
    is one line on stderr naming it with the closest valid keys or the group's options, and exit status 2.
    The entry point's config directory and config groups must be registered already."""
    problem = find_override_problem(config_name, sys.argv[1:] if argv is None else argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)


# Hydra flags after which there is nothing to check, or a config other than the entry point's.
_UNCHECKED_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc", "--info", "-i",
                    "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                    "--experimental-rerun")
_MAX_COMPOSITIONS = 16  # group sweeps: the combinations of options composed to check keys against


def find_override_problem(config_name: str, argv: list[str]) -> str | None:
    """What is wrong with the overrides in ``argv`` (a Hydra command line, flags included), in one line,
    or None. Checked: the option of each ``group=option`` and ``+group=option`` (every option of a sweep),
    that a plain ``group=option`` names a group the config's defaults list has, and that the key of each
    plain ``key=value`` exists in the config composed with the command line's group choices. Left to
    Hydra and to :func:`refuse_unknown_keys`: ``hydra.*``, ``+key``, ``++key``, ``~key``, ``group@package``,
    glob and range sweeps of a group, and a command line Hydra cannot parse."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, OverrideType
    from hydra.errors import HydraException

    if GlobalHydra.instance().is_initialized() or any(a.split("=", 1)[0] in _UNCHECKED_FLAGS for a in argv):
        return None
    parser = get_args_parser()

    def refuse(message: str) -> None:
        raise ValueError(message)

    parser.error = refuse  # type: ignore[method-assign]  # Hydra itself reports a bad command line
    try:
        overrides = OverridesParser.create().parse_overrides(parser.parse_args(argv).overrides)
    except (ValueError, HydraException):
        return None

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()

        def is_group(name: str) -> bool:
            parent, _, leaf = name.rpartition("/")
            return leaf in loader.list_groups(parent)

        groups: list[tuple[Any, list[str]]] = []  # (override, the options it selects)
        keys = []
        for override in overrides:
            name = override.key_or_group
            if name == "hydra" or name.startswith(("hydra.", "hydra/")) or override.package is not None:
                continue
            if not is_group(name):
                if "/" in name:
                    return f"{override.input_line}: no config group {name}"
                if override.type == OverrideType.CHANGE:
                    keys.append(override)
                continue
            if override.type == OverrideType.DEL:
                groups.append((override, []))
                continue
            value = override.value()
            if isinstance(value, ChoiceSweep):
                choices = [str(choice) for choice in value.list]
            elif isinstance(value, str):
                choices = [value]
            else:  # a glob or range sweep, a list of configs: Hydra judges it
                return None
            available = loader.get_group_options(name)
            shown = [option for option in available if not option.endswith("_schema")]
            for choice in choices:
                if choice not in available:
                    close = difflib.get_close_matches(choice, shown)
                    hint = f"did you mean {', '.join(close)}? " if close else ""
                    return (f"{override.input_line}: config group {name} has no option {choice!r}; "
                            f"{hint}options: {', '.join(shown)}")
            groups.append((override, choices))

        def line(override: Any, choice: str | None) -> str:
            prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++"}.get(override.type, "")
            return override.input_line if choice is None else f"{prefix}{override.key_or_group}={choice}"

        combinations = itertools.islice(
            itertools.product(*[choices or [None] for _, choices in groups]), _MAX_COMPOSITIONS)
        composed = []
        try:
            for combination in combinations:
                chosen = [line(o, choice) for (o, _), choice in zip(groups, combination, strict=True)]
                composed.append(compose(config_name, overrides=chosen))
        except Exception:  # Hydra reports what it cannot compose, but for a plain group=option whose group
            # the defaults list lacks: said here, with the + that selects it
            added = [line(o, choices[0] if choices else None) for o, choices in groups
                     if o.type != OverrideType.CHANGE]
            try:
                defaults = compose(config_name, overrides=added, return_hydra_config=True)
            except Exception:
                return None
            selected = defaults.hydra.runtime.choices
            for override, _ in groups:
                if override.type == OverrideType.CHANGE and override.key_or_group not in selected:
                    return (f"{override.input_line}: config group {override.key_or_group} is not in the "
                            f"defaults list of {config_name}.yaml; select it with +{override.input_line}")
            return None

    for override in keys:
        problems = [_missing_key(cfg, override.key_or_group) for cfg in composed]
        if all(problems):
            return f"{override.input_line}: {problems[0]}"
    return None


# Names DeepSpeed's configs, bing_bert's and NVIDIA's flags, and Hugging Face's arguments give a setting
# that has another name (or is a config group choice) here: what a missing key of theirs points to.
FOREIGN_NAMES = {
    "gradient_clipping": ("max_grad_norm",),
    "learning_rate": ("optimizer.lr",),
    "fp16": ("precision=fp16",),
    "bf16": ("precision=bf16",),
    "init_checkpoint": ("init_from", "model_file"),
    "load_training_checkpoint": ("init_from",),
    "model_name_or_path": ("init_from", "model_file"),
    "num_steps_per_checkpoint": ("checkpoint_steps",),
    "save_steps": ("checkpoint_steps",),
    "lr_schedule": ("scheduler",),
    "deepspeed_transformer_kernel": ("kernel=triton",),
    "per_device_train_batch_size": ("train_micro_batch_size_per_gpu",),
    "train_batch_size_per_gpu": ("train_micro_batch_size_per_gpu",),
}


def _named_here(cfg: Any, target: str) -> bool:
    """Whether ``target`` (a dotted key, or group=option) is something ``cfg`` has."""
    key = target.split("=", 1)[0]
    node = cfg
    for part in key.split("."):
        if not OmegaConf.is_dict(node) or part not in node:
            return False
        node = node._get_node(part)
    return True


def _paths_ending_with(cfg: Any, name: str, path: str = "") -> list[str]:
    """Dotted paths of ``cfg`` (not through lists or interpolations) whose last part is ``name``."""
    found = []
    for key in cfg.keys():
        if not isinstance(key, str) or (not path and key == "hydra"):
            continue
        if key == name:
            found.append(path + key)
        if not OmegaConf.is_interpolation(cfg, key) and OmegaConf.is_dict(cfg._get_node(key)):
            found += _paths_ending_with(cfg._get_node(key), name, f"{path}{key}.")
    return found


def _missing_key(cfg: Any, key: str) -> str | None:
    """Why ``key`` (a dotted path) is not a key of ``cfg``, or None if it is, or if a list or an
    interpolation on its path leaves the answer to Hydra. The hint names, in order: the key under
    another group (``warmup_proportion`` -> ``scheduler.warmup_proportion``), the name of a DeepSpeed,
    NVIDIA or Hugging Face setting here (``gradient_clipping`` -> ``max_grad_norm``), close spellings."""
    node, path = cfg, ""
    for part in key.split("."):
        if OmegaConf.is_list(node):
            return None
        if not OmegaConf.is_dict(node):
            return f"{path[:-1]} is a value, not a group of keys"
        valid = [k for k in node.keys() if isinstance(k, str) and (path or k != "hydra")]
        if part not in valid:
            elsewhere = [p for p in _paths_ending_with(cfg, part) if p != path + part]
            elsewhere += [name for name in FOREIGN_NAMES.get(part, ()) if _named_here(cfg, name)][:1]
            close = [path + k for k in difflib.get_close_matches(part, valid)]
            where = f"of {path[:-1]}" if path else "at the top level"
            hints = list(dict.fromkeys(elsewhere + close))
            if hints:
                return f"no key {path + part}; did you mean {', '.join(hints)}?"
            return f"no key {path + part}; valid keys {where}: {', '.join(sorted(valid))}"
        if OmegaConf.is_interpolation(node, part):
            return None
        node, path = node._get_node(part), f"{path}{part}."
    return None


def launch_time() -> datetime.datetime:
    """When this run was launched. Under torchrun on Linux, the start of the launcher (the workers'
    parent process, the same for every rank of a node), so that the ranks of a node, started a few
    hundred milliseconds apart, name the same time-stamped output_dir; otherwise now."""
    if "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        try:  # Linux: /proc/<pid>/stat field 22 is the start time in clock ticks after boot
            ticks = int(open(f"/proc/{os.getppid()}/stat").read().rsplit(")", 1)[1].split()[19])
            boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
            return datetime.datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return datetime.datetime.now()


def register_configs() -> None:
    # ${launch_time:%Y-%m-%d_%H-%M-%S}: Hydra's ${now:...}, but one time for all the ranks of a node.
    # Cached per config, as ${now:} is, so a sweep's jobs (their configs carry the cache) resolve the
    # sweep's time even in other processes, and each composed config resolves one time.
    OmegaConf.register_new_resolver("launch_time", lambda pattern: launch_time().strftime(pattern),
                                    replace=True, use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(group="model", name="bert_schema", node=ModelConfig)
    cs.store(group="optimizer", name="lamb_schema", node=LambConfig)
    cs.store(group="optimizer", name="adam_schema", node=AdamConfig)
    cs.store(group="scheduler", name="warmup_exp_decay_exp_schema", node=WarmupExpDecayExpConfig)
    cs.store(group="scheduler", name="warmup_linear_schema", node=WarmupLinearConfig)
    cs.store(group="scheduler", name="warmup_poly_schema", node=WarmupPolyConfig)
    cs.store(group="scheduler", name="constant_schema", node=ConstantConfig)
    cs.store(group="precision", name="precision_schema", node=PrecisionConfig)
    cs.store(group="kernel", name="kernel_schema", node=KernelConfig)
    register_data_configs(cs)
    cs.store(group="logger", name="none_schema", node=NoLoggerConfig)
    cs.store(group="logger", name="wandb_schema", node=WandbLoggerConfig)


# --------------------------------------------------------------------------- batch arithmetic


@dataclass(frozen=True)
class BatchSizes:
    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    world_size: int


def resolve_batch_sizes(
    train_batch_size: int | None,
    train_micro_batch_size_per_gpu: int | None,
    gradient_accumulation_steps: int | None,
    world_size: int = 1,
) -> BatchSizes:
    """Complete ``train_batch_size = micro x accumulation x world_size`` from any two of the three.

    Raises ValueError, printing all four numbers, when the set is inconsistent, not divisible,
    or under-determined.
    """
    total, micro, accum = train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps
    shown = (
        f"train_batch_size={total}, train_micro_batch_size_per_gpu={micro}, "
        f"gradient_accumulation_steps={accum}, world_size={world_size}"
    )
    for name, value in (("train_batch_size", total), ("train_micro_batch_size_per_gpu", micro),
                        ("gradient_accumulation_steps", accum), ("world_size", world_size)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{name} must be a positive integer, got {value!r} ({shown})")
    if micro is not None and accum is not None:
        if total is not None and total != micro * accum * world_size:
            raise ConfigError(
                "inconsistent batch sizes: train_batch_size must equal train_micro_batch_size_per_gpu"
                f" x gradient_accumulation_steps x world_size = {micro * accum * world_size} ({shown}); "
                "a value from the config file counts as given: set the one to derive to null, e.g. "
                "train_micro_batch_size_per_gpu=null"
            )
        total = micro * accum * world_size
    elif total is not None and micro is not None:
        if total % (micro * world_size):
            raise ConfigError(
                "train_batch_size is not divisible by train_micro_batch_size_per_gpu x world_size = "
                f"{micro * world_size} ({shown})"
            )
        accum = total // (micro * world_size)
    elif total is not None and accum is not None:
        if total % (accum * world_size):
            raise ConfigError(
                "train_batch_size is not divisible by gradient_accumulation_steps x world_size = "
                f"{accum * world_size} ({shown})"
            )
        micro = total // (accum * world_size)
    else:
        raise ConfigError(f"give at least two of train_batch_size, train_micro_batch_size_per_gpu, "
                         f"gradient_accumulation_steps ({shown})")
    return BatchSizes(total, micro, accum, world_size)


def world_size_from_env() -> int:
    """World size as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
