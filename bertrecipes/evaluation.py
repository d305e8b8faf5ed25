"""Held-out evaluation of a pre-training model: masked-LM and next-sentence loss and accuracy on
fixed instances (``bertrecipes.data.build.build_eval_dataset``), during training or of any checkpoint.

    python -m bertrecipes.pretrain +phase=seq128 eval_data=[wikitext-103/wiki.valid.tokens] eval_steps=500
    python -m bertrecipes.evaluation runs/seq128/checkpoints --eval-data wikitext-103/wiki.valid.tokens
    python -m bertrecipes.evaluation uncased_L-12_H-768_A-12/bert_model.ckpt --ckpt-type TF --eval-data ...

The MLM loss is the mean cross-entropy over every masked token of the set (not a mean of batch
means), the MLM accuracy the share of masked tokens whose top logit is the original token (MLPerf
BERT's target metric); NSP loss and accuracy are per sequence, and ``eval_loss`` is their sum, as the
training loss is. Under torchrun every rank scores an equal, contiguous share of the set (the
remainder of a division by the world size is left out) and the sums are all-reduced.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bertrecipes import distributed as dist
from bertrecipes.data import PretrainingDataset
from bertrecipes.data.build import build_eval_dataset
from bertrecipes.errors import ConfigError, UserError
from bertrecipes.model import BertForPreTraining
from bertrecipes.precision import DTYPES, autocast_context

__all__ = ["evaluate_checkpoint", "evaluate_pretraining"]

log = logging.getLogger(__name__)

_NSP_KEYS = ("eval_loss", "eval_nsp_loss", "eval_nsp_accuracy")


def _batch_sums(mlm_logits: torch.Tensor, nsp_logits: torch.Tensor, labels: torch.Tensor,
                nsp_labels: torch.Tensor) -> torch.Tensor:
    """[MLM loss sum, MLM correct, NSP loss sum, NSP correct] of one batch, float64, on its device."""
    mlm_logits, nsp_logits = mlm_logits.float().flatten(0, -2), nsp_logits.float()
    labels, nsp_labels = labels.flatten(), nsp_labels.view(-1)
    return torch.stack([
        F.cross_entropy(mlm_logits, labels, ignore_index=-100, reduction="sum"),
        (mlm_logits.argmax(-1) == labels).sum(),  # a label of -100 never equals an argmax
        F.cross_entropy(nsp_logits, nsp_labels, reduction="sum"),
        (nsp_logits.argmax(-1) == nsp_labels).sum(),
    ]).double()


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
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    masked = 0  # counted on the host copies: no device-to-host wait per batch
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
            masked += int((host["masked_lm_labels"] != -100).sum())
    finally:
        model.train(was_training)
    totals = torch.cat([sums, torch.tensor([masked, share], dtype=torch.float64, device=device)])
    if ctx is not None:
        dist.all_reduce_sum(totals, ctx)
    mlm_loss_sum, mlm_correct, nsp_loss_sum, nsp_correct, masked, sequences = totals.tolist()
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


def evaluate_checkpoint(
    checkpoint: str | Path,
    eval_data: list[str],
    *,
    ckpt_type: str = "DS",
    origin_bert_config_file: str | Path | None = None,
    vocab_file: str | Path | None = None,
    do_lower_case: bool | None = None,
    max_seq_length: int = 128,
    max_predictions_per_seq: int = 20,
    masked_lm_prob: float = 0.15,
    whole_word_mask: bool = False,
    batch_size: int = 64,
    max_samples: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Scores of a DS, HF or TF checkpoint (with its masked-LM head) on the held-out text
    ``eval_data``, tokenized with the checkpoint's vocabulary (or ``vocab_file``). Without an NSP
    head (or pooler) the NSP scores and ``eval_loss`` are left out."""
    from bertrecipes.engine import pick_device
    from bertrecipes.interop import check_vocab_file, load_into_model, load_model_state
    from bertrecipes.interop.export import infer_lower_case

    imported = load_model_state(checkpoint, ckpt_type, origin_bert_config_file)
    if imported.config is None:
        raise UserError(f"{imported.source} came without a BERT config; pass --origin-bert-config-file "
                        f"(a bert_config.json or config.json)")
    vocab = Path(vocab_file) if vocab_file else imported.vocab_file
    if vocab is None:
        raise UserError(f"no vocab file found with {imported.source}; pass --vocab-file")
    check_vocab_file(vocab, imported.config.vocab_size, imported.source)
    if max_seq_length > imported.config.max_position_embeddings:
        raise ConfigError(f"max_seq_length={max_seq_length} exceeds the checkpoint's "
                          f"max_position_embeddings={imported.config.max_position_embeddings}")
    model = BertForPreTraining(imported.config)
    missing = load_into_model(model, imported).missing_keys
    if any(k.startswith("cls.predictions.") for k in missing):
        raise UserError(f"{imported.source} has no masked-LM head (cls.predictions.*), so it cannot predict "
                        f"masked tokens (a SQuAD or sentence-embedding checkpoint?)")
    has_nsp = not any(k.startswith(("cls.seq_relationship.", "bert.pooler.")) for k in missing)
    if cache_dir is None:
        cache_dir = os.environ.get("BERTRECIPES_CACHE") or Path.home() / ".cache" / "bertrecipes"
    dataset = build_eval_dataset(
        eval_data, vocab, max_seq_length=max_seq_length, max_predictions_per_seq=max_predictions_per_seq,
        cache_dir=cache_dir, lower_case=infer_lower_case(imported, vocab) if do_lower_case is None
        else do_lower_case, masked_lm_prob=masked_lm_prob, whole_word_mask=whole_word_mask, progress=progress)
    torch_device = pick_device(device)
    scores = evaluate_pretraining(model.to(torch_device), dataset, batch_size=batch_size, device=torch_device,
                                  precision=precision, max_samples=max_samples, progress=progress)
    if not has_nsp:
        log.warning("%s has no next-sentence head: NSP scores and eval_loss left out", imported.source)
        scores = {k: v for k, v in scores.items() if k not in _NSP_KEYS}
    return scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bertrecipes.interop import CKPT_TYPES

    parser = argparse.ArgumentParser(prog="python -m bertrecipes.evaluation",
                                     description="Masked-LM and NSP scores of a BERT checkpoint on held-out "
                                                 "text.")
    parser.add_argument("checkpoint", help="a run's checkpoints/ dir (or a tag dir, state.pt); an HF "
                                           "directory; a TF checkpoint prefix")
    parser.add_argument("--eval-data", nargs="+", required=True,
                        help="held-out text: files, directories or globs (text, WikiExtractor, WikiText, "
                             "JSONL, parquet)")
    parser.add_argument("--ckpt-type", default="DS", type=str.upper, choices=CKPT_TYPES,
                        help="format of CHECKPOINT (default: DS, bertrecipes' own)")
    parser.add_argument("--origin-bert-config-file", help="bert_config.json/config.json, if not beside it")
    parser.add_argument("--vocab-file", help="vocab.txt (default: the checkpoint's own)")
    parser.add_argument("--do-lower-case", action=argparse.BooleanOptionalAction, default=None,
                        help="lower-case the text (default: the run's data.lower_case, else inferred from "
                             "the vocabulary)")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--max-predictions-per-seq", type=int, default=20)
    parser.add_argument("--masked-lm-prob", type=float, default=0.15)
    parser.add_argument("--whole-word-mask", action="store_true")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per forward")
    parser.add_argument("--max-samples", type=int, help="score the first N instances (default: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--cache-dir", help="where the held-out instances are cached (default: "
                                            "$BERTRECIPES_CACHE, else ~/.cache/bertrecipes)")
    parser.add_argument("--output", help="also write the scores to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        scores = evaluate_checkpoint(
            args.checkpoint, args.eval_data, ckpt_type=args.ckpt_type,
            origin_bert_config_file=args.origin_bert_config_file, vocab_file=args.vocab_file,
            do_lower_case=args.do_lower_case, max_seq_length=args.max_seq_length,
            max_predictions_per_seq=args.max_predictions_per_seq, masked_lm_prob=args.masked_lm_prob,
            whole_word_mask=args.whole_word_mask, batch_size=args.batch_size, max_samples=args.max_samples,
            device=args.device, precision=args.precision, cache_dir=args.cache_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(scores, indent=2)
    if args.output:
        from bertrecipes.atomic import write_text_atomic

        write_text_atomic(args.output, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
