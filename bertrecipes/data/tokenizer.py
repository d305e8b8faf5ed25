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

import gc
import hashlib
import heapq
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing

from bertrecipes.atomic import write_text_atomic

__all__ = [
    "SPECIAL_TOKENS",
    "CachedWordEncoder",
    "SpecialTokens",
    "continuation_mask",
    "load_tokenizer",
    "read_vocab",
    "special_token_ids",
    "train_wordpiece",
    "vocab_sha256",
]

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# Order matters: the vocabulary file lists them first, in this order, so [PAD] is 0 and zero-padding
# is [PAD].
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



def train_wordpiece(documents: list[list[str]], vocab_size: int, lower_case: bool, out_path: Path,
                    min_frequency: int = 2, limit_alphabet: int = 1000) -> Path:
    """Learn a BERT WordPiece vocabulary from `documents` (lists of sentences) and write `vocab.txt`.

    The algorithm of `tokenizers`' WordPiece trainer: words are normalised and pre-tokenised as BERT
    does; every word starts as its first character plus ``##``-prefixed continuation characters (the
    ``limit_alphabet`` most frequent characters; rarer ones are left out and become [UNK]); then the
    most frequent adjacent pair of pieces is merged, again and again, until the vocabulary holds
    `vocab_size` tokens or no pair occurs `min_frequency` times. Unlike that trainer, ties are broken
    by the pieces' text rather than by hash order, so the same corpus gives the same file in every
    process.

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

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                            lowercase=lower_case)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter[str] = Counter()
    for doc in documents:
        for sentence in doc:
            words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(sentence))
            word_counts.update(w for w, _ in words)
    tokens = _learn_pieces(word_counts, vocab_size - len(SPECIAL_TOKENS), min_frequency, limit_alphabet)
    if not tokens:
        raise ValueError("the documents contain no text to learn a vocabulary from")
    write_text_atomic(out_path, "".join(t + "\n" for t in (*SPECIAL_TOKENS, *tokens)))
    return out_path


def _learn_pieces(word_counts: Counter[str], size: int, min_frequency: int, limit_alphabet: int) -> list[str]:
    """The alphabet, then merged pieces in merge order, at most `size` tokens (see train_wordpiece)."""
    char_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for ch in word:
            char_counts[ch] += count
    alphabet = {ch for ch, _ in sorted(char_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit_alphabet]}
    words: list[list[str]] = []
    counts: list[int] = []
    initial: Counter[str] = Counter()
    for word, count in sorted(word_counts.items()):
        if len(word) > _MAX_INPUT_CHARS_PER_WORD or any(ch not in alphabet for ch in word):
            continue  # tokenised as [UNK] anyway
        pieces = [word[0], *("##" + ch for ch in word[1:])]
        words.append(pieces)
        counts.append(count)
        for piece in pieces:
            initial[piece] += count
    vocab = [t for t, _ in sorted(initial.items(), key=lambda kv: (-kv[1], kv[0]))][:size]
    known = set(vocab)

    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for index, (pieces, count) in enumerate(zip(words, counts, strict=True)):
        for pair in zip(pieces, pieces[1:], strict=False):
            pair_counts[pair] += count
            where.setdefault(pair, set()).add(index)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < size and heap:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative:
            continue  # stale entry: the pair's count changed since it was pushed
        if -negative < min_frequency:
            break
        first, second = pair
        merged = first + second[2:]
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        changed: set[tuple[str, str]] = set()
        for index in sorted(where.pop(pair, ())):
            pieces, count = words[index], counts[index]
            if len(pieces) < 2:
                continue
            for old in zip(pieces, pieces[1:], strict=False):
                pair_counts[old] -= count
                changed.add(old)
            out, i = [], 0
            while i < len(pieces):
                if i + 1 < len(pieces) and pieces[i] == first and pieces[i + 1] == second:
                    out.append(merged)
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            words[index] = out
            for new in zip(out, out[1:], strict=False):
                pair_counts[new] += count
                where.setdefault(new, set()).add(index)
                changed.add(new)
        pair_counts.pop(pair, None)
        for p in changed:
            c = pair_counts.get(p, 0)
            if c > 0 and p != pair:
                heapq.heappush(heap, (-c, p))
            elif c <= 0:
                pair_counts.pop(p, None)
    return vocab


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


def vocab_sha256(vocab_file: str | Path) -> str:
    """SHA-256 of a vocab file's bytes: what prepared data records to refuse a different vocabulary."""
    digest = hashlib.sha256()
    with open(vocab_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# BERT's pre-tokens of ASCII text: runs of letters/digits, and each punctuation character (BERT counts
# every printable non-alphanumeric ASCII character as punctuation).
_ASCII_WORDS = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What BERT's clean_text does to them: tab/newline/CR are whitespace, other control characters go.
_CLEAN_ASCII_CONTROL = {c: None for c in [*range(0x20), 0x7F]} | {ord(c): " " for c in "\t\n\r"}


class CachedWordEncoder:
    """Encodes sentences to exactly ``tokenizer.encode(s, add_special_tokens=False).ids``, several times
    faster on natural text, returned flat (all ids in one array plus per-sentence lengths).

    Why it is exact: BERT's normaliser and pre-tokeniser act on each character with no context beyond
    the word, and words never span a space or a punctuation mark, so a sentence's ids are the
    concatenation of its words' ids. An ASCII sentence is cut into BERT's own pre-tokens with a regex
    (after BERT's control-character cleaning, and lower-cased first for an uncased vocabulary, which
    BERT does anyway); any other sentence is cut at spaces only. Why it is fast: natural text repeats
    its words (Zipf), so after a few thousand sentences almost every word is a dict hit; the misses
    are encoded by the `tokenizers` library in long joined strings (its per-call overhead dominates on
    single words), and the per-word work runs in C (``map``, ``itertools.chain``, ``bytes.join``).
    """

    _JOIN = 2000  # missing words per joined string sent to the tokenizer

    def __init__(self, tokenizer: Tokenizer, max_cache_entries: int = 4_000_000) -> None:
        self.tokenizer = tokenizer
        self.max_cache_entries = max_cache_entries
        # Lower-casing the key first is only safe when the tokenizer lower-cases too.
        normalizer = json.loads(tokenizer.normalizer.__getstate__()) if tokenizer.normalizer else {}
        self._lower = bool(normalizer.get("lowercase", False))
        # word -> its ids as int32 bytes: one b"".join then builds a whole chunk's id array.
        self._cache: dict[str, bytes] = {}

    def _encode_missing(self, words: list[str]) -> None:
        cache = self._cache
        if len(cache) + len(words) > self.max_cache_entries:
            cache.clear()  # bounded memory; entries are recomputed identically when seen again
        groups = [words[i:i + self._JOIN] for i in range(0, len(words), self._JOIN)]
        encodings = self.tokenizer.encode_batch([" ".join(g) for g in groups], add_special_tokens=False)
        for group, encoding in zip(groups, encodings, strict=True):
            # Each token's start offset, in the joined string, names the word it came from.
            starts = np.zeros(len(group), dtype=np.int64)
            np.cumsum([len(w) + 1 for w in group[:-1]], out=starts[1:])
            token_starts = np.fromiter((o[0] for o in encoding.offsets), dtype=np.int64,
                                       count=len(encoding.ids))
            owner = np.searchsorted(starts, token_starts, side="right") - 1
            bounds = np.searchsorted(owner, np.arange(len(group) + 1), side="left").tolist()
            ids = np.asarray(encoding.ids, dtype=np.int32).tobytes()
            for j, word in enumerate(group):
                cache[word] = ids[4 * bounds[j]:4 * bounds[j + 1]]

    def _words(self, sentence: str) -> list[str]:
        if sentence.isascii():
            if _ASCII_CONTROL.search(sentence):
                sentence = sentence.translate(_CLEAN_ASCII_CONTROL)
            if self._lower:
                sentence = sentence.lower()
            return _ASCII_WORDS.findall(sentence)
        return sentence.split(" ")

    def encode_flat(self, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32[total], tokens per sentence int64[len(sentences)]) of `sentences`."""
        # Millions of short-lived lists would trigger the cyclic GC over and over, for nothing.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            split = list(map(self._words, sentences))
            words = list(itertools.chain.from_iterable(split))
            missing = set(words).difference(self._cache)
            if missing:
                self._encode_missing(sorted(missing))  # sorted: cache content never depends on set order
            pieces = list(map(self._cache.__getitem__, words))
            ids = np.frombuffer(b"".join(pieces), dtype=np.int32)
            per_word = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)) // 4
            words_per_sentence = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
        finally:
            if was_enabled:
                gc.enable()
        tokens_before_word = np.zeros(len(per_word) + 1, dtype=np.int64)
        np.cumsum(per_word, out=tokens_before_word[1:])
        word_ends = np.cumsum(words_per_sentence)
        return ids, tokens_before_word[word_ends] - tokens_before_word[word_ends - words_per_sentence]
