"""Write a BERT checkpoint (DS, HF or TF) as a Hugging Face model directory.

The directory holds ``config.json``, ``model.safetensors`` (HF names, the tied MLM decoder weight
and bias saved as their own copies: safetensors refuses shared storage), ``vocab.txt``,
``tokenizer_config.json`` and ``special_tokens_map.json``, so that::

    transformers.BertForPreTraining.from_pretrained(out_dir)   # or BertForQuestionAnswering
    transformers.BertTokenizer.from_pretrained(out_dir)

load with no missing or unexpected keys. The command line is ``python -m bertrecipes.export_hf``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from bertrecipes.atomic import as_if_created
from bertrecipes.checkpoint import CheckpointError
from bertrecipes.errors import ConfigError, UserError
from bertrecipes.interop.load import ImportedCheckpoint, load_model_state
from bertrecipes.interop.names import MLM_BIAS, MLM_DECODER_BIAS, MLM_DECODER_WEIGHT, WORD_EMBEDDINGS
from bertrecipes.interop.vocab import check_vocab_file
from bertrecipes.model import BertConfig

log = logging.getLogger(__name__)

ARCHITECTURES = {"pretraining": "BertForPreTraining", "qa": "BertForQuestionAnswering"}
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"}
_PRETRAINING_HEADS = (
    "bert.pooler.dense.weight", "bert.pooler.dense.bias",
    "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias", MLM_BIAS,
    "cls.seq_relationship.weight", "cls.seq_relationship.bias",
)
_QA_HEADS = ("qa_outputs.weight", "qa_outputs.bias")


def hf_config_dict(config: BertConfig, architecture: str) -> dict:
    """transformers.BertConfig fields for ``config``."""
    return {
        "architectures": [ARCHITECTURES[architecture]],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.hidden_dropout_prob,
        "attention_probs_dropout_prob": config.attention_probs_dropout_prob,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": config.initializer_range,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }


def to_hf_state_dict(state: dict[str, torch.Tensor], architecture: str,
                     source: str) -> dict[str, torch.Tensor]:
    """Our state dict as ``BertForPreTraining``'s or ``BertForQuestionAnswering``'s, every tensor its
    own contiguous CPU copy."""
    if any(k.startswith("bert.encoder.FinalLayerNorm.") for k in state):
        raise CheckpointError(
            f"{source} is a pre-LN model (pre_layer_norm=true, with bert.encoder.FinalLayerNorm); Hugging "
            f"Face's BertModel is post-LN only and would compute something else, so it cannot be exported "
            f"to it"
        )
    heads = {"pretraining": _PRETRAINING_HEADS, "qa": _QA_HEADS}[architecture]
    lacking = [k for k in heads if k not in state]
    if lacking:
        other = next((a for a, h in (("qa", _QA_HEADS), ("pretraining", _PRETRAINING_HEADS))
                      if a != architecture and all(k in state for k in h)), None)
        raise CheckpointError(
            f"cannot export {source} as {ARCHITECTURES[architecture]}: it lacks {lacking}"
            + (f"; it has the {ARCHITECTURES[other]} heads (--architecture {other})" if other else "")
        )
    if architecture == "pretraining":
        keep = [k for k in state if k.startswith(("bert.", "cls."))]
    else:  # HF's BertForQuestionAnswering has no pooler
        keep = [k for k in state if k.startswith("bert.") and not k.startswith("bert.pooler.")]
        keep += list(_QA_HEADS)
    dropped = sorted(set(state) - set(keep))
    if dropped:
        log.info("not exported (not part of %s): %s", ARCHITECTURES[architecture], dropped)
    out = {k: state[k].detach().to("cpu").contiguous().clone() for k in keep}
    if architecture == "pretraining":
        out[MLM_DECODER_WEIGHT] = out[WORD_EMBEDDINGS].clone()
        out[MLM_DECODER_BIAS] = out[MLM_BIAS].clone()
    return out


def infer_lower_case(imported: ImportedCheckpoint, vocab_file: Path) -> bool:
    """Whether the tokenizer lower-cases, as :func:`lower_case_setting` finds it."""
    return lower_case_setting(imported.source, vocab_file)[0]


def lower_case_setting(source: str | Path, vocab_file: str | Path) -> tuple[bool, str | None]:
    """Whether the tokenizer of the checkpoint at ``source`` lower-cases, and where that is recorded.

    The record, when there is one beside the checkpoint: a bertrecipes pre-training run's
    ``data.lower_case`` or a fine-tuning run's ``do_lower_case`` (its ``config.yaml``), or a Hugging
    Face folder's ``tokenizer_config.json``. Without one (``None``), the vocabulary decides: uncased
    BERT vocabularies have no upper-case token."""
    folder = Path(source).parent
    run_config = folder / "config.yaml"
    if run_config.is_file():
        import yaml

        try:
            saved = yaml.safe_load(run_config.read_text()) or {}
        except (OSError, yaml.YAMLError):
            saved = {}
        if isinstance(saved, dict):
            for value, where in (((saved.get("data") or {}).get("lower_case"), "data.lower_case"),
                                 (saved.get("do_lower_case"), "do_lower_case")):
                if isinstance(value, bool):
                    return value, f"{run_config}: {where}"
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            value = json.loads(tokenizer_config.read_text()).get("do_lower_case")
        except (OSError, ValueError, AttributeError):
            value = None
        if isinstance(value, bool):
            return value, f"{tokenizer_config}: do_lower_case"
    with open(vocab_file, encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f]
    return not any(t != t.lower() for t in tokens if not (t.startswith("[") and t.endswith("]"))), None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _cannot_write(out_dir: Path, error: OSError) -> str:
    """One line for an OSError met creating or writing ``out_dir``: the path and the OS's reason."""
    for parent in out_dir.absolute().parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():  # mkdir says "File exists" or "Not a directory" for it
                return f"cannot create {out_dir}: {parent} is not a directory"
            break
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(out_dir) else ""
    return f"cannot write {out_dir}: {error.strerror or error}{where}"


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    ckpt_type: str = "DS",
    vocab_file: str | Path | None = None,
    architecture: str | None = None,
    do_lower_case: bool | None = None,
    origin_bert_config_file: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Export ``checkpoint`` to the Hugging Face directory ``out_dir``; returns it.

    ``architecture`` is ``pretraining`` or ``qa`` (default: ``qa`` if the checkpoint has
    ``qa_outputs``). ``vocab_file`` defaults to the one found with the checkpoint, ``do_lower_case``
    to :func:`infer_lower_case`. ``out_dir`` appears whole or not at all (written beside it, then
    renamed); a non-empty ``out_dir`` is replaced only with ``force``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not empty; choose another directory or pass --force to "
                        f"replace it")
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ConfigError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    imported = load_model_state(checkpoint, ckpt_type, origin_bert_config_file)
    if imported.config is None:
        raise CheckpointError(f"{imported.source} came without a BERT config; pass --origin-bert-config-file "
                              f"(a bert_config.json or config.json)")
    if imported.config.pre_layer_norm:
        raise CheckpointError(f"{imported.source} is a pre-LN model (pre_layer_norm=true, the recipe's "
                              f"phases' default, as bing_bert's); Hugging Face's BertModel is post-LN only "
                              f"and would compute something else, so it cannot be exported to it. For a "
                              f"model transformers can load, pre-train with model.pre_layer_norm=false; "
                              f"bertrecipes' own SQuAD fine-tuning and evaluation take pre-LN checkpoints")
    architecture = architecture or ("qa" if "qa_outputs.weight" in imported.state_dict else "pretraining")
    state = to_hf_state_dict(imported.state_dict, architecture, imported.source)
    vocab = Path(vocab_file) if vocab_file else imported.vocab_file
    if vocab is None:
        raise CheckpointError(f"no vocab file found with {imported.source}; pass --vocab-file")
    check_vocab_file(vocab, imported.config.vocab_size, imported.source)
    lower_case = infer_lower_case(imported, vocab) if do_lower_case is None else do_lower_case

    from safetensors.torch import save_file

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    except OSError as e:
        raise UserError(_cannot_write(out_dir, e)) from None
    try:
        _write_json(tmp / "config.json", hf_config_dict(imported.config, architecture))
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        shutil.copyfile(vocab, tmp / "vocab.txt")
        _write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "BertTokenizer", "do_lower_case": lower_case, "strip_accents": None,
            "tokenize_chinese_chars": True, "model_max_length": imported.config.max_position_embeddings,
            **SPECIAL_TOKENS,
        })
        _write_json(tmp / "special_tokens_map.json", SPECIAL_TOKENS)
        as_if_created(tmp)  # mkdtemp makes it private; an export is meant to be shared
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(_cannot_write(out_dir, e)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s, vocab %s, do_lower_case=%s) to %s", imported.source,
             ARCHITECTURES[architecture], vocab, lower_case, out_dir)
    return out_dir
