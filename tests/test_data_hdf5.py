"""NVIDIA DeepLearningExamples hdf5 shards: a tiny file written here in NVIDIA's layout (gzip datasets,
masked_lm_positions/ids padded with 0) is converted and served; every batch field is compared with
what NVIDIA's own loader would make of the raw arrays (the first 0 position ends the predictions)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bertrecipes.data import PretrainingLoader
from bertrecipes.data.build import build_pretraining_dataset, open_prepared_dataset
from bertrecipes.data.hdf5 import convert_nvidia_hdf5
from bertrecipes.data.prepare import DataPreparationError
from bertrecipes.data.shards import PreparedDataMismatch

h5py = pytest.importorskip(
    "h5py", reason="h5py is the optional 'hdf5' extra: pip install 'bertrecipes[hdf5]'"
)

SEQ, PRED, VOCAB = 32, 5, 120


def nvidia_arrays(n: int, seed: int) -> dict[str, np.ndarray]:
    """Rows as NVIDIA writes them: [CLS] A [SEP] B [SEP] 0..., input_mask, segment ids, 0-padded masks."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((n, SEQ), np.int32) for k in ("input_ids", "input_mask", "segment_ids")}
    out["masked_lm_positions"] = np.zeros((n, PRED), np.int32)
    out["masked_lm_ids"] = np.zeros((n, PRED), np.int32)
    out["next_sentence_labels"] = rng.integers(0, 2, n).astype(np.int8)
    for r in range(n):
        len_a, len_b = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        tokens = [101, *rng.integers(5, VOCAB, len_a), 102, *rng.integers(5, VOCAB, len_b), 102]
        length = len(tokens)
        out["input_ids"][r, :length] = tokens
        out["input_mask"][r, :length] = 1
        out["segment_ids"][r, len_a + 2 : length] = 1
        k = int(rng.integers(1, PRED + 1))
        positions = np.sort(
            rng.choice(np.r_[1 : len_a + 1, len_a + 2 : length - 1], size=min(k, length - 3), replace=False)
        )
        out["masked_lm_positions"][r, : len(positions)] = positions
        out["masked_lm_ids"][r, : len(positions)] = out["input_ids"][r, positions]
        out["input_ids"][r, positions] = 103
    return out


def write_hdf5(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as f:
        for key, array in arrays.items():
            f.create_dataset(key, data=array, compression="gzip")
    return path


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, Path, list[dict[str, np.ndarray]]]:
    directory = tmp_path / "hdf5"
    directory.mkdir()
    arrays = [nvidia_arrays(37, seed=0), nvidia_arrays(20, seed=1)]
    for i, a in enumerate(arrays):
        write_hdf5(directory / f"training_shard_{i}.hdf5", a)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(
        "\n".join(
            ["[PAD]"]
            + [f"t{i}" for i in range(1, 100)]
            + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            + [f"w{i}" for i in range(104, VOCAB)]
        )
        + "\n"
    )
    return directory, vocab, arrays


