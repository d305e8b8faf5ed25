"""Import BERT weights from our own (DS), Hugging Face (HF) and Google TensorFlow (TF) checkpoints.

Every importer returns an :class:`ImportedCheckpoint` whose ``state_dict`` is in our layout (Hugging
Face ``BertForPreTraining`` names, see :mod:`bertrecipes.interop.names`); :func:`load_into_model`
then loads it into our model, checking shapes and naming what is missing or left over::

    from bertrecipes.interop import load_into_model, load_model_state
    from bertrecipes.model import BertForPreTraining

    imported = load_model_state("uncased_L-12_H-768_A-12/bert_model.ckpt", ckpt_type="TF")
    model = BertForPreTraining(imported.config)
    load_into_model(model, imported)

Accepted paths: DS, anything :func:`bertrecipes.checkpoint.load_checkpoint` takes (a run's
``checkpoints/`` directory, a tag directory, a ``state.pt``); HF, a directory or weights file
(``model.safetensors``, a sharded ``model.safetensors.index.json``, ``pytorch_model.bin``) with its
``config.json``, or a Hub id when no such local path exists; TF, a checkpoint prefix
(``bert_model.ckpt``), its ``.index`` file or the directory holding it, with ``bert_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bertrecipes.checkpoint import LATEST_FILE, STATE_FILE, CheckpointError, checkpoint_vocab, load_checkpoint
from bertrecipes.errors import ConfigError
from bertrecipes.interop.deepspeed import (
    MODEL_STATES_FILE,
    find_model_states,
    infer_config,
    is_nvidia_checkpoint,
    is_pre_layer_norm,
    load_foreign,
    newest_nvidia_checkpoint,
    read_model_states,
    read_nvidia_checkpoint,
)
from bertrecipes.interop.names import (
    BACKBONE_PREFIXES,
    TF_SKIPPED,
    WORD_EMBEDDINGS,
    hf_to_ours,
    tf_to_ours,
    tie_mlm_head,
)
from bertrecipes.interop.tf_bundle import TFBundle
from bertrecipes.interop.vocab import fit_vocab_size, is_padded_vocab
from bertrecipes.model import BertConfig

log = logging.getLogger(__name__)

CKPT_TYPES = ("DS", "HF", "TF")
_DESCRIPTION = {"DS": "bertrecipes (DS)", "HF": "Hugging Face (HF)", "TF": "TensorFlow (TF)"}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
_TF_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass
class ImportedCheckpoint:
    """Weights in our layout plus what came with them.

    ``state_dict`` always has the ``bert.`` prefix, no ``cls.predictions.decoder.bias`` and no
    ``position_ids``; heads only if the source had them. ``config`` describes the tensors (its
    ``vocab_size`` is the checkpoint's row count, padded or not). ``source`` names the file read.
    """

    state_dict: dict[str, torch.Tensor]
    config: BertConfig | None
    vocab_file: Path | None
    source: str
    global_step: int | None = None
    # A bertrecipes checkpoint's optimizer, scaler, model_config and path, when the caller asked to
    # keep them (``load_model_state(..., keep_training_state=True)``); else None.
    training_state: dict[str, Any] | None = None


@dataclass
class LoadReport:
    """What :func:`load_into_model` did not load: head parameters left as initialised
    (``missing_keys``) and checkpoint tensors the model has no place for (``unexpected_keys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def normalize_ckpt_type(ckpt_type: str) -> str:
    kind = str(ckpt_type).upper()
    if kind not in CKPT_TYPES:
        raise ConfigError(f"ckpt_type must be one of {', '.join(CKPT_TYPES)} (any case), got {ckpt_type!r}")
    return kind


def detect_checkpoint_type(path: str | Path) -> tuple[str, str] | None:
    """(type, reason) for what ``path`` looks like, or None when it is not recognisable."""
    path = Path(path)
    if path.is_file():
        name = path.name
        if name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")):
            return "HF", f"{name} is a Hugging Face weights file"
        if name.endswith(".index") or _TF_DATA_SUFFIX.search(name):
            return "TF", f"{name} is a TensorFlow checkpoint file"
        if name == STATE_FILE:
            return "DS", f"a {STATE_FILE} file"
        if name.endswith("model_states.pt"):
            return "DS", f"{name} is a DeepSpeed model-states file"
        return None
    if path.is_dir():
        for name in (STATE_FILE, MODEL_STATES_FILE, "latest"):
            if (path / name).is_file():
                return "DS", f"it holds {name}"
        newest = newest_nvidia_checkpoint(path)
        if newest is not None:
            return "DS", f"it holds {newest.name}, an NVIDIA DeepLearningExamples checkpoint"
        weights = [n for n in HF_WEIGHT_FILES if (path / n).is_file()]
        if weights:
            return "HF", f"it holds {weights[0]}"
        indexes = sorted(path.glob("*.index"))
        if indexes:
            return "TF", f"it holds {indexes[0].name}"
        return None
    if Path(f"{path}.index").is_file():
        return "TF", f"{path}.index exists"
    return None


def refuse_other_type(path: str | Path, kind: str) -> None:
    """A CheckpointError naming the right ``ckpt_type`` when ``path`` is plainly of another kind."""
    detected = detect_checkpoint_type(path)
    if detected and detected[0] != kind:
        other, why = detected
        raise CheckpointError(
            f"{path} looks like a {_DESCRIPTION[other]} checkpoint ({why}), but ckpt_type={kind} expects a "
            f"{_DESCRIPTION[kind]} checkpoint; use ckpt_type={other}"
        )


# ------------------------------------------------------------------------------------ configs


def read_bert_config(path: str | Path) -> BertConfig:
    """A BertConfig from Google's ``bert_config.json``, Hugging Face's ``config.json`` or bing_bert's
    training config (``bert_large_lamb.json``: its ``bert_model_config``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read BERT config {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"BERT config {path} is not valid JSON: {e}") from e
    if isinstance(data.get("bert_model_config"), dict):  # bing_bert's training config (bert_large_lamb.json)
        data = data["bert_model_config"]
    if "vocab_size" not in data and isinstance(data.get("vocab_size_or_config_json_file"), int):
        data = {**data, "vocab_size": data["vocab_size_or_config_json_file"]}  # bing_bert's name for it
    if data.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{path}: model_type is {data['model_type']!r}, expected 'bert'")
    if data.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{path}: position_embedding_type={data['position_embedding_type']!r}; only "
                              f"'absolute' (BERT's learned positions) is supported")
    if data.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{path}: hidden_act={data['hidden_act']!r}; bertrecipes' BERT implements the "
                              f"exact (erf) 'gelu' only")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in data]
    if missing:
        raise CheckpointError(f"BERT config {path} lacks {missing} (as bert_config.json/config.json have)")
    fields = {f.name: data[f.name] for f in dataclasses.fields(BertConfig) if f.name in data}
    try:
        return BertConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"BERT config {path}: {e}") from e


def expected_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of our BertForPreTraining (and of a QA head) for ``config``."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {
        "bert.embeddings.word_embeddings.weight": (v, h),
        "bert.embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "bert.embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "cls.predictions.bias": (v,),
        "cls.predictions.decoder.weight": (v, h),
        "cls.seq_relationship.weight": (2, h), "cls.seq_relationship.bias": (2,),
        "qa_outputs.weight": (2, h), "qa_outputs.bias": (2,),
    }
    modules = {"bert.embeddings.LayerNorm": None, "bert.pooler.dense": (h, h),
               "cls.predictions.transform.dense": (h, h), "cls.predictions.transform.LayerNorm": None}
    if config.pre_layer_norm:
        modules["bert.encoder.FinalLayerNorm"] = None
    for n in range(config.num_hidden_layers):
        layer = f"bert.encoder.layer.{n}"
        modules.update({f"{layer}.attention.self.query": (h, h), f"{layer}.attention.self.key": (h, h),
                        f"{layer}.attention.self.value": (h, h), f"{layer}.attention.output.dense": (h, h),
                        f"{layer}.attention.output.LayerNorm": None, f"{layer}.intermediate.dense": (i, h),
                        f"{layer}.output.dense": (h, i), f"{layer}.output.LayerNorm": None})
    for module, weight in modules.items():
        weight = weight or (h,)  # None: a LayerNorm
        shapes[f"{module}.weight"] = weight
        shapes[f"{module}.bias"] = (weight[0],)
    return shapes


def check_config_matches(state: dict[str, torch.Tensor], config: BertConfig, source: str,
                         config_source: str) -> BertConfig:
    """Raise CheckpointError if ``config`` does not describe the tensors in ``state``. Returns the config,
    with ``vocab_size`` set to the checkpoint's rows where one size is the other padded."""
    rows = state[WORD_EMBEDDINGS].shape[0] if WORD_EMBEDDINGS in state else config.vocab_size
    if rows != config.vocab_size:
        if not (is_padded_vocab(rows, config.vocab_size) or is_padded_vocab(config.vocab_size, rows)):
            raise CheckpointError(
                f"{source}: tensor {WORD_EMBEDDINGS} has {rows} rows but config {config_source} says "
                f"vocab_size={config.vocab_size} (expected shape [{config.vocab_size}, {config.hidden_size}])"
            )
        config = dataclasses.replace(config, vocab_size=int(rows))
    layers = {int(m.group(1)) for k in state if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k))}
    if layers and layers != set(range(config.num_hidden_layers)):
        raise CheckpointError(
            f"{source} has {len(layers)} encoder layers (bert.encoder.layer.{min(layers)}..{max(layers)}) "
            f"but config {config_source} says num_hidden_layers={config.num_hidden_layers}"
        )
    expected = expected_shapes(config)
    for key in sorted(state, key=lambda k: k != WORD_EMBEDDINGS):  # the clearest mismatch first
        tensor = state[key]
        if key in expected and tuple(tensor.shape) != expected[key]:
            raise CheckpointError(
                f"{source}: tensor {key} has shape {list(tensor.shape)} but config {config_source} "
                f"(hidden_size={config.hidden_size}, intermediate_size={config.intermediate_size}, "
                f"vocab_size={config.vocab_size}) expects {list(expected[key])}"
            )
    if "bert.encoder.FinalLayerNorm.weight" in state and not config.pre_layer_norm:
        raise CheckpointError(f"{source} has bert.encoder.FinalLayerNorm (a pre-LN model) but config "
                              f"{config_source} has pre_layer_norm=false")
    return config


