"""Checkpoints written by DeepSpeed for BERT: DeepSpeedExamples' ``bing_bert`` pre-training (and
anything else saved by ``DeepSpeedEngine.save_checkpoint`` around a BERT model), read without
DeepSpeed installed; and NVIDIA DeepLearningExamples' BERT checkpoints (``ckpt_<step>.pt``:
``{"model": state dict, "optimizer": ..., "files": ..., "epoch": ..., "data_loader": ...}``), whose
model is the same Hugging Face BERT with ``dense_act`` names, post-LN.

Both pickle more than weights (optimizer states, configs, even a data loader), sometimes objects of
classes from modules this installation lacks (DeepSpeed's, the training script's own). Those
objects are read as empty stand-ins, with a warning naming them: the weights never need them.

The engine writes ``<save_dir>/<tag>/mp_rank_00_model_states.pt`` and names the newest tag in
``<save_dir>/latest``. The file is a pickled dict whose ``module`` entry is the model's state dict
(older tools wrote ``model_state_dict``); fp16 runs save fp16 weights. bing_bert's model is Hugging
Face's BERT with three renamings, all mapped here onto our (Hugging Face) names:

* ``*.dense_act.*`` (a linear layer fused with its activation) for the intermediate layer, the
  pooler and the MLM transform: ``*.dense.*``;
* pre-LN layers (``nvidia/modelingpreln.py``): ``PreAttentionLayerNorm`` is the LayerNorm of the
  attention sub-block (ours: ``attention.output.LayerNorm``), ``PostAttentionLayerNorm`` the one of
  the feed-forward sub-block (ours: ``output.LayerNorm``); ``bert.encoder.FinalLayerNorm`` as ours;
* DeepSpeed's fused transformer kernel (``--deepspeed_transformer_kernel``): per layer
  ``attn_qkvw`` / ``attn_qkvb`` (query, key and value stacked along the output dimension),
  ``attn_ow`` / ``attn_ob``, ``inter_w`` / ``inter_b``, ``output_w`` / ``output_b``, and two
  LayerNorms whose roles depend on the placement. Post-LN, ``attn_nw`` / ``attn_nb`` normalise
  after the attention's residual and ``norm_w`` / ``norm_b`` after the feed-forward's. Pre-LN (the
  kernel bing_bert builds), ``norm_w`` / ``norm_b`` normalise the layer's input, before attention,
  and ``attn_nw`` / ``attn_nb`` the attention's residual, before the feed-forward.

The placement is read from the weights: bing_bert's pre-LN encoder is the one with a final
LayerNorm. The file holds no architecture; with no ``bert_config.json`` given, it is read from the
tensor shapes, with 64-dimensional attention heads (every published BERT size has them). Its
vocabulary size is always the embedding's rows: bing_bert sizes it from its tokenizer (padded to
a multiple of 8), whatever its training config says. ZeRO stage-3 files (weights partitioned,
``zero_pp_rank_*``) must be consolidated first.
"""

from __future__ import annotations

import logging
import pickle
import re
import types
from pathlib import Path

import torch

from bertrecipes.checkpoint import LATEST_FILE, CheckpointError
from bertrecipes.interop.names import hf_to_ours
from bertrecipes.model import BertConfig

log = logging.getLogger(__name__)

MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
HEAD_SIZE = 64  # per-head width of every published BERT (tiny to large)

_KERNEL_LINEAR = {
    "attn_ow": "attention.output.dense.weight", "attn_ob": "attention.output.dense.bias",
    "inter_w": "intermediate.dense.weight", "inter_b": "intermediate.dense.bias",
    "output_w": "output.dense.weight", "output_b": "output.dense.bias",
}
# Ours: attention.output.LayerNorm belongs to the attention sub-block, output.LayerNorm to the
# feed-forward one, in both placements (see bertrecipes.model.bert).
_KERNEL_NORMS_POST_LN = {
    "attn_nw": "attention.output.LayerNorm.weight", "attn_nb": "attention.output.LayerNorm.bias",
    "norm_w": "output.LayerNorm.weight", "norm_b": "output.LayerNorm.bias",
}
_KERNEL_NORMS_PRE_LN = {
    "norm_w": "attention.output.LayerNorm.weight", "norm_b": "attention.output.LayerNorm.bias",
    "attn_nw": "output.LayerNorm.weight", "attn_nb": "output.LayerNorm.bias",
}
_KERNEL_PARAM = re.compile(r"^(bert\.encoder\.layer\.\d+)\.(attn_qkv[wb]|"
                           + "|".join([*_KERNEL_LINEAR, *_KERNEL_NORMS_POST_LN]) + r")$")
_SPARSE_LAYOUT = ".sparse_self_attention.master_layout"  # DeepSpeed sparse attention's block layout
FINAL_LAYER_NORM = "bert.encoder.FinalLayerNorm.weight"
_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")


