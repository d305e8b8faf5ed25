"""Vocabulary sizes: checkpoints padded to a multiple of 8 (NVIDIA: 30522 -> 30528) load both ways.

Only three tensors have a row per token: the word embeddings, the MLM decoder (tied to them) and the
MLM bias. A padded vocabulary adds fewer than 8 rows that no token uses, so trimming them or adding
zero rows changes no output for real tokens. Any other size difference means a different
tokenizer, and is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from bertrecipes.checkpoint import CheckpointError
from bertrecipes.interop.names import MLM_BIAS, MLM_DECODER_WEIGHT, WORD_EMBEDDINGS

log = logging.getLogger(__name__)

PAD_MULTIPLE = 8


def is_padded_vocab(padded: int, vocab_size: int) -> bool:
    """Whether ``padded`` is ``vocab_size`` rounded up to a multiple of 8 (and not equal to it)."""
    return padded % PAD_MULTIPLE == 0 and 0 < padded - vocab_size < PAD_MULTIPLE


def checkpoint_vocab_size(state: dict[str, torch.Tensor]) -> int | None:
    """Rows of the word embeddings (or of the MLM bias when only the head is there)."""
    for key in (WORD_EMBEDDINGS, MLM_BIAS):
        if key in state:
            return int(state[key].shape[0])
    return None


def fit_vocab_size(state: dict[str, torch.Tensor], vocab_size: int,
                   source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``state`` with its vocabulary rows trimmed or zero-padded to ``vocab_size``.

    Allowed: the checkpoint is ``vocab_size`` padded (trim its extra rows), or ``vocab_size`` is the
    checkpoint's size padded (add zero rows). Anything else raises CheckpointError naming both sizes.
    """
    rows = checkpoint_vocab_size(state)
    if rows is None or rows == vocab_size:
        return dict(state)
    if not (is_padded_vocab(rows, vocab_size) or is_padded_vocab(vocab_size, rows)):
        raise CheckpointError(
            f"{source}: checkpoint vocabulary {rows} vs tokenizer/config {vocab_size}: neither is the other "
            f"padded to a multiple of {PAD_MULTIPLE} (as 30522 -> 30528), so the checkpoint was trained with "
            f"another vocabulary; use its vocab file (or set the model's vocab_size to {rows})"
        )
    out = dict(state)
    for key in (WORD_EMBEDDINGS, MLM_BIAS):
        if key not in out:
            continue
        tensor = out[key]
        if rows > vocab_size:
            out[key] = tensor[:vocab_size].clone()
        else:
            padding = tensor.new_zeros((vocab_size - rows, *tensor.shape[1:]))
            out[key] = torch.cat([tensor, padding])
    if MLM_DECODER_WEIGHT in out and WORD_EMBEDDINGS in out:
        out[MLM_DECODER_WEIGHT] = out[WORD_EMBEDDINGS]
    log.info("%s: vocabulary rows %s from %d to %d", source, "trimmed" if rows > vocab_size else "padded",
             rows, vocab_size)
    return out


def vocab_file_size(vocab_file: str | Path) -> int:
    """Number of tokens in a WordPiece ``vocab.txt`` (one per line, as BertTokenizer reads it)."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            return len(f.readlines())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read vocab file {vocab_file}: {e}") from e


def check_vocab_file(vocab_file: str | Path, vocab_size: int, source: str = "the checkpoint") -> int:
    """The token count of ``vocab_file`` after checking it fits a checkpoint of ``vocab_size`` rows
    (equal, or the checkpoint padded to a multiple of 8)."""
    tokens = vocab_file_size(vocab_file)
    if tokens != vocab_size and not is_padded_vocab(vocab_size, tokens):
        raise CheckpointError(
            f"vocab file {vocab_file} has {tokens} tokens but {source} has a vocabulary of {vocab_size} "
            f"rows; use the vocab file the checkpoint was trained with"
        )
    return tokens
