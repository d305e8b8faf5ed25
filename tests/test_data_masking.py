"""Dynamic masking (new masks every epoch, computed at load time) and the batch masker itself.

Rows are built from documents of consecutive ids (as in test_instances), so the original token at any
position is known independently of what the masker reports. Exact resume with dynamic masks through
the loader (with workers, across an epoch boundary) is tested in test_data_prepare.
"""

from __future__ import annotations

import numpy as np
import pytest

from bertrecipes.data.dataset import PretrainingDataset
from bertrecipes.data.instances import TokenizedChunk, create_instance_rows
from bertrecipes.data.masking import MaskingSpec, mask_batch, row_keys
from bertrecipes.data.tokenizer import SpecialTokens

SPECIAL = SpecialTokens(pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4)
SEQ, PRED, VOCAB = 64, 10, 5000


class UnmaskedRows:
    """A minimal in-memory store of unmasked rows (what dynamic-masking shards hold)."""

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        self.rows = rows
        self.max_seq_length = rows["input_ids"].shape[1]
        self.max_predictions_per_seq = PRED

    def __len__(self) -> int:
        return len(self.rows["lengths"])

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        out = {k: v[indices] for k, v in self.rows.items()}
        cols = np.arange(self.max_seq_length)
        out["token_type_ids"] = (cols >= out["segment_b_start"][:, None]) & (cols < out["lengths"][:, None])
        return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> PretrainingDataset:
    rng = np.random.default_rng(0)
    docs, next_id = [], 5
    for _ in range(60):
        doc = []
        for _ in range(rng.integers(3, 10)):
            n = int(rng.integers(4, 14))
            doc.append(list(range(next_id, next_id + n)))
            next_id += n
        docs.append(doc)
    assert next_id < VOCAB
    rows = create_instance_rows(
        TokenizedChunk.from_nested(docs),
        special=SPECIAL,
        max_seq_length=SEQ,
        short_seq_prob=0.1,
        dupe_factor=3,
        seed=1,
    )
    vocab_file = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab_file.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]) + "\n"
    )
    spec = MaskingSpec.for_vocab(
        vocab_size=VOCAB, special=SPECIAL, masked_lm_prob=0.15, max_predictions_per_seq=PRED
    )
    return PretrainingDataset(UnmaskedRows(rows), vocab_file, {}, dynamic_masking=spec, masking_seed=7)


def masks(batch) -> list[tuple]:
    return [
        tuple(p[lab != -100].tolist())
        for p, lab in zip(batch["masked_lm_positions"], batch["masked_lm_labels"], strict=True)
    ]


def test_same_epoch_same_masks_whatever_the_batch(dataset: PretrainingDataset) -> None:
    indices = np.arange(40)
    alone = [masks(dataset.get_batch([i], epoch=3))[0] for i in indices]
    together = masks(dataset.get_batch(indices, epoch=3))
    shuffled_order = np.random.default_rng(1).permutation(indices)
    shuffled = dict(
        zip(shuffled_order.tolist(), masks(dataset.get_batch(shuffled_order, epoch=3)), strict=True)
    )
    assert alone == together == [shuffled[i] for i in indices.tolist()]
    for key in ("input_ids", "masked_lm_labels"):
        assert np.array_equal(
            dataset.get_batch(indices, epoch=3)[key], dataset.get_batch(indices, epoch=3)[key]
        )


def test_masks_change_every_epoch(dataset: PretrainingDataset) -> None:
    indices = np.arange(len(dataset))
    epochs = [masks(dataset.get_batch(indices, epoch=e)) for e in range(3)]
    for a, b in ((0, 1), (1, 2), (0, 2)):
        differing = sum(x != y for x, y in zip(epochs[a], epochs[b], strict=True))
        assert differing / len(indices) > 0.9
    dataset.epoch = 1  # __getitem__ follows dataset.epoch
    assert masks({k: v[None] for k, v in dataset[5].items()}) == [epochs[1][5]]
    dataset.epoch = 0


