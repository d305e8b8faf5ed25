"""Tests for PretrainingDataset and PretrainingLoader: order, sharding across ranks, exact resume.

Each synthetic instance carries its own index in input_ids[1], so a batch's sample ids can be read back.
The reference order is written out from the loader's documented definition: epoch e is
torch.randperm(N) from a generator seeded with seed + e, cut to whole global micro-batches.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bertrecipes.data.dataset import PretrainingDataset, PretrainingLoader
from bertrecipes.data.instances import InstanceArrays

SEQ, PRED, ID_OFFSET = 16, 4, 5


def make_dataset(n: int, tmp_path) -> PretrainingDataset:
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                    + [f"w{i}" for i in range(n + 10)]) + "\n")
    rng = np.random.default_rng(0)
    lengths = rng.integers(6, SEQ + 1, size=n)
    input_ids = np.zeros((n, SEQ), dtype=np.int32)
    segment_ids = np.zeros((n, SEQ), dtype=np.int8)
    for i, length in enumerate(lengths):
        input_ids[i, :length] = [2, i + ID_OFFSET] + [7] * (length - 5) + [3, 7, 3]
        segment_ids[i, length - 2:length] = 1
    num_predictions = rng.integers(1, PRED + 1, size=n)
    positions = np.zeros((n, PRED), dtype=np.int32)
    masked_ids = np.zeros((n, PRED), dtype=np.int32)
    for i, k in enumerate(num_predictions):
        positions[i, :k] = np.arange(2, 2 + k)
        masked_ids[i, :k] = 7
    labels = (np.arange(n) % 2).astype(np.int8)
    arrays = InstanceArrays(input_ids, segment_ids, lengths.astype(np.int32), positions, masked_ids,
                            num_predictions.astype(np.int32), labels)
    return PretrainingDataset(arrays, vocab_file, manifest={})


def sample_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return (batch["input_ids"][:, 1] - ID_OFFSET).tolist()


def take(loader: PretrainingLoader, num_batches: int) -> list[list[int]]:
    return [sample_ids(b) for b in itertools.islice(iter(loader), num_batches)]


def reference_stream(n: int, micro: int, world: int, rank: int, seed: int, epochs: int) -> list[list[int]]:
    per_epoch = n // (micro * world)
    out = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for step in range(per_epoch):
            start = step * micro * world + rank * micro
            out.append(perm[start:start + micro])
    return out


@pytest.fixture
def dataset(tmp_path) -> PretrainingDataset:
    return make_dataset(37, tmp_path)  # 37 is prime: no micro x world divides it


def test_getitem_keys_and_dtypes(dataset: PretrainingDataset) -> None:
    item = dataset[3]
    assert set(item) == {"input_ids", "token_type_ids", "attention_mask", "masked_lm_positions",
                         "masked_lm_labels", "next_sentence_labels", "length"}
    assert all(v.dtype == torch.long for v in item.values())
    assert item["input_ids"].shape == (SEQ,) and item["masked_lm_labels"].shape == (PRED,)
    assert item["next_sentence_labels"].shape == () and item["length"].shape == ()
    length = int(dataset.instances.lengths[3])
    k = int(dataset.instances.num_predictions[3])
    assert item["length"] == length
    assert item["attention_mask"].tolist() == [1] * length + [0] * (SEQ - length)
    assert item["masked_lm_labels"].tolist() == [7] * k + [-100] * (PRED - k)
    assert item["next_sentence_labels"] == 1
    batch = dataset.get_batch([3, 0])
    for key, value in item.items():
        assert torch.equal(batch[key][0], value)
    assert dataset.vocab_size == 5 + 37 + 10
    assert dataset.max_seq_length == SEQ and dataset.max_predictions_per_seq == PRED


def test_check_compatible_names_both_sides(dataset: PretrainingDataset) -> None:
    dataset.check_compatible(SEQ, PRED, dataset.vocab_size)
    with pytest.raises(ValueError, match=f"max_seq_length: data has {SEQ}, caller expects 128"):
        dataset.check_compatible(128, PRED, dataset.vocab_size)
    with pytest.raises(ValueError, match="vocab_size: data has 52, caller expects 30522"):
        dataset.check_compatible(SEQ, PRED, 30522)


def test_order_matches_definition_across_epochs(dataset: PretrainingDataset) -> None:
    loader = PretrainingLoader(dataset, 4, seed=3)
    assert loader.batches_per_epoch == 9
    got = take(loader, 9 * 3 + 2)
    assert got == reference_stream(37, 4, 1, 0, seed=3, epochs=4)[: 9 * 3 + 2]
    assert loader.samples_consumed == (9 * 3 + 2) * 4 and loader.epoch == 3


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("resume_step", [0, 5, 8, 9, 23])
def test_resume_equals_uninterrupted_tail(dataset: PretrainingDataset, world: int, resume_step: int) -> None:
    micro, total = 4, 30
    for rank in range(world):
        full = take(PretrainingLoader(dataset, micro, seed=1, rank=rank, world_size=world), total)
        start_sample = resume_step * micro * world
        resumed = PretrainingLoader(dataset, micro, seed=1, rank=rank, world_size=world,
                                    start_sample=start_sample)
        assert resumed.samples_consumed == start_sample
        assert take(resumed, total - resume_step) == full[resume_step:]


def test_resume_after_partial_iteration(dataset: PretrainingDataset) -> None:
    loader = PretrainingLoader(dataset, 3, seed=5, world_size=2, rank=1)
    first = take(loader, 7)
    checkpoint = loader.samples_consumed
    assert checkpoint == 7 * 3 * 2
    rest = take(PretrainingLoader(dataset, 3, seed=5, world_size=2, rank=1, start_sample=checkpoint), 10)
    assert first + rest == take(PretrainingLoader(dataset, 3, seed=5, world_size=2, rank=1), 17)


def test_ranks_get_disjoint_equal_streams(dataset: PretrainingDataset) -> None:
    micro, world = 5, 2  # 37 // 10 = 3 steps: 30 samples per epoch, 7 dropped
    loaders = [PretrainingLoader(dataset, micro, seed=0, rank=r, world_size=world) for r in range(world)]
    assert all(ld.batches_per_epoch == 3 for ld in loaders)
    streams = [take(ld, 3 * 2) for ld in loaders]
    for epoch in range(2):
        per_rank = [sum(s[epoch * 3:(epoch + 1) * 3], []) for s in streams]
        assert [len(r) for r in per_rank] == [15, 15]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert len(set(per_rank[0]) | set(per_rank[1])) == 30
        assert all(0 <= i < 37 for i in per_rank[0] + per_rank[1])


def test_rank_batches_interleave_into_single_rank_batches(dataset: PretrainingDataset) -> None:
    micro, steps = 3, 14
    single = take(PretrainingLoader(dataset, micro * 2, seed=9), steps)
    rank0 = take(PretrainingLoader(dataset, micro, seed=9, rank=0, world_size=2), steps)
    rank1 = take(PretrainingLoader(dataset, micro, seed=9, rank=1, world_size=2), steps)
    assert [a + b for a, b in zip(rank0, rank1, strict=True)] == single


def test_global_rng_untouched(dataset: PretrainingDataset) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    take(PretrainingLoader(dataset, 4, seed=0), 25)
    assert torch.equal(torch.get_rng_state(), before)


def test_workers_give_the_same_stream(dataset: PretrainingDataset) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    with_workers = PretrainingLoader(dataset, 4, seed=2, world_size=2, rank=1, start_sample=16, num_workers=2)
    got = take(with_workers, 12)
    assert torch.equal(torch.get_rng_state(), before)
    assert got == take(PretrainingLoader(dataset, 4, seed=2, world_size=2, rank=1, start_sample=16), 12)
    assert with_workers.samples_consumed == 16 + 12 * 8


@pytest.mark.parametrize("start_sample", [3, -8, 10])
def test_bad_start_sample_is_named(dataset: PretrainingDataset, start_sample: int) -> None:
    with pytest.raises(ValueError, match=f"multiple of .* = 8 .* got {start_sample}"):
        PretrainingLoader(dataset, 4, seed=0, world_size=2, start_sample=start_sample)


def test_bad_sizes(dataset: PretrainingDataset) -> None:
    with pytest.raises(ValueError, match="37 instances, fewer than one global micro-batch"):
        PretrainingLoader(dataset, 20, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank must be in"):
        PretrainingLoader(dataset, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        PretrainingLoader(dataset, 0, seed=0)
