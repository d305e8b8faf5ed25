"""Raw text corpora -> tokenized chunks -> MLM/NSP instance shards, in parallel, cached, resumable.

One call, `prepare_corpus(settings, phase, cache_dir, num_proc)`:

1. Reads the sources (`bertrecipes.data.sources`) in this process, document by document, and cuts the
   stream into chunks of `documents_per_shard` documents. Chunk boundaries depend only on the data and
   the settings, never on `num_proc`, so the output is byte-identical for any number of processes.
2. Worker processes (`num_proc`, a bounded number of chunks in flight so memory stays flat) split
   each chunk's lines into sentences, tokenize them (`CachedWordEncoder`: ids equal to BERT's
   tokenizer) and store the tokens under ``<cache>/<name>-<hash>/chunk-NNNNN/``; then build Google's
   MLM/NSP instances for the requested sequence length (random-next B comes from the same chunk, as
   Google's script takes it from the same input file) and store them as shard NNNNN of
   ``.../seq<S>-<hash>/`` (format: `bertrecipes.data.shards`).
3. Writes the manifests last. A rerun with the same settings reuses everything; another phase (seq512
   after seq128) reuses the tokenized chunks and only builds instances; an interrupted build keeps its
   finished chunks and shards.

Any exception in a worker comes back as one `DataPreparationError` naming the chunk and its source
files; a worker killed by the OS (out of memory) is reported the same way, with what to lower.

Usage (what `python -m bertrecipes.prepare_data` calls through `bertrecipes.data.build`)::

    settings = CorpusSettings(sources=(SourceSpec(paths=("wiki/",)),), vocab_file=Path("vocab.txt"))
    phase = InstanceSettings(max_seq_length=128, max_predictions_per_seq=20)
    result = prepare_corpus(settings, phase, Path("~/.cache/bertrecipes").expanduser(), num_proc=8)
    result.directory   # open with bertrecipes.data.shards.open_prepared
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bertrecipes.data.instances import TokenizedChunk, create_instance_rows
from bertrecipes.data.masking import MaskingSpec
from bertrecipes.data.sentences import DEFAULT_MAX_SENTENCE_CHARS, SPLITTER_VERSION, split_sentences
from bertrecipes.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    id_dtype,
    read_manifest,
    write_json_atomic,
    write_shard,
)
from bertrecipes.data.sources import ReadStats, SourceSpec, mix_documents, source_fingerprint
from bertrecipes.data.tokenizer import (
    CachedWordEncoder,
    continuation_mask,
    load_tokenizer,
    read_vocab,
    special_token_ids,
    train_wordpiece,
    vocab_sha256,
)
from bertrecipes.errors import UserError

__all__ = [
    "CorpusSettings",
    "DataPreparationError",
    "InstanceSettings",
    "PreparedData",
    "prepare_corpus",
    "train_corpus_vocab",
]

logger = logging.getLogger("bertrecipes.data")

# Bump when tokenization/splitting (TOKENIZED_...) or instance creation/masking (INSTANCES_...) change
# what they produce, so caches built by older code are not reused.
TOKENIZED_FORMAT_VERSION = 1
INSTANCES_VERSION = 1
MASKING_MODES = ("static", "dynamic")


class DataPreparationError(UserError, RuntimeError):
    """Preparing the data failed; the message names the chunk, its source files and the cause."""


@dataclass(frozen=True)
class CorpusSettings:
    """What determines the tokenized corpus (and so every phase built from it)."""

    sources: tuple[SourceSpec, ...]
    vocab_file: Path
    lower_case: bool = True
    documents_per_shard: int = 10_000
    seed: int = 12345  # for fractional source weights
    max_sentence_chars: int = DEFAULT_MAX_SENTENCE_CHARS
    name: str = "corpus"  # only names the cache directory

    def __post_init__(self) -> None:
        if self.documents_per_shard < 2:
            raise UserError(
                f"documents_per_shard must be >= 2 (random-next sentences come from another "
                f"document of the same shard), got {self.documents_per_shard}"
            )


@dataclass(frozen=True)
class InstanceSettings:
    """What determines one phase's instances (Google's create_pretraining_data flags + masking mode)."""

    max_seq_length: int
    max_predictions_per_seq: int
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 5
    whole_word_mask: bool = False
    masking: str = "static"  # static: masks fixed in the shards | dynamic: new masks every epoch
    seed: int = 12345

    def __post_init__(self) -> None:
        if self.masking not in MASKING_MODES:
            raise UserError(f"masking must be one of {MASKING_MODES}, got {self.masking!r}")
        # checked here, before any worker starts
        for name, ok, valid in (
            ("max_seq_length", self.max_seq_length >= 8, ">= 8"),
            ("max_predictions_per_seq", self.max_predictions_per_seq >= 1, ">= 1"),
            ("masked_lm_prob", 0.0 < self.masked_lm_prob < 1.0, "in (0, 1)"),
            ("short_seq_prob", 0.0 <= self.short_seq_prob <= 1.0, "in [0, 1]"),
            ("dupe_factor", self.dupe_factor >= 1, ">= 1"),
        ):
            if not ok:
                raise UserError(f"{name} must be {valid}, got {getattr(self, name)}")


@dataclass
class PreparedData:
    """Where a prepared phase is and what building it took."""

    directory: Path
    manifest: dict[str, Any]
    reused: bool
    seconds: float = 0.0


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _corpus_key(settings: CorpusSettings, vocab_sha: str) -> dict[str, Any]:
    return {
        "format_version": TOKENIZED_FORMAT_VERSION,
        "splitter_version": SPLITTER_VERSION,
        "sources": [source_fingerprint(s) for s in settings.sources],
        "vocab_sha256": vocab_sha,
        "lower_case": settings.lower_case,
        "documents_per_shard": settings.documents_per_shard,
        "seed": settings.seed,
        "max_sentence_chars": settings.max_sentence_chars,
    }


def train_corpus_vocab(
    sources: tuple[SourceSpec, ...], vocab_size: int, lower_case: bool, seed: int, cache_dir: Path
) -> Path:
    """Train a WordPiece vocab on the sources' lines once; later calls with the same corpus reuse it."""
    key = {
        "sources": [source_fingerprint(s) for s in sources],
        "vocab_size": vocab_size,
        "lower_case": lower_case,
        "seed": seed,
    }
    vocab_dir = cache_dir / f"vocab-{_hash(key)}"
    vocab_file = vocab_dir / "vocab.txt"
    if vocab_file.is_file() and vocab_file.stat().st_size > 0:
        logger.info("reusing the vocabulary trained on this corpus: %s", vocab_file)
        return vocab_file
    vocab_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stats = ReadStats()
    documents = (lines for lines, _ in mix_documents(list(sources), seed, stats))
    candidate = vocab_dir / f".vocab.txt.candidate-{os.getpid()}"
    train_wordpiece(documents, vocab_size, lower_case, candidate)
    os.replace(candidate, vocab_file)
    write_json_atomic(vocab_dir / "settings.json", key | {"documents": stats.documents_used})
    logger.info(
        "trained a %d-piece WordPiece vocabulary on %d documents in %.1fs -> %s",
        vocab_size,
        stats.documents_used,
        time.perf_counter() - start,
        vocab_file,
    )
    return vocab_file


