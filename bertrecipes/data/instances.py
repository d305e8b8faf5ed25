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
  chunks of two or more sentences become "is next" pairs and one-sentence chunks are skipped.

Usage::

    arrays = create_instances(docs_of_sentence_ids, vocab_size=30522, special=special_token_ids(tok),
                              max_seq_length=128)
    arrays.save_npz("instances.npz")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from bertrecipes.data.tokenizer import SpecialTokens

__all__ = ["InstanceArrays", "create_instances"]

# Google's recipe: 80% [MASK], 10% unchanged, 10% random token.
_MASK_PROB = 0.8
_KEEP_PROB_GIVEN_NOT_MASK = 0.5


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
class _Instance:
    tokens: np.ndarray  # int32, unpadded
    num_a: int  # len(A): the first [SEP] sits at 1 + num_a
    positions: np.ndarray
    original_ids: np.ndarray
    is_random_next: bool


def _truncate_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int,
                   rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Trim the longer side one token at a time, from a random end, until both fit."""
    a_start, a_end, b_start, b_end = 0, len(tokens_a), 0, len(tokens_b)
    excess = (a_end + b_end) - max_num_tokens
    if excess > 0:
        # Cutting from the front half the time avoids always showing the model sentence-final text.
        from_front = rng.random(excess) < 0.5
        for front in from_front:
            if a_end - a_start > b_end - b_start:
                if front:
                    a_start += 1
                else:
                    a_end -= 1
            elif front:
                b_start += 1
            else:
                b_end -= 1
    return tokens_a[a_start:a_end], tokens_b[b_start:b_end]


class _Masker:
    """Chooses masked-LM positions and replacement tokens for one vocabulary."""

    def __init__(self, *, vocab_size: int, special: SpecialTokens, masked_lm_prob: float,
                 max_predictions_per_seq: int, whole_word_mask: bool, is_continuation: np.ndarray | None,
                 rng: np.random.Generator) -> None:
        self.special = special
        self.masked_lm_prob = masked_lm_prob
        self.max_predictions = max_predictions_per_seq
        self.whole_word_mask = whole_word_mask
        self.rng = rng
        self.is_special = np.zeros(vocab_size, dtype=bool)
        self.is_special[list(special.ids)] = True
        self.replacement_ids = np.flatnonzero(~self.is_special).astype(np.int32)
        self.is_continuation = is_continuation

    def __call__(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (masked tokens, sorted positions, original ids at those positions)."""
        num_to_predict = min(self.max_predictions, max(1, int(round(len(tokens) * self.masked_lm_prob))))
        candidates = np.flatnonzero(~self.is_special[tokens])
        if self.whole_word_mask:
            positions = self._choose_whole_words(tokens, candidates, num_to_predict)
        else:
            positions = np.sort(self.rng.permutation(candidates)[:num_to_predict])
        original = tokens[positions]
        masked = tokens.copy()
        k = len(positions)
        is_mask = self.rng.random(k) < _MASK_PROB
        is_random = ~is_mask & (self.rng.random(k) >= _KEEP_PROB_GIVEN_NOT_MASK)
        masked[positions[is_mask]] = self.special.mask_id
        masked[positions[is_random]] = self.rng.choice(self.replacement_ids, size=int(is_random.sum()))
        return masked, positions.astype(np.int32), original

    def _choose_whole_words(self, tokens: np.ndarray, candidates: np.ndarray,
                            num_to_predict: int) -> np.ndarray:
        if len(candidates) == 0:
            return candidates
        # A word starts at a non-continuation piece, or at any piece not directly after another candidate
        # (so a "##" piece right after [CLS]/[SEP] is its own word rather than part of the previous one).
        is_cont = self.is_continuation[tokens[candidates]]
        contiguous = np.concatenate(([False], np.diff(candidates) == 1))
        starts = np.flatnonzero(~(is_cont & contiguous))
        bounds = np.append(starts, len(candidates))
        chosen: list[np.ndarray] = []
        count = 0
        for w in self.rng.permutation(len(starts)):
            if count >= num_to_predict:
                break
            size = bounds[w + 1] - bounds[w]
            # Skip words that would overshoot, as the reference does, rather than masking half a word.
            if count + size > num_to_predict:
                continue
            chosen.append(candidates[bounds[w]:bounds[w + 1]])
            count += size
        if not chosen:
            return candidates[:0]
        return np.sort(np.concatenate(chosen))


