"""SQuAD v1.1 fine-tuning: build everything from the config, train, predict, score.

``run(cfg)`` is what ``python -m bertrecipes.squad`` calls:

1. the model: weights and architecture from ``model_file`` (``ckpt_type`` DS / HF / TF) or, with
   no model_file, a from-scratch model of the ``model`` group; the tokenizer from ``vocab_file``
   or the vocabulary the checkpoint names;
2. ``do_train``: :func:`train`, the optimizer-step loop of pre-training (micro-batches under
   autocast, scaled backward, unscale, global-norm overflow check, clip, LR, step, zero) over
   shuffled windows of ``train_file`` for ``num_train_epochs`` (or ``max_steps``), logging to
   metrics.jsonl and the dashboard logger, then a checkpoint in ``<output_dir>/checkpoints``
   (also every ``checkpoint_steps`` and on a stop signal; ``resume=true`` continues from the latest
   exactly: weights, optimizer, schedule, loss scale, random state, position in the windows);
3. ``do_predict``: logits for every window of ``predict_file``, the n-best span search
   (:mod:`bertrecipes.squad.postprocess`), ``predictions.json`` and ``nbest_predictions.json``,
   and the official EM/F1 (:mod:`bertrecipes.squad.evaluate`), logged as one more record.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from bertrecipes import distributed as dist
from bertrecipes.atomic import write_json_atomic
from bertrecipes.checkpoint import (
    VOCAB_FILE,
    CheckpointError,
    checkpoint_vocab,
    load_checkpoint,
    save_checkpoint,
)
from bertrecipes.config import BatchSizes, resolve_batch_sizes
from bertrecipes.data.tokenizer import load_tokenizer
from bertrecipes.engine import (
    OptimizerStep,
    StopRequest,
    TrainState,
    batch_to_device,
    build_from_config,
    build_layer_factory,
    build_model_config,
    check_triton_device,
    elastic_restart,
    exit_on_stop,
    graph_step_marker,
    pick_device,
    prepare_output_dir,
    rank_rng_states,
    report_user_error,
    restore_optimizer_and_scaler,
    restore_rank_rng,
    seed_everything,
    seed_rank_streams,
    unpad_options,
    uses_cuda_graphs,
    warn_if_saved_before_rescale_after_warmup,
)
from bertrecipes.errors import ConfigError, UserError
from bertrecipes.metrics import MetricsFile, NullLogger, Throughput, finite_or_none
from bertrecipes.model import BertConfig
from bertrecipes.optim import build_param_groups
from bertrecipes.precision import LossScaler, autocast_context, autocast_dtype
from bertrecipes.squad.config import validate_squad_config
from bertrecipes.squad.data import (
    SquadExample,
    SquadFeatures,
    build_features,
    gold_answers,
    read_squad_examples,
)
from bertrecipes.squad.evaluate import evaluate
from bertrecipes.squad.model import BertForQuestionAnswering, qa_loss, qa_training_flops_per_sample
from bertrecipes.squad.postprocess import best_spans

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
PREDICTIONS_FILE = "predictions.json"
NBEST_FILE = "nbest_predictions.json"

# A pre-training checkpoint's heads and pooler are not part of the QA model.
_UNUSED_PREFIXES = ("cls.", "bert.pooler.")


# --------------------------------------------------------------------------- the initial model


@dataclass
class InitialModel:
    """What a checkpoint gives: architecture, weights (our layout), vocabulary, a name for messages."""

    config: BertConfig | None
    state_dict: dict[str, torch.Tensor] | None
    vocab_file: Path | None
    source: str
    global_step: int | None = None  # the step the checkpoint was saved at, when it says


def load_initial_model(cfg: DictConfig) -> InitialModel:
    """Read ``model_file`` as ``ckpt_type`` says (nothing when model_file is null)."""
    if not cfg.model_file:
        return InitialModel(None, None, None, "a from-scratch model")
    try:
        from bertrecipes.interop import load_model_state
    except ImportError as e:
        raise ConfigError(f"ckpt_type={cfg.ckpt_type} needs bertrecipes.interop (Hugging Face / TensorFlow "
                          f"checkpoint import), which this installation lacks: {e}") from None
    imported = load_model_state(cfg.model_file, ckpt_type=cfg.ckpt_type,
                                origin_bert_config_file=cfg.origin_bert_config_file)
    if imported.config is None:
        raise ConfigError(f"{imported.source}: no BERT config found; set origin_bert_config_file")
    vocab = Path(imported.vocab_file) if imported.vocab_file else None
    return InitialModel(imported.config, dict(imported.state_dict), vocab, str(imported.source),
                        imported.global_step)


def initial_model_of(payload: dict[str, Any]) -> InitialModel:
    """The model a loaded bertrecipes checkpoint (pre-training or fine-tuning) holds."""
    fields = payload.get("model_config")
    if not fields:
        raise CheckpointError(f"{payload['path']} has no model_config (not written by bertrecipes?)")
    try:
        config = BertConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{payload['path']}: model_config is not a BERT config: {e}") from e
    return InitialModel(config, payload["model"], checkpoint_vocab(payload), payload["path"])


def load_qa_weights(model: BertForQuestionAnswering, state_dict: dict[str, torch.Tensor],
                    source: str) -> bool:
    """Load ``state_dict`` (our layout) into ``model``; returns whether the QA layer came with it.

    The pre-training heads and the pooler are dropped; anything else that does not fit is an error
    naming ``source`` and the keys.
    """
    state = {k: v for k, v in state_dict.items() if not k.startswith(_UNUSED_PREFIXES)}
    ours = model.state_dict()
    name = "bert.embeddings.word_embeddings.weight"
    if name in state and state[name].shape != ours[name].shape:
        raise CheckpointError(f"{source}: word embeddings {tuple(state[name].shape)} in the checkpoint, "
                              f"{tuple(ours[name].shape)} in the model")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("qa_outputs.")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match BertForQuestionAnswering: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    return not any(k.startswith("qa_outputs.") for k in result.missing_keys)


def record_architecture(model_cfg: DictConfig, config: BertConfig) -> None:
    """Set the ``model`` group's fields to ``config``'s, the architecture a checkpoint gave."""
    for key in model_cfg:
        if hasattr(config, key):
            model_cfg[key] = getattr(config, key)
    if "pad_vocab_to_multiple_of" in model_cfg:
        model_cfg.pad_vocab_to_multiple_of = 1  # the vocabulary size is the checkpoint's, as it is


def build_model(cfg: DictConfig, initial: InitialModel, vocab_size: int) -> BertForQuestionAnswering:
    """The QA model: the checkpoint's architecture (or the ``model`` group's), ``dropout`` applied."""
    if initial.config is not None:
        model_config = initial.config
        rows = model_config.vocab_size
        if vocab_size > rows:
            raise ConfigError(f"the tokenizer has {vocab_size} tokens but {initial.source} was trained "
                              f"with a vocabulary of {rows}; use its own vocab_file")
        # A checkpoint without its vocabulary file (a bing_bert or TF one): its rows are the tokens of
        # the one it was trained with, or them padded (bing_bert and NVIDIA pad to a multiple of 8).
        if initial.vocab_file is None and not any(
                rows == -(-vocab_size // multiple) * multiple for multiple in (1, 8, 16, 32, 64, 128)):
            raise ConfigError(f"the vocabulary has {vocab_size} tokens but {initial.source} was trained with "
                              f"{rows} (not that number padded to a multiple of 8 to 128 either): use the "
                              "vocab_file it was trained with")
    else:
        model_config = build_model_config(cfg.model, vocab_size, cfg.max_seq_length)
    if cfg.dropout is not None:
        model_config = dataclasses.replace(model_config, hidden_dropout_prob=cfg.dropout,
                                           attention_probs_dropout_prob=cfg.dropout)
    if cfg.max_seq_length > model_config.max_position_embeddings:
        raise ConfigError(f"max_seq_length={cfg.max_seq_length} exceeds the model's "
                          f"max_position_embeddings={model_config.max_position_embeddings}")
    unpad, unpad_bucket = unpad_options(cfg.kernel)
    model = BertForQuestionAnswering(model_config, layer_factory=build_layer_factory(cfg.kernel),
                                     unpad=unpad, unpad_bucket=unpad_bucket)
    if initial.state_dict is not None:
        has_head = load_qa_weights(model, initial.state_dict, initial.source)
        log.info("loaded %s from %s%s", "encoder and QA layer" if has_head else "encoder", initial.source,
                 "" if has_head else " (QA layer freshly initialised)")
        if not has_head and not cfg.do_train:
            log.warning("do_train=false but %s has no QA layer (qa_outputs): predictions will be random",
                        initial.source)
    elif not cfg.do_train:
        log.warning("do_train=false and no model_file: predicting with a random model")
    return model


def build_tokenizer(cfg: DictConfig, initial: InitialModel):
    vocab_file = cfg.vocab_file or initial.vocab_file
    if not vocab_file:
        raise ConfigError(f"no vocabulary: set vocab_file (a BERT vocab.txt); {initial.source} names none")
    if cfg.vocab_file and initial.vocab_file and Path(cfg.vocab_file).is_file() and \
            Path(initial.vocab_file).is_file() and \
            Path(cfg.vocab_file).read_bytes() != Path(initial.vocab_file).read_bytes():
        raise ConfigError(f"vocab_file={cfg.vocab_file} differs from the vocabulary {initial.source} was "
                          f"trained with ({initial.vocab_file}): leave vocab_file unset to use that one")
    try:
        resolve_lower_case(cfg, initial, vocab_file)
        return load_tokenizer(vocab_file, lower_case=cfg.do_lower_case), Path(vocab_file)
    except (OSError, ValueError) as e:
        hint = "" if cfg.vocab_file else f" (named by {initial.source}; set vocab_file to override)"
        raise ConfigError(f"vocab_file: {e}{hint}") from None


def resolve_lower_case(cfg: DictConfig, initial: InitialModel, vocab_file: str | Path) -> None:
    """Set ``do_lower_case`` when it is null: as the checkpoint was trained (its run's config, a Hugging
    Face folder's tokenizer_config.json), else as its vocabulary says (uncased ones have no upper-case
    token). A value given that contradicts the checkpoint's record is kept, with a warning."""
    from bertrecipes.interop.export import lower_case_setting

    source = initial.source if initial.state_dict is not None else vocab_file
    inferred, record = lower_case_setting(source, vocab_file)
    if cfg.do_lower_case is None:
        cfg.do_lower_case = inferred
        log.info("do_lower_case=%s (%s)", inferred, record or f"the vocabulary {vocab_file} is "
                 f"{'uncased' if inferred else 'cased'}")
    elif record is not None and cfg.do_lower_case != inferred:
        log.warning("do_lower_case=%s, but %s says %s: the text is tokenized %s, not as the model was "
                    "trained (leave do_lower_case unset to follow the checkpoint)", cfg.do_lower_case, record,
                    inferred, "lower-cased" if cfg.do_lower_case else "with its case")