# --------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs besides the chunk (sent once per chunk; small)."""

    corpus_dir: str
    phase_dir: str
    vocab_file: str
    lower_case: bool
    max_sentence_chars: int
    instance: InstanceSettings


@dataclass
class _ChunkTask:
    index: int
    documents: list[list[str]] | None  # None: the tokenized chunk is already in corpus_dir
    origins: list[str] = field(default_factory=list)  # source files of the chunk (for error messages)


def _vocab_size(vocab_file: str | Path) -> int:
    # Line count (ids are line numbers), as PretrainingDataset and the model's embedding count it.
    return max(read_vocab(vocab_file).values()) + 1


_WORKER: dict[str, Any] = {}  # per process: the tokenizer and its word cache, built once


def _worker_tools(job: _Job) -> dict[str, Any]:
    key = (job.vocab_file, job.lower_case)
    if _WORKER.get("key") != key:
        # Workers are the parallelism; the tokenizer's own thread pool would only oversubscribe the cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        tokenizer = load_tokenizer(job.vocab_file, lower_case=job.lower_case)
        vocab_size = _vocab_size(job.vocab_file)
        special = special_token_ids(tokenizer)
        settings = job.instance
        masking = MaskingSpec.for_vocab(
            vocab_size=vocab_size,
            special=special,
            masked_lm_prob=settings.masked_lm_prob,
            max_predictions_per_seq=settings.max_predictions_per_seq,
            whole_word_mask=settings.whole_word_mask,
            is_continuation=continuation_mask(tokenizer) if settings.whole_word_mask else None,
        )
        _WORKER.update(
            key=key,
            encoder=CachedWordEncoder(tokenizer),
            vocab_size=vocab_size,
            special=special,
            masking=masking,
        )
    return _WORKER


