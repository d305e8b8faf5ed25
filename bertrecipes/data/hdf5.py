"""NVIDIA DeepLearningExamples BERT shards (hdf5) -> bertrecipes' memory-mapped shard format.

For users who already have NVIDIA's pre-training data: each ``.hdf5`` file holds ``input_ids``,
``input_mask``, ``segment_ids`` (int[N, S]), ``masked_lm_positions``, ``masked_lm_ids`` (int[N, P],
padded with 0: position 0 is [CLS], never a prediction, so the first 0 ends the list, exactly as
NVIDIA's loader reads it) and ``next_sentence_labels`` (int[N]). Each file becomes one shard (in
parallel, once; cached by the files' paths, sizes and mtimes), after checks that name the file: the
sequence length and prediction count must equal the run's, segment ids must be 0...0 1...1 0...0,
every id must fit the vocabulary.

Converting instead of reading hdf5 during training: NVIDIA writes gzip-compressed datasets, so
random row access would decompress whole chunks per sample; the converted shards are read with one
fancy index per batch, like data prepared by bertrecipes itself.

Needs h5py (``pip install "bertrecipes[hdf5]"``). Usage::

    prepared = convert_nvidia_hdf5("hdf5/wikicorpus_en", vocab_file="vocab.txt", lower_case=True,
                                   cache_dir=Path("~/.cache/bertrecipes").expanduser(),
                                   max_seq_length=128, max_predictions_per_seq=20)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bertrecipes.data.prepare import DataPreparationError, PreparedData
from bertrecipes.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PreparedDataMismatch,
    read_manifest,
    write_json_atomic,
    write_shard,
)
from bertrecipes.data.sources import DataSourceError, resolve_paths
from bertrecipes.data.tokenizer import read_vocab, vocab_sha256

__all__ = ["NVIDIA_KEYS", "convert_nvidia_hdf5"]

logger = logging.getLogger("bertrecipes.data")

NVIDIA_KEYS = (
    "input_ids",
    "input_mask",
    "segment_ids",
    "masked_lm_positions",
    "masked_lm_ids",
    "next_sentence_labels",
)
CONVERTER_VERSION = 1

# The phases in conf/phase and the shapes NVIDIA's hdf5 files for them have.
_PHASE_SHAPES = {(128, 20): "seq128", (512, 80): "seq512"}


def _shape_advice(seq: int, predictions: int) -> str:
    """How to run on files of these shapes: the phase made for them, or the two settings."""
    phase = _PHASE_SHAPES.get((seq, predictions))
    settings = f"max_seq_length={seq} max_predictions_per_seq={predictions}"
    return (f"use the phase the files were made for, +phase={phase}" if phase else
            f"no phase has these shapes: give {settings}")


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as err:
        raise DataSourceError(
            'reading NVIDIA hdf5 shards needs h5py: pip install "bertrecipes[hdf5]" (or pip install h5py)'
        ) from err
    return h5py


def _shapes(path: Path) -> tuple[int, int]:
    """(sequence length, max predictions) of one hdf5 file, checking its datasets exist."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in NVIDIA_KEYS if k not in f]
            if missing:
                raise DataSourceError(
                    f"{path} lacks datasets {missing}; NVIDIA BERT shards have "
                    f"{list(NVIDIA_KEYS)} (found {sorted(f.keys())})"
                )
            return int(f["input_ids"].shape[1]), int(f["masked_lm_positions"].shape[1])
    except OSError as err:
        raise DataSourceError(f"cannot open {path} as hdf5: {err}") from err


def _convert_file(path: str, shard_dir: str, vocab_size: int) -> dict[str, Any]:
    try:
        return _convert_file_checked(Path(path), Path(shard_dir), vocab_size)
    except Exception as err:
        raise DataPreparationError(
            f"converting NVIDIA shard {path} failed: {type(err).__name__}: {err}"
        ) from None


def _convert_file_checked(path: Path, shard_dir: Path, vocab_size: int) -> dict[str, Any]:
    h5py = _h5py()
    with h5py.File(path, "r") as f:
        data = {k: np.asarray(f[k][...]) for k in NVIDIA_KEYS}
    input_ids, input_mask, segment_ids = data["input_ids"], data["input_mask"], data["segment_ids"]
    n, seq = input_ids.shape
    positions, masked_ids = data["masked_lm_positions"], data["masked_lm_ids"]
    for name in ("input_mask", "segment_ids"):
        if data[name].shape != (n, seq):
            raise ValueError(f"{name} has shape {data[name].shape}, input_ids has {(n, seq)}")
    if (
        masked_ids.shape != positions.shape
        or positions.shape[0] != n
        or data["next_sentence_labels"].shape[0] != n
    ):
        raise ValueError(
            f"inconsistent row counts/shapes: input_ids {input_ids.shape}, masked_lm_positions "
            f"{positions.shape}, masked_lm_ids {masked_ids.shape}, next_sentence_labels "
            f"{data['next_sentence_labels'].shape}"
        )
    if n and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(
            f"token ids span [{input_ids.min()}, {input_ids.max()}], outside the vocabulary "
            f"[0, {vocab_size}) (is data.vocab_file the vocab these shards were made with?)"
        )
    lengths = input_mask.astype(np.int64).sum(axis=1)
    cols = np.arange(seq)
    if not np.array_equal(input_mask.astype(bool), cols < lengths[:, None]):
        raise ValueError("input_mask is not 1...1 0...0 in every row")
    is_b = segment_ids.astype(bool)
    b_start = np.where(is_b.any(axis=1), is_b.argmax(axis=1), lengths)
    if not np.array_equal(is_b, (cols >= b_start[:, None]) & (cols < lengths[:, None])):
        raise ValueError("segment_ids are not 0...0 1...1 (then 0 on padding) in every row")
    # NVIDIA's loader: the first 0 in masked_lm_positions ends the predictions (0 is [CLS]).
    is_pad = positions == 0
    counts = np.where(is_pad.any(axis=1), is_pad.argmax(axis=1), positions.shape[1])
    used = np.arange(positions.shape[1]) < counts[:, None]
    # the labels, as the ids: a bad one would fail training hours later, naming no file or row
    for name, values, low, high, meaning in (
            ("masked_lm_positions", positions, 1, lengths[:, None], "a real token after [CLS]"),
            ("masked_lm_ids", masked_ids, 0, vocab_size, f"a token id in [0, {vocab_size})"),
    ):
        bad = used & ((values < low) | (values >= high))
        if bad.any():
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            raise ValueError(f"{name} row {row} holds {values[row][bad[row]].tolist()}: each must be "
                             f"{meaning}")
    labels = data["next_sentence_labels"].reshape(n)
    if n and not np.isin(labels, (0, 1)).all():
        row = int(np.flatnonzero(~np.isin(labels, (0, 1)))[0])
        raise ValueError(f"next_sentence_labels row {row} is {labels[row]}: each must be 0 or 1")
    rows = {
        "input_ids": input_ids,
        "lengths": lengths,
        "segment_b_start": b_start,
        "next_sentence_labels": labels,
        "masked_lm_positions": np.where(used, positions, 0),
        "masked_lm_ids": np.where(used, masked_ids, 0),
        "num_predictions": counts,
    }
    write_shard(shard_dir, rows, vocab_size)
    return {"instances": int(n), "instance_tokens": int(lengths.sum()), "predictions": int(counts.sum())}