def test_masked_rows_keep_the_text_and_follow_googles_recipe(dataset: PretrainingDataset) -> None:
    store = dataset.instances
    indices = np.arange(len(dataset))
    original = store.rows["input_ids"].astype(np.int64)
    lengths = store.rows["lengths"].astype(np.int64)
    outcome = {"mask": 0, "keep": 0, "random": 0}
    for epoch in range(4):
        batch = dataset.get_batch(indices, epoch=epoch)
        ids = batch["input_ids"].numpy()
        for r in range(len(indices)):
            used = batch["masked_lm_labels"][r].numpy() != -100
            positions = batch["masked_lm_positions"][r].numpy()[used]
            labels = batch["masked_lm_labels"][r].numpy()[used]
            assert len(positions) == min(PRED, max(1, round(lengths[r] * 0.15)))
            assert (np.diff(positions) > 0).all()
            np.testing.assert_array_equal(labels, original[r, positions])  # labels are the true tokens
            assert not np.isin(original[r, positions], SPECIAL.ids).any()  # never [CLS]/[SEP]/padding
            untouched = np.setdiff1d(np.arange(SEQ), positions)
            np.testing.assert_array_equal(ids[r, untouched], original[r, untouched])
            new = ids[r, positions]
            outcome["mask"] += int((new == SPECIAL.mask_id).sum())
            outcome["keep"] += int((new == labels).sum())
            outcome["random"] += int(((new != labels) & (new != SPECIAL.mask_id)).sum())
            assert not np.isin(new[new != SPECIAL.mask_id], SPECIAL.ids).any()
    total = sum(outcome.values())
    assert abs(outcome["mask"] / total - 0.8) < 0.02
    assert abs(outcome["keep"] / total - 0.1) < 0.02  # a random token equal to the original counts as kept
    assert abs(outcome["random"] / total - 0.1) < 0.02


def test_whole_word_masking_takes_whole_words() -> None:
    # Words of 1-3 pieces: ids >= 1000 are "##" continuations.
    is_continuation = np.zeros(VOCAB, dtype=bool)
    is_continuation[1000:] = True
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(200):
        tokens = [SPECIAL.cls_id]
        while len(tokens) < 50:
            tokens += [int(rng.integers(10, 1000))] + [
                int(x) for x in rng.integers(1000, 2000, rng.integers(0, 3))
            ]
        tokens += [SPECIAL.sep_id]
        rows.append(tokens + [0] * (SEQ - len(tokens)))
    ids = np.array(rows)
    lengths = (ids != 0).sum(axis=1)
    spec = MaskingSpec.for_vocab(
        vocab_size=VOCAB,
        special=SPECIAL,
        masked_lm_prob=0.15,
        max_predictions_per_seq=PRED,
        whole_word_mask=True,
        is_continuation=is_continuation,
    )
    masked, positions, original, counts = mask_batch(
        ids, lengths, spec, keys=row_keys(0, np.arange(len(ids)))
    )
    for r in range(len(ids)):
        chosen = set(positions[r, : counts[r]].tolist())
        assert 0 < counts[r] <= min(PRED, round(lengths[r] * 0.15))
        for p in chosen:  # a chosen piece's whole word is chosen: its continuation pieces and its head
            if is_continuation[ids[r, p]]:
                assert p - 1 in chosen
            if p + 1 < SEQ and is_continuation[ids[r, p + 1]]:
                assert p + 1 in chosen


def test_random_source_must_be_one_of_keys_or_rng() -> None:
    spec = MaskingSpec.for_vocab(
        vocab_size=VOCAB, special=SPECIAL, masked_lm_prob=0.15, max_predictions_per_seq=PRED
    )
    ids, lengths = np.full((2, 8), 7), np.array([8, 8])
    with pytest.raises(ValueError, match="exactly one of keys"):
        mask_batch(ids, lengths, spec)
    with pytest.raises(ValueError, match="exactly one of keys"):
        mask_batch(ids, lengths, spec, keys=row_keys(0, np.arange(2)), rng=np.random.default_rng(0))
