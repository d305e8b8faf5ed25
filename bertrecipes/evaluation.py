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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bertrecipes import distributed as dist
from bertrecipes.data import PretrainingDataset
from bertrecipes.data.build import build_eval_dataset
from bertrecipes.errors import ConfigError, UserError
from bertrecipes.metrics import finite_or_none
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


def eval_share(num_instances: int, max_samples: int | None, world_size: int,
               names: tuple[str, str] = ("eval_data", "max_eval_samples")) -> int:
    """Instances each of ``world_size`` ranks scores: an equal share of the first ``max_samples``
    (all when None); an error, before any work, when that leaves a rank nothing. ``names``: what the
    caller calls the held-out text and the sample limit (config keys, or command-line flags)."""
    data_name, limit_name = names
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"{limit_name} must be a positive integer or null, got {max_samples}")
    share = min(num_instances, max_samples or num_instances) // world_size
    if share < 1:
        limit = f" ({limit_name}={max_samples})" if max_samples is not None else ""
        raise ConfigError(
            f"the held-out set has {num_instances} instances{limit}: too few for {world_size} process(es); "
            f"give {data_name} more text" + (f" or raise {limit_name}" if max_samples is not None else "")
        )
    return share


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
        raise ConfigError(f"the evaluation batch size must be a positive integer, got {batch_size}")
    share = eval_share(len(dataset), max_samples, world)
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
    return {  # a diverged model's NaN becomes null in JSON, as in the training records
        "eval_loss": finite_or_none(mlm_loss + nsp_loss),
        "eval_mlm_loss": finite_or_none(mlm_loss),
        "eval_mlm_accuracy": mlm_correct / max(masked, 1.0),
        "eval_mlm_perplexity": finite_or_none(math.exp(min(mlm_loss, 700.0))),
        "eval_nsp_loss": finite_or_none(nsp_loss),
        "eval_nsp_accuracy": nsp_correct / sequences,
        "eval_samples": int(round(sequences)),
        "eval_masked_tokens": int(round(masked)),
    }


# The held-out set's settings when neither the caller nor the checkpoint's run says otherwise.
_SET_DEFAULTS = {"max_seq_length": 128, "max_predictions_per_seq": 20, "masked_lm_prob": 0.15,
                 "short_seq_prob": 0.1, "whole_word_mask": False}


def _run_set_settings(source: str) -> dict[str, Any]:
    """The held-out set's settings of the run that wrote a checkpoint of ours (its config.yaml beside
    the checkpoint), so the command line scores the set that run's evaluations scored."""
    run_config = Path(source).parent / "config.yaml"
    if not run_config.is_file():
        return {}
    import yaml

    cfg = yaml.safe_load(run_config.read_text()) or {}
    found = {k: cfg[k] for k in ("max_seq_length", "max_predictions_per_seq") if k in cfg}
    data = cfg.get("data") or {}
    found.update({k: data[k] for k in ("masked_lm_prob", "short_seq_prob", "whole_word_mask") if k in data})
    return found