def _validate(*, vocab_size: int, special: SpecialTokens, max_seq_length: int, short_seq_prob: float,
              masked_lm_prob: float, max_predictions_per_seq: int, dupe_factor: int, whole_word_mask: bool,
              is_continuation: np.ndarray | None) -> None:
    if max_seq_length < 5:
        raise ValueError(f"max_seq_length must be >= 5 ([CLS] A [SEP] B [SEP] with one token each), "
                         f"got {max_seq_length}")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError(f"short_seq_prob must be in [0, 1], got {short_seq_prob}")
    if not 0.0 < masked_lm_prob < 1.0:
        raise ValueError(f"masked_lm_prob must be in (0, 1), got {masked_lm_prob}")
    if max_predictions_per_seq < 1:
        raise ValueError(f"max_predictions_per_seq must be >= 1, got {max_predictions_per_seq}")
    if dupe_factor < 1:
        raise ValueError(f"dupe_factor must be >= 1, got {dupe_factor}")
    bad = [i for i in special.ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"special token ids {bad} are outside the vocabulary [0, {vocab_size})")
    if vocab_size <= len(set(special.ids)):
        raise ValueError(f"vocab_size {vocab_size} leaves no non-special ids to use as random tokens")
    if whole_word_mask:
        if is_continuation is None:
            raise ValueError("whole_word_mask=True needs is_continuation (see tokenizer.continuation_mask)")
        if is_continuation.shape != (vocab_size,) or is_continuation.dtype != np.bool_:
            raise ValueError(f"is_continuation must be bool[{vocab_size}], got {is_continuation.dtype}"
                             f"{list(is_continuation.shape)}")


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
    _validate(vocab_size=vocab_size, special=special, max_seq_length=max_seq_length,
              short_seq_prob=short_seq_prob, masked_lm_prob=masked_lm_prob,
              max_predictions_per_seq=max_predictions_per_seq, dupe_factor=dupe_factor,
              whole_word_mask=whole_word_mask, is_continuation=is_continuation)
    docs: list[list[list[int]]] = []
    for doc in documents:
        sentences = [list(map(int, s)) for s in doc if len(s) > 0]
        if sentences:
            docs.append(sentences)
    for d, doc in enumerate(docs):
        for s in doc:
            lo, hi = min(s), max(s)
            if lo < 0 or hi >= vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} in document {d} is outside the vocabulary "
                                 f"[0, {vocab_size})")

    rng = np.random.default_rng(seed)
    masker = _Masker(vocab_size=vocab_size, special=special, masked_lm_prob=masked_lm_prob,
                     max_predictions_per_seq=max_predictions_per_seq, whole_word_mask=whole_word_mask,
                     is_continuation=is_continuation, rng=rng)
    instances: list[_Instance] = []
    for _ in range(dupe_factor):
        for doc_index in range(len(docs)):
            instances.extend(_instances_from_document(docs, doc_index, max_seq_length, short_seq_prob,
                                                      special, masker, rng))
    order = rng.permutation(len(instances))
    return _to_arrays([instances[i] for i in order], max_seq_length, max_predictions_per_seq)


def _instances_from_document(docs: list[list[list[int]]], doc_index: int, max_seq_length: int,
                             short_seq_prob: float, special: SpecialTokens, masker: _Masker,
                             rng: np.random.Generator) -> list[_Instance]:
    document = docs[doc_index]
    max_num_tokens = max_seq_length - 3
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = int(rng.integers(2, max_num_tokens + 1))
    can_pick_random = len(docs) > 1

    out: list[_Instance] = []
    chunk: list[list[int]] = []
    chunk_length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_length += len(document[i])
        if i == len(document) - 1 or chunk_length >= target_seq_length:
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
            tokens_a = [t for s in chunk[:a_end] for t in s]
            if can_pick_random and (len(chunk) == 1 or rng.random() < 0.5):
                is_random_next = True
                target_b_length = target_seq_length - len(tokens_a)
                other = int(rng.integers(0, len(docs) - 1))
                other += other >= doc_index  # uniform over the other documents
                random_doc = docs[other]
                tokens_b: list[int] = []
                for sentence in random_doc[int(rng.integers(0, len(random_doc))):]:
                    tokens_b.extend(sentence)
                    if len(tokens_b) >= target_b_length:
                        break
                # The chunk's sentences after A were not used: pack them again into the next chunk.
                i -= len(chunk) - a_end
            elif len(chunk) >= 2:
                is_random_next = False
                tokens_b = [t for s in chunk[a_end:] for t in s]
            else:
                # Only one document and one sentence: no B exists for this chunk.
                chunk, chunk_length = [], 0
                i += 1
                continue
            tokens_a, tokens_b = _truncate_pair(tokens_a, tokens_b, max_num_tokens, rng)
            tokens = np.array([special.cls_id, *tokens_a, special.sep_id, *tokens_b, special.sep_id],
                              dtype=np.int32)
            masked, positions, original = masker(tokens)
            out.append(_Instance(masked, len(tokens_a), positions, original, is_random_next))
            chunk, chunk_length = [], 0
        i += 1
    return out


def _to_arrays(instances: list[_Instance], max_seq_length: int,
               max_predictions_per_seq: int) -> InstanceArrays:
    n = len(instances)
    input_ids = np.zeros((n, max_seq_length), dtype=np.int32)
    segment_ids = np.zeros((n, max_seq_length), dtype=np.int8)
    lengths = np.zeros(n, dtype=np.int32)
    positions = np.zeros((n, max_predictions_per_seq), dtype=np.int32)
    masked_ids = np.zeros((n, max_predictions_per_seq), dtype=np.int32)
    num_predictions = np.zeros(n, dtype=np.int32)
    labels = np.zeros(n, dtype=np.int8)
    for row, inst in enumerate(instances):
        length = len(inst.tokens)
        input_ids[row, :length] = inst.tokens
        segment_ids[row, inst.num_a + 2:length] = 1
        lengths[row] = length
        k = len(inst.positions)
        positions[row, :k] = inst.positions
        masked_ids[row, :k] = inst.original_ids
        num_predictions[row] = k
        labels[row] = int(inst.is_random_next)
    return InstanceArrays(input_ids, segment_ids, lengths, positions, masked_ids, num_predictions, labels)