def find_model_states(path: str | Path) -> Path | None:
    """The ``mp_rank_00_model_states.pt`` that ``path`` designates: the file itself, a tag directory
    holding it, or a save directory whose ``latest`` names such a tag; None when ``path`` is none
    of these (it may be a bertrecipes checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path if path.name.endswith("model_states.pt") else None
    if not path.is_dir():
        return None
    found = _model_states_in(path)
    if found is not None:
        return found
    latest = path / LATEST_FILE
    if latest.is_file():
        return _model_states_in(path / latest.read_text().strip())
    tags = sorted(d.name for d in path.iterdir() if d.is_dir() and _model_states_in(d) is not None)
    if tags:  # DeepSpeed releases that wrote no `latest`
        raise CheckpointError(f"{path} holds DeepSpeed checkpoints ({', '.join(tags)}) but no "
                              f"'{LATEST_FILE}' file naming the newest: give the directory of one")
    return None


def _model_states_in(tag_dir: Path) -> Path | None:
    """The model-states file of a DeepSpeed tag directory (ZeRO-3's per-rank name included)."""
    if (tag_dir / MODEL_STATES_FILE).is_file():
        return tag_dir / MODEL_STATES_FILE
    if not tag_dir.is_dir():
        return None
    partitioned = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    return partitioned[0] if partitioned else None


class _StandIn:
    """What an object of a class that cannot be imported becomes: it takes any arguments and state."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def _tolerant_pickle(missing: set[str]) -> types.ModuleType:
    """A pickle module whose Unpickler makes a :class:`_StandIn` subclass of any class it cannot
    import (recording ``module.name`` in ``missing``) instead of failing."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                missing.add(f"{module}.{name}")
                return type(name, (_StandIn,), {"__module__": module})

    module = types.ModuleType("tolerant_pickle")
    module.Unpickler = Unpickler
    module.load = pickle.load
    module.__name__ = "pickle"
    return module


def load_foreign(path: Path, kind: str) -> dict:
    """A checkpoint file that another program pickled (``kind`` names it in messages), read whole,
    as our own are, from a path the user chose; objects of classes that cannot be imported become
    empty stand-ins, named in a warning."""
    missing: set[str] = set()
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False,
                             pickle_module=_tolerant_pickle(missing))
    except Exception as e:  # torch raises several types for truncated zip archives or pickles
        raise CheckpointError(f"{path} is not a readable {kind} checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e
    if missing:
        log.warning("%s: objects of %s (not installed here) were skipped; the weights do not need them", path,
                    ", ".join(sorted(missing)))
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a {kind} checkpoint (got {type(payload).__name__})")
    return payload


_NVIDIA_NAME = re.compile(r"(?:phase\d_)?ckpt_(\d+)\.pt")


def newest_nvidia_checkpoint(directory: Path) -> Path | None:
    """The ``ckpt_<step>.pt`` with the highest step in an NVIDIA DeepLearningExamples results
    directory, or None."""
    found = [(int(m.group(1)), p) for p in directory.glob("*ckpt_*.pt")
             if (m := _NVIDIA_NAME.fullmatch(p.name))]
    return max(found)[1] if found else None


def is_nvidia_checkpoint(payload: dict) -> bool:
    """NVIDIA DeepLearningExamples' layout: the weights under ``model``, and no bertrecipes config."""
    return isinstance(payload.get("model"), dict) and "model_config" not in payload


def read_nvidia_checkpoint(path: Path, payload: dict) -> tuple[dict[str, torch.Tensor], int | None]:
    """The weights (fp32, our names) and global step (its ``global_step``, else the file name's
    ``ckpt_<step>.pt``) of an NVIDIA DeepLearningExamples BERT checkpoint."""
    state = _weights(path, payload["model"], "'model'")
    step = payload.get("global_step")
    named = _NVIDIA_NAME.fullmatch(path.name)
    if not isinstance(step, int) and named:
        step = int(named.group(1))
    return deepspeed_to_ours(state, str(path)), step if isinstance(step, int) else None


def _weights(path: Path, module, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, fp32, without a ``module.`` (DDP) prefix."""
    tensors = [v for v in module.values() if isinstance(v, torch.Tensor)] if isinstance(module, dict) else []
    if not tensors:
        raise CheckpointError(f"{path} holds no model weights ({where} has no tensors)")
    return {k.removeprefix("module."): v.float() if v.is_floating_point() else v
            for k, v in module.items() if isinstance(v, torch.Tensor)}


def read_model_states(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The model's state dict (fp32, our names) and the engine's global step from a DeepSpeed file."""
    if (path.parent / "mp_rank_01_model_states.pt").exists():
        raise CheckpointError(f"{path.parent} holds a model-parallel checkpoint (mp_rank_01_...); BERT "
                              f"checkpoints with one model-parallel rank only can be read")
    payload = load_foreign(path, "DeepSpeed")
    module = payload.get("module", payload.get("model_state_dict"))
    tensors = [v for v in module.values() if isinstance(v, torch.Tensor)] if isinstance(module, dict) else []
    if not tensors or all(t.numel() == 0 for t in tensors):
        what = "only empty placeholders" if tensors else "no tensors"
        raise CheckpointError(f"{path} holds no model weights ({what} in 'module' or 'model_state_dict'): "
                              f"a ZeRO stage-3 checkpoint keeps them partitioned; consolidate it first with "
                              f"the zero_to_fp32.py script DeepSpeed writes beside it")
    state = _weights(path, module, "'module'")
    sparse = [k for k in state if k.endswith(_SPARSE_LAYOUT)]
    if sparse:
        log.warning("%s was trained with DeepSpeed's sparse attention: its weights load into dense "
                    "attention, which attends to every token (its block layout is dropped)", path)
        state = {k: v for k, v in state.items() if not k.endswith(_SPARSE_LAYOUT)}
    step = payload.get("global_steps", payload.get("last_global_step"))
    return deepspeed_to_ours(state, str(path)), step if isinstance(step, int) else None


def deepspeed_to_ours(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename bing_bert / DeepSpeed-kernel BERT weights to ours (see the module docstring)."""
    norms = _KERNEL_NORMS_PRE_LN if FINAL_LAYER_NORM in state else _KERNEL_NORMS_POST_LN
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        kernel = _KERNEL_PARAM.match(key)
        if kernel:
            layer, param = kernel.groups()
            if param.startswith("attn_qkv"):
                if tensor.shape[0] % 3:
                    raise CheckpointError(f"{source}: {key} has {tensor.shape[0]} rows, not query, key "
                                          f"and value stacked (a multiple of 3)")
                kind = "weight" if param.endswith("w") else "bias"
                for name, part in zip(("query", "key", "value"), tensor.chunk(3, dim=0), strict=True):
                    out[f"{layer}.attention.self.{name}.{kind}"] = part.clone()
            else:
                out[f"{layer}.{_KERNEL_LINEAR.get(param) or norms[param]}"] = tensor
            continue
        key = key.replace(".dense_act.", ".dense.")
        key = key.replace(".PreAttentionLayerNorm.", ".attention.output.LayerNorm.")
        key = key.replace(".PostAttentionLayerNorm.", ".output.LayerNorm.")
        out[key] = tensor
    return hf_to_ours(out)


def is_pre_layer_norm(state: dict[str, torch.Tensor]) -> bool:
    """bing_bert's pre-LN encoder ends with a LayerNorm; its post-LN one has none."""
    return FINAL_LAYER_NORM in state


def infer_config(state: dict[str, torch.Tensor], source: str) -> BertConfig:
    """The architecture the tensors imply, with 64-dimensional attention heads."""
    try:
        vocab_size, hidden = state["bert.embeddings.word_embeddings.weight"].shape
        positions = state["bert.embeddings.position_embeddings.weight"].shape[0]
        token_types = state["bert.embeddings.token_type_embeddings.weight"].shape[0]
        intermediate = state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{source}: no {e.args[0]} among its weights, so its architecture cannot be "
                              f"read from them; give its bert_config.json (origin_bert_config_file=, "
                              f"--origin-bert-config-file in the command-line tools)") from None
    except ValueError as e:  # a tensor without the expected dimensions
        raise CheckpointError(f"{source}: its embedding tensors do not have BERT's shapes ({e})") from None
    layers = 1 + max(int(m.group(1)) for m in map(_LAYER.match, state) if m)
    if hidden % HEAD_SIZE:
        raise CheckpointError(f"{source}: hidden size {hidden} is not a multiple of {HEAD_SIZE}, so the "
                              f"number of attention heads cannot be assumed; give its bert_config.json "
                              f"(origin_bert_config_file=, or --origin-bert-config-file)")
    heads = hidden // HEAD_SIZE
    log.warning("%s holds no architecture: read from its tensors (%d layers, hidden %d, intermediate %d, "
                "vocabulary %d) with %d attention heads of %d dimensions; give its bert_config.json "
                "(origin_bert_config_file=, or --origin-bert-config-file) if it has other heads", source,
                layers, hidden, intermediate, vocab_size, heads, HEAD_SIZE)
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=intermediate,
                      max_position_embeddings=positions, type_vocab_size=token_types,
                      pre_layer_norm=is_pre_layer_norm(state))


__all__ = ["MODEL_STATES_FILE", "deepspeed_to_ours", "find_model_states", "infer_config",
           "is_nvidia_checkpoint", "is_pre_layer_norm", "load_foreign", "newest_nvidia_checkpoint",
           "read_model_states", "read_nvidia_checkpoint"]