def _tokenize_chunk(
    documents: list[list[str]], encoder: CachedWordEncoder, max_sentence_chars: int
) -> TokenizedChunk:
    sentences: list[str] = []
    sentences_per_doc: list[int] = []
    for lines in documents:
        before = len(sentences)
        for line in lines:
            sentences.extend(split_sentences(line, max_sentence_chars))
        sentences_per_doc.append(len(sentences) - before)
    ids, lengths = encoder.encode_flat(sentences)
    # Drop sentences with no tokens (only control characters, say), then documents left empty.
    keep = lengths > 0
    sentence_offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[keep], out=sentence_offsets[1:])
    doc_of_sentence = np.repeat(np.arange(len(documents)), sentences_per_doc)[keep]
    kept_per_doc = np.bincount(doc_of_sentence, minlength=len(documents))
    document_offsets = np.zeros(int((kept_per_doc > 0).sum()) + 1, dtype=np.int64)
    np.cumsum(kept_per_doc[kept_per_doc > 0], out=document_offsets[1:])
    return TokenizedChunk(ids, sentence_offsets, document_offsets)


def _save_chunk(directory: Path, chunk: TokenizedChunk, vocab_size: int) -> None:
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "tokens.npy", chunk.tokens.astype(id_dtype(vocab_size)))
    np.save(tmp / "sentence_offsets.npy", chunk.sentence_offsets)
    np.save(tmp / "document_offsets.npy", chunk.document_offsets)
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(tmp, directory)


def _load_chunk(directory: Path) -> TokenizedChunk:
    return TokenizedChunk(
        np.load(directory / "tokens.npy"),
        np.load(directory / "sentence_offsets.npy"),
        np.load(directory / "document_offsets.npy"),
    )


def _describe(task: _ChunkTask, job: _Job | None = None) -> str:
    files = list(dict.fromkeys(task.origins))
    if files:
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        return f"chunk {task.index} (documents from {shown})"
    where = f" ({Path(job.corpus_dir) / f'chunk-{task.index:05d}'})" if job else ""
    return f"chunk {task.index}{where}"


def _process_chunk(task: _ChunkTask, job: _Job) -> dict[str, Any]:
    """Tokenize (or load) one chunk and build its instance shard; returns counts for the manifests."""
    try:
        tools = _worker_tools(job)
        corpus_dir, phase_dir = Path(job.corpus_dir), Path(job.phase_dir)
        chunk_dir = corpus_dir / f"chunk-{task.index:05d}"
        start = time.perf_counter()
        if task.documents is not None and not chunk_dir.is_dir():
            chunk = _tokenize_chunk(task.documents, tools["encoder"], job.max_sentence_chars)
            _save_chunk(chunk_dir, chunk, tools["vocab_size"])
        else:
            chunk = _load_chunk(chunk_dir)
        tokenize_seconds = time.perf_counter() - start
        shard_dir = phase_dir / f"shard-{task.index:05d}"
        if shard_dir.is_dir():
            num_instances = int(np.load(shard_dir / "lengths.npy", mmap_mode="r").shape[0])
            instance_tokens = int(np.load(shard_dir / "lengths.npy").astype(np.int64).sum())
        else:
            settings = job.instance
            rows = create_instance_rows(
                chunk,
                special=tools["special"],
                max_seq_length=settings.max_seq_length,
                short_seq_prob=settings.short_seq_prob,
                dupe_factor=settings.dupe_factor,
                seed=settings.seed,
                chunk_index=task.index,
                masking=tools["masking"] if settings.masking == "static" else None,
            )
            num_instances = write_shard(shard_dir, rows, tools["vocab_size"])
            instance_tokens = int(rows["lengths"].astype(np.int64).sum())
        return {
            "index": task.index,
            "documents": chunk.num_documents,
            "sentences": chunk.num_sentences,
            "tokens": len(chunk.tokens),
            "instances": num_instances,
            "instance_tokens": instance_tokens,
            "tokenize_seconds": tokenize_seconds,
            "seconds": time.perf_counter() - start,
        }
    except Exception as err:
        # One clear error for the main process, naming the data, instead of a traceback from a worker.
        raise DataPreparationError(
            f"preparing {_describe(task, job)} failed: {type(err).__name__}: {err}"
        ) from None


