"""Held-out evaluation of a pre-training model: masked-LM and next-sentence loss and accuracy on
fixed instances (``bertrecipes.data.build.build_eval_dataset``).

    python -m bertrecipes.pretrain +phase=seq128 eval_data=[wikitext-103/wiki.valid.tokens] eval_steps=500

The MLM loss is the mean cross-entropy over every masked token of the set (not a mean of batch
means), the MLM accuracy the share of masked tokens whose top logit is the original token (MLPerf
BERT's target metric); NSP loss and accuracy are per sequence, and ``eval_loss`` is their sum, as the
training loss is. Under torchrun every rank scores an equal, contiguous share of the set (the
remainder of a division by the world size is left out) and the sums are all-reduced.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bertrecipes import distributed as dist
from bertrecipes.data import PretrainingDataset
from bertrecipes.errors import ConfigError
from bertrecipes.model import BertForPreTraining
from bertrecipes.precision import autocast_context

__all__ = ["evaluate_pretraining"]


def _batch_sums(mlm_logits: torch.Tensor, nsp_logits: torch.Tensor, labels: torch.Tensor,
                nsp_labels: torch.Tensor) -> torch.Tensor:
    """[MLM loss sum, MLM correct, masked tokens, NSP loss sum, NSP correct, sequences], float64."""
    mlm_logits, nsp_logits = mlm_logits.float().flatten(0, -2), nsp_logits.float()
    labels, nsp_labels = labels.flatten(), nsp_labels.view(-1)
    masked = labels != -100
    return torch.stack([
        F.cross_entropy(mlm_logits, labels, ignore_index=-100, reduction="sum").double(),
        ((mlm_logits.argmax(-1) == labels) & masked).sum().double(),
        masked.sum().double(),
        F.cross_entropy(nsp_logits, nsp_labels, reduction="sum").double(),
        (nsp_logits.argmax(-1) == nsp_labels).sum().double(),
        torch.tensor(float(nsp_labels.numel()), dtype=torch.float64, device=labels.device),
    ])


@torch.no_grad()
def evaluate_pretraining(model: BertForPreTraining, dataset: PretrainingDataset, *, batch_size: int,
                         device: torch.device, precision: str = "fp32", max_samples: int | None = None,
                         ctx: dist.DistContext | None = None, progress: bool = False) -> dict[str, float]:
    """Score ``model`` (dropout off; its train/eval mode is restored) on the first ``max_samples``
    instances of ``dataset`` (all when None), ``batch_size`` sequences per forward, under
    ``precision``'s autocast. Every rank of ``ctx`` must call it (FSDP gathers parameters in the
    forward). Returns eval_loss, eval_mlm_loss, eval_mlm_accuracy, eval_mlm_perplexity,
    eval_nsp_loss, eval_nsp_accuracy, eval_samples and eval_masked_tokens (over all ranks)."""
    from bertrecipes.engine import batch_to_device  # the engine imports this module

    world, rank = (ctx.world_size, ctx.rank) if ctx is not None else (1, 0)
    if batch_size < 1:
        raise ConfigError(f"eval_batch_size must be a positive integer, got {batch_size}")
    total = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    share = total // world
    if share < 1:
        raise ConfigError(
            f"the held-out set has {len(dataset)} instances (max_eval_samples={max_samples}): too few for "
            f"{world} process(es); give eval_data more text or raise max_eval_samples"
        )
    start = rank * share
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for lo in tqdm(range(start, start + share, batch_size), desc="eval", unit="batch", leave=False,
                       disable=not progress, dynamic_ncols=True):
            host = dataset.get_batch(np.arange(lo, min(lo + batch_size, start + share)))
            batch, layout = batch_to_device(host, device, model.bert)
            with autocast_context(precision, device):
                mlm_logits, nsp_logits = model(batch["input_ids"], batch["token_type_ids"],
                                               batch["attention_mask"], batch["masked_lm_positions"],
                                               unpadded=layout)
            sums += _batch_sums(mlm_logits, nsp_logits, batch["masked_lm_labels"],
                                batch["next_sentence_labels"])
    finally:
        model.train(was_training)
    if ctx is not None:
        dist.all_reduce_sum(sums, ctx)
    mlm_loss_sum, mlm_correct, masked, nsp_loss_sum, nsp_correct, sequences = sums.tolist()
    mlm_loss = mlm_loss_sum / max(masked, 1.0)
    nsp_loss = nsp_loss_sum / sequences
    return {
        "eval_loss": mlm_loss + nsp_loss,
        "eval_mlm_loss": mlm_loss,
        "eval_mlm_accuracy": mlm_correct / max(masked, 1.0),
        "eval_mlm_perplexity": math.exp(min(mlm_loss, 700.0)),
        "eval_nsp_loss": nsp_loss,
        "eval_nsp_accuracy": nsp_correct / sequences,
        "eval_samples": int(round(sequences)),
        "eval_masked_tokens": int(round(masked)),
    }
