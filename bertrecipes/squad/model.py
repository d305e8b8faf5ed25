"""BERT for extractive question answering: the encoder plus one linear layer giving, for every
token, a start and an end logit.

Parameter names are Hugging Face's ``BertForQuestionAnswering`` (``bert.*`` without a pooler,
``qa_outputs.weight`` [2, H], ``qa_outputs.bias`` [2]), so such a checkpoint loads as is and a
pre-training checkpoint supplies ``bert.*`` (its ``cls.*`` heads and pooler are not used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bertrecipes.model import BertConfig, BertModel, LayerFactory, Unpadded, init_bert_weights
from bertrecipes.model.bert import scatter_rows

# The start/end logit of a padding position when the encoder is unpadded: far below any real
# logit (so out of the softmax and never a predicted span) yet finite in fp16.
PADDING_LOGIT = -10000.0


class BertForQuestionAnswering(nn.Module):
    """``forward(input_ids, token_type_ids, attention_mask) -> (start_logits, end_logits)``, each
    [B, S] in the computation dtype.

    ``unpad=True`` runs the encoder and the QA layer on real tokens only; padding positions then get
    :data:`PADDING_LOGIT`, which takes them out of the loss's softmax. (The padded model scores
    padding like any token, as Google's and Hugging Face's do; real-token logits are the same.)
    """

    def __init__(self, config: BertConfig, layer_factory: LayerFactory | None = None, unpad: bool = False,
                 unpad_bucket: int = 0):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False, layer_factory=layer_factory, unpad=unpad,
                              unpad_bucket=unpad_bucket)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        init_bert_weights(self, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        unpadded: Unpadded | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, layout = self.bert.encode(input_ids, token_type_ids, attention_mask, unpadded)
        logits = self.qa_outputs(x)
        if layout is not None:  # [T, 2] -> [B, S, 2], padding at PADDING_LOGIT
            logits = scatter_rows(logits, layout, PADDING_LOGIT)
        start_logits, end_logits = logits.unbind(-1)
        return start_logits, end_logits


def qa_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
            end_positions: torch.Tensor) -> torch.Tensor:
    """(CE(start) + CE(end)) / 2 in fp32, averaged over the batch.

    As Hugging Face's BertForQuestionAnswering: positions outside the sequence are clamped to
    ``seq_len`` and that index is ignored, so a label that was cut off by truncation adds no loss.
    """
    seq_len = start_logits.shape[1]
    start = start_positions.view(-1).clamp(0, seq_len)
    end = end_positions.view(-1).clamp(0, seq_len)
    start_loss = F.cross_entropy(start_logits.float(), start, ignore_index=seq_len)
    end_loss = F.cross_entropy(end_logits.float(), end, ignore_index=seq_len)
    return (start_loss + end_loss) / 2


def qa_training_flops_per_sample(config: BertConfig, seq_len: int) -> float:
    """Model FLOPs of one training window (forward + backward = 3 x forward), matmuls only: the
    encoder (as in :func:`bertrecipes.model.training_flops_per_sample`) plus the 2-way QA layer."""
    h, i = config.hidden_size, config.intermediate_size
    per_token_layer = 2 * (4 * h * h + 2 * h * i) + 4 * seq_len * h
    return 3.0 * (config.num_hidden_layers * seq_len * per_token_layer + seq_len * 2 * h * 2)