# --------------------------------------------------------------------------- main side


def _chunk_tasks(settings: CorpusSettings, stats: ReadStats) -> Iterator[_ChunkTask]:
    documents: list[list[str]] = []
    origins: list[str] = []
    index = 0
    for lines, origin in mix_documents(list(settings.sources), settings.seed, stats):
        documents.append(lines)
        origins.append(origin)
        if len(documents) == settings.documents_per_shard:
            yield _ChunkTask(index, documents, origins)
            documents, origins, index = [], [], index + 1
    if documents:
        yield _ChunkTask(index, documents, origins)


def _run_tasks(tasks: Iterator[_ChunkTask], job: _Job, num_proc: int, bar: tqdm) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    def done(result: dict[str, Any]) -> None:
        results.append(result)
        bar.update(result["documents"])
        bar.set_postfix(chunks=len(results), instances=sum(r["instances"] for r in results), refresh=False)

    if num_proc <= 1:
        for task in tasks:
            done(_process_chunk(task, job))
        return results
    # A bounded window of chunks in flight: reading never runs ahead of the workers by more than this.
    window = 2 * num_proc
    with ProcessPoolExecutor(max_workers=num_proc) as pool:
        pending: deque[tuple[_ChunkTask, Future]] = deque()
        try:
            for task in tasks:
                pending.append((task, pool.submit(_process_chunk, task, job)))
                if len(pending) >= window:
                    done(_result(*pending.popleft()))
            while pending:
                done(_result(*pending.popleft()))
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise
    return results


def _result(task: _ChunkTask, future: Future) -> dict[str, Any]:
    try:
        return future.result()
    except BrokenProcessPool as err:
        raise DataPreparationError(
            f"a worker process died while preparing {_describe(task)} (killed by the OS, most likely out "
            "of memory); lower data.num_proc or data.documents_per_shard"
        ) from err