def test_converted_shards_serve_what_nvidias_loader_would(shards, tmp_path: Path) -> None:
    directory, vocab, arrays = shards
    prepared = convert_nvidia_hdf5(
        directory,
        vocab_file=vocab,
        lower_case=True,
        cache_dir=tmp_path / "cache",
        max_seq_length=SEQ,
        max_predictions_per_seq=PRED,
        num_proc=2,
        progress=False,
    )
    dataset = open_prepared_dataset(
        prepared.directory, max_seq_length=SEQ, max_predictions_per_seq=PRED, vocab_file=vocab
    )
    assert len(dataset) == 57 and dataset.vocab_size == VOCAB
    batch = dataset.get_batch(np.arange(57))
    raw = {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}
    np.testing.assert_array_equal(batch["input_ids"], raw["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], raw["input_mask"])
    np.testing.assert_array_equal(batch["token_type_ids"], raw["segment_ids"])
    np.testing.assert_array_equal(batch["next_sentence_labels"], raw["next_sentence_labels"])
    np.testing.assert_array_equal(batch["length"], raw["input_mask"].sum(axis=1))
    for r in range(57):  # NVIDIA's rule: labels at positions before the first 0 position, -100 elsewhere
        pads = np.flatnonzero(raw["masked_lm_positions"][r] == 0)
        k = pads[0] if len(pads) else PRED
        want = np.full(PRED, -100)
        want[:k] = raw["masked_lm_ids"][r, :k]
        np.testing.assert_array_equal(batch["masked_lm_labels"][r], want)
        np.testing.assert_array_equal(batch["masked_lm_positions"][r, :k], raw["masked_lm_positions"][r, :k])
    again = convert_nvidia_hdf5(
        directory,
        vocab_file=vocab,
        lower_case=True,
        cache_dir=tmp_path / "cache",
        max_seq_length=SEQ,
        max_predictions_per_seq=PRED,
        progress=False,
    )
    assert again.reused
    first = next(iter(PretrainingLoader(dataset, 4, seed=0, world_size=2, rank=1, num_workers=1)))
    assert first["input_ids"].shape == (4, SEQ) and first["input_ids"].dtype == torch.long


def test_wrong_phase_and_bad_files_are_named(shards, tmp_path: Path) -> None:
    directory, vocab, arrays = shards
    cache = tmp_path / "cache"
    with pytest.raises(
        PreparedDataMismatch, match=f"have max_seq_length {SEQ} .* this run has max_seq_length 128.*no "
                                    f"phase has these shapes: give max_seq_length={SEQ} "
                                    f"max_predictions_per_seq={PRED}"
    ):
        convert_nvidia_hdf5(
            directory,
            vocab_file=vocab,
            lower_case=True,
            cache_dir=cache,
            max_seq_length=128,
            max_predictions_per_seq=20,
            progress=False,
        )
    small_vocab = tmp_path / "small.txt"
    small_vocab.write_text("\n".join(vocab.read_text().splitlines()[:110]) + "\n")
    with pytest.raises(DataPreparationError, match="training_shard_0.hdf5 failed: .*outside the vocabulary"):
        convert_nvidia_hdf5(
            directory,
            vocab_file=small_vocab,
            lower_case=True,
            cache_dir=cache,
            max_seq_length=SEQ,
            max_predictions_per_seq=PRED,
            progress=False,
        )
    broken = nvidia_arrays(5, seed=3)
    broken["segment_ids"][0, 1] = 1  # segment 1 inside A
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    write_hdf5(bad_dir / "x.hdf5", broken)
    with pytest.raises(DataPreparationError, match="x.hdf5 failed: ValueError: segment_ids are not"):
        convert_nvidia_hdf5(
            bad_dir,
            vocab_file=vocab,
            lower_case=True,
            cache_dir=cache,
            max_seq_length=SEQ,
            max_predictions_per_seq=PRED,
            progress=False,
        )


@pytest.mark.parametrize("field, value, message", [
    ("masked_lm_ids", 40000, r"masked_lm_ids row 2 holds \[40000\]: each must be a token id in \[0, "),
    ("masked_lm_positions", SEQ + 5, rf"masked_lm_positions row 2 holds \[{SEQ + 5}\]: each must be a real"),
    ("next_sentence_labels", 2, "next_sentence_labels row 2 is 2: each must be 0 or 1"),
])
def test_bad_labels_are_named_when_converting(shards, tmp_path: Path, field, value, message) -> None:
    """Checked as the ids are: otherwise a bad label fails training hours later, naming no file or row."""
    _, vocab, _ = shards
    broken = nvidia_arrays(5, seed=3)
    if field == "next_sentence_labels":
        broken[field][2] = value
    else:
        broken[field][2, 0] = value
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    write_hdf5(bad_dir / "x.hdf5", broken)
    with pytest.raises(DataPreparationError, match=f"x.hdf5 failed: ValueError: {message}"):
        convert_nvidia_hdf5(bad_dir, vocab_file=vocab, lower_case=True, cache_dir=tmp_path / "cache",
                            max_seq_length=SEQ, max_predictions_per_seq=PRED, progress=False)


def test_data_nvidia_hdf5_config(make_cfg, shards) -> None:
    directory, vocab, _ = shards
    cfg = make_cfg(
        "data=nvidia_hdf5",
        f"data.input_dir={directory}",
        f"data.vocab_file={vocab}",
        f"max_seq_length={SEQ}",
        f"max_predictions_per_seq={PRED}",
        "data.num_proc=1",
    )
    dataset = build_pretraining_dataset(cfg)
    assert len(dataset) == 57
    batches = list(itertools.islice(PretrainingLoader(dataset, 8, seed=1), 3))
    assert all(b["input_ids"].shape == (8, SEQ) for b in batches)


def test_nvidia_shards_as_a_held_out_set(make_cfg, shards, tmp_path: Path) -> None:
    """MLPerf-style: the evaluation set is NVIDIA hdf5 shards, masks included, scored as they are."""
    import json

    from bertrecipes.data.build import build_eval_dataset
    from bertrecipes.data.sources import DataSourceError
    from bertrecipes.engine import train

    directory, vocab, arrays = shards
    raw = {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}
    dataset = build_eval_dataset([str(directory)], vocab, max_seq_length=SEQ, max_predictions_per_seq=PRED,
                                 cache_dir=tmp_path / "cache", progress=False)
    batch = dataset.get_batch(np.arange(len(dataset)))
    np.testing.assert_array_equal(batch["input_ids"], raw["input_ids"])
    # NVIDIA's rule, counted on the raw arrays: a row's predictions end at its first 0 position
    first_zero = [next((i for i, p in enumerate(row) if p == 0), PRED) for row in raw["masked_lm_positions"]]
    assert int((batch["masked_lm_labels"] != -100).sum()) == sum(first_zero)

    out = tmp_path / "run"
    train(make_cfg("data=nvidia_hdf5", f"data.input_dir={directory}", f"data.vocab_file={vocab}",
                   f"max_seq_length={SEQ}", f"max_predictions_per_seq={PRED}", "data.num_proc=1",
                   "data.num_workers=0", "model.hidden_size=32", "model.intermediate_size=64",
                   "train_batch_size=8", "train_micro_batch_size_per_gpu=8", "max_steps=2",
                   f"eval_data=[{directory}]", output_dir=out))
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    (scores,) = [r for r in rows if "eval_loss" in r]
    assert scores["eval_samples"] == 57 and scores["eval_masked_tokens"] == sum(first_zero)

    text = tmp_path / "more.txt"
    text.write_text("t1 t2 t3.\n")
    with pytest.raises(DataSourceError, match="mixes NVIDIA hdf5 shards with other files"):
        build_eval_dataset([str(directory), str(text)], vocab, max_seq_length=SEQ,
                           max_predictions_per_seq=PRED, cache_dir=tmp_path / "cache", progress=False)


def test_a_shape_mismatch_names_the_phase_made_for_the_files() -> None:
    """NVIDIA's phase-1 files (128, 20) and phase-2 files (512, 80) are the shapes of our phases."""
    from bertrecipes.data.hdf5 import _shape_advice

    for phase in ("seq128", "seq512"):
        settings = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "phase" / f"{phase}.yaml")
                                  .read_text())
        advice = _shape_advice(settings["max_seq_length"], settings["max_predictions_per_seq"])
        assert advice == f"use the phase the files were made for, +phase={phase}"