# --------------------------------------------------------------------------- run


@dataclass
class RunOutputs:
    """Where a run writes: its directory, metrics.jsonl, the dashboard logger, its resolved config.
    Under torchrun only rank 0 writes: the other ranks have no metrics file and a NullLogger."""

    dir: Path
    metrics: MetricsFile | None
    logger: Any
    config_yaml: str
    ctx: dist.DistContext = dataclasses.field(default_factory=dist.DistContext)

    def record(self, record: dict[str, Any], step: int) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
        self.logger.log(record, step=step)


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune and/or predict as ``cfg`` says; returns a summary (steps, scores, paths).

    Under torchrun, each rank trains on its share of every step's windows (DDP, or ZeRO-1 with
    ``distributed.zero_stage=1``) and predicts its share of the prediction windows; rank 0 gathers
    the logits, writes the files and scores them."""
    validate_squad_config(cfg)
    device = pick_device(cfg.device)
    ctx = dist.init_distributed(cfg.distributed, device)
    try:
        return _run(cfg, output_dir, dist.device_for_rank(device, ctx), ctx)
    finally:
        dist.shutdown(ctx)


def _run(cfg: DictConfig, output_dir: str | Path | None, device: torch.device,
         ctx: dist.DistContext) -> dict[str, Any]:
    output_dir = prepare_output_dir(output_dir or cfg.output_dir)
    dist.same_output_dir(output_dir, ctx)
    # torchrun --max-restarts: a restarted group continues from the checkpoint, or starts over
    starting_over = elastic_restart(cfg, output_dir / CHECKPOINT_SUBDIR, ctx) if cfg.do_train else False
    resume_from = load_resume_checkpoint(cfg, output_dir / CHECKPOINT_SUBDIR) if cfg.resume else None
    if cfg.do_train and not cfg.resume and not starting_over and (output_dir / CHECKPOINT_SUBDIR).exists():
        # keep-last would mix two runs' tags
        raise ConfigError(f"output_dir {output_dir} already holds a fine-tuning run ({CHECKPOINT_SUBDIR}/): "
                          "continue it with resume=true, or give another output_dir (by default each run "
                          "gets a new time-stamped one); predicting alone (do_train=false) may reuse it")
    check_triton_device(cfg, device)
    autocast_dtype(cfg.precision.dtype)  # validates the name
    if cfg.precision.dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision=bf16 but this GPU does not support bfloat16; use precision=fp16")
    batch = resolve_batch_sizes(cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu,
                                cfg.gradient_accumulation_steps, ctx.world_size) if cfg.do_train else None
    seed_everything(cfg.seed)

    if resume_from is not None:
        initial = initial_model_of(resume_from)
        log.info("resuming fine-tuning from %s at step %d (weights, optimizer, schedule, loss scale, "
                 "random state and data position%s)", resume_from["path"],
                 resume_from["train_state"]["global_step"],
                 f"; model_file {cfg.model_file} is not read" if cfg.model_file else "")
    else:
        initial = load_initial_model(cfg)
    tokenizer, vocab_file = build_tokenizer(cfg, initial)
    vocab_size = max(tokenizer.get_vocab().values()) + 1
    model = build_model(cfg, initial, vocab_size).to(device)
    if initial.config is not None:  # config.yaml shows the architecture the run has: the checkpoint's
        record_architecture(cfg.model, model.config)
    # predicting from a fine-tuned model: its record carries the step that model was saved at
    has_qa_layer = bool(initial.state_dict) and "qa_outputs.weight" in initial.state_dict
    fine_tuned_step = initial.global_step if has_qa_layer else None
    del initial
    if resume_from is not None:
        resume_from["model"] = None  # in the model now: let the copy go

    def features_of(examples: list[SquadExample], is_training: bool) -> SquadFeatures:
        t0 = time.perf_counter()
        features = build_features(examples, tokenizer, cfg.max_seq_length, cfg.doc_stride,
                                  cfg.max_query_length, is_training, cfg.windows_without_answer)
        log.info("%s: %d questions -> %d windows of %d tokens (%.1fs)%s",
                 "train" if is_training else "predict", len(examples), len(features), cfg.max_seq_length,
                 time.perf_counter() - t0,
                 f"; {features.num_skipped} skipped (answer not locatable)" if features.num_skipped else "")
        return features

    train_features = features_of(read_squad_examples(cfg.train_file, "train"), True) if cfg.do_train else None
    if cfg.do_predict:
        predict_examples = read_squad_examples(cfg.predict_file, "validation")
        predict_features = features_of(predict_examples, False)

    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    metrics = None
    if ctx.is_main:  # rank 0 alone writes the config, metrics.jsonl and the dashboard
        # a resumed run keeps the config it started with, and predicting into a run's directory
        # leaves that run's config as it is
        if resume_from is None and (cfg.do_train or not (output_dir / "config.yaml").exists()):
            (output_dir / "config.yaml").write_text(config_yaml)
        logger = instantiate(cfg.logger, run_config=OmegaConf.to_container(cfg, resolve=True),
                             output_dir=str(output_dir), default_name=cfg.job_name, _recursive_=False,
                             _convert_="all")
        metrics_path = output_dir / "metrics.jsonl"
        if resume_from is not None:  # the records up to the checkpoint's step stay; a prediction is redone
            metrics = MetricsFile(metrics_path, truncate_after_step=resume_from["train_state"]["global_step"],
                                  drop=lambda record: "predict_questions" in record)
        elif not cfg.do_train and metrics_path.exists():  # predicting into a run's directory: its
            # training records stay, an earlier prediction's record is replaced by this one's
            metrics = MetricsFile(metrics_path, drop=lambda record: "predict_questions" in record)
        else:
            if metrics_path.exists():  # after a prediction alone, or a failed attempt: a new file
                log.warning("replacing %s of an earlier prediction or attempt in the same output_dir",
                            metrics_path)
                metrics_path.unlink()
            metrics = MetricsFile(metrics_path)
    else:
        logger = NullLogger()
    outputs = RunOutputs(output_dir, metrics, logger, config_yaml, ctx)
    summary: dict[str, Any] = {"output_dir": str(output_dir), "global_step": fine_tuned_step or 0}
    # compile=true: the forward passes go through torch.compile; parameters, checkpoints and the
    # train/eval switch stay the model's own. Under torchrun, training goes through DDP around it.
    seed_rank_streams(cfg.seed, ctx)  # the same initial weights on every rank, then each its own dropout
    train_forward = dist.wrap_model(model, ctx, cfg.distributed, compile=cfg.compile,
                                    compile_mode=cfg.compile_mode)
    forward = dist.unwrap(train_forward)
    try:
        if cfg.do_train:
            summary.update(train(cfg, model, train_features, batch, device, outputs, vocab_file,
                                 train_forward, resume_from=resume_from))
            del resume_from
        if cfg.do_predict and not summary.get("stopped"):
            summary["eval"] = predict_and_evaluate(cfg, model, predict_examples, predict_features, device,
                                                   outputs, step=summary["global_step"], forward=forward)
    finally:
        if outputs.metrics is not None:
            outputs.metrics.close()
        outputs.logger.finish()
    return summary


# --------------------------------------------------------------------------- resume

# Settings that decide the training windows and their order: a resumed run must keep them.
RESUME_FIXED = ("train_file", "max_seq_length", "doc_stride", "max_query_length", "do_lower_case", "seed",
                "train_batch_size", "windows_without_answer")


# What a run saved before a setting existed did: its value for that setting.
SAVED_BEFORE_THE_KEY = {"windows_without_answer": "cls"}


def same_setting(key: str, saved: Any, now: Any) -> bool:
    """Whether a resumed run's ``key`` is the saved one: equal, or for ``train_file`` the same file
    named another way (a relative path, a link)."""
    if saved == now:
        return True
    if key == "train_file" and isinstance(saved, str) and isinstance(now, str):
        try:
            return Path(saved).is_file() and Path(now).is_file() and Path(saved).samefile(now)
        except OSError:
            return False
    return False


def load_resume_checkpoint(cfg: DictConfig, checkpoint_dir: Path) -> dict[str, Any]:
    """The latest checkpoint of the fine-tuning run in ``checkpoint_dir``, checked against ``cfg``."""
    if not cfg.do_train:
        raise ConfigError("resume=true continues fine-tuning, but do_train=false; to predict from a run's "
                          f"checkpoint give model_file={checkpoint_dir} instead")
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"resume=true but no checkpoint in {checkpoint_dir}: the directory does not "
                              "exist (set output_dir to the directory of the run to continue)")
    try:
        payload = load_checkpoint(checkpoint_dir)
    except CheckpointError as e:
        raise CheckpointError(f"resume=true but {e}") from e
    if (payload.get("client_state") or {}).get("task") != "squad" or "optimizer" not in payload:
        raise CheckpointError(f"resume=true but {payload['path']} is not a SQuAD fine-tuning checkpoint")
    saved_config = Path(payload["path"]).parent / "config.yaml"
    if saved_config.is_file():
        saved = OmegaConf.load(saved_config)
        if cfg.do_lower_case is None and isinstance(saved.get("do_lower_case"), bool):
            cfg.do_lower_case = saved.do_lower_case  # unset: the run's own
        for key, value in SAVED_BEFORE_THE_KEY.items():  # a run saved before the setting existed
            saved.setdefault(key, value)
        changed = [f"{key}={saved.get(key)!r} (now {cfg[key]!r})" for key in RESUME_FIXED
                   if key in saved and not same_setting(key, saved.get(key), cfg[key])]
        if changed:
            raise ConfigError(f"resume=true but the run was saved with {', '.join(changed)}: these settings "
                              "decide the training windows and their order, so a resumed run must keep them "
                              "(give the saved values)")
        saved_optimizer = OmegaConf.select(saved, "optimizer._target_")
        if saved_optimizer and saved_optimizer != cfg.optimizer._target_:
            raise ConfigError(f"resume=true but the run was saved with optimizer {saved_optimizer} and this "
                              f"one has {cfg.optimizer._target_}: its state cannot continue in another "
                              "optimizer (choose the saved one)")
    saved_vocab = checkpoint_vocab(payload)
    if cfg.vocab_file and saved_vocab is not None and Path(cfg.vocab_file).is_file() and \
            Path(cfg.vocab_file).read_bytes() != saved_vocab.read_bytes():
        raise ConfigError(f"resume=true but vocab_file={cfg.vocab_file} differs from the vocabulary the run "
                          f"was saved with ({saved_vocab}); leave vocab_file out to use the saved one")
    return payload


def windows_from(num_windows: int, seed: int, start: int) -> Iterator[int]:
    """:func:`shuffled_windows` from its ``start``-th index on (what a run that has already taken
    ``start`` windows takes next)."""
    order = shuffled_windows(num_windows, seed, first_epoch=start // num_windows)
    return itertools.islice(order, start % num_windows, None)


# --------------------------------------------------------------------------- training


def shuffled_windows(num_windows: int, seed: int, first_epoch: int = 0) -> Iterator[int]:
    """Window indices, a fresh permutation each epoch (epoch e's depends only on seed and e)."""
    for epoch in itertools.count(first_epoch):
        yield from np.random.default_rng([seed, epoch]).permutation(num_windows).tolist()


def train(cfg: DictConfig, model: BertForQuestionAnswering, features: SquadFeatures, batch: BatchSizes,
          device: torch.device, outputs: RunOutputs, vocab_file: Path,
          forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
          resume_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fine-tuning loop; returns the final step, the last logged metrics and the checkpoint.
    ``forward`` runs the model's forward passes (default: the model; a ``torch.compile`` of it; DDP
    around either under torchrun). ``resume_from``: a loaded checkpoint of this run (its weights
    already in ``model``), whose optimizer, schedule, loss scale, random state and data position the
    loop continues from."""
    forward = forward if forward is not None else model
    if len(features) == 0:
        raise UserError(f"train_file {cfg.train_file} gives no training windows: no answer was found in its "
                        "context at answer_start" + (", or none fits whole in a window of max_seq_length="
                        f"{cfg.max_seq_length} (windows_without_answer=drop leaves the others out)"
                        if cfg.windows_without_answer == "drop" else ""))
    total_steps = cfg.max_steps or math.ceil(cfg.num_train_epochs * len(features) / batch.train_batch_size)
    precision = cfg.precision.dtype
    ctx = outputs.ctx
    make_optimizer = build_from_config("optimizer", cfg.optimizer, _partial_=True)
    try:  # the constructor runs here (a partial): its ValueError is a bad optimizer setting
        optimizer = dist.build_optimizer(make_optimizer,
                                         build_param_groups(model, cfg.optimizer.weight_decay), ctx,
                                         cfg.distributed)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer: {e}") from e
    schedule = build_from_config("scheduler", cfg.scheduler, base_lr=cfg.optimizer.lr,
                                 total_steps=total_steps)
    try:
        scaler = LossScaler.from_config(cfg.precision, device)
    except ValueError as e:
        raise ConfigError(f"precision: {e}") from e
    state = TrainState()
    if resume_from is not None:
        restore_optimizer_and_scaler(model, optimizer, scaler, resume_from, cfg.optimizer._target_)
        warn_if_saved_before_rescale_after_warmup(resume_from["path"], cfg)
        state = TrainState(**resume_from["train_state"])
        saved_total = resume_from["scheduler"].get("total_steps")
        if saved_total is not None and saved_total != total_steps:
            log.warning("the run was saved with %d steps in all and now has %d (num_train_epochs=%s, "
                        "max_steps=%s): the LR schedule's rates from here on differ from an uninterrupted "
                        "run's", saved_total, total_steps, cfg.num_train_epochs, cfg.max_steps)
    # Kept as compact numpy arrays; each micro-batch becomes int64 tensors on the device.
    arrays = {"input_ids": features.input_ids, "token_type_ids": features.token_type_ids,
              "attention_mask": features.attention_mask, "start_positions": features.start_positions,
              "end_positions": features.end_positions}
    lengths = features.attention_mask.sum(1)
    order = windows_from(len(features), cfg.seed, state.last_global_data_samples)
    accum, micro = batch.gradient_accumulation_steps, batch.train_micro_batch_size_per_gpu
    # Each step takes train_batch_size windows of the order; rank r trains on the r-th share of them,
    # so any world size trains on the same windows per step.
    share = slice(ctx.rank * micro * accum, (ctx.rank + 1) * micro * accum)
    model_config = model.config
    flops_per_sample = qa_training_flops_per_sample(model_config, cfg.max_seq_length)
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = uses_cuda_graphs(cfg.compile, cfg.compile_mode, model.bert.unpad, model.bert.unpad_bucket)
    step_optimizer = OptimizerStep(params, optimizer, scaler, schedule, state, cfg.max_grad_norm,
                                   keep_grads=graphs)
    checkpoint_dir = outputs.dir / CHECKPOINT_SUBDIR
    log.info("fine-tuning %.1fM parameters: %d steps (%.2f epochs of %d windows), batch %d = micro %d x "
             "accumulation %d x world %d, on %s, %s", sum(p.numel() for p in params) / 1e6, total_steps,
             total_steps * batch.train_batch_size / len(features), len(features), batch.train_batch_size,
             micro, accum, ctx.world_size, device, precision)

    def checkpoint() -> None:
        step_optimizer.resolve()  # the last step's outcome decides the counters saved
        optimizer_state = dist.optimizer_state_for_checkpoint(model, optimizer, ctx)  # ZeRO: a collective
        rng_ranks = rank_rng_states(ctx)
        if ctx.is_main:
            save_checkpoint(
                checkpoint_dir, f"global_step{state.global_step}",
                state={"model": model.state_dict(), "optimizer": optimizer_state, "rng_ranks": rng_ranks,
                       "scheduler": {"schedule_step": state.schedule_step, "total_steps": total_steps},
                       "scaler": scaler.state_dict(), "train_state": asdict(state),
                       "model_config": model_config.to_dict(), "world_size": ctx.world_size},
                client_state={"epoch": state.epoch, "last_global_step": state.global_step,
                              "last_global_data_samples": state.last_global_data_samples,
                              "vocab_file": str(vocab_file), "do_lower_case": cfg.do_lower_case,
                              "task": "squad"},
                config_yaml=outputs.config_yaml, keep_last=cfg.keep_last_checkpoints,
                files={VOCAB_FILE: vocab_file},
            )
        dist.barrier(ctx)

    model.train()
    throughput = Throughput(device)
    throughput.reset(state.last_global_data_samples, 0)  # a resumed run counts from its checkpoint
    real_tokens = 0
    last_record: dict[str, Any] = {}
    last_saved_step = state.global_step if resume_from is not None else -1
    progress = tqdm(total=total_steps, initial=min(state.global_step, total_steps), desc=cfg.job_name,
                    disable=not (cfg.progress_bar and ctx.is_main), unit="step", dynamic_ncols=True)
    tokens_at_last_log, real_tokens_logged = 0, 0.0
    if resume_from is not None:
        restore_rank_rng(resume_from, outputs.ctx)  # dropout continues as it would have
        if state.global_step >= total_steps:
            log.info("fine-tuning had already finished (step %d of %d)", state.global_step, total_steps)
    mark_graph_step = graph_step_marker(graphs)
    try:
        with StopRequest() as stop:
            stopping = False  # a signal on any rank stops every rank at the same step
            vote = dist.StopVote(ctx, device)
            while state.global_step < total_steps:
                if vote(stop.requested):
                    stopping = True
                    break
                # ---- one optimizer step: accumulate `accum` micro-batches of this rank's share (the
                # gradients are all-reduced across ranks on the last one only)
                windows = np.fromiter(itertools.islice(order, batch.train_batch_size), dtype=np.int64,
                                      count=batch.train_batch_size)[share]
                loss_sum = torch.zeros((), device=device)
                for micro_step in range(accum):
                    mark_graph_step()
                    index = windows[micro_step * micro:(micro_step + 1) * micro]
                    host = {k: torch.from_numpy(v[index]).long() for k, v in arrays.items()}
                    mb, layout = batch_to_device(host, device, model.bert)
                    with dist.no_sync(forward, sync=micro_step == accum - 1):
                        with autocast_context(precision, device):
                            start_logits, end_logits = forward(mb["input_ids"], mb["token_type_ids"],
                                                               mb["attention_mask"], unpadded=layout)
                        loss = qa_loss(start_logits, end_logits, mb["start_positions"], mb["end_positions"])
                        (loss * (step_optimizer.loss_scale / accum)).backward()
                    loss_sum += loss.detach()
                    real_tokens += int(lengths[index].sum())
                state.last_global_data_samples += batch.train_batch_size
                state.epoch = state.last_global_data_samples // len(features)
                state.global_step += 1

                # ---- unscale, overflow check, clip, LR, step, zero (as in pre-training)
                grad_norm = step_optimizer()
                progress.update(1)

                # ---- logging and checkpoints, when due
                is_last = state.global_step >= total_steps
                if state.global_step % cfg.steps_per_print == 0 or is_last:
                    step_optimizer.resolve()
                    # the loss averaged over ranks, tokens summed over them
                    new_tokens = torch.tensor(float(real_tokens - tokens_at_last_log), device=device)
                    reduced = dist.all_reduce_mean(torch.stack([loss_sum / accum, new_tokens]), ctx)
                    global_tokens = real_tokens_logged + float(reduced[1]) * ctx.world_size
                    samples_per_sec, tokens_per_sec = throughput.rates(state.last_global_data_samples,
                                                                       global_tokens)
                    record = {
                        "step": state.global_step,
                        "samples": state.last_global_data_samples,
                        "epoch": state.last_global_data_samples / len(features),
                        "loss": finite_or_none(float(reduced[0])),
                        "lr": optimizer.param_groups[0]["lr"],
                        "grad_norm": finite_or_none(float(grad_norm)),
                        "samples_per_sec": samples_per_sec,
                        "tokens_per_sec": tokens_per_sec,
                        "skipped_steps": state.skipped_steps,
                    }
                    if precision == "fp16":
                        record["loss_scale"] = scaler.scale
                    if device.type == "cuda":
                        record["tflops"] = samples_per_sec * flops_per_sample / 1e12
                        record["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    outputs.record(record, step=state.global_step)
                    progress.set_postfix(loss=f"{record['loss'] or float('nan'):.4f}",
                                         samples_s=f"{samples_per_sec:.1f}")
                    last_record = record
                    tokens_at_last_log, real_tokens_logged = real_tokens, global_tokens
                    throughput.reset(state.last_global_data_samples, global_tokens)
                if cfg.checkpoint_steps and state.global_step % cfg.checkpoint_steps == 0:
                    checkpoint()
                    last_saved_step = state.global_step
            # a signal during the last step(s) is not left for the vote at the top of a next step: no
            # prediction starts when the job was asked to stop (a resume then only predicts)
            stopping = stopping or dist.any_rank(stop.requested, ctx, device)
            step_optimizer.resolve()
            if last_saved_step != state.global_step:
                checkpoint()
            if stopping and ctx.is_main:  # once, not once per rank
                log.warning("stopped at step %d of %d on request (no prediction made); continue with "
                            "resume=true output_dir=%s", state.global_step, total_steps, outputs.dir)
    finally:
        progress.close()
    return {"global_step": state.global_step, "total_steps": total_steps, "last_metrics": last_record,
            "checkpoint_dir": str(checkpoint_dir), "stopped": stopping,
            # this rank's signal, or another rank's (the vote does not say which)
            "stop_signal": (stop.signal or signal.SIGTERM) if stopping else None,
            "skipped_examples": features.num_skipped, "train_state": asdict(state)}


# --------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict_logits(model: BertForQuestionAnswering, features: SquadFeatures, batch_size: int,
                   device: torch.device, precision: str,
                   forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
                   progress: bool = False, windows: range | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Start and end logits (fp32, [windows, seq_len]) for every window (or those of ``windows``, a
    range of indices), in eval mode (``forward``: as in :func:`train`). They stay on the device
    until the last batch: one copy to the host, not a wait per batch."""
    forward = forward if forward is not None else model
    windows = windows if windows is not None else range(len(features))
    was_training = model.training
    model.eval()
    starts, ends = [], []
    try:
        for i in tqdm(range(windows.start, windows.stop, batch_size), desc="predict", unit="batch",
                      leave=False, disable=not progress, dynamic_ncols=True):
            last = min(i + batch_size, windows.stop)
            window = {name: torch.from_numpy(getattr(features, name)[i:last]).long()
                      for name in ("input_ids", "token_type_ids", "attention_mask")}
            mb, layout = batch_to_device(window, device, model.bert)
            with autocast_context(precision, device):
                start, end = forward(mb["input_ids"], mb["token_type_ids"], mb["attention_mask"],
                                     unpadded=layout)
            # a copy: a CUDA-graph replay (compile_mode=reduce-overhead) reuses its output memory
            starts.append(start.to(torch.float32, copy=True))
            ends.append(end.to(torch.float32, copy=True))
    finally:
        model.train(was_training)
    seq = features.input_ids.shape[1]
    if not starts:
        return np.zeros((0, seq), np.float32), np.zeros((0, seq), np.float32)
    return torch.cat(starts).cpu().numpy(), torch.cat(ends).cpu().numpy()


def predict_and_evaluate(cfg: DictConfig, model: BertForQuestionAnswering, examples: list[SquadExample],
                         features: SquadFeatures, device: torch.device, outputs: RunOutputs,
                         step: int, forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
                         ) -> dict[str, Any]:
    """Write predictions.json and nbest_predictions.json; score them if the file has gold answers.
    Under torchrun every rank computes the logits of its contiguous share of the windows and rank 0
    gathers them, writes and scores (the others return an empty record)."""
    ctx = outputs.ctx
    throughput = Throughput(device)
    throughput.reset(0, 0)
    bounds = [len(features) * r // ctx.world_size for r in range(ctx.world_size + 1)]
    start_logits, end_logits = predict_logits(model, features, cfg.predict_batch_size, device,
                                              cfg.precision.dtype, forward,
                                              progress=cfg.progress_bar and ctx.is_main,
                                              windows=range(bounds[ctx.rank], bounds[ctx.rank + 1]))
    if ctx.enabled:
        shares = dist.gather_to_main((start_logits, end_logits), ctx)
        if not ctx.is_main:
            dist.barrier(ctx)  # rank 0 writes and scores
            return {}
        start_logits = np.concatenate([start for start, _ in shares])
        end_logits = np.concatenate([end for _, end in shares])
    windows_per_sec, _ = throughput.rates(len(features), 0)
    predictions, nbest = best_spans(examples, features, start_logits, end_logits, cfg.n_best_size,
                                    cfg.max_answer_length)
    write_json_atomic(outputs.dir / PREDICTIONS_FILE, predictions)
    write_json_atomic(outputs.dir / NBEST_FILE, nbest)
    record: dict[str, Any] = {"step": step, "predict_questions": len(examples),
                              "predict_windows": len(features), "predict_samples_per_sec": windows_per_sec}
    gold = gold_answers(examples)
    if len(gold) == len(examples):
        record.update(evaluate(gold, predictions))
        log.info("%s: exact_match %.2f, f1 %.2f over %d questions", cfg.predict_file, record["exact_match"],
                 record["f1"], len(examples))
    else:
        log.warning("%s: %d of %d questions have no gold answers; predictions written but not scored",
                    cfg.predict_file, len(examples) - len(gold), len(examples))
    outputs.record(record, step=step)
    log.info("predictions: %s, %s", outputs.dir / PREDICTIONS_FILE, outputs.dir / NBEST_FILE)
    dist.barrier(ctx)
    return record


def run_and_report(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any] | None:
    """``run`` with user errors printed as one line (no traceback) and exit status 2."""
    try:
        summary = run(cfg, output_dir)
    except UserError as e:
        report_user_error(e)  # one line and exit 2; in a sweep, this job fails and the others run
    exit_on_stop(summary)  # a stopped run exits with 128 + the signal's number
    return summary


__all__ = ["InitialModel", "build_model", "load_initial_model", "load_qa_weights", "predict_and_evaluate",
           "predict_logits", "run", "run_and_report", "train"]
