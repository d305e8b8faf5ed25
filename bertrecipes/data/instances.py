"""Masked-LM + next-sentence pre-training instances from tokenized documents.

Semantics follow Google BERT's `create_pretraining_data.py` (re-implemented here):

* for each of `dupe_factor` passes (fresh random splits and masks each time), for each document, pack
  consecutive sentences into chunks of about `max_seq_length - 3` tokens (with probability
  `short_seq_prob` the document aims for a shorter random length in [2, max] instead, so the model
  also sees short inputs);
* split a chunk at a random sentence boundary into A; with probability 0.5 (always, when the chunk is
  one sentence) B is text from a random *other* document starting at a random sentence ("random next",
  label 1) and the chunk's unused sentences go back to be packed again; otherwise B is the rest of the
  chunk (label 0, "is next");
* trim the longer of A and B, one token at a time from a random end, until they fit;
  tokens are `[CLS] A [SEP] B [SEP]`, segment ids 0 for `[CLS] A [SEP]` and 1 for `B [SEP]`;
* mask `min(max_predictions_per_seq, max(1, round(len(tokens) * masked_lm_prob)))` non-special
  positions chosen at random (whole words when `is_continuation` is given and `whole_word_mask`);
  each chosen token becomes [MASK] (80%), stays (10%) or becomes a random token (10%).

Deliberate differences from the reference script:

* random replacement tokens are drawn uniformly from the *non-special* ids, so [CLS]/[SEP]/[PAD]/[MASK]
  never appear inside text;
* the random document is drawn uniformly from the other documents (the reference retries 10 times and
  may, rarely, take its own document);
* a `##` piece right after [SEP] starts a new word in whole-word masking (the reference glues it to the
  last word of A across the [SEP]);
* empty sentences and documents are dropped. If only one document is left, random next is impossible:
  chunks of two or more sentences become "is next" pairs and one-sentence chunks are skipped;
* masks come from `bertrecipes.data.masking` (a counter-based generator keyed per instance) and the
  pair decisions from Python's `random.Random`: the same distributions, other random streams.

How it is fast: a document's sentences are contiguous in one flat token array, so A and B are always
two slices of it. The pair decisions (a Python loop over sentence *lengths*, no token copying) yield
four offsets per instance; one vectorised gather then builds every padded row of a chunk, and one
vectorised call masks them all.

`create_instance_rows` works on such a flat chunk (what the sharded pipeline in
`bertrecipes.data.prepare` calls); `create_instances` takes nested lists (documents -> sentences ->
ids) and returns `InstanceArrays`.

Usage::

    arrays = create_instances(docs_of_sentence_ids, vocab_size=30522, special=special_token_ids(tok),
                              max_seq_length=128)
    arrays.save_npz("instances.npz")
"""

from __future__ import annotations

import bisect
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from bertrecipes.data.masking import MaskingSpec, mask_batch, row_keys
from bertrecipes.data.tokenizer import SpecialTokens

__all__ = ["InstanceArrays", "TokenizedChunk", "create_instance_rows", "create_instances"]

# Tags that keep the random streams of different uses of one seed apart.
_PAIRS_STREAM, _MASK_STREAM, _SHUFFLE_STREAM = 11, 12, 13