# ------------------------------------------------------------------------------------- DS


def _load_ds(path: Path, config_file: Path | None, verify_crc: bool,
             keep_training_state: bool = False) -> tuple[ImportedCheckpoint, str]:
    foreign = None
    if path.is_dir() and not any((path / name).is_file() for name in (STATE_FILE, LATEST_FILE)):
        newest = newest_nvidia_checkpoint(path)  # an NVIDIA DeepLearningExamples results directory
        if newest is not None:
            log.info("%s: reading its newest checkpoint, %s", path, newest.name)
            path = newest
    model_states = find_model_states(path)
    if model_states is not None:  # written by DeepSpeed (bing_bert), not by bertrecipes
        foreign = (model_states, *read_model_states(model_states))
    elif path.is_file() and path.name != STATE_FILE:  # ours, or NVIDIA DeepLearningExamples' ckpt_<step>.pt
        payload = load_foreign(path, "PyTorch")
        if is_nvidia_checkpoint(payload):
            foreign = (path, *read_nvidia_checkpoint(path, payload))
        del payload
    if foreign is not None:
        source, state, step = foreign
        if config_file is not None:  # the LayerNorms' placement is in the weights, not the config; the
            # vocabulary size too (bing_bert's configs say 119547; both pad their tokenizer's to 8)
            config = read_bert_config(config_file)
            config = dataclasses.replace(config, pre_layer_norm=is_pre_layer_norm(state))
            if WORD_EMBEDDINGS in state:
                config = dataclasses.replace(config, vocab_size=state[WORD_EMBEDDINGS].shape[0])
        else:
            config = infer_config(state, str(source))
        return ImportedCheckpoint(state, config, None, str(source), step), str(config_file or source)
    payload = load_checkpoint(path)
    source = payload["path"]
    state = {k.removeprefix("module."): v for k, v in payload["model"].items()}
    config = BertConfig(**payload["model_config"]) if payload.get("model_config") else None
    client_state = payload.get("client_state") or {}
    vocab_file = checkpoint_vocab(payload)
    step = (payload.get("train_state") or {}).get("global_step", client_state.get("last_global_step"))
    if config_file is not None:
        config = read_bert_config(config_file)
    training = ({key: payload.get(key) for key in ("optimizer", "scaler", "model_config", "path")}
                if keep_training_state else None)
    return ImportedCheckpoint(state, config, vocab_file, source, step, training), str(config_file or source)


