"""BERT WordPiece vocabularies and tokenizers, built on the `tokenizers` library.

* `train_wordpiece` learns a `vocab.txt` (one token per line, line number = id) from sentences;
  `[PAD] [UNK] [CLS] [SEP] [MASK]` take ids 0-4.
* `load_tokenizer` turns any BERT `vocab.txt` into a fast tokenizer whose ids equal
  `transformers.BertTokenizer(vocab_file, do_lower_case=...)`: BERT normaliser (clean text, split CJK
  characters, lower-case and strip accents when uncased), BERT pre-tokeniser, greedy WordPiece.
* `special_token_ids` and `continuation_mask` give the ids that instance creation needs.

Usage::

    vocab = train_wordpiece(docs, vocab_size=4000, lower_case=True, out_path=Path("vocab.txt"))
    tok = load_tokenizer(vocab)
    ids = tok.encode("Hello world", add_special_tokens=False).ids
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import BertWordPieceTokenizer, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing

__all__ = [
    "SPECIAL_TOKENS",
    "SpecialTokens",
    "continuation_mask",
    "load_tokenizer",
    "read_vocab",
    "special_token_ids",
    "train_wordpiece",
]

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# Order matters: the trainer assigns ids in this order, so [PAD] is 0 and zero-padding is [PAD].
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)

# Same limit as BERT's reference WordpieceTokenizer; longer words become [UNK].
_MAX_INPUT_CHARS_PER_WORD = 100


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the five BERT special tokens in one vocabulary."""

    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int

    @property
    def ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)


def _write_text_atomic(path: Path, text: str) -> None:
    # Readers (other ranks, a second build) must never see a half-written vocab.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def train_wordpiece(documents: list[list[str]], vocab_size: int, lower_case: bool, out_path: Path) -> Path:
    """Learn a BERT WordPiece vocabulary from `documents` (lists of sentences) and write `vocab.txt`.

    `out_path` is the file to write, or an existing directory to write `vocab.txt` into. Returns the
    file's path. The vocabulary may come out smaller than `vocab_size` when the corpus has fewer
    distinct pieces; its real size is the number of lines in the file.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size}")
    out_path = Path(out_path)
    if out_path.is_dir():
        out_path = out_path / "vocab.txt"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    trainer_tokenizer = BertWordPieceTokenizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower_case
    )
    sentences = (sentence for doc in documents for sentence in doc)
    trainer_tokenizer.train_from_iterator(
        sentences,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        wordpieces_prefix="##",
        show_progress=False,
    )
    vocab = trainer_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise RuntimeError(f"trained vocabulary ids are not contiguous 0..{len(tokens) - 1}")
    if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise RuntimeError(f"special tokens not at ids 0-4: {tokens[: len(SPECIAL_TOKENS)]}")
    if len(tokens) == len(SPECIAL_TOKENS):
        raise ValueError("the documents contain no text to learn a vocabulary from")
    _write_text_atomic(out_path, "".join(t + "\n" for t in tokens))
    return out_path


def read_vocab(vocab_file: str | Path) -> dict[str, int]:
    """Read a BERT `vocab.txt` into token -> id, with the same line rules as transformers' BertTokenizer."""
    path = Path(vocab_file)
    if not path.is_file():
        raise FileNotFoundError(f"vocab file {str(path)!r} does not exist (expected a BERT vocab.txt)")
    vocab: dict[str, int] = {}
    # Text mode, like the reference loader: universal newlines, one token per line, id = line number.
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f.readlines()):
            vocab[line.rstrip("\n")] = index
    if not vocab:
        raise ValueError(f"vocab file {str(path)!r} is empty (expected one token per line)")
    return vocab


def load_tokenizer(vocab_file: str | Path, lower_case: bool = True) -> Tokenizer:
    """A BERT WordPiece tokenizer for `vocab_file`; `encode(text)` adds [CLS]/[SEP] unless told not to."""
    vocab = read_vocab(vocab_file)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"vocab file {str(vocab_file)!r} lacks special tokens {missing}; "
                         f"a BERT vocab needs all of {list(SPECIAL_TOKENS)}")
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=UNK,
                                           max_input_chars_per_word=_MAX_INPUT_CHARS_PER_WORD))
    # strip_accents=None follows `lowercase`, as BERT does: uncased vocabularies have no accents.
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower_case
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> SpecialTokens:
    """The ids of [PAD] [UNK] [CLS] [SEP] [MASK] in `tokenizer`'s vocabulary."""
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer vocabulary lacks special tokens {missing}; need all of "
                         f"{list(SPECIAL_TOKENS)}")
    return SpecialTokens(ids[PAD], ids[UNK], ids[CLS], ids[SEP], ids[MASK])


def continuation_mask(tokenizer: Tokenizer) -> np.ndarray:
    """bool[vocab_size]: True for ids whose token is a word continuation ("##ing"), for whole-word masking."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    mask = np.zeros(size, dtype=bool)
    for token, index in vocab.items():
        if token.startswith("##"):
            mask[index] = True
    return mask
