"""Tests for PretrainingDataset and PretrainingLoader: order, sharding across ranks, exact resume.

Each synthetic instance carries its own index in input_ids[1], so a batch's sample ids can be read back.
The reference order is written out from the loader's documented definition: epoch e is
torch.randperm(N) from a generator seeded with seed + e; the epochs follow one another as one stream,
and global micro-step j takes the next micro x world samples of it, rank r the r-th micro of them (the
`whole_batches` order of older runs instead cuts each epoch to whole global micro-batches).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bertrecipes.data.dataset import PretrainingDataset, PretrainingLoader
from bertrecipes.data.instances import InstanceArrays
from bertrecipes.data.masking import MaskingSpec
from bertrecipes.data.tokenizer import SpecialTokens

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


def permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def reference_stream(n: int, micro: int, world: int, rank: int, seed: int, steps: int,
                     start: int = 0) -> list[list[int]]:
    """The continuous order, from its definition: sample p of the stream is permutation(p // n)[p % n]."""
    out = []
    for step in range(steps):
        first = start + step * micro * world + rank * micro
        out.append([permutation(n, seed, p // n)[p % n] for p in range(first, first + micro)])
    return out


def whole_batches_reference(n: int, micro: int, world: int, rank: int, seed: int,
                            epochs: int) -> list[list[int]]:
    per_epoch = n // (micro * world)
    out = []
    for epoch in range(epochs):
        perm = permutation(n, seed, epoch)
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
    got = take(loader, 29)  # 116 samples: three epochs of 37 and 5 of the fourth
    assert got == reference_stream(37, 4, 1, 0, seed=3, steps=29)
    assert sum(got, [])[:37] == permutation(37, 3, 0) and sum(got, [])[74:111] == permutation(37, 3, 2)
    assert got[9] == permutation(37, 3, 0)[36:] + permutation(37, 3, 1)[:3]  # a batch across epochs
    assert loader.samples_consumed == 29 * 4 and loader.epoch == 3


@pytest.mark.parametrize(("micro", "world"), [(1, 1), (4, 1), (3, 2), (5, 2), (2, 4), (12, 3)])
def test_every_micro_batch_and_world_size_reads_the_same_stream(dataset: PretrainingDataset, micro: int,
                                                                  world: int) -> None:
    """Where epochs end does not depend on micro x world: the samples of consecutive global
    micro-steps, ranks in order, are the one stream of epoch permutations."""
    steps = 100 // (micro * world) + 1
    ranks = [take(PretrainingLoader(dataset, micro, seed=4, rank=r, world_size=world), steps)
             for r in range(world)]
    read = [i for step in zip(*ranks, strict=True) for batch in step for i in batch]
    stream = permutation(37, 4, 0) + permutation(37, 4, 1) + permutation(37, 4, 2) + permutation(37, 4, 3)
    assert read == stream[:len(read)] and len(read) >= 100


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


@pytest.mark.parametrize("start", [0, 7, 36, 37, 41, 100])
def test_resume_from_any_sample_count_with_another_micro_batch(dataset: PretrainingDataset,
                                                               start: int) -> None:
    """A run saved at `start` samples with one micro-batch x world size goes on with another one
    where it stopped: the samples that follow are the stream's next ones."""
    got = take(PretrainingLoader(dataset, 3, seed=6, world_size=2, rank=1, start_sample=start), 15)
    assert got == reference_stream(37, 3, 2, 1, seed=6, steps=15, start=start)


def test_whole_batches_order_of_older_runs(dataset: PretrainingDataset) -> None:
    loader = PretrainingLoader(dataset, 4, seed=3, order="whole_batches")
    got = take(loader, 9 * 3 + 2)
    assert got == whole_batches_reference(37, 4, 1, 0, seed=3, epochs=4)[: 9 * 3 + 2]
    assert loader.samples_consumed == (9 * 3 + 2) * 4 and loader.epoch == 3
    resumed = PretrainingLoader(dataset, 4, seed=3, start_sample=40, order="whole_batches", num_workers=1)
    assert take(resumed, 6) == got[10:16]
    with pytest.raises(ValueError, match="multiple of micro_batch_size x world_size = 8 in the whole_batches "
                                         "order, got 12"):
        PretrainingLoader(dataset, 4, seed=0, world_size=2, start_sample=12, order="whole_batches")
    with pytest.raises(ValueError, match="order must be one of continuous, whole_batches, got 'cut'"):
        PretrainingLoader(dataset, 4, seed=0, order="cut")


def test_dynamic_masks_follow_each_samples_own_epoch(tmp_path) -> None:
    """With dynamic masking a micro-batch across an epoch boundary masks each row with its own epoch's
    masks: the same rows as `get_batch` of that one sample in that epoch."""
    arrays = make_dataset(37, tmp_path).instances
    spec = MaskingSpec.for_vocab(vocab_size=52, special=SpecialTokens(0, 1, 2, 3, 4), masked_lm_prob=0.3,
                                 max_predictions_per_seq=PRED)
    dataset = PretrainingDataset(arrays, tmp_path / "vocab.txt", manifest={}, dynamic_masking=spec,
                                 masking_seed=11)
    for workers in (0, 1):
        batches = list(itertools.islice(PretrainingLoader(dataset, 5, seed=2, num_workers=workers), 16))
        rows = 0
        for batch in batches:
            for row in range(5):
                epoch, index = divmod(rows, 37)
                want = dataset.get_batch([permutation(37, 2, epoch)[index]], epoch=epoch)
                for key, value in want.items():
                    assert torch.equal(batch[key][row], value[0]), (rows, key)
                rows += 1
    # the masks do change with the epoch (else the check above would not tell epochs apart)
    assert not torch.equal(dataset.get_batch(range(37), epoch=0)["input_ids"],
                           dataset.get_batch(range(37), epoch=1)["input_ids"])


def test_resume_after_partial_iteration(dataset: PretrainingDataset) -> None:
    loader = PretrainingLoader(dataset, 3, seed=5, world_size=2, rank=1)
    first = take(loader, 7)
    checkpoint = loader.samples_consumed
    assert checkpoint == 7 * 3 * 2
    rest = take(PretrainingLoader(dataset, 3, seed=5, world_size=2, rank=1, start_sample=checkpoint), 10)
    assert first + rest == take(PretrainingLoader(dataset, 3, seed=5, world_size=2, rank=1), 17)


def test_ranks_get_disjoint_equal_streams(dataset: PretrainingDataset) -> None:
    micro, world = 5, 2  # 37 samples: 3 steps and 7 samples of the fourth per epoch
    loaders = [PretrainingLoader(dataset, micro, seed=0, rank=r, world_size=world) for r in range(world)]
    streams = [sum(take(ld, 37), []) for ld in loaders]  # 370 samples: ten epochs
    assert [len(s) for s in streams] == [185, 185]
    for epoch in range(10):  # each epoch's 37 samples are read once, by one rank or the other
        read = [i for step in range(37) for r in range(2) for i in streams[r][5 * step:5 * step + 5]]
        assert sorted(read[37 * epoch:37 * (epoch + 1)]) == list(range(37))


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


def test_bad_start_sample_is_named(dataset: PretrainingDataset) -> None:
    with pytest.raises(ValueError, match=r"start_sample must be a global sample count \(>= 0\), got -8"):
        PretrainingLoader(dataset, 4, seed=0, world_size=2, start_sample=-8)


def test_bad_sizes(dataset: PretrainingDataset) -> None:
    with pytest.raises(ValueError, match="37 instances, fewer than one global micro-batch"):
        PretrainingLoader(dataset, 20, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank must be in"):
        PretrainingLoader(dataset, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        PretrainingLoader(dataset, 0, seed=0)