def convert_nvidia_hdf5(
    input_dir: str | Path,
    *,
    vocab_file: str | Path,
    lower_case: bool,
    cache_dir: Path,
    max_seq_length: int,
    max_predictions_per_seq: int,
    num_proc: int = 1,
    progress: bool = True,
) -> PreparedData:
    """Convert (or reuse the conversion of) NVIDIA hdf5 shards; see the module docstring."""
    start = time.perf_counter()
    pattern = Path(str(input_dir)).expanduser()
    files = resolve_paths([str(pattern)])
    files = [p for p in files if p.suffix.lower() in (".hdf5", ".h5")]
    if not files:
        raise DataSourceError(f"no .hdf5/.h5 files in {str(input_dir)!r} (data.input_dir)")
    vocab_file = Path(vocab_file).expanduser().resolve()
    vocab_size = max(read_vocab(vocab_file).values()) + 1
    vocab_sha = vocab_sha256(vocab_file)
    seq, predictions = _shapes(files[0])
    if (seq, predictions) != (max_seq_length, max_predictions_per_seq):
        raise PreparedDataMismatch(
            f"NVIDIA shards in {input_dir} have max_seq_length {seq} and max_predictions_per_seq "
            f"{predictions}; this run has max_seq_length {max_seq_length} and max_predictions_per_seq "
            f"{max_predictions_per_seq} ({_shape_advice(seq, predictions)})"
        )
    key = {
        "converter_version": CONVERTER_VERSION,
        "vocab_sha256": vocab_sha,
        "lower_case": lower_case,
        "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }
    out_dir = Path(cache_dir).expanduser() / (
        f"nvidia_hdf5-seq{seq}-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}"
    )
    manifest = read_manifest(out_dir)
    if manifest is not None:
        logger.info("reusing converted NVIDIA shards %s (%d instances)", out_dir, manifest["num_instances"])
        return PreparedData(out_dir, manifest, reused=True)
    for path in files[1:]:
        if _shapes(path) != (seq, predictions):
            raise DataSourceError(
                f"{path} has (max_seq_length, max_predictions_per_seq) = {_shapes(path)}, "
                f"{files[0]} has {(seq, predictions)}; one directory must hold one phase"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vocab_file, out_dir / "vocab.txt")
    jobs = [(str(p), str(out_dir / f"shard-{i:05d}"), vocab_size) for i, p in enumerate(files)]
    results: list[dict[str, Any]] = []
    with tqdm(total=len(files), unit=" files", desc="nvidia hdf5", disable=not progress) as bar:
        if num_proc <= 1:
            for job in jobs:
                results.append(_convert_file(*job))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=num_proc) as pool:
                futures = [pool.submit(_convert_file, *job) for job in jobs]
                for job, future in zip(jobs, futures, strict=True):
                    try:
                        results.append(future.result())
                    except BrokenProcessPool as err:
                        raise DataPreparationError(
                            f"a worker process died converting {job[0]} (killed by "
                            "the OS, most likely out of memory); lower data.num_proc"
                        ) from err
                    bar.update()
    total = sum(r["instances"] for r in results)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "settings": {"nvidia_hdf5": key},
        "max_seq_length": seq,
        "max_predictions_per_seq": predictions,
        "masking": "static",
        "lower_case": lower_case,
        "vocab_file": "vocab.txt",
        "vocab_source": str(vocab_file),
        "vocab_sha256": vocab_sha,
        "vocab_size": vocab_size,
        "num_instances": total,
        "shards": [
            {"name": f"shard-{i:05d}", "num_instances": r["instances"], "source": str(p)}
            for i, (p, r) in enumerate(zip(files, results, strict=True))
        ],
        "stats": {
            "instances": total,
            "instance_tokens": sum(r["instance_tokens"] for r in results),
            "files": len(files),
        },
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    logger.info(
        "converted %d NVIDIA hdf5 files (%d instances) in %.1fs -> %s",
        len(files),
        total,
        time.perf_counter() - start,
        out_dir,
    )
    return PreparedData(out_dir, manifest, reused=False, seconds=time.perf_counter() - start)
