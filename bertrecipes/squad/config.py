"""Typed schema of ``conf/squad.yaml`` (SQuAD v1.1 fine-tuning), registered in Hydra's ConfigStore.

The groups (model, optimizer, scheduler, precision, kernel, logger) are pre-training's, registered
by :func:`bertrecipes.config.register_configs`; this module adds the top-level ``squad_schema``,
so a misspelled key (``doc_strid=64``) is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from bertrecipes.config import refuse_unknown_keys, register_configs
from bertrecipes.distributed import COMPILE_MODES, DistributedConfig
from bertrecipes.errors import ConfigError
from bertrecipes.squad.data import WINDOWS_WITHOUT_ANSWER

CKPT_TYPES = ("DS", "HF", "TF")


@dataclass
class SquadConfig:
    model: Any = MISSING  # architecture of a from-scratch model only; a checkpoint brings its own
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    precision: Any = MISSING
    kernel: Any = MISSING
    logger: Any = MISSING

    job_name: str = "bert_squad"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = MISSING

    do_train: bool = True
    do_predict: bool = True
    # SQuAD v1.1 JSON files, or a `datasets` hub name (e.g. rajpurkar/squad, optionally :split).
    train_file: str | None = None
    predict_file: str | None = None

    # The pre-trained (or fine-tuned) model: DS = a bertrecipes checkpoint (directory or state.pt), a
    # DeepSpeed one (bing_bert) or NVIDIA DeepLearningExamples' ckpt_<step>.pt; HF = a Hugging Face
    # folder/file; TF = a Google BERT TensorFlow checkpoint.
    ckpt_type: str = "DS"
    model_file: str | None = None  # null: a from-scratch model built from the `model` group
    origin_bert_config_file: str | None = None  # config.json / bert_config.json for HF and TF
    vocab_file: str | None = None  # null: the vocabulary the checkpoint names or ships
    do_lower_case: bool | None = None  # null: as the checkpoint was trained, else as its vocabulary says

    max_seq_length: int = 384
    doc_stride: int = 128  # tokens between the starts of consecutive windows over a context
    max_query_length: int = 64  # question tokens kept
    n_best_size: int = 20
    max_answer_length: int = 30  # in WordPiece tokens
    # a training window that does not hold the whole answer: "drop" it (BingBertSquad) or label it
    # [CLS] ("cls": Google BERT, NVIDIA, Hugging Face)
    windows_without_answer: str = "drop"

    # Batch arithmetic as in pre-training: train_batch_size = micro x accumulation x world_size.
    train_batch_size: int | None = 24
    train_micro_batch_size_per_gpu: int | None = 3
    gradient_accumulation_steps: int | None = None
    predict_batch_size: int = 32
    num_train_epochs: float = 2.0
    max_steps: int | None = None  # optimizer steps to run; null = num_train_epochs over the windows
    max_grad_norm: float = 1.0
    dropout: float | None = 0.1  # hidden and attention dropout; null = the checkpoint's own

    steps_per_print: int = 10
    progress_bar: bool = True
    compile: bool = False  # torch.compile the model for training and prediction (speed only)
    # torch.compile's mode: default | reduce-overhead (CUDA graphs: fixed shapes, so kernel.unpad=false
    # or kernel.unpad_bucket)
    # | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    checkpoint_steps: int = 0  # also save every N steps (0 = only at the end of training)
    # Continue the fine-tuning run in output_dir from its latest checkpoint (after a crash or a stop).
    resume: bool = False
    # Under torchrun: DDP (distributed.zero_stage=1 shards the Adam state); backend, timeout, buckets.
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    keep_last_checkpoints: int = 1


def register_squad_configs() -> None:
    """Register the shared groups and ``squad_schema`` (idempotent)."""
    register_configs()
    ConfigStore.instance().store(name="squad_schema", node=SquadConfig)


def validate_squad_config(cfg) -> None:
    """Reject values the schema's types cannot: ranges and the relations between them."""
    refuse_unknown_keys(cfg, SquadConfig)
    if cfg.ckpt_type not in CKPT_TYPES:
        raise ConfigError(f"ckpt_type must be one of {', '.join(CKPT_TYPES)}, got {cfg.ckpt_type!r}")
    if not cfg.do_train and not cfg.do_predict:
        raise ConfigError("nothing to do: do_train=false and do_predict=false")
    if cfg.do_train and not cfg.train_file:
        raise ConfigError("do_train=true needs train_file (a SQuAD v1.1 JSON such as train-v1.1.json, "
                          "or a datasets hub name such as rajpurkar/squad)")
    if cfg.do_predict and not cfg.predict_file:
        raise ConfigError("do_predict=true needs predict_file (a SQuAD v1.1 JSON such as "
                          "dev-v1.1.json, or a datasets hub name)")
    for name in ("max_seq_length", "doc_stride", "max_query_length", "n_best_size", "max_answer_length",
                 "predict_batch_size", "steps_per_print"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.max_seq_length < cfg.max_query_length + 4:
        raise ConfigError(f"max_seq_length={cfg.max_seq_length} leaves no room for the context after "
                          f"max_query_length={cfg.max_query_length} question tokens and 3 special tokens")
    if cfg.num_train_epochs <= 0:
        raise ConfigError(f"num_train_epochs must be positive, got {cfg.num_train_epochs}")
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        raise ConfigError(f"max_steps must be positive or null, got {cfg.max_steps}")
    for name, note in (("checkpoint_steps", " (0 = off)"), ("keep_last_checkpoints", " (0 = keep all)"),
                       ("max_grad_norm", " (0 = off)")):
        if not getattr(cfg, name) >= 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}{note}")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1) or null, got {cfg.dropout}")
    if cfg.distributed.strategy != "ddp":
        raise ConfigError(f"distributed.strategy must be ddp for SQuAD fine-tuning (the model is "
                          f"replicated on every rank; distributed.zero_stage=1 shards the optimizer "
                          f"state), got {cfg.distributed.strategy!r}")
    if cfg.windows_without_answer not in WINDOWS_WITHOUT_ANSWER:
        raise ConfigError(f"windows_without_answer must be one of {', '.join(WINDOWS_WITHOUT_ANSWER)}, "
                          f"got {cfg.windows_without_answer!r}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}")
