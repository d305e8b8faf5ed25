"""The bertrecipes command line for a DeepSpeed BERT run: a DeepSpeed config JSON (and, for
pre-training, bing_bert's training config) in, Hydra overrides out.

    python -m bertrecipes.from_deepspeed deepspeed_bsz64k_lamb_config_seq128.json \\
        --bing-bert-config bert_large_lamb.json --seq 128 --lr-offset 1e-3
    python -m bertrecipes.from_deepspeed deepspeed_bsz24_config.json --task squad

It prints ``# notes`` (what has no counterpart, or differs), then the command. What it maps:

* DeepSpeed config: ``train_batch_size``, ``train_micro_batch_size_per_gpu``,
  ``gradient_accumulation_steps``, ``steps_per_print``, ``gradient_clipping`` (``max_grad_norm``; else
  the optimizer's ``params.max_grad_norm``, as in BingBertSquad's config),
  ``optimizer`` (Lamb or Adam/AdamW and their ``params``), ``fp16`` (``loss_scale``,
  ``initial_scale_power``, ``loss_scale_window``, ``hysteresis``, ``min_loss_scale``) or ``bf16``,
  ``zero_optimization.stage`` (1: ``distributed.zero_stage=1``; 3: ``distributed.strategy=fsdp``).
* bing_bert's training config: ``bert_model_config`` (the model), and the ``mixed_seq_training``
  entry of ``--seq`` (or ``training``): ``learning_rate``, ``warmup_proportion``, ``decay_rate``,
  ``decay_step``, ``total_training_steps``.
* bing_bert's launch-script flags: ``--lr-schedule EE|LE``, ``--lr-offset``, ``--seq``,
  ``--max-predictions-per-seq``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from bertrecipes.errors import ConfigError, UserError
from bertrecipes.layer_drop import check_config

# Keys of a DeepSpeed config that change nothing in a bertrecipes run (logging, timers) or that
# its other settings cover; said in a note, not mapped.
_NO_EFFECT = {"wall_clock_breakdown", "prescale_gradients", "dump_state", "flops_profiler",
              "tensorboard", "memory_breakdown"}
_FP16_KEYS = ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")
_OPTIMIZER_PARAMS = {
    "lamb": ("lr", "betas", "eps", "weight_decay", "bias_correction", "max_coeff", "min_coeff"),
    "adam": ("lr", "betas", "eps", "weight_decay", "bias_correction", "adam_w_mode"),
}
_OPTIMIZER_TYPES = {"lamb": "lamb", "fusedlamb": "lamb", "adam": "adam", "adamw": "adam", "fusedadam": "adam"}
_MODEL_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
               "type_vocab_size", "initializer_range")
# conf/model/*.yaml: the named sizes (the rest of a BERT config at bertrecipes' defaults)
_MODELS = {"bert_large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096),
           "bert_base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072)}
_MODEL_DEFAULTS = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                       max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02)


def _value(x: Any) -> str:
    """A value as a Hydra override writes it."""
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, (list, tuple)):
        return "[" + ",".join(_value(v) for v in x) + "]"
    return repr(x) if isinstance(x, float) else str(x)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a JSON object")
    return data


def _block(ds: dict, key: str) -> dict:
    """``ds[key]`` as a JSON object ({} when absent or null)."""
    value = ds.get(key)
    if key == "zero_optimization" and isinstance(value, bool):  # DeepSpeed's old form: true = stage 1
        return {"stage": int(value)}
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{key} must be a JSON object, got {value!r}")
    return value


def _number(value: object, name: str, kind: type = float) -> float | int:
    """``value`` as a ``kind`` (float or int), or a UserError naming ``name``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (kind is int and value != int(value)):
        raise UserError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def deepspeed_overrides(ds: dict, task: str) -> tuple[list[str], list[str]]:
    """(overrides, notes) for a DeepSpeed config ``ds``."""
    overrides, notes = [], []
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "steps_per_print"):
        if key in ds:
            overrides.append(f"{key}={_value(_number(ds[key], key, int))}")
    if "gradient_clipping" in ds:
        overrides.append(f"max_grad_norm={_value(_number(ds['gradient_clipping'], 'gradient_clipping'))}")

    optimizer = _block(ds, "optimizer")
    if optimizer:
        kind = str(optimizer.get("type", "")).lower()
        name = _OPTIMIZER_TYPES.get(kind)
        if name is None:
            raise UserError(f"optimizer type {optimizer.get('type')!r} has no bertrecipes counterpart "
                            "(Lamb, Adam or AdamW)")
        overrides.append(f"optimizer={name}")
        params = dict(optimizer.get("params") or {})
        if kind == "adamw":
            params.setdefault("adam_w_mode", True)
        for key in _OPTIMIZER_PARAMS[name]:
            if key in params:
                overrides.append(f"optimizer.{key}={_value(params.pop(key))}")
        if "max_grad_norm" in params:  # BingBertSquad's config clips here, not with gradient_clipping
            clip = _number(params.pop("max_grad_norm"), "optimizer.params.max_grad_norm")
            if "gradient_clipping" not in ds:
                overrides.append(f"max_grad_norm={_value(clip)}")
            elif clip != _number(ds["gradient_clipping"], "gradient_clipping"):
                notes.append(f"optimizer.params.max_grad_norm={_value(clip)} differs from gradient_clipping="
                             f"{_value(_number(ds['gradient_clipping'], 'gradient_clipping'))}; DeepSpeed "
                             f"clips with gradient_clipping, as here")
        if params:
            notes.append(f"optimizer params without a counterpart, not mapped: {', '.join(sorted(params))}")

    fp16, bf16 = _block(ds, "fp16"), _block(ds, "bf16") or _block(ds, "bfloat16")
    if fp16.get("enabled"):
        overrides.append("precision=fp16")
        overrides += [f"precision.{k}={_value(fp16[k])}" for k in _FP16_KEYS if k in fp16]
        rest = sorted(set(fp16) - {"enabled", *_FP16_KEYS})
        if rest:
            notes.append(f"fp16 settings without a counterpart, not mapped: {', '.join(rest)}")
    elif bf16.get("enabled"):
        overrides.append("precision=bf16")
    else:
        overrides.append("precision=fp32")

    stage = _number(_block(ds, "zero_optimization").get("stage", 0), "zero_optimization.stage", int)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    if stage == 1:
        overrides.append("distributed.zero_stage=1")
    elif stage == 2:
        overrides.append("distributed.zero_stage=1")
        notes.append("ZeRO stage 2 (gradients sharded too) maps to distributed.zero_stage=1, which shards "
                     "the optimizer state only (distributed.strategy=fsdp shards gradients and parameters)")
    elif stage == 3:
        if task == "squad":
            notes.append("ZeRO stage 3 has no counterpart in SQuAD fine-tuning (the model fits one GPU): "
                         "plain DDP is used")
        else:
            overrides.append("distributed.strategy=fsdp")
    pld = _block(ds, "progressive_layer_drop")
    if pld.get("enabled"):
        if task == "squad":
            notes.append("progressive_layer_drop is for pre-training; fine-tuning runs every layer")
        else:
            overrides.append("progressive_layer_drop.enabled=true")
            given = {k: _number(pld[k], f"progressive_layer_drop.{k}") for k in ("theta", "gamma")
                     if k in pld}
            try:
                check_config(given.get("theta", 0.5), given.get("gamma", 0.001))
            except ConfigError as e:
                raise UserError(str(e)) from e
            overrides += [f"progressive_layer_drop.{k}={_value(v)}" for k, v in given.items()]
            defaults = {"theta": 0.5, "gamma": 0.001}
            missing = [f"{k} {defaults[k]}" for k in defaults if k not in given]
            if missing:
                names = " and ".join(k.split()[0] for k in missing)
                notes.append(f"progressive_layer_drop without {names} (DeepSpeed requires them): "
                             f"bertrecipes' default {' and '.join(missing)} applies")
            overrides.append("model.pre_layer_norm=true")
            notes.append("progressive_layer_drop: bing_bert runs it on its pre-LN model "
                         "(modelingpreln_layerdrop.py), hence model.pre_layer_norm=true")
            if "distributed.strategy=fsdp" in overrides:  # each rank skips its own layers: not FSDP
                overrides[overrides.index("distributed.strategy=fsdp")] = "distributed.zero_stage=1"
                notes.append("ZeRO stage 3 with progressive_layer_drop maps to distributed.zero_stage=1: "
                             "FSDP gathers every layer with every rank, and the ranks skip different layers")
    if "sparse_attention" in ds:
        notes.append("sparse_attention is not implemented: attention is dense (exact)")
    if "scheduler" in ds:
        notes.append("DeepSpeed's own scheduler block is not mapped: bing_bert sets the LR itself "
                     "(--lr-schedule); choose scheduler= yourself")
    handled = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "steps_per_print", "gradient_clipping", "optimizer", "fp16", "bf16", "bfloat16",
               "zero_optimization", "sparse_attention", "scheduler", "progressive_layer_drop"}
    ignored = sorted(k for k in ds if k in _NO_EFFECT)
    unknown = sorted(k for k in ds if k not in handled and k not in _NO_EFFECT)
    if ignored:
        notes.append(f"no effect here, not mapped: {', '.join(ignored)}")
    if unknown:
        notes.append(f"not mapped (no counterpart known): {', '.join(unknown)}")
    return overrides, notes


