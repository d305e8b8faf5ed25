"""Cached pre-training data on disk, a torch Dataset over it, and a resumable distributed loader.

* `build_demo_dataset` generates the synthetic demo corpus, trains (or reuses) a WordPiece vocab,
  tokenizes, creates instances and caches `instances.npz` + `manifest.json` under
  `cache_dir/<hash of settings>/`; a later call with the same settings loads the cache.
* `PretrainingDataset` serves one instance (or a batch of them) as torch tensors, from any instance
  store: `InstanceArrays` in memory (the demo) or `ShardedInstances`, memory-mapped shards made by
  `bertrecipes.data.prepare` (open them with `bertrecipes.data.build.open_prepared_dataset`). With
  dynamic masking it masks at load time, keyed by (seed, epoch, index).
* `PretrainingLoader` yields micro-batches forever from one stream of samples, the epochs' shuffles
  (each fixed by seed and epoch) one after another, whatever the micro-batch and world size; it
  splits each global micro-step across ranks and resumes exactly from a global sample count such as a
  checkpoint's `last_global_data_samples`. Every rank gets a batch at every step, so no rank waits
  for another at an epoch's end.

Usage::

    ds = build_demo_dataset("~/.cache/bertrecipes", num_documents=2000, corpus_seed=0, vocab_size=4000,
                            lower_case=True, max_seq_length=128, max_predictions_per_seq=20,
                            masked_lm_prob=0.15, short_seq_prob=0.1, dupe_factor=5,
                            whole_word_mask=False, seed=12345)
    for batch in PretrainingLoader(ds, micro_batch_size=32, seed=0):
        ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from bertrecipes.atomic import write_json_atomic
from bertrecipes.data.demo_corpus import generate_demo_corpus
from bertrecipes.data.instances import InstanceArrays, create_instances
from bertrecipes.data.masking import MaskingSpec, mask_batch, row_keys
from bertrecipes.data.tokenizer import (
    continuation_mask,
    load_tokenizer,
    read_vocab,
    special_token_ids,
    train_wordpiece,
)

__all__ = ["CONTINUOUS", "DATA_ORDERS", "WHOLE_BATCHES", "PretrainingDataset", "PretrainingLoader",
           "build_demo_dataset"]

logger = logging.getLogger("bertrecipes.data")

# Bump when the corpus generator, instance semantics or file layout change, so old caches are ignored.
CACHE_FORMAT_VERSION = 1
IGNORE_INDEX = -100  # label value that torch's cross_entropy skips
_DYNAMIC_MASK_STREAM = 21  # keeps load-time masks apart from build-time ones made with the same seed


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]



def _demo_vocab(cache_dir: Path, documents: list[list[str]], vocab_settings: dict[str, Any]) -> Path:
    """Train the demo vocab once per (corpus, vocab_size, case) and share it across instance settings.

    The `tokenizers` WordPiece trainer breaks count ties in hash order, so two trainings on the same
    corpus can differ in a few pieces: reusing the cached file is what keeps the ids stable.
    """
    vocab_dir = cache_dir / f"vocab-{_settings_hash(vocab_settings)}"
    vocab_file = vocab_dir / "vocab.txt"
    if vocab_file.is_file() and vocab_file.stat().st_size > 0:
        logger.info("reusing cached vocab %s", vocab_file)
        return vocab_file
    vocab_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    candidate = vocab_dir / f".vocab.txt.candidate-{os.getpid()}"
    train_wordpiece(documents, vocab_settings["vocab_size"], vocab_settings["lower_case"], candidate)
    # Publish with link(), which fails if the file exists: when several processes (ranks) train at
    # once, the first one wins and every process uses that same file, never a mix of two vocabularies.
    try:
        os.link(candidate, vocab_file)
        logger.info("trained WordPiece vocab (%d tokens) in %.2fs -> %s",
                    len(read_vocab(vocab_file)), time.perf_counter() - start, vocab_file)
    except FileExistsError:
        logger.info("another process published %s first; using it", vocab_file)
    except OSError:  # file systems without hard links: last writer wins
        os.replace(candidate, vocab_file)
    candidate.unlink(missing_ok=True)
    write_json_atomic(vocab_dir / "settings.json", vocab_settings)
    return vocab_file


def build_demo_dataset(
    cache_dir: str | Path,
    *,
    num_documents: int,
    corpus_seed: int,
    vocab_size: int,
    lower_case: bool,
    max_seq_length: int,
    max_predictions_per_seq: int,
    masked_lm_prob: float,
    short_seq_prob: float,
    dupe_factor: int,
    whole_word_mask: bool,
    seed: int,
) -> PretrainingDataset:
    """Build (or load from `cache_dir`) pre-training instances from the synthetic demo corpus.

    Safe to call from several processes at once (they agree on one vocab file and write identical
    instances), but cheaper to build on one rank and load on the others after a barrier.
    """
    cache_dir = Path(cache_dir).expanduser()
    settings: dict[str, Any] = {
        "format_version": CACHE_FORMAT_VERSION, "corpus": "demo", "num_documents": num_documents,
        "corpus_seed": corpus_seed, "vocab_size": vocab_size, "lower_case": lower_case,
        "max_seq_length": max_seq_length, "max_predictions_per_seq": max_predictions_per_seq,
        "masked_lm_prob": masked_lm_prob, "short_seq_prob": short_seq_prob, "dupe_factor": dupe_factor,
        "whole_word_mask": whole_word_mask, "seed": seed,
    }
    vocab_settings = {k: settings[k] for k in ("format_version", "corpus", "num_documents", "corpus_seed",
                                                "vocab_size", "lower_case")}
    out_dir = cache_dir / _settings_hash(settings)
    manifest_file, instances_file = out_dir / "manifest.json", out_dir / "instances.npz"

    cached = _load_cached(out_dir, settings)
    if cached is not None:
        return cached

    start = time.perf_counter()
    documents = generate_demo_corpus(num_documents, corpus_seed)
    logger.info("generated demo corpus: %d documents, %d sentences in %.2fs", len(documents),
                sum(len(d) for d in documents), time.perf_counter() - start)
    vocab_file = _demo_vocab(cache_dir, documents, vocab_settings)
    tokenizer = load_tokenizer(vocab_file, lower_case=lower_case)

    t = time.perf_counter()
    flat = [sentence for doc in documents for sentence in doc]
    encodings = tokenizer.encode_batch(flat, add_special_tokens=False)
    ids = iter(e.ids for e in encodings)
    token_docs = [[next(ids) for _ in doc] for doc in documents]
    logger.info("tokenized %d sentences (%d tokens) in %.2fs", len(flat),
                sum(len(e.ids) for e in encodings), time.perf_counter() - t)

    t = time.perf_counter()
    real_vocab_size = tokenizer.get_vocab_size()
    instances = create_instances(
        token_docs, vocab_size=real_vocab_size, special=special_token_ids(tokenizer),
        max_seq_length=max_seq_length, short_seq_prob=short_seq_prob, masked_lm_prob=masked_lm_prob,
        max_predictions_per_seq=max_predictions_per_seq, dupe_factor=dupe_factor,
        whole_word_mask=whole_word_mask,
        is_continuation=continuation_mask(tokenizer) if whole_word_mask else None, seed=seed,
    )
    logger.info("created %d instances in %.2fs", len(instances), time.perf_counter() - t)

    out_dir.mkdir(parents=True, exist_ok=True)
    instances.save_npz(instances_file)
    manifest = {
        "settings": settings,
        "num_instances": len(instances),
        "max_seq_length": max_seq_length,
        "max_predictions_per_seq": max_predictions_per_seq,
        "vocab_size": real_vocab_size,
        "vocab_file": os.path.relpath(vocab_file, out_dir),
        "vocab_sha256": _sha256_file(vocab_file),
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    # The manifest goes last: its presence means the instances beside it are complete.
    write_json_atomic(manifest_file, manifest)
    logger.info("built demo dataset in %.2fs -> %s", time.perf_counter() - start, out_dir)
    return PretrainingDataset(instances, vocab_file, manifest, directory=out_dir)


def _load_cached(out_dir: Path, settings: dict[str, Any]) -> PretrainingDataset | None:
    manifest_file, instances_file = out_dir / "manifest.json", out_dir / "instances.npz"
    if not (manifest_file.is_file() and instances_file.is_file()):
        return None
    start = time.perf_counter()
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        vocab_file = (out_dir / manifest["vocab_file"]).resolve()
        if manifest.get("settings") != settings:
            logger.warning("cache manifest %s has other settings; rebuilding", manifest_file)
            return None
        if not vocab_file.is_file() or _sha256_file(vocab_file) != manifest["vocab_sha256"]:
            logger.warning("vocab %s missing or changed since %s was built; rebuilding", vocab_file, out_dir)
            return None
        instances = InstanceArrays.load_npz(instances_file)
    except (OSError, ValueError, KeyError) as err:
        logger.warning("unreadable cache in %s (%s); rebuilding", out_dir, err)
        return None
    if len(instances) != manifest["num_instances"]:
        logger.warning("cache %s holds %d instances, manifest says %d; rebuilding", out_dir, len(instances),
                       manifest["num_instances"])
        return None
    logger.info("reusing cached dataset %s (%d instances) loaded in %.2fs", out_dir, len(instances),
                time.perf_counter() - start)
    return PretrainingDataset(instances, vocab_file, manifest, directory=out_dir)


class InstanceStore(Protocol):
    """Where instances live: `InstanceArrays` (in memory) or `ShardedInstances` (memory-mapped shards)."""

    max_seq_length: int
    max_predictions_per_seq: int

    def __len__(self) -> int: ...

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class PretrainingDataset(torch.utils.data.Dataset):
    """Pre-training instances as torch tensors.

    `dataset[i]` (or `dataset.get_batch(indices, epoch)` with a leading batch dimension) returns
    input_ids, token_type_ids, attention_mask: long[S]; masked_lm_positions, masked_lm_labels: long[P]
    (labels are the original ids, -100 on padding); next_sentence_labels, length: long scalars.

    With `dynamic_masking` the store holds unmasked rows and every call masks them afresh with keys
    hash(masking_seed, epoch, index): new masks each epoch, the same masks for the same (epoch, index)
    whichever process or batch asks, so a resumed run sees exactly what an uninterrupted one would.
    `dataset[i]` uses `dataset.epoch` (0 unless set), for use with a plain DataLoader.
    """

    def __init__(self, instances: InstanceStore, vocab_file: str | Path, manifest: dict[str, Any], *,
                 dynamic_masking: MaskingSpec | None = None, masking_seed: int = 0,
                 directory: str | Path | None = None) -> None:
        self.instances = instances
        self.directory = Path(directory) if directory is not None else None  # where it is cached, if on disk
        self.vocab_file = Path(vocab_file)
        self.manifest = manifest
        self.dynamic_masking = dynamic_masking
        self.masking_seed = masking_seed
        self.epoch = 0
        # Line count, not distinct tokens: ids are line numbers, so this is what an embedding needs.
        self.vocab_size = max(read_vocab(self.vocab_file).values()) + 1
        self.max_seq_length = instances.max_seq_length
        self.max_predictions_per_seq = (dynamic_masking.max_predictions_per_seq if dynamic_masking
                                        else instances.max_predictions_per_seq)
        for key, value in (("vocab_size", self.vocab_size), ("max_seq_length", self.max_seq_length),
                           ("max_predictions_per_seq", self.max_predictions_per_seq)):
            if key in manifest and manifest[key] != value:
                raise ValueError(f"manifest says {key}={manifest[key]} but the data has {key}={value} "
                                 f"(vocab {self.vocab_file})")

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} instances")
        batch = self.get_batch([index % len(self)], epoch=self.epoch)
        return {k: v[0] for k, v in batch.items()}

    def get_batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor,
                  epoch: int | Sequence[int] | np.ndarray = 0) -> dict[str, torch.Tensor]:
        """Gather instances with one fancy-index per array (much faster than stacking __getitem__).

        `epoch` (one for all rows, or one per row) matters only with dynamic masking: it selects that
        epoch's masks.
        """
        if isinstance(indices, torch.Tensor):
            indices = indices.numpy()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        a = self.instances.gather(idx)
        lengths = a["lengths"].astype(np.int64)
        if self.dynamic_masking is not None:
            epochs = np.asarray(epoch, dtype=np.int64).reshape(-1)
            if epochs.size not in (1, idx.size):
                raise ValueError(f"{epochs.size} epochs given for {idx.size} rows (give one, or one per row)")
            keys = row_keys(self.masking_seed, _DYNAMIC_MASK_STREAM, epochs, idx)
            input_ids, positions, masked_ids, counts = mask_batch(a["input_ids"], lengths,
                                                                  self.dynamic_masking, keys=keys)
        else:
            input_ids, positions = a["input_ids"], a["masked_lm_positions"]
            masked_ids, counts = a["masked_lm_ids"], a["num_predictions"]
        attention = np.arange(self.max_seq_length) < lengths[:, None]
        pred_slots = np.arange(self.max_predictions_per_seq)
        # int64 first: ids may be stored as uint16, where -100 would wrap around.
        labels = np.where(pred_slots < counts[:, None], masked_ids.astype(np.int64), IGNORE_INDEX)
        return {
            "input_ids": torch.from_numpy(input_ids.astype(np.int64)),
            "token_type_ids": torch.from_numpy(a["token_type_ids"].astype(np.int64)),
            "attention_mask": torch.from_numpy(attention.astype(np.int64)),
            "masked_lm_positions": torch.from_numpy(positions.astype(np.int64)),
            "masked_lm_labels": torch.from_numpy(labels.astype(np.int64)),
            "next_sentence_labels": torch.from_numpy(a["next_sentence_labels"].astype(np.int64)),
            "length": torch.from_numpy(lengths),
        }

    def check_compatible(self, max_seq_length: int, max_predictions_per_seq: int, vocab_size: int) -> None:
        """Raise ValueError if the data was built for other shapes than the caller (model/config) expects."""
        mismatches = [
            f"{name}: data has {ours}, caller expects {theirs}"
            for name, ours, theirs in (
                ("max_seq_length", self.max_seq_length, max_seq_length),
                ("max_predictions_per_seq", self.max_predictions_per_seq, max_predictions_per_seq),
                ("vocab_size", self.vocab_size, vocab_size),
            )
            if ours != theirs
        ]
        if mismatches:
            raise ValueError(f"pre-training data ({self.vocab_file}) does not match: "
                             + "; ".join(mismatches))


CONTINUOUS, WHOLE_BATCHES = "continuous", "whole_batches"
DATA_ORDERS = (CONTINUOUS, WHOLE_BATCHES)


def _rank_index_stream(num_instances: int, micro_batch_size: int, world_size: int, rank: int, seed: int,
                       start_sample: int, order: str = CONTINUOUS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(epoch of each row, index of each row) of one rank's micro-batches, forever, from global sample
    `start_sample`.

    Epoch e is `torch.randperm(N)` from a private generator seeded with `seed + e`. With the
    `continuous` order the epochs follow one another as one stream of samples: stream position p is
    instance perm_{p // N}[p % N], global micro-step j covers positions [s + j*G, s + (j+1)*G) with
    G = micro*world and s the start, and rank r takes the r-th `micro`-sized chunk of it. A micro-batch
    can hold the last samples of one epoch and the first of the next; where the epochs end does not
    depend on G, so runs with any micro-batch x world size read the same samples in the same order, and
    a run resumes from any sample count.

    `whole_batches` is the order of runs saved before the stream was continuous: each epoch is cut to a
    multiple of G (the remainder N mod G is left out of that epoch), so G decides where epochs end.
    Either way every rank gets a micro-batch at every global micro-step, so no rank waits for another.
    """
    global_batch = micro_batch_size * world_size
    if order == WHOLE_BATCHES:
        samples_per_epoch = (num_instances // global_batch) * global_batch
        epoch, offset = divmod(start_sample, samples_per_epoch)
        while True:
            permutation = _permutation(num_instances, seed, epoch)
            for step_start in range(offset, samples_per_epoch, global_batch):
                begin = step_start + rank * micro_batch_size
                yield (np.full(micro_batch_size, epoch, dtype=np.int64),
                       permutation[begin:begin + micro_batch_size])
            epoch, offset = epoch + 1, 0
    if order != CONTINUOUS:
        raise ValueError(f"order must be one of {', '.join(DATA_ORDERS)}, got {order!r}")
    permutations: dict[int, np.ndarray] = {}
    position = start_sample + rank * micro_batch_size
    while True:
        positions = np.arange(position, position + micro_batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, num_instances)
        for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
            if epoch not in permutations:
                permutations[epoch] = _permutation(num_instances, seed, epoch)
        for old in [e for e in permutations if e < epochs[0]]:
            del permutations[old]
        indices = np.empty(micro_batch_size, dtype=np.int64)
        for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
            rows = epochs == epoch
            indices[rows] = permutations[epoch][offsets[rows]]
        yield epochs, indices
        position += global_batch


def _permutation(num_instances: int, seed: int, epoch: int) -> np.ndarray:
    return torch.randperm(num_instances, generator=torch.Generator().manual_seed(seed + epoch)).numpy()


class _RankBatchSampler(Sampler[tuple[list[int], list[int]]]):
    """The same (epochs, indices) stream as the loader, for a DataLoader that fetches in worker processes."""

    def __init__(self, num_instances: int, micro_batch_size: int, world_size: int, rank: int, seed: int,
                 start_sample: int, order: str) -> None:
        self.args = (num_instances, micro_batch_size, world_size, rank, seed, start_sample, order)

    def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
        for epochs, indices in _rank_index_stream(*self.args):
            yield epochs.tolist(), indices.tolist()


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """In a loader worker: ignore SIGTERM and SIGINT. A scheduler (Slurm's preemption or time limit,
    systemd) signals the whole process group; a worker killed by it would take the training process
    down before it saves its checkpoint. The training process handles the signal and, when it
    finishes, shuts its workers down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _BatchFetcher(torch.utils.data.Dataset):
    """Maps (epochs, indices) to a whole batch, so DataLoader workers gather with one fancy-index.

    The batch travels packed into one flat tensor: a worker hands each tensor to the main process
    through its own shared-memory segment, so one tensor instead of seven is several times cheaper;
    pinning then pins it once, and the unpacked fields are contiguous views of pinned memory.
    """

    def __init__(self, dataset: PretrainingDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, request: tuple[list[int], list[int]]) -> tuple[torch.Tensor, tuple]:
        epochs, indices = request
        return _pack(self.dataset.get_batch(indices, epoch=epochs))


def _pack(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple]:
    layout = tuple((key, tuple(value.shape)) for key, value in batch.items())
    return torch.cat([value.reshape(-1) for value in batch.values()]), layout


def _unpack(flat: torch.Tensor, layout: tuple) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for key, shape in layout:
        size = math.prod(shape)
        out[key] = flat[start:start + size].view(shape)
        start += size
    return out


class PretrainingLoader:
    """Endless, deterministic, resumable micro-batches for one data-parallel rank.

    Iterating yields dicts of stacked tensors (keys as `PretrainingDataset`). Each epoch is a fresh
    permutation from `torch.Generator().manual_seed(seed + epoch)`; torch's global RNG is never used.
    With the default `continuous` order the epochs are one stream of samples (see `_rank_index_stream`),
    so the order does not depend on the micro-batch or the world size, and `start_sample` may be any
    global sample count; `whole_batches` is the order of runs saved before, where each epoch is cut to
    whole global micro-batches and `start_sample` must be a multiple of one.
    Sample counts are global (all ranks): after k global micro-steps
    `samples_consumed == start_sample + k*micro*world`. Iterate one iterator at a time: each advances
    the shared `samples_consumed`.
    """

    def __init__(self, dataset: PretrainingDataset, micro_batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, start_sample: int = 0, num_workers: int = 0,
                 pin_memory: bool = False, order: str = CONTINUOUS) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}) for world_size={world_size}, got {rank}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if order not in DATA_ORDERS:
            raise ValueError(f"order must be one of {', '.join(DATA_ORDERS)}, got {order!r}")
        global_batch = micro_batch_size * world_size
        if len(dataset) < global_batch:
            raise ValueError(f"dataset has {len(dataset)} instances, fewer than one global micro-batch "
                             f"(micro_batch_size {micro_batch_size} x world_size {world_size} "
                             f"= {global_batch})")
        if start_sample < 0:
            raise ValueError(f"start_sample must be a global sample count (>= 0), got {start_sample}")
        if order == WHOLE_BATCHES and start_sample % global_batch != 0:
            raise ValueError(f"start_sample must be a multiple of micro_batch_size x world_size "
                             f"= {global_batch} in the {WHOLE_BATCHES} order, got {start_sample}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.order = order
        self.global_batch_size = global_batch
        # Samples read per epoch: all of them, or (whole_batches) those in whole global micro-batches.
        self.samples_per_epoch = (len(dataset) if order == CONTINUOUS
                                  else len(dataset) // global_batch * global_batch)
        self._samples_consumed = start_sample

    @property
    def samples_consumed(self) -> int:
        """Global samples (all ranks) in the batches yielded so far, counted from sample 0."""
        return self._samples_consumed

    @property
    def epoch(self) -> int:
        """Epoch of the next sample."""
        return self._samples_consumed // self.samples_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        stream_args = (len(self.dataset), self.micro_batch_size, self.world_size, self.rank, self.seed,
                       self._samples_consumed, self.order)
        if self.num_workers == 0:
            pin = self.pin_memory and torch.cuda.is_available()
            for epochs, indices in _rank_index_stream(*stream_args):
                batch = self.dataset.get_batch(indices, epoch=epochs)
                if pin:  # one pinned allocation per batch, not one per field
                    flat, layout = _pack(batch)
                    batch = _unpack(flat.pin_memory(), layout)
                self._samples_consumed += self.global_batch_size
                yield batch
        else:
            loader = DataLoader(
                _BatchFetcher(self.dataset), batch_size=None, sampler=_RankBatchSampler(*stream_args),
                num_workers=self.num_workers, pin_memory=self.pin_memory,
                # Worker seeds would otherwise be drawn from torch's global RNG.
                generator=torch.Generator().manual_seed(self.seed),
                worker_init_fn=_leave_stop_signals_to_the_trainer,
            )
            for flat, layout in loader:
                self._samples_consumed += self.global_batch_size
                yield _unpack(flat, layout)