# ------------------------------------------------------------------------------------- HF


def _safetensors_size_hint(path: Path) -> str:
    """'it is N bytes but its header describes M' when the header is readable, else ''."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return f"; it is {path.stat().st_size} bytes but its header describes {8 + header_len + end}"
    except Exception:  # the header itself is damaged: nothing more precise to say
        return ""


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error type for short/corrupt files
            raise CheckpointError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): expected an 8-byte "
                f"header length, a JSON header and the tensor data it describes"
                f"{_safetensors_size_hint(path)} ({e})"
            ) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated zip archives or pickles
        raise CheckpointError(
            f"{path} is not a readable PyTorch weights file (truncated or corrupt?): expected a torch.save "
            f"zip archive of a state dict of tensors ({type(e).__name__}: {e})"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.name.endswith(".index.json"):
        return _read_weights_file(path)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is not a sharded-checkpoint index (JSON, 'weight_map'): {e}") from e
    state = {}
    for shard in sorted(set(weight_map.values())):
        if not (path.parent / shard).is_file():
            raise CheckpointError(f"{path} names shard {shard}, which does not exist in {path.parent}")
        state.update(_read_weights_file(path.parent / shard))
    return state


def _download_from_hub(repo_id: str) -> Path:
    """A local snapshot of Hub model ``repo_id`` (config, vocab and weights only)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(f"{repo_id} is not a local path; to fetch it from the Hugging Face Hub, "
                              f"pip install huggingface_hub") from e
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=["config.json", "vocab.txt", "*.safetensors",
                                                                "model.safetensors.index.json"]))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(repo_id, allow_patterns=["config.json", "vocab.txt",
                                                                    "pytorch_model.bin*"]))
    except Exception as e:  # network, authentication, unknown repository...
        raise CheckpointError(f"{repo_id} is neither a local path nor a model on the Hugging Face Hub "
                              f"that could be downloaded: {type(e).__name__}: {e}") from e
    return local


