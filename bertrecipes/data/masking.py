"""Masked-LM masking of whole batches at once, with random numbers that depend only on a per-row key.

Google BERT's rule per sequence: predict ``min(max_predictions, max(1, round(length * masked_lm_prob)))``
non-special positions chosen uniformly at random (whole words with ``whole_word_mask``); each becomes
[MASK] (80%), stays (10%) or becomes a random non-special token (10%).

At load time (*dynamic* masking: new masks every epoch) the random numbers come from a counter-based
generator, SplitMix64 of (row key, position, stream) with key = hash(seed, epoch, index): a row's
masks are a pure function of its key, whatever else is in the batch, which worker computes them or
in which order, so a resumed run sees exactly the masks an uninterrupted one would. At build time
(*static* masking) a whole shard is masked with one numpy Generator seeded by the shard's index,
which is faster and just as independent of how many processes build the shards. Choosing the
positions as the k candidates with the smallest random priority is the same distribution as a
random permutation's first k.

Usage::

    spec = MaskingSpec.for_vocab(vocab_size=30522, special=special_token_ids(tok), masked_lm_prob=0.15,
                                 max_predictions_per_seq=20)
    masked, positions, labels, counts = mask_batch(input_ids, lengths, spec, keys=row_keys(seed, epoch, idx))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bertrecipes.data.tokenizer import SpecialTokens

__all__ = ["MaskingSpec", "mask_batch", "row_keys", "uniform"]

# Google's recipe: 80% [MASK], 10% unchanged, 10% random token.
MASK_FRACTION = 0.8
KEEP_FRACTION = 0.1

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
# Independent streams per use, so the priority and the 80/10/10 draw of one position are unrelated.
_STREAM_PRIORITY, _STREAM_DECISION, _STREAM_TOKEN = 1, 2, 3


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 arrays (wrapping arithmetic, in place where possible)."""
    z = x + _GOLDEN
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def row_keys(*parts: int | np.ndarray) -> np.ndarray:
    """uint64 keys from integers and/or integer arrays (broadcast): ``row_keys(seed, epoch, indices)``."""
    key = np.zeros((), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:
            value = np.asarray(part).astype(np.int64).astype(np.uint64)
            key = _splitmix(key ^ value)
    return np.atleast_1d(key)


def uniform(keys: np.ndarray, columns: np.ndarray | int, stream: int) -> np.ndarray:
    """float64 in [0, 1) for each (row key, column): shape keys.shape + (len(columns),)."""
    cols = np.arange(columns, dtype=np.uint64) if np.isscalar(columns) else np.asarray(columns, np.uint64)
    with np.errstate(over="ignore"):
        base = _splitmix(keys.astype(np.uint64) ^ np.uint64(stream * 0x632BE59BD9B4E019 & (2**64 - 1)))
        bits = _splitmix(base[..., None] + cols * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class MaskingSpec:
    """What masking needs to know about the vocabulary and the recipe."""

    masked_lm_prob: float
    max_predictions_per_seq: int
    mask_id: int
    is_special: np.ndarray  # bool[vocab]: never chosen, never used as a random replacement
    replacement_ids: np.ndarray  # int32: the non-special ids, drawn uniformly for the 10% random case
    whole_word_mask: bool = False
    is_continuation: np.ndarray | None = None  # bool[vocab], "##" pieces (whole-word masking)

    @classmethod
    def for_vocab(
        cls,
        *,
        vocab_size: int,
        special: SpecialTokens,
        masked_lm_prob: float,
        max_predictions_per_seq: int,
        whole_word_mask: bool = False,
        is_continuation: np.ndarray | None = None,
    ) -> MaskingSpec:
        if not 0.0 < masked_lm_prob < 1.0:
            raise ValueError(f"masked_lm_prob must be in (0, 1), got {masked_lm_prob}")
        if max_predictions_per_seq < 1:
            raise ValueError(f"max_predictions_per_seq must be >= 1, got {max_predictions_per_seq}")
        bad = [i for i in special.ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"special token ids {bad} are outside the vocabulary [0, {vocab_size})")
        if vocab_size <= len(set(special.ids)):
            raise ValueError(f"vocab_size {vocab_size} leaves no non-special ids to use as random tokens")
        if whole_word_mask:
            if is_continuation is None:
                raise ValueError(
                    "whole_word_mask=True needs is_continuation (see tokenizer.continuation_mask)"
                )
            if is_continuation.shape != (vocab_size,) or is_continuation.dtype != np.bool_:
                raise ValueError(
                    f"is_continuation must be bool[{vocab_size}], got {is_continuation.dtype}"
                    f"{list(is_continuation.shape)}"
                )
        is_special = np.zeros(vocab_size, dtype=bool)
        is_special[list(special.ids)] = True
        return cls(
            masked_lm_prob=masked_lm_prob,
            max_predictions_per_seq=max_predictions_per_seq,
            mask_id=special.mask_id,
            is_special=is_special,
            replacement_ids=np.flatnonzero(~is_special).astype(np.int32),
            whole_word_mask=whole_word_mask,
            is_continuation=is_continuation if whole_word_mask else None,
        )


def mask_batch(
    input_ids: np.ndarray,
    lengths: np.ndarray,
    spec: MaskingSpec,
    *,
    keys: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mask unmasked rows ``input_ids[B, S]`` (zero-padded after ``lengths[B]``).

    Random numbers come from `keys` (uint64[B], one per row: each row's masks depend on its key only)
    or from the generator `rng` (faster for a whole shard at build time). Returns ``(masked_ids
    int32[B, S], positions int32[B, P], original ids int32[B, P], num_predictions int32[B])``;
    positions are ascending and padded with 0, original ids with 0.
    """
    if (keys is None) == (rng is None):
        raise ValueError("give exactly one of keys (per-row counter-based draws) and rng (a numpy Generator)")
    ids = np.asarray(input_ids)
    batch, seq = ids.shape
    num_predictions = spec.max_predictions_per_seq
    lengths = np.asarray(lengths, dtype=np.int64)
    # Python's round() and np.round both round half to even, as the reference's int(round(...)) does.
    want = np.minimum(num_predictions, np.maximum(1, np.round(lengths * spec.masked_lm_prob))).astype(
        np.int64
    )
    candidate = ~spec.is_special[ids]
    if not spec.is_special[0]:  # padding (id 0) is excluded by [PAD] being special, unless 0 is not [PAD]
        candidate &= np.arange(seq) < lengths[:, None]
    if keys is not None:
        priority = uniform(keys, seq, _STREAM_PRIORITY)
    else:
        priority = rng.random((batch, seq), dtype=np.float32)

    if spec.whole_word_mask:
        chosen = _choose_whole_words(ids, candidate, priority, want, spec.is_continuation)
        counts = chosen.sum(axis=1).astype(np.int32)
        # Ascending positions per row: a stable argsort of "not chosen" puts chosen columns first, in order.
        ranked = np.argsort(~chosen, axis=1, kind="stable")[:, :num_predictions]
        if ranked.shape[1] < num_predictions:  # sequences shorter than P
            ranked = np.pad(ranked, ((0, 0), (0, num_predictions - ranked.shape[1])))
        slot_used = np.arange(num_predictions) < counts[:, None]
        positions = np.where(slot_used, ranked, 0)
    else:
        priority[~candidate] = 2.0  # non-candidates sort last
        k = min(num_predictions, seq)
        if k < seq:
            smallest = np.argpartition(priority, k - 1, axis=1)[:, :k]
        else:
            smallest = np.broadcast_to(np.arange(seq), (batch, seq)).copy()
        # The k smallest priorities are the first k of a random permutation of the candidates; keep
        # `want` of them (all candidates when there are fewer), then put them in ascending order.
        order = np.take_along_axis(priority, smallest, axis=1).argsort(axis=1, kind="stable")
        ranked = np.take_along_axis(smallest, order, axis=1)
        counts = np.minimum(candidate.sum(axis=1), want).astype(np.int32)
        slot_used = np.arange(k) < counts[:, None]
        positions = np.sort(np.where(slot_used, ranked, seq), axis=1)
        positions = np.where(positions < seq, positions, 0)
        if k < num_predictions:
            positions = np.pad(positions, ((0, 0), (0, num_predictions - k)))
            slot_used = np.pad(slot_used, ((0, 0), (0, num_predictions - k)))
    positions = positions.astype(np.int32)
    original = np.where(slot_used, np.take_along_axis(ids, positions, axis=1), 0).astype(np.int32)

    if keys is not None:
        # Indexed by the position itself (not its slot), so they do not depend on the other choices.
        decision = uniform(keys, positions, _STREAM_DECISION)
        token_draw = uniform(keys, positions, _STREAM_TOKEN)
    else:
        decision = rng.random(positions.shape)
        token_draw = rng.random(positions.shape)
    replacement = spec.replacement_ids[(token_draw * len(spec.replacement_ids)).astype(np.int64)]
    new_ids = np.where(
        decision < MASK_FRACTION,
        spec.mask_id,
        np.where(decision < MASK_FRACTION + KEEP_FRACTION, original, replacement),
    )
    masked = ids.astype(np.int32, copy=True)
    rows = np.broadcast_to(np.arange(batch)[:, None], positions.shape)
    masked[rows[slot_used], positions[slot_used]] = new_ids[slot_used]
    return masked, positions, original, counts


def _choose_whole_words(
    ids: np.ndarray,
    candidate: np.ndarray,
    priority: np.ndarray,
    want: np.ndarray,
    is_continuation: np.ndarray,
) -> np.ndarray:
    """Whole-word selection: words in random order (by the priority of their first piece), skipping a
    word that would overshoot the budget, as the reference does (a row at a time: the greedy skip is
    sequential)."""
    batch, seq = ids.shape
    # A word starts at a candidate that is not a "##" piece directly after another candidate, so a
    # "##" piece right after [CLS]/[SEP] starts its own word.
    prev_candidate = np.zeros_like(candidate)
    prev_candidate[:, 1:] = candidate[:, :-1]
    starts = candidate & ~(is_continuation[ids] & prev_candidate)
    chosen = np.zeros((batch, seq), dtype=bool)
    for row in range(batch):
        start_cols = np.flatnonzero(starts[row])
        if len(start_cols) == 0:
            continue
        cand_cols = candidate[row]
        ends = np.empty_like(start_cols)
        for w, col in enumerate(start_cols):
            end = col + 1
            while end < seq and cand_cols[end] and not starts[row, end]:
                end += 1
            ends[w] = end
        count, budget = 0, int(want[row])
        for w in np.argsort(priority[row, start_cols], kind="stable"):
            if count >= budget:
                break
            size = int(ends[w] - start_cols[w])
            if count + size > budget:
                continue
            chosen[row, start_cols[w] : ends[w]] = True
            count += size
    return chosen