def bing_bert_overrides(config: dict, seq: int | None) -> tuple[list[str], list[str]]:
    """(overrides, notes) for bing_bert's training config (``bert_large_lamb.json``'s shape)."""
    overrides, notes = [], []
    model = config.get("bert_model_config") or {}
    sizes = {k: model[k] for k in _MODEL_KEYS if k in model}
    named = next((name for name, values in _MODELS.items()
                  if all(sizes.get(k) == v for k, v in values.items())), None)
    if named:
        overrides.append(f"model={named}")
        fixed = _MODELS[named]
    else:
        fixed = {}
    for key, value in sizes.items():
        if key not in fixed and _MODEL_DEFAULTS.get(key) != value:
            overrides.append(f"model.{key}={_value(value)}")
    overrides.append("model.pre_layer_norm=true")  # bing_bert's model: nvidia/modelingpreln.py
    overrides.append("model.pad_vocab_to_multiple_of=8")  # turing/models.py pads the vocabulary so
    if model.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"hidden_act={model['hidden_act']!r}: bertrecipes' BERT has the exact GELU only")

    training = config.get("training")
    mixed = config.get("mixed_seq_training") or {}
    if mixed:
        if seq is None:
            raise UserError(f"the bing_bert config trains at several lengths ({', '.join(sorted(mixed))}): "
                            f"give --seq with one of them")
        if str(seq) not in mixed:
            raise UserError(f"--seq {seq} is not one of the bing_bert config's lengths "
                            f"({', '.join(sorted(mixed))})")
        training = mixed[str(seq)]
    training = training or {}
    if "learning_rate" in training:
        overrides.append(f"optimizer.lr={_value(float(training['learning_rate']))}")
    for key in ("warmup_proportion", "decay_rate", "decay_step"):  # EE and LE decay alike
        if key in training:
            overrides.append(f"scheduler.{key}={_value(training[key])}")
    if "total_training_steps" in training:
        overrides.append(f"total_training_steps={_value(training['total_training_steps'])}")
        notes.append("max_steps is not in bing_bert's config (it runs num_epochs or stops by hand): set "
                     "max_steps= (BERT-large's 64K/32K LAMB recipe: 7038 at seq128, 1561 at seq512)")
    return overrides, notes