def _load_hf(path: Path, config_file: Path | None, verify_crc: bool) -> tuple[ImportedCheckpoint, str]:
    if not path.exists():
        if path.is_absolute() or not _HUB_ID.fullmatch(str(path)):
            raise CheckpointError(f"Hugging Face checkpoint {path} does not exist")
        path = _download_from_hub(str(path))
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        weights = next((path / n for n in HF_WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            found = sorted(p.name for p in path.iterdir())[:10]
            raise CheckpointError(f"no Hugging Face weights in {path}: expected one of "
                                  f"{list(HF_WEIGHT_FILES)} (found {found})")
    else:
        weights = path
    directory = weights.parent
    state = hf_to_ours(_read_hf_weights(weights))
    config_path = config_file or directory / "config.json"
    config = read_bert_config(config_path) if config_file or config_path.is_file() else None
    vocab_file = directory / "vocab.txt" if (directory / "vocab.txt").is_file() else None
    return ImportedCheckpoint(state, config, vocab_file, str(weights), None), str(config_path)


# ------------------------------------------------------------------------------------- TF


def resolve_tf_prefix(path: str | Path) -> Path:
    """The checkpoint prefix for a prefix, its ``.index``/``.data-*`` file, or a directory."""
    path = Path(path)
    if path.name.endswith(".index"):
        return path.with_name(path.name.removesuffix(".index"))
    if _TF_DATA_SUFFIX.search(path.name):
        return path.with_name(_TF_DATA_SUFFIX.sub("", path.name))
    if path.is_dir():
        if (path / "bert_model.ckpt.index").is_file():
            return path / "bert_model.ckpt"
        state_file = path / "checkpoint"  # TF's "latest" file: model_checkpoint_path: "model.ckpt-1000"
        if state_file.is_file():
            match = re.search(r'^model_checkpoint_path:\s*"(.+)"', state_file.read_text(), re.M)
            if match:
                return path / match.group(1)
        indexes = sorted(path.glob("*.index"))
        if len(indexes) == 1:
            return indexes[0].with_name(indexes[0].name.removesuffix(".index"))
        raise CheckpointError(
            f"{path}: expected one TensorFlow checkpoint (a *.index file, e.g. bert_model.ckpt.index), found "
            f"{[p.name for p in indexes] or 'none'}; pass the checkpoint prefix"
        )
    return path


def _load_tf(path: Path, config_file: Path | None, verify_crc: bool) -> tuple[ImportedCheckpoint, str]:
    prefix = resolve_tf_prefix(path)
    if not Path(f"{prefix}.index").is_file():
        raise CheckpointError(f"TensorFlow checkpoint index {prefix}.index does not exist (expected a "
                              f"checkpoint prefix such as bert_model.ckpt, its .index file, or its folder)")
    bundle = TFBundle(prefix, verify_crc=verify_crc)
    state, unknown, global_step = {}, [], None
    for name in bundle.entries:
        if name == "global_step":
            global_step = int(bundle.read(name).item())
            continue
        if TF_SKIPPED.search(name):
            continue
        mapped = tf_to_ours(name)
        if mapped is None:
            unknown.append(name)
            continue
        ours, transpose = mapped
        tensor = bundle.read(name)
        state[ours] = tensor.t().contiguous() if transpose else tensor
    if unknown:
        warnings.warn(f"{prefix}: {len(unknown)} TensorFlow variables not imported (unknown to the BERT "
                      f"name mapping): {unknown}", stacklevel=3)
    if not state:
        raise CheckpointError(f"{prefix} holds no BERT variables (expected Google's names, e.g. "
                              f"bert/embeddings/word_embeddings; found {list(bundle.entries)[:8]})")
    directory = prefix.parent
    config_path = config_file or next((directory / n for n in ("bert_config.json", "config.json")
                                       if (directory / n).is_file()), None)
    config = read_bert_config(config_path) if config_path else None
    vocab_file = directory / "vocab.txt" if (directory / "vocab.txt").is_file() else None
    imported = ImportedCheckpoint(state, config, vocab_file, str(bundle.index_file), global_step)
    return imported, str(config_path)


# ---------------------------------------------------------------------------------- public API


def load_model_state(
    model_file: str | Path,
    ckpt_type: str = "DS",
    origin_bert_config_file: str | Path | None = None,
    verify_crc: bool = True,
    keep_training_state: bool = False,
) -> ImportedCheckpoint:
    """Read a DS, HF or TF checkpoint into our layout, with its config and vocab file when found.
    With ``keep_training_state`` a bertrecipes checkpoint also brings its optimizer and loss-scaler
    state (``training_state``), for a next phase that continues them.

    ``origin_bert_config_file`` overrides the config found with the checkpoint (HF ``config.json``, TF
    ``bert_config.json``, DS's saved model config). ``verify_crc`` checks TF tensors' CRC32C.
    Errors (missing or truncated files, a path of another checkpoint type, a config that does not
    match the tensors) are CheckpointError naming the file.
    """
    kind = normalize_ckpt_type(ckpt_type)
    path = Path(model_file)
    refuse_other_type(path, kind)
    config_file = Path(origin_bert_config_file) if origin_bert_config_file else None
    if kind == "DS":
        imported, config_source = _load_ds(path, config_file, verify_crc, keep_training_state)
    else:
        imported, config_source = {"HF": _load_hf, "TF": _load_tf}[kind](path, config_file, verify_crc)
    imported.state_dict = tie_mlm_head(imported.state_dict, imported.source)
    if not any(k.startswith(BACKBONE_PREFIXES) for k in imported.state_dict):
        raise CheckpointError(f"{imported.source} has no BERT encoder weights (bert.embeddings.*, "
                              f"bert.encoder.*); found {sorted(imported.state_dict)[:8]}")
    if imported.config is not None:
        imported.config = check_config_matches(imported.state_dict, imported.config, imported.source,
                                               config_source)
    return imported


def load_into_model(model: nn.Module, imported: ImportedCheckpoint, strict_heads: bool = False) -> LoadReport:
    """Load ``imported`` into our ``BertForPreTraining``, a model whose ``bert`` is our ``BertModel``
    (e.g. SQuAD's), or a bare ``BertModel``.

    The encoder (embeddings + layers) must match exactly; a padded vocabulary is trimmed or padded
    (:func:`fit_vocab_size`). Heads (pooler, MLM/NSP, QA) the checkpoint lacks stay as initialised
    and heads the model lacks are ignored, both logged and returned, unless ``strict_heads``, which
    makes any difference an error. Shape mismatches name the tensor and both shapes.
    """
    model_config = getattr(model, "config", None) or getattr(getattr(model, "bert", None), "config", None)
    if imported.config is not None and model_config is not None and \
            imported.config.pre_layer_norm != model_config.pre_layer_norm:
        theirs, ours = ("pre-LN" if c.pre_layer_norm else "post-LN" for c in (imported.config, model_config))
        raise CheckpointError(f"{imported.source} is {theirs} but the model is {ours}: set "
                              f"model.pre_layer_norm={str(imported.config.pre_layer_norm).lower()}")
    target = model.state_dict()
    bare = not any(k.startswith("bert.") for k in target)  # a BertModel: compare in our full names
    if bare:
        target = {"bert." + k: v for k, v in target.items()}
    state = imported.state_dict
    if WORD_EMBEDDINGS in state and WORD_EMBEDDINGS in target:
        state = fit_vocab_size(state, target[WORD_EMBEDDINGS].shape[0], imported.source)
    for key, tensor in state.items():
        if key in target and tensor.shape != target[key].shape:
            raise CheckpointError(
                f"{imported.source}: tensor {key} has shape {list(tensor.shape)} in the checkpoint but the "
                f"model expects {list(target[key].shape)} (check hidden_size, intermediate_size, vocab_size)"
            )
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if any(k.startswith(BACKBONE_PREFIXES) for k in missing + unexpected) or (
            strict_heads and (missing or unexpected)):
        raise CheckpointError(
            f"{imported.source} does not match the model: missing {_some(missing)}, unexpected "
            f"{_some(unexpected)} (another num_hidden_layers or pre_layer_norm, or another architecture?)"
        )
    loadable = {k.removeprefix("bert.") if bare else k: v for k, v in state.items() if k in target}
    model.load_state_dict(loadable, strict=False)
    if missing:
        log.warning("%s: no weights for %s; left as initialised", imported.source, missing)
    if unexpected:
        log.info("%s: ignored %s (not in this model)", imported.source, unexpected)
    return LoadReport(missing_keys=missing, unexpected_keys=unexpected)


def _some(keys: list[str], limit: int = 10) -> str:
    return f"{keys[:limit]}{f' and {len(keys) - limit} more' if len(keys) > limit else ''}"