@dataclass
class InstanceArrays:
    """N pre-training instances as padded numpy arrays (S = max_seq_length, P = max_predictions_per_seq).

    input_ids            int32[N, S]  [CLS] A [SEP] B [SEP] with masks applied, 0 ([PAD]) after `lengths`
    segment_ids          int8[N, S]   0 for [CLS] A [SEP], 1 for B [SEP], 0 on padding
    lengths              int32[N]     real tokens, specials included
    masked_lm_positions  int32[N, P]  ascending positions of predicted tokens, 0 after `num_predictions`
    masked_lm_ids        int32[N, P]  original ids at those positions, 0 after `num_predictions`
    num_predictions      int32[N]
    next_sentence_labels int8[N]      0 = B follows A, 1 = B is random
    """

    input_ids: np.ndarray
    segment_ids: np.ndarray
    lengths: np.ndarray
    masked_lm_positions: np.ndarray
    masked_lm_ids: np.ndarray
    num_predictions: np.ndarray
    next_sentence_labels: np.ndarray

    _DTYPES = {
        "input_ids": np.int32, "segment_ids": np.int8, "lengths": np.int32, "masked_lm_positions": np.int32,
        "masked_lm_ids": np.int32, "num_predictions": np.int32, "next_sentence_labels": np.int8,
    }

    def __post_init__(self) -> None:
        n = self.input_ids.shape[0] if self.input_ids.ndim == 2 else -1
        two_d = ("input_ids", "segment_ids", "masked_lm_positions", "masked_lm_ids")
        for f in fields(self):
            array = getattr(self, f.name)
            want_ndim = 2 if f.name in two_d else 1
            if not isinstance(array, np.ndarray) or array.ndim != want_ndim or array.shape[0] != n:
                raise ValueError(f"InstanceArrays.{f.name} must be a {want_ndim}-d numpy array with {n} "
                                 f"rows, got {type(array).__name__} of shape {getattr(array, 'shape', None)}")
            setattr(self, f.name, array.astype(self._DTYPES[f.name], copy=False))
        if self.segment_ids.shape != self.input_ids.shape:
            raise ValueError(f"segment_ids shape {self.segment_ids.shape} != input_ids shape "
                             f"{self.input_ids.shape}")
        if self.masked_lm_ids.shape != self.masked_lm_positions.shape:
            raise ValueError(f"masked_lm_ids shape {self.masked_lm_ids.shape} != masked_lm_positions shape "
                             f"{self.masked_lm_positions.shape}")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_seq_length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def max_predictions_per_seq(self) -> int:
        return int(self.masked_lm_positions.shape[1])

    def save_npz(self, path: str | Path) -> None:
        """Write all arrays to `path` (.npz, uncompressed) atomically: a temp file, then os.replace."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        # A file object stops numpy from appending ".npz" to the temp name.
        with open(tmp, "wb") as f:
            np.savez(f, **{f_.name: getattr(self, f_.name) for f_ in fields(self)})
        os.replace(tmp, path)

    @classmethod
    def from_rows(cls, rows: dict[str, np.ndarray]) -> InstanceArrays:
        """From `create_instance_rows` output with masks (segment ids rebuilt from `segment_b_start`)."""
        cols = np.arange(rows["input_ids"].shape[1])
        segment_ids = (cols >= rows["segment_b_start"][:, None]) & (cols < rows["lengths"][:, None])
        return cls(rows["input_ids"], segment_ids.astype(np.int8), rows["lengths"],
                   rows["masked_lm_positions"],
                   rows["masked_lm_ids"], rows["num_predictions"], rows["next_sentence_labels"])

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `indices` as the arrays `PretrainingDataset` serves (numpy, compact dtypes)."""
        return {"input_ids": self.input_ids[indices], "token_type_ids": self.segment_ids[indices],
                "lengths": self.lengths[indices], "next_sentence_labels": self.next_sentence_labels[indices],
                "masked_lm_positions": self.masked_lm_positions[indices],
                "masked_lm_ids": self.masked_lm_ids[indices],
                "num_predictions": self.num_predictions[indices]}

    @classmethod
    def load_npz(cls, path: str | Path) -> InstanceArrays:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"instance file {str(path)!r} does not exist")
        with np.load(path) as data:
            missing = [f.name for f in fields(cls) if f.name not in data.files]
            if missing:
                raise ValueError(f"instance file {str(path)!r} lacks arrays {missing}; has {data.files}")
            return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass
class TokenizedChunk:
    """Documents -> sentences -> token ids, flat: sentence i is ``tokens[sentence_offsets[i]:
    sentence_offsets[i + 1]]`` and document d is sentences ``document_offsets[d]`` to
    ``document_offsets[d + 1]``. No sentence and no document is empty."""

    tokens: np.ndarray  # any integer dtype
    sentence_offsets: np.ndarray  # int64[num_sentences + 1], starts at 0
    document_offsets: np.ndarray  # int64[num_documents + 1], starts at 0

    @property
    def num_documents(self) -> int:
        return len(self.document_offsets) - 1

    @property
    def num_sentences(self) -> int:
        return len(self.sentence_offsets) - 1

    @classmethod
    def from_nested(cls, documents: Sequence[Sequence[Sequence[int]]]) -> TokenizedChunk:
        """Flatten documents of sentences of ids, dropping empty sentences and then empty documents."""
        sentences: list[Sequence[int]] = []
        doc_offsets = [0]
        for doc in documents:
            kept = [s for s in doc if len(s) > 0]
            if kept:
                sentences.extend(kept)
                doc_offsets.append(len(sentences))
        lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
        sentence_offsets = np.zeros(len(sentences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=sentence_offsets[1:])
        tokens = np.fromiter((int(t) for s in sentences for t in s), dtype=np.int64,
                             count=int(sentence_offsets[-1]))
        return cls(tokens, sentence_offsets, np.asarray(doc_offsets, dtype=np.int64))


def _trimmed_lengths(len_a: int, len_b: int, max_num_tokens: int) -> tuple[int, int]:
    """How many tokens the reference's loop ("trim the longer side, B on a tie, until they fit") takes
    from A and from B, in closed form."""
    excess = len_a + len_b - max_num_tokens
    if excess <= 0:
        return 0, 0
    lead = len_a - len_b
    if lead > 0:  # A is longer: it loses `lead` first, then B and A alternate, B first
        if excess <= lead:
            return excess, 0
        rest = excess - lead
        return lead + rest // 2, rest - rest // 2
    if excess <= -lead:
        return 0, excess
    rest = excess + lead
    return rest // 2, -lead + rest - rest // 2


def _pair_offsets(sent_off: list[int], doc_off: list[int], max_num_tokens: int, short_seq_prob: float,
                  dupe_factor: int, rng: random.Random) -> tuple[list[int], ...]:
    """Google's pair decisions for every document and dupe pass, as flat token offsets.

    Returns (a_start, a_end, b_start, b_end, is_random_next) lists; A and B are already truncated.
    Integer draws use ``int(random() * n)``: C-speed, and its bias (n / 2**53) is far below anything
    a training run could notice.
    """
    num_docs = len(doc_off) - 1
    can_pick_random = num_docs > 1
    a_starts: list[int] = []
    a_ends: list[int] = []
    b_starts: list[int] = []
    b_ends: list[int] = []
    labels: list[int] = []
    uniform, random_bits = rng.random, rng.getrandbits
    for _ in range(dupe_factor):
        for d in range(num_docs):
            first, last = doc_off[d], doc_off[d + 1]  # sentence indices [first, last)
            target = max_num_tokens
            if uniform() < short_seq_prob:
                target = 2 + int(uniform() * (max_num_tokens - 1))  # uniform in [2, max_num_tokens]
            chunk_begin = i = first
            while i < last:
                if i == last - 1 or sent_off[i + 1] - sent_off[chunk_begin] >= target:
                    n_chunk = i - chunk_begin + 1
                    a_sentences = 1 + int(uniform() * (n_chunk - 1)) if n_chunk >= 2 else 1
                    a0, a1 = sent_off[chunk_begin], sent_off[chunk_begin + a_sentences]
                    if can_pick_random and (n_chunk == 1 or uniform() < 0.5):
                        is_random = 1
                        target_b = target - (a1 - a0)
                        other = int(uniform() * (num_docs - 1))
                        other += other >= d  # uniform over the other documents
                        o_first, o_last = doc_off[other], doc_off[other + 1]
                        start = o_first + int(uniform() * (o_last - o_first))
                        b0 = sent_off[start]
                        # Whole sentences from `start` until B reaches target_b (at least one).
                        end = bisect.bisect_left(sent_off, b0 + target_b, start + 1, o_last + 1)
                        b1 = sent_off[min(end, o_last)]
                        # The chunk's sentences after A were not used: pack them again into the next chunk.
                        i = chunk_begin + a_sentences - 1
                    elif n_chunk >= 2:
                        is_random = 0
                        b0, b1 = a1, sent_off[i + 1]
                    else:
                        # Only one document and one sentence: no B exists for this chunk.
                        chunk_begin = i = i + 1
                        continue
                    # Trim the longer side one token at a time, each from the front or the back with
                    # probability 1/2 (so the model does not always see sentence-final text): the
                    # front count is a Binomial(n, 1/2) draw, the popcount of n random bits.
                    trim_a, trim_b = _trimmed_lengths(a1 - a0, b1 - b0, max_num_tokens)
                    if trim_a:
                        front = random_bits(trim_a).bit_count()
                        a0, a1 = a0 + front, a1 - (trim_a - front)
                    if trim_b:
                        front = random_bits(trim_b).bit_count()
                        b0, b1 = b0 + front, b1 - (trim_b - front)
                    a_starts.append(a0)
                    a_ends.append(a1)
                    b_starts.append(b0)
                    b_ends.append(b1)
                    labels.append(is_random)
                    chunk_begin = i + 1
                i += 1
    return a_starts, a_ends, b_starts, b_ends, labels


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(total)


def _assemble(tokens: np.ndarray, a0: np.ndarray, a1: np.ndarray, b0: np.ndarray, b1: np.ndarray,
              max_seq_length: int, special: SpecialTokens) -> tuple[np.ndarray, np.ndarray]:
    """Padded rows ``[CLS] A [SEP] B [SEP] 0...`` for all instances at once; returns (ids, lengths)."""
    n = len(a0)
    len_a, len_b = a1 - a0, b1 - b0
    row_start = np.arange(n, dtype=np.int64) * max_seq_length
    ids = np.zeros((n, max_seq_length), dtype=np.int32)
    flat = ids.reshape(-1)
    # A fills columns 1..len_a, B fills len_a+2 .. len_a+1+len_b: two flat range gathers.
    flat[_ranges(row_start + 1, len_a)] = tokens[_ranges(a0, len_a)]
    flat[_ranges(row_start + len_a + 2, len_b)] = tokens[_ranges(b0, len_b)]
    flat[row_start] = special.cls_id
    flat[row_start + len_a + 1] = special.sep_id
    flat[row_start + len_a + len_b + 2] = special.sep_id
    return ids, (len_a + len_b + 3).astype(np.int32)


def create_instance_rows(chunk: TokenizedChunk, *, special: SpecialTokens, max_seq_length: int,
                         short_seq_prob: float, dupe_factor: int, seed: int, chunk_index: int = 0,
                         masking: MaskingSpec | None = None) -> dict[str, np.ndarray]:
    """Instances of one chunk of documents (random-next B comes from the same chunk), shuffled.

    Returns numpy arrays ``input_ids int32[N, S]`` (masked when `masking` is given, else unmasked),
    ``lengths int32[N]``, ``segment_b_start int32[N]`` (first position of B: segment id 1 from there
    to the end of the row's length), ``next_sentence_labels int8[N]`` and, with `masking`,
    ``masked_lm_positions``, ``masked_lm_ids`` (int32[N, P], 0-padded) and ``num_predictions int32[N]``.
    Deterministic in (chunk, settings, seed, chunk_index).
    """
    if max_seq_length < 5:
        raise ValueError(f"max_seq_length must be >= 5 ([CLS] A [SEP] B [SEP] with one token each), "
                         f"got {max_seq_length}")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError(f"short_seq_prob must be in [0, 1], got {short_seq_prob}")
    if dupe_factor < 1:
        raise ValueError(f"dupe_factor must be >= 1, got {dupe_factor}")
    rng = random.Random(int(row_keys(seed, _PAIRS_STREAM, chunk_index)[0]))
    a0, a1, b0, b1, labels = (np.asarray(x, dtype=np.int64) for x in _pair_offsets(
        chunk.sentence_offsets.tolist(), chunk.document_offsets.tolist(), max_seq_length - 3,
        short_seq_prob, dupe_factor, rng))
    input_ids, lengths = _assemble(chunk.tokens, a0, a1, b0, b1, max_seq_length, special)
    rows: dict[str, np.ndarray] = {
        "input_ids": input_ids, "lengths": lengths, "segment_b_start": (a1 - a0 + 2).astype(np.int32),
        "next_sentence_labels": labels.astype(np.int8),
    }
    if masking is not None:
        # Build-time masks: one generator per chunk (fast, and fixed by the chunk index alone).
        mask_rng = np.random.default_rng(int(row_keys(seed, _MASK_STREAM, chunk_index)[0]))
        masked, positions, original, counts = mask_batch(input_ids, lengths, masking, rng=mask_rng)
        rows.update(input_ids=masked, masked_lm_positions=positions, masked_lm_ids=original,
                    num_predictions=counts)
    shuffle_seed = int(row_keys(seed, _SHUFFLE_STREAM, chunk_index)[0])
    order = np.random.default_rng(shuffle_seed).permutation(len(lengths))
    return {name: array[order] for name, array in rows.items()}


def create_instances(
    documents: Sequence[Sequence[Sequence[int]]],
    *,
    vocab_size: int,
    special: SpecialTokens,
    max_seq_length: int,
    short_seq_prob: float = 0.1,
    masked_lm_prob: float = 0.15,
    max_predictions_per_seq: int = 20,
    dupe_factor: int = 5,
    whole_word_mask: bool = False,
    is_continuation: np.ndarray | None = None,
    seed: int = 12345,
) -> InstanceArrays:
    """Build masked-LM/NSP instances from documents -> sentences -> WordPiece ids (see module docstring).

    `is_continuation` (bool[vocab_size], True for "##" pieces) is required for `whole_word_mask`.
    Deterministic for a given `seed`; instances are returned in shuffled order.
    """
    masking = MaskingSpec.for_vocab(vocab_size=vocab_size, special=special, masked_lm_prob=masked_lm_prob,
                                    max_predictions_per_seq=max_predictions_per_seq,
                                    whole_word_mask=whole_word_mask, is_continuation=is_continuation)
    chunk = TokenizedChunk.from_nested(documents)
    if len(chunk.tokens):
        lo, hi = int(chunk.tokens.min()), int(chunk.tokens.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            position = int(np.flatnonzero(chunk.tokens == bad)[0])
            sentence = int(np.searchsorted(chunk.sentence_offsets, position, side="right")) - 1
            document = int(np.searchsorted(chunk.document_offsets, sentence, side="right")) - 1
            raise ValueError(f"token id {bad} in document {document} is outside the vocabulary "
                             f"[0, {vocab_size})")
    rows = create_instance_rows(chunk, special=special, max_seq_length=max_seq_length,
                                short_seq_prob=short_seq_prob, dupe_factor=dupe_factor, seed=seed,
                                masking=masking)
    return InstanceArrays.from_rows(rows)
