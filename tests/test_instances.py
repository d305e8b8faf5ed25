"""Tests for create_instances: checked against the documents it was given, not against its own output.

The synthetic corpus numbers every token of every document consecutively (ids 5, 6, 7, ...), so any
run of text in an instance can be traced back to its document and position, and the original id at
a masked position is known independently of what the code reports.
"""

from __future__ import annotations

import numpy as np
import pytest

from bertrecipes.data.instances import InstanceArrays, create_instances
from bertrecipes.data.tokenizer import SpecialTokens

SPECIAL = SpecialTokens(pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4)
FIRST_ID = 5
SEQ = 64


def make_corpus(num_docs: int, sentences: tuple[int, int], sentence_len: tuple[int, int], seed: int = 0):
    """Documents of consecutive ids; returns (documents, doc_of_id, vocab_size)."""
    rng = np.random.default_rng(seed)
    docs, doc_of_id = [], []
    next_id = FIRST_ID
    for d in range(num_docs):
        doc = []
        for _ in range(rng.integers(sentences[0], sentences[1] + 1)):
            n = int(rng.integers(sentence_len[0], sentence_len[1] + 1))
            doc.append(list(range(next_id, next_id + n)))
            next_id += n
            doc_of_id += [d] * n
        docs.append(doc)
    return docs, np.array([-1] * FIRST_ID + doc_of_id), next_id


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(80, (3, 12), (4, 14))


@pytest.fixture(scope="module")
def plain(corpus) -> InstanceArrays:
    docs, _, vocab_size = corpus
    return create_instances(docs, vocab_size=vocab_size, special=SPECIAL, max_seq_length=SEQ,
                            max_predictions_per_seq=20, dupe_factor=10, seed=1)


def split_rows(arrays: InstanceArrays):
    """Per instance: (length, index of first [SEP], input row)."""
    for row in range(len(arrays)):
        length = int(arrays.lengths[row])
        ids = arrays.input_ids[row]
        first_sep = int(np.flatnonzero(ids[:length] == SPECIAL.sep_id)[0])
        yield length, first_sep, ids


def original_run(ids: np.ndarray, lo: int, hi: int, masked: dict[int, int]) -> np.ndarray:
    """The original ids of a consecutive run [lo, hi): recovered from any unmasked position in it.

    Only if every token of the run is masked (rare: a short A taken as one whole word) does this fall
    back on the reported original id of its first position.
    """
    anchor = next((p for p in range(lo, hi) if p not in masked), None)
    start = masked[lo] if anchor is None else ids[anchor] - (anchor - lo)
    return start + np.arange(hi - lo)