def evaluate_checkpoint(
    checkpoint: str | Path,
    eval_data: list[str],
    *,
    ckpt_type: str = "DS",
    origin_bert_config_file: str | Path | None = None,
    vocab_file: str | Path | None = None,
    do_lower_case: bool | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    **set_settings: Any,
) -> dict[str, float]:
    """Scores of a DS, HF or TF checkpoint (with its masked-LM head) on the held-out text
    ``eval_data``, tokenized with the checkpoint's vocabulary (or ``vocab_file``). ``set_settings``
    (max_seq_length, max_predictions_per_seq, masked_lm_prob, short_seq_prob, whole_word_mask; None
    or absent: the checkpoint's run's, else BERT's defaults) shape the set. Without an NSP head (or
    pooler) the NSP scores and ``eval_loss`` are left out."""
    from bertrecipes.engine import pick_device
    from bertrecipes.interop import check_vocab_file, load_into_model, load_model_state
    from bertrecipes.interop.export import infer_lower_case

    unknown = sorted(set(set_settings) - set(_SET_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown held-out set settings {unknown}; valid: {sorted(_SET_DEFAULTS)}")
    imported = load_model_state(checkpoint, ckpt_type, origin_bert_config_file)
    if imported.config is None:
        raise UserError(f"{imported.source} came without a BERT config; pass --origin-bert-config-file "
                        f"(a bert_config.json or config.json)")
    vocab = Path(vocab_file) if vocab_file else imported.vocab_file
    if vocab is None:
        raise UserError(f"no vocab file found with {imported.source}; pass --vocab-file")
    check_vocab_file(vocab, imported.config.vocab_size, imported.source)
    settings = {**_SET_DEFAULTS, **_run_set_settings(imported.source),
                **{k: v for k, v in set_settings.items() if v is not None}}
    if settings["max_seq_length"] > imported.config.max_position_embeddings:
        raise ConfigError(f"max_seq_length={settings['max_seq_length']} exceeds the checkpoint's "
                          f"max_position_embeddings={imported.config.max_position_embeddings}")
    model = BertForPreTraining(imported.config)
    missing = load_into_model(model, imported).missing_keys
    if any(k.startswith("cls.predictions.") for k in missing):
        raise UserError(f"{imported.source} has no masked-LM head (cls.predictions.*), so it cannot predict "
                        f"masked tokens (a SQuAD or sentence-embedding checkpoint?)")
    has_nsp = not any(k.startswith(("cls.seq_relationship.", "bert.pooler.")) for k in missing)
    if cache_dir is None:
        cache_dir = os.environ.get("BERTRECIPES_CACHE") or Path.home() / ".cache" / "bertrecipes"
    lower_case = infer_lower_case(imported, vocab) if do_lower_case is None else do_lower_case
    log.info("held-out set: %s, lower_case=%s", settings, lower_case)
    torch_device = pick_device(device)
    joined = not torch.distributed.is_initialized()  # a caller's own process group is left to it
    ctx = dist.init_distributed(dist.DistributedConfig(), torch_device)  # under torchrun: ranks share the set
    torch_device = dist.device_for_rank(torch_device, ctx)
    try:
        with dist.main_rank_first(ctx, "heldout-data"):  # rank 0 builds the cache, the others load it
            dataset = build_eval_dataset(eval_data, vocab, cache_dir=cache_dir, lower_case=lower_case,
                                         progress=progress and ctx.is_main, **settings)
        eval_share(len(dataset), max_samples, ctx.world_size, names=("--eval-data", "--max-samples"))
        scores = evaluate_pretraining(model.to(torch_device), dataset, batch_size=batch_size,
                                      device=torch_device, precision=precision, max_samples=max_samples,
                                      ctx=ctx if ctx.enabled else None, progress=progress and ctx.is_main)
    finally:
        if joined:
            dist.shutdown(ctx)
    if not has_nsp:
        log.warning("%s has no next-sentence head: NSP scores and eval_loss left out", imported.source)
        scores = {k: v for k, v in scores.items() if k not in _NSP_KEYS}
    return scores


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bertrecipes.interop import CKPT_TYPES

    parser = argparse.ArgumentParser(prog="python -m bertrecipes.evaluation",
                                     description="Masked-LM and NSP scores of a BERT checkpoint on held-out "
                                                 "text.")
    parser.add_argument("checkpoint", help="a run's checkpoints/ dir (or a tag dir, state.pt); a DeepSpeed "
                                           "save or tag dir, an NVIDIA ckpt_<step>.pt or its directory; an "
                                           "HF directory; a TF checkpoint prefix")
    parser.add_argument("--eval-data", nargs="+", required=True,
                        help="held-out text: files, directories or globs (text, WikiExtractor, WikiText, "
                             "JSONL, parquet)")
    parser.add_argument("--ckpt-type", default="DS", type=str.upper, choices=CKPT_TYPES,
                        help="format of CHECKPOINT (default: DS: bertrecipes', DeepSpeed's or NVIDIA's "
                             "PyTorch checkpoints)")
    parser.add_argument("--origin-bert-config-file", help="bert_config.json/config.json, if not beside it")
    parser.add_argument("--vocab-file", help="vocab.txt (default: the checkpoint's own)")
    parser.add_argument("--do-lower-case", action=argparse.BooleanOptionalAction, default=None,
                        help="lower-case the text (default: the run's data.lower_case, else inferred from "
                             "the vocabulary)")
    parser.add_argument("--max-seq-length", type=_positive_int,
                        help="default: the checkpoint's run's (ours), else 128")
    parser.add_argument("--max-predictions-per-seq", type=_positive_int,
                        help="default: the checkpoint's run's (ours), else 20")
    parser.add_argument("--masked-lm-prob", type=float,
                        help="default: the run's data.masked_lm_prob, else 0.15")
    parser.add_argument("--short-seq-prob", type=float,
                        help="default: the run's data.short_seq_prob, else 0.1")
    parser.add_argument("--whole-word-mask", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the run's data.whole_word_mask, else off")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="sequences per forward")
    parser.add_argument("--max-samples", type=_positive_int,
                        help="score the first N instances (default: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--cache-dir", help="where the held-out instances are cached (default: "
                                            "$BERTRECIPES_CACHE, else ~/.cache/bertrecipes)")
    parser.add_argument("--output", help="also write the scores to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.output and not Path(args.output).resolve().parent.is_dir():  # say so before the work, not after
        print(f"error: --output {args.output}: its directory does not exist", file=sys.stderr)
        return 2
    from bertrecipes.engine import device_problem

    problem = device_problem(args.device)
    if problem:
        print(f"error: --device {args.device}: {problem}", file=sys.stderr)
        return 2
    try:
        scores = evaluate_checkpoint(
            args.checkpoint, args.eval_data, ckpt_type=args.ckpt_type,
            origin_bert_config_file=args.origin_bert_config_file, vocab_file=args.vocab_file,
            do_lower_case=args.do_lower_case, batch_size=args.batch_size, max_samples=args.max_samples,
            device=args.device, precision=args.precision, cache_dir=args.cache_dir,
            max_seq_length=args.max_seq_length, max_predictions_per_seq=args.max_predictions_per_seq,
            masked_lm_prob=args.masked_lm_prob, short_seq_prob=args.short_seq_prob,
            whole_word_mask=args.whole_word_mask)
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank meets it: one says it
            print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank has the scores; one reports them
        return 0
    text = json.dumps(scores, indent=2)
    if args.output:
        from bertrecipes.atomic import write_text_atomic

        write_text_atomic(args.output, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
