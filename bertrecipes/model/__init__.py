"""The BERT model: one parameter layout (Hugging Face names) for every kernel and checkpoint."""

from bertrecipes.model.bert import (
    BertConfig,
    BertForPreTraining,
    BertLayer,
    BertModel,
    LayerFactory,
    Unpadded,
    count_parameters,
    gather_positions,
    init_bert_weights,
    pretraining_loss,
    training_flops_per_sample,
    unpad_index,
)

__all__ = [
    "BertConfig",
    "BertForPreTraining",
    "BertLayer",
    "BertModel",
    "LayerFactory",
    "Unpadded",
    "count_parameters",
    "gather_positions",
    "init_bert_weights",
    "pretraining_loss",
    "training_flops_per_sample",
    "unpad_index",
]