def true_tokens(arrays: InstanceArrays, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A ids, B ids, whole unmasked sequence) of one instance, independent of masked_lm_ids."""
    length = int(arrays.lengths[row])
    ids = arrays.input_ids[row]
    first_sep = int(np.flatnonzero(ids[:length] == SPECIAL.sep_id)[0])
    k = int(arrays.num_predictions[row])
    masked = dict(zip(arrays.masked_lm_positions[row, :k].tolist(), arrays.masked_lm_ids[row, :k].tolist(),
                      strict=True))
    a = original_run(ids, 1, first_sep, masked)
    b = original_run(ids, first_sep + 1, length - 1, masked)
    return a, b, np.concatenate(([SPECIAL.cls_id], a, [SPECIAL.sep_id], b, [SPECIAL.sep_id]))


def test_layout_invariants(plain: InstanceArrays) -> None:
    a = plain
    assert a.input_ids.shape == (len(a), SEQ) and a.masked_lm_positions.shape == (len(a), 20)
    assert a.input_ids.dtype == np.int32 and a.segment_ids.dtype == np.int8
    assert (a.lengths <= SEQ).all() and (a.lengths >= 5).all()
    for row, (length, first_sep, ids) in enumerate(split_rows(a)):
        text = ids[:length]
        assert np.flatnonzero(text == SPECIAL.cls_id).tolist() == [0]
        assert np.flatnonzero(text == SPECIAL.sep_id).tolist() == [first_sep, length - 1]
        assert 2 <= first_sep <= length - 3  # A and B each hold at least one token
        assert not np.isin(text, [SPECIAL.pad_id, SPECIAL.unk_id]).any()
        assert not ids[length:].any()
        seg = a.segment_ids[row]
        assert not seg[: first_sep + 1].any() and seg[first_sep + 1:length].all() and not seg[length:].any()


def test_pairs_trace_back_to_documents(plain: InstanceArrays, corpus) -> None:
    _, doc_of_id, _ = corpus
    for row in range(len(plain)):
        a, b, truth = true_tokens(plain, row)
        doc_a, doc_b = set(doc_of_id[a]), set(doc_of_id[b])
        assert len(doc_a) == 1 and len(doc_b) == 1, "A and B must each be one run of one document"
        if plain.next_sentence_labels[row] == 0:
            assert doc_a == doc_b and b[0] > a[-1], "is-next B must follow A in the same document"
        else:
            assert doc_a != doc_b, "random-next B must come from another document"
        k = int(plain.num_predictions[row])
        positions = plain.masked_lm_positions[row, :k]
        assert not np.isin(positions, [0, len(a) + 1, len(truth) - 1]).any(), "specials are never predicted"
        np.testing.assert_array_equal(plain.masked_lm_ids[row, :k], truth[positions])


def test_masking_statistics(plain: InstanceArrays) -> None:
    a = plain
    expected = np.minimum(20, np.maximum(1, np.round(a.lengths * 0.15))).astype(int)
    np.testing.assert_array_equal(a.num_predictions, expected)
    non_special = a.lengths - 3
    fraction = a.num_predictions.sum() / non_special.sum()
    assert abs(fraction - 0.15) < 0.02, fraction

    outcomes = {"mask": 0, "keep": 0, "random": 0}
    for row in range(len(a)):
        k = int(a.num_predictions[row])
        positions = a.masked_lm_positions[row, :k]
        assert (np.diff(positions) > 0).all(), "positions must be sorted and distinct"
        assert not a.masked_lm_positions[row, k:].any() and not a.masked_lm_ids[row, k:].any()
        assert not np.isin(a.masked_lm_ids[row, :k], SPECIAL.ids).any(), "special tokens are never predicted"
        shown = a.input_ids[row, positions]
        original = a.masked_lm_ids[row, :k]
        outcomes["mask"] += int((shown == SPECIAL.mask_id).sum())
        outcomes["keep"] += int((shown == original).sum())
        outcomes["random"] += int(((shown != SPECIAL.mask_id) & (shown != original)).sum())
    total = sum(outcomes.values())
    assert total > 5000
    assert abs(outcomes["mask"] / total - 0.8) < 0.02, outcomes
    assert abs(outcomes["keep"] / total - 0.1) < 0.015, outcomes
    assert abs(outcomes["random"] / total - 0.1) < 0.015, outcomes


def test_random_next_fraction_is_about_half(plain: InstanceArrays) -> None:
    # Slightly above 0.5: a chunk of a single sentence (often at a document's end) is always random.
    fraction = plain.next_sentence_labels.mean()
    assert 0.45 < fraction < 0.65, fraction


def test_whole_word_masking_masks_every_piece(corpus) -> None:
    docs, _, vocab_size = corpus
    rng = np.random.default_rng(7)
    is_continuation = rng.random(vocab_size) < 0.4
    is_continuation[list(SPECIAL.ids)] = False
    a = create_instances(docs, vocab_size=vocab_size, special=SPECIAL, max_seq_length=SEQ, dupe_factor=4,
                         whole_word_mask=True, is_continuation=is_continuation, seed=3)
    fully_masked_multi_piece = 0
    for row in range(len(a)):
        _, _, truth = true_tokens(a, row)
        k = int(a.num_predictions[row])
        assert k <= min(20, max(1, round(len(truth) * 0.15)))
        masked = np.zeros(len(truth), dtype=bool)
        masked[a.masked_lm_positions[row, :k]] = True
        # Words rebuilt independently: a non-special token plus the "##" pieces directly after it.
        words: list[list[int]] = []
        for p, token in enumerate(truth):
            if token in SPECIAL.ids:
                continue
            if is_continuation[token] and words and words[-1][-1] == p - 1:
                words[-1].append(p)
            else:
                words.append([p])
        for word in words:
            assert masked[word].all() or not masked[word].any(), f"word {word} partly masked in row {row}"
            fully_masked_multi_piece += len(word) > 1 and bool(masked[word].all())
    assert fully_masked_multi_piece > 100


def test_dupe_factor_multiplies_instances_with_fresh_masks() -> None:
    # Two short sentences per document: every "is next" instance is exactly [s0, s1], so the same
    # pair appears in several dupes and its masks can be compared.
    docs, _, vocab_size = make_corpus(60, (2, 2), (6, 10), seed=5)
    kwargs = dict(vocab_size=vocab_size, special=SPECIAL, max_seq_length=SEQ, short_seq_prob=0.0, seed=2)
    one = create_instances(docs, dupe_factor=1, **kwargs)
    four = create_instances(docs, dupe_factor=4, **kwargs)
    assert 3.5 < len(four) / len(one) < 4.5

    masks_by_pair: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for row in range(len(four)):
        if four.next_sentence_labels[row] != 0:
            continue
        k = int(four.num_predictions[row])
        positions = four.masked_lm_positions[row, :k]
        original = four.input_ids[row, : four.lengths[row]].copy()
        original[positions] = four.masked_lm_ids[row, :k]
        masks_by_pair.setdefault(tuple(original), []).append(tuple(positions))
    repeated = [m for m in masks_by_pair.values() if len(m) > 1]
    assert len(repeated) > 20
    differing = sum(len(set(m)) > 1 for m in repeated)
    assert differing / len(repeated) > 0.8


def test_deterministic_for_a_seed(corpus) -> None:
    docs, _, vocab_size = corpus
    kwargs = dict(vocab_size=vocab_size, special=SPECIAL, max_seq_length=SEQ, dupe_factor=2)
    first, again = create_instances(docs, seed=11, **kwargs), create_instances(docs, seed=11, **kwargs)
    other = create_instances(docs, seed=12, **kwargs)
    for name in ("input_ids", "segment_ids", "masked_lm_positions", "masked_lm_ids", "next_sentence_labels"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert len(first) != len(other) or not np.array_equal(first.input_ids, other.input_ids)


def test_short_seq_prob_gives_short_instances() -> None:
    # Long documents: without short targets, only a document's last chunk can be short. A short
    # target still packs whole sentences (~10 tokens here) into A and B, so "short" means < SEQ / 2.
    docs, _, vocab_size = make_corpus(60, (20, 30), (8, 12), seed=9)
    kwargs = dict(vocab_size=vocab_size, special=SPECIAL, max_seq_length=SEQ, dupe_factor=3, seed=4)
    never = create_instances(docs, short_seq_prob=0.0, **kwargs)
    often = create_instances(docs, short_seq_prob=0.5, **kwargs)
    short = SEQ // 2
    frac_never, frac_often = (never.lengths < short).mean(), (often.lengths < short).mean()
    assert frac_never < 0.1 and frac_often > 0.3, (frac_never, frac_often)


def test_edge_documents() -> None:
    docs, doc_of_id, vocab_size = make_corpus(5, (1, 1), (5, 8), seed=1)
    # Single-sentence documents still give instances, with B from another document.
    with_empty = docs + [[], [[]]]  # a document without sentences, and one with an empty sentence
    a = create_instances(with_empty, vocab_size=vocab_size, special=SPECIAL, max_seq_length=SEQ, seed=0)
    assert len(a) == 5 * 5 and a.next_sentence_labels.all()
    # One document in total: random next is impossible, so every instance is "is next".
    long_doc, _, vocab_size = make_corpus(1, (8, 8), (5, 8), seed=2)
    b = create_instances(long_doc, vocab_size=vocab_size, special=SPECIAL, max_seq_length=SEQ, seed=0)
    assert len(b) > 0 and not b.next_sentence_labels.any()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max_seq_length": 4}, "max_seq_length"),
        ({"masked_lm_prob": 0.0}, "masked_lm_prob"),
        ({"short_seq_prob": 1.5}, "short_seq_prob"),
        ({"dupe_factor": 0}, "dupe_factor"),
        ({"whole_word_mask": True}, "is_continuation"),
        ({"vocab_size": 3}, "special token ids"),
    ],
)
def test_bad_arguments_are_named(corpus, override, message) -> None:
    docs, _, vocab_size = corpus
    kwargs = dict(vocab_size=vocab_size, special=SPECIAL, max_seq_length=SEQ) | override
    with pytest.raises(ValueError, match=message):
        create_instances(docs, **kwargs)


def test_out_of_vocab_id_is_rejected() -> None:
    with pytest.raises(ValueError, match="token id 50"):
        create_instances([[[5, 6, 50]], [[7, 8]]], vocab_size=50, special=SPECIAL, max_seq_length=SEQ)


def test_npz_round_trip(plain: InstanceArrays, tmp_path) -> None:
    path = tmp_path / "instances.npz"
    plain.save_npz(path)
    loaded = InstanceArrays.load_npz(path)
    assert [p.name for p in tmp_path.iterdir()] == ["instances.npz"]  # no temp file left behind
    for name in ("input_ids", "segment_ids", "lengths", "masked_lm_positions", "masked_lm_ids",
                 "num_predictions", "next_sentence_labels"):
        got, want = getattr(loaded, name), getattr(plain, name)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