# The phases' checkpoint intervals (conf/phase/seq128.yaml, seq512.yaml; a test holds them equal).
CHECKPOINT_STEPS = {128: 500, 512: 250}


def command(ds_config: Path, bing_bert_config: Path | None = None, task: str = "pretrain",
            seq: int | None = None, lr_schedule: str = "EE", lr_offset: float | None = None,
            max_predictions_per_seq: int | None = None) -> tuple[list[str], list[str]]:
    """(the command as a list of words, notes)."""
    overrides, notes = deepspeed_overrides(_read_json(ds_config, "DeepSpeed config"), task)
    if task == "squad":
        if bing_bert_config is not None:
            raise UserError("--bing-bert-config is bing_bert's pre-training config; SQuAD fine-tuning takes "
                            "its architecture from model_file")
        return ["python", "-m", "bertrecipes.squad", *overrides], notes
    schedules = {"EE": "warmup_exp_decay_exp", "LE": "warmup_linear_decay_exp"}
    overrides.append(f"scheduler={schedules[lr_schedule]}")
    lengths: list[int] = []  # the sequence lengths of bing_bert's mixed_seq_training, if any
    if bing_bert_config is None:
        notes.append("no --bing-bert-config: the model and the schedule's settings stay bertrecipes' "
                     "defaults (model=bert_tiny); give bing_bert's training config, or set model= and "
                     "scheduler.* yourself")
    else:
        training_config = _read_json(bing_bert_config, "bing_bert config")
        more, more_notes = bing_bert_overrides(training_config, seq)
        lengths = [int(length) for length in training_config.get("mixed_seq_training") or {}
                   if str(length).isdigit()]
        # bing_bert sets the LR from its own config's learning_rate: that one wins
        ours = [o for o in overrides if o.startswith("optimizer.lr=")]
        theirs = [o for o in more if o.startswith("optimizer.lr=")]
        if theirs:
            if ours and ours != theirs:
                notes.append(f"the DeepSpeed config's {ours[0]} differs from the bing_bert config's "
                             f"{theirs[0]}; bing_bert sets the rate from the latter, as here")
            overrides = [o for o in overrides if o not in ours]
        overrides += more
        notes += more_notes
    overrides = list(dict.fromkeys(overrides))  # once each (progressive_layer_drop asks for pre-LN too)
    if seq is not None:
        overrides.append(f"max_seq_length={seq}")
        shorter = [length for length in lengths if length < seq]
        if shorter or (bing_bert_config is None and seq == 512):
            first = f"the seq{min(shorter)} phase" if shorter else "phase 1"
            notes.append(f"phase 2 (seq{seq}) continues {first}: add init_from=<phase-1 run>/checkpoints "
                         "(bing_bert's --load_training_checkpoint), or it pre-trains from random weights")
            overrides.append("load_optimizer_states=null")  # that flag's DeepSpeed load continues them
    if max_predictions_per_seq is not None:
        overrides.append(f"max_predictions_per_seq={max_predictions_per_seq}")
    if lr_offset is not None:
        overrides.append(f"scheduler.lr_offset={_value(float(lr_offset))}")
    # bing_bert saves at every epoch's end; a run without checkpoints would lose everything to a crash.
    # The phase's interval where there is one for this length (conf/phase), else the seq128 phase's.
    overrides.append(f"checkpoint_steps={CHECKPOINT_STEPS.get(seq, CHECKPOINT_STEPS[128])}")
    overrides.append(f"job_name=bing_bert_seq{seq}" if seq is not None else "job_name=bing_bert")
    return ["python", "-m", "bertrecipes.pretrain", *overrides], notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bertrecipes.from_deepspeed",
                                     description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("deepspeed_config", type=Path, help="the DeepSpeed config JSON (--deepspeed_config)")
    parser.add_argument("--bing-bert-config", type=Path,
                        help="bing_bert's training config (--config_file, e.g. bert_large_lamb.json)")
    parser.add_argument("--task", choices=("pretrain", "squad"), default="pretrain")
    parser.add_argument("--seq", type=int, help="sequence length (bing_bert's --max_seq_length)")
    parser.add_argument("--lr-schedule", choices=("EE", "LE"), default="EE",
                        help="bing_bert's --lr_schedule: EE = warmup_exp_decay_exp, "
                             "LE = warmup_linear_decay_exp (linear warmup, the same decay)")
    parser.add_argument("--lr-offset", type=float, help="bing_bert's --lr_offset")
    parser.add_argument("--max-predictions-per-seq", type=int, help="bing_bert's --max_predictions_per_seq")
    args = parser.parse_args(argv)
    try:
        words, notes = command(args.deepspeed_config, args.bing_bert_config, args.task, args.seq,
                               args.lr_schedule, args.lr_offset, args.max_predictions_per_seq)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"# {note}")
    print(shlex.join(words))
    return 0


if __name__ == "__main__":
    sys.exit(main())
