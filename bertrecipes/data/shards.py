"""Prepared pre-training data on disk: a directory of instance shards, memory-mapped, with a manifest.

Layout of one prepared phase (``.../seq128-<hash>/``)::

    manifest.json        settings, counts, vocab sha256, sequence length; written last = complete
    vocab.txt            the vocabulary the ids refer to (a copy: the directory is self-contained)
    shard-00000/         one per chunk of documents
        input_ids.npy            uint16[n, S] (int32 for vocabularies over 65,535), 0-padded;
                                 unmasked when masking is dynamic
        lengths.npy              int16[n]   real tokens, [CLS]/[SEP] included
        segment_b_start.npy      int16[n]   first position of segment B
        next_sentence_labels.npy int8[n]    0 = B follows A, 1 = B is random
        masked_lm_positions.npy  int16[n, P]  static masking only, 0-padded
        masked_lm_ids.npy        uint16/int32[n, P]
        num_predictions.npy      int16[n]

Why plain ``.npy`` files and not Arrow/parquet: a batch is a random set of rows, and a memory-mapped
``.npy`` serves that with one numpy fancy index per array, straight from the page cache, with no
decoding, no per-row Python objects and no copy until the gather; opening a shard reads a 128-byte
header. Arrow's random row access goes through its own batch-to-Python formatting, several times
slower for this access pattern (and parquet must decompress whole pages). Compact dtypes
(uint16 ids, int16 positions) halve what is read per sample.

`open_prepared` refuses a directory built for another sequence length, prediction count or
vocabulary, naming both sides.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bertrecipes.atomic import write_json_atomic
from bertrecipes.data.tokenizer import vocab_sha256
from bertrecipes.errors import UserError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PreparedDataMismatch",
    "ShardedInstances",
    "check_prepared",
    "open_prepared",
    "read_manifest",
    "write_json_atomic",
    "write_shard",
]

FORMAT_NAME = "bertrecipes-pretraining-shards"
FORMAT_VERSION = 1
_ROW_FIELDS = ("input_ids", "lengths", "segment_b_start", "next_sentence_labels")
_MASK_FIELDS = ("masked_lm_positions", "masked_lm_ids", "num_predictions")


class PreparedDataMismatch(UserError, ValueError):
    """Prepared data and the run disagree (sequence length, predictions, vocabulary); names both sides."""



def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def write_shard(directory: Path, rows: dict[str, np.ndarray], vocab_size: int) -> int:
    """Write `create_instance_rows` output as one shard directory, atomically; returns its row count."""
    ids = id_dtype(vocab_size)
    dtypes = {
        "input_ids": ids,
        "lengths": np.int16,
        "segment_b_start": np.int16,
        "next_sentence_labels": np.int8,
        "masked_lm_positions": np.int16,
        "masked_lm_ids": ids,
        "num_predictions": np.int16,
    }
    if rows["input_ids"].shape[1] > np.iinfo(np.int16).max:
        raise ValueError(
            f"max_seq_length {rows['input_ids'].shape[1]} does not fit the int16 positions "
            "of the shard format (at most 32767)"
        )
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, array in rows.items():
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(array, dtype=dtypes[name]))
    # A shard directory exists only complete: rename is atomic, and a rerun skips finished shards.
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(tmp, directory)
    return int(rows["input_ids"].shape[0])


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a complete prepared directory, or None when there is none (or it is unreadable)."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        return None
    return manifest


class ShardedInstances:
    """All shards of a prepared directory as one row-indexed store, memory-mapped (opened lazily, so a
    DataLoader worker maps the files itself instead of receiving pickled arrays)."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.shard_names = [s["name"] for s in manifest["shards"] if s["num_instances"] > 0]
        counts = [s["num_instances"] for s in manifest["shards"] if s["num_instances"] > 0]
        self.offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.offsets[1:])
        self.max_seq_length = int(manifest["max_seq_length"])
        self.has_masks = manifest["masking"] == "static"
        self.max_predictions_per_seq = int(manifest["max_predictions_per_seq"])
        self._arrays: list[dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def _open(self) -> list[dict[str, np.ndarray]]:
        fields = _ROW_FIELDS + (_MASK_FIELDS if self.has_masks else ())
        arrays = []
        for index, name in enumerate(self.shard_names):
            shard = {f: np.load(self.directory / name / f"{f}.npy", mmap_mode="r") for f in fields}
            expected = int(self.offsets[index + 1] - self.offsets[index])
            if shard["input_ids"].shape != (expected, self.max_seq_length):
                raise PreparedDataMismatch(
                    f"shard {self.directory / name} holds input_ids of shape {shard['input_ids'].shape}, "
                    f"the manifest says ({expected}, {self.max_seq_length}); the directory is damaged: "
                    "delete it to rebuild"
                )
            arrays.append(shard)
        return arrays

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `indices` (int array) from whichever shards hold them, in the order given."""
        if self._arrays is None:
            self._arrays = self._open()
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            bad = int(indices.min() if indices.min() < 0 else indices.max())
            raise IndexError(f"index {bad} out of range for a dataset of {len(self)} instances")
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        local = indices - self.offsets[shard_of]
        first = self._arrays[0] if self._arrays else None
        fields = _ROW_FIELDS + (_MASK_FIELDS if self.has_masks else ())
        out = {f: np.empty((len(indices),) + first[f].shape[1:], dtype=first[f].dtype) for f in fields}
        for shard in np.unique(shard_of):
            select = shard_of == shard
            rows = local[select]
            arrays = self._arrays[shard]
            for f in fields:
                out[f][select] = arrays[f][rows]
        cols = np.arange(self.max_seq_length)
        out["token_type_ids"] = (
            (cols >= out["segment_b_start"][:, None]) & (cols < out["lengths"][:, None])
        ).astype(np.int8)
        return out


def check_prepared(
    manifest: dict[str, Any],
    directory: Path,
    *,
    max_seq_length: int | None,
    max_predictions_per_seq: int | None,
    vocab_file: str | Path | None,
) -> None:
    """Raise PreparedDataMismatch when the run's settings differ from what the data was built with."""
    problems = []
    for name, want in (
        ("max_seq_length", max_seq_length),
        ("max_predictions_per_seq", max_predictions_per_seq),
    ):
        if want is not None and int(manifest[name]) != int(want):
            problems.append(f"{name}: the data has {manifest[name]}, this run has {want}")
    if vocab_file is not None:
        sha = vocab_sha256(vocab_file)
        if sha != manifest["vocab_sha256"]:
            problems.append(
                f"vocabulary: the data was tokenized with {manifest.get('vocab_source')!r} "
                f"(sha256 {manifest['vocab_sha256'][:12]}..., {manifest['vocab_size']} tokens), "
                f"this run uses {str(vocab_file)!r} (sha256 {sha[:12]}...)"
            )
    if problems:
        raise PreparedDataMismatch(
            f"prepared data in {directory} does not match this run: "
            + "; ".join(problems)
            + ". Prepare data for these settings (python -m bertrecipes.prepare_data "
            "with the same overrides) or change the run's settings."
        )


def open_prepared(
    directory: str | Path,
    *,
    max_seq_length: int | None = None,
    max_predictions_per_seq: int | None = None,
    vocab_file: str | Path | None = None,
) -> tuple[ShardedInstances, dict[str, Any], Path]:
    """Open a prepared directory, checked against the run: returns (store, manifest, its vocab file)."""
    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    if manifest is None:
        raise PreparedDataMismatch(
            f"{directory} is not complete prepared pre-training data (no readable manifest.json of format "
            f"{FORMAT_NAME} v{FORMAT_VERSION}); build it with python -m bertrecipes.prepare_data"
        )
    check_prepared(
        manifest,
        directory,
        max_seq_length=max_seq_length,
        max_predictions_per_seq=max_predictions_per_seq,
        vocab_file=vocab_file,
    )
    own_vocab = directory / "vocab.txt"
    if not own_vocab.is_file() or vocab_sha256(own_vocab) != manifest["vocab_sha256"]:
        raise PreparedDataMismatch(
            f"{own_vocab} is missing or is not the vocabulary the data was built with "
            f"(sha256 {manifest['vocab_sha256'][:12]}...); the directory is damaged"
        )
    return ShardedInstances(directory, manifest), manifest, own_vocab
