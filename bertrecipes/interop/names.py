"""Parameter names of Hugging Face and Google (TensorFlow) BERT checkpoints, mapped onto ours.

Ours are Hugging Face ``BertForPreTraining``'s, with two differences: no ``cls.predictions.decoder.bias``
(our MLM head has one bias, ``cls.predictions.bias``, which HF ties the decoder bias to) and no
``position_ids`` buffers. ``cls.predictions.decoder.weight`` is the word-embedding matrix (tied).
"""

from __future__ import annotations

import re

import torch

from bertrecipes.checkpoint import CheckpointError

WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
MLM_DECODER_WEIGHT = "cls.predictions.decoder.weight"
MLM_DECODER_BIAS = "cls.predictions.decoder.bias"
MLM_BIAS = "cls.predictions.bias"
BACKBONE_PREFIXES = ("bert.embeddings.", "bert.encoder.")

# HF BertModel checkpoints (e.g. sentence-transformers) have no "bert." prefix.
_HF_BARE_PREFIXES = ("embeddings.", "encoder.", "pooler.")


def hf_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BERT state dict (any of BertModel / ForPreTraining / ForMaskedLM /
    ForQuestionAnswering, with or without the ``bert.`` prefix, old ``gamma``/``beta`` names) to ours.
    Keys of other heads (``classifier.*``...) pass through unchanged."""
    out = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):  # a buffer (arange), not a weight
            continue
        if key.startswith(_HF_BARE_PREFIXES):
            key = "bert." + key
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        out[key] = tensor
    return out


def tie_mlm_head(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Fold HF's decoder bias into ``cls.predictions.bias`` and point the decoder weight at the word
    embeddings, refusing checkpoints whose head is not tied (our model cannot represent that)."""
    state = dict(state)
    if MLM_DECODER_BIAS in state:
        decoder_bias = state.pop(MLM_DECODER_BIAS)
        if MLM_BIAS not in state:
            state[MLM_BIAS] = decoder_bias
        elif not torch.equal(state[MLM_BIAS], decoder_bias):
            raise CheckpointError(f"{source}: {MLM_DECODER_BIAS} differs from {MLM_BIAS}; the MLM head is "
                                  f"expected to have one bias (tied, as BERT has)")
    if MLM_BIAS in state and WORD_EMBEDDINGS in state:
        decoder = state.get(MLM_DECODER_WEIGHT)
        if decoder is not None and not torch.equal(decoder, state[WORD_EMBEDDINGS]):
            raise CheckpointError(f"{source}: {MLM_DECODER_WEIGHT} differs from {WORD_EMBEDDINGS}; the MLM "
                                  f"decoder is expected to be tied to the word embeddings, as in BERT")
        state[MLM_DECODER_WEIGHT] = state[WORD_EMBEDDINGS]
    return state


# ----------------------------------------------------------------------------- Google TF names

_TF_SINGLE = {
    "cls/predictions/output_bias": MLM_BIAS,
    "cls/seq_relationship/output_weights": "cls.seq_relationship.weight",  # already [out, in]
    "cls/seq_relationship/output_bias": "cls.seq_relationship.bias",
    "cls/squad/output_weights": "qa_outputs.weight",  # Google's run_squad.py, [2, H]
    "cls/squad/output_bias": "qa_outputs.bias",
}
_TF_EMBEDDING = re.compile(r"bert/embeddings/(word|position|token_type)_embeddings")
_TF_LAYER = r"bert/encoder/layer_\d+/"
_TF_MODULE_PARAM = re.compile(
    "(bert/embeddings/LayerNorm"
    f"|{_TF_LAYER}attention/self/(?:query|key|value)"
    f"|{_TF_LAYER}attention/output/(?:dense|LayerNorm)"
    f"|{_TF_LAYER}intermediate/dense"
    f"|{_TF_LAYER}output/(?:dense|LayerNorm)"
    "|bert/pooler/dense"
    "|cls/predictions/transform/(?:dense|LayerNorm))"
    "/(kernel|bias|gamma|beta)"
)
_TF_PARAM = {"kernel": "weight", "gamma": "weight", "beta": "bias", "bias": "bias"}
# Optimizer slots and training bookkeeping (Adam/LAMB moments, AMP loss scaling, step counters).
TF_SKIPPED = re.compile(
    r"(?:^|/)(?:adam_[mv]|Adam(?:_\d+)?|Momentum|beta[12]_power|global_step|loss_scale"
    r"|current_loss_scale|good_steps)$"
)


def tf_to_ours(name: str) -> tuple[str, bool] | None:
    """(our parameter name, whether to transpose) for a Google BERT variable; None if unknown.

    Dense ``kernel``s are stored [in, out] and transposed to torch's [out, in]; ``output_weights``
    are already [out, in]."""
    if name in _TF_SINGLE:
        return _TF_SINGLE[name], False
    if match := _TF_EMBEDDING.fullmatch(name):
        return f"bert.embeddings.{match.group(1)}_embeddings.weight", False
    if match := _TF_MODULE_PARAM.fullmatch(name):
        module = re.sub(r"layer_(\d+)", r"layer.\1", match.group(1)).replace("/", ".")
        return f"{module}.{_TF_PARAM[match.group(2)]}", match.group(2) == "kernel"
    return None