def prepare_corpus(
    settings: CorpusSettings,
    phase: InstanceSettings,
    cache_dir: Path,
    num_proc: int = 1,
    progress: bool = True,
) -> PreparedData:
    """Build (or reuse) the instance shards of `phase` for the corpus `settings`; see the module docstring."""
    start = time.perf_counter()
    vocab_file = Path(settings.vocab_file).expanduser().resolve()
    if not vocab_file.is_file():
        raise UserError(
            f"vocab file {str(settings.vocab_file)!r} does not exist (data.vocab_file: a BERT "
            "vocab.txt, or null to train one on the corpus)"
        )
    vocab_sha = vocab_sha256(vocab_file)
    corpus_key = _corpus_key(settings, vocab_sha)
    corpus_dir = Path(cache_dir).expanduser() / f"{settings.name}-{_hash(corpus_key)}"
    phase_key = {"corpus": _hash(corpus_key), "instances": asdict(phase), "algorithm": INSTANCES_VERSION}
    phase_dir = corpus_dir / f"seq{phase.max_seq_length}-{_hash(phase_key)}"

    manifest = read_manifest(phase_dir)
    if manifest is not None:
        logger.info("reusing prepared data %s (%d instances)", phase_dir, manifest["num_instances"])
        return PreparedData(phase_dir, manifest, reused=True)

    load_tokenizer(vocab_file, lower_case=settings.lower_case)  # a bad vocab fails here, not in a worker
    vocab_size = _vocab_size(vocab_file)
    phase_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vocab_file, phase_dir / "vocab.txt")
    job = _Job(
        str(corpus_dir),
        str(phase_dir),
        str(vocab_file),
        settings.lower_case,
        settings.max_sentence_chars,
        phase,
    )
    corpus_manifest = _read_corpus_manifest(corpus_dir, corpus_key)
    stats = ReadStats()
    if corpus_manifest is not None:
        logger.info("reusing tokenized corpus %s; building %s instances", corpus_dir, phase_dir.name)
        tasks: Iterator[_ChunkTask] = (_ChunkTask(i, None) for i in range(corpus_manifest["num_chunks"]))
        total = corpus_manifest["documents"]
    else:
        tasks, total = _chunk_tasks(settings, stats), None
    num_proc = max(1, int(num_proc))
    with tqdm(
        total=total,
        unit=" docs",
        desc=f"seq{phase.max_seq_length}",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,
    ) as bar:
        results = _run_tasks(tasks, job, num_proc, bar)
    results.sort(key=lambda r: r["index"])
    if not results or sum(r["documents"] for r in results) == 0:
        raise DataPreparationError(
            f"the sources yielded no documents with text: {[s.label for s in settings.sources]} "
            f"(files read: {stats.files}, empty documents: {stats.empty_documents})"
        )

    totals = {
        k: sum(r[k] for r in results)
        for k in ("documents", "sentences", "tokens", "instances", "instance_tokens")
    }
    if corpus_manifest is None:
        corpus_manifest = {
            "settings": corpus_key,
            "num_chunks": len(results),
            "documents": totals["documents"],
            "sentences": totals["sentences"],
            "tokens": totals["tokens"],
            "read": stats.as_dict(),
            "vocab_file": str(vocab_file),
        }
        write_json_atomic(corpus_dir / "corpus.json", corpus_manifest)
    if totals["instances"] == 0:
        raise DataPreparationError(
            f"the corpus ({totals['documents']} documents, {totals['tokens']} tokens) gave no instances; "
            "it needs at least two documents, or documents of two or more sentences"
        )
    seconds = time.perf_counter() - start
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "settings": {"corpus": corpus_key, "instances": asdict(phase), "corpus_name": settings.name},
        "max_seq_length": phase.max_seq_length,
        "max_predictions_per_seq": phase.max_predictions_per_seq,
        "masking": phase.masking,
        "masking_seed": phase.seed,
        "masked_lm_prob": phase.masked_lm_prob,
        "whole_word_mask": phase.whole_word_mask,
        "lower_case": settings.lower_case,
        "vocab_file": "vocab.txt",
        "vocab_source": str(vocab_file),
        "vocab_sha256": vocab_sha,
        "vocab_size": vocab_size,
        "num_instances": totals["instances"],
        "shards": [{"name": f"shard-{r['index']:05d}", "num_instances": r["instances"]} for r in results],
        "stats": {**totals, "read": corpus_manifest["read"], "num_proc": num_proc},
        "build_seconds": round(seconds, 3),
    }
    write_json_atomic(phase_dir / "manifest.json", manifest)
    logger.info(
        "prepared %d instances (%d documents, %d corpus tokens) in %.1fs -> %s",
        totals["instances"],
        totals["documents"],
        totals["tokens"],
        seconds,
        phase_dir,
    )
    return PreparedData(phase_dir, manifest, reused=False, seconds=seconds)


def _read_corpus_manifest(corpus_dir: Path, corpus_key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        manifest = json.loads((corpus_dir / "corpus.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("settings") != json.loads(json.dumps(corpus_key, default=str)):
        return None
    if not all((corpus_dir / f"chunk-{i:05d}").is_dir() for i in range(manifest["num_chunks"])):
        return None
    return manifest
