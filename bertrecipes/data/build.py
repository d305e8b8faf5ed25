"""Build the pre-training dataset a run's config names (``cfg.data``): for the training engine and for
``python -m bertrecipes.prepare_data``.

``cfg`` is the whole run config: ``cfg.max_seq_length``, ``cfg.max_predictions_per_seq`` and
``cfg.progress_bar`` are read besides ``cfg.data.*``. Each ``data.name`` has one builder in
``_PREPARERS``; a corpus or hdf5 source is prepared into shards once (cached) and then opened
memory-mapped, checked against the run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bertrecipes.data.dataset import PretrainingDataset, build_demo_dataset
from bertrecipes.data.hdf5 import convert_nvidia_hdf5
from bertrecipes.data.masking import MaskingSpec
from bertrecipes.data.prepare import (
    CorpusSettings,
    InstanceSettings,
    PreparedData,
    prepare_corpus,
    train_corpus_vocab,
)
from bertrecipes.data.shards import open_prepared
from bertrecipes.data.sources import DataSourceError, SourceSpec, resolve_paths
from bertrecipes.data.tokenizer import continuation_mask, load_tokenizer, special_token_ids
from bertrecipes.errors import ConfigError

__all__ = [
    "EVAL_SEED",
    "build_eval_dataset",
    "build_pretraining_dataset",
    "build_run_eval_dataset",
    "open_prepared_dataset",
    "prepare_data",
]

logger = logging.getLogger("bertrecipes.data")

# The held-out set's instances and masks: one fixed draw, so evaluations of every run and checkpoint
# with the same vocabulary and shapes score the same predictions.
EVAL_SEED = 20190401


def _num_proc(value: int | None) -> int:
    if value is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if value < 1:
        raise ConfigError(f"data.num_proc must be >= 1 or null (all cores), got {value}")
    return int(value)


def corpus_sources(data: DictConfig) -> tuple[SourceSpec, ...]:
    """The corpus: ``data.paths`` as one source (if any) plus every entry of ``data.sources``."""
    sources = []
    if data.paths:
        sources.append(
            SourceSpec(
                paths=tuple(str(p) for p in data.paths),
                format=data.format,
                text_column=data.text_column,
                weight=float(data.weight),
            )
        )
    for entry in data.sources:
        fields = OmegaConf.to_container(entry, resolve=True)
        fields["paths"] = tuple(str(p) for p in fields.get("paths") or ())
        sources.append(SourceSpec(**fields))
    if not sources:
        raise ConfigError(
            f"data={data.name} has no corpus: give data.paths=[files, directories or globs] "
            "or data.sources=[...]"
        )
    return tuple(sources)


def _prepare_corpus(cfg: DictConfig) -> PreparedData:
    data = cfg.data
    cache_dir = Path(data.cache_dir).expanduser()
    sources = corpus_sources(data)
    vocab_file = data.vocab_file
    if vocab_file is None:
        vocab_file = train_corpus_vocab(sources, data.vocab_size, data.lower_case, data.seed, cache_dir)
    settings = CorpusSettings(
        sources=sources,
        vocab_file=Path(vocab_file),
        lower_case=data.lower_case,
        documents_per_shard=data.documents_per_shard,
        seed=data.seed,
        max_sentence_chars=data.max_sentence_chars,
        name=data.name,
    )
    phase = InstanceSettings(
        max_seq_length=cfg.max_seq_length,
        max_predictions_per_seq=cfg.max_predictions_per_seq,
        masked_lm_prob=data.masked_lm_prob,
        short_seq_prob=data.short_seq_prob,
        dupe_factor=data.dupe_factor,
        whole_word_mask=data.whole_word_mask,
        masking=data.masking,
        seed=data.seed,
    )
    return prepare_corpus(
        settings,
        phase,
        cache_dir,
        num_proc=_num_proc(data.num_proc),
        progress=bool(cfg.get("progress_bar", True)),
    )


def _prepare_nvidia(cfg: DictConfig) -> PreparedData:
    data = cfg.data
    return convert_nvidia_hdf5(
        data.input_dir,
        vocab_file=data.vocab_file,
        lower_case=data.lower_case,
        cache_dir=Path(data.cache_dir).expanduser(),
        max_seq_length=cfg.max_seq_length,
        max_predictions_per_seq=cfg.max_predictions_per_seq,
        num_proc=_num_proc(data.num_proc),
        progress=bool(cfg.get("progress_bar", True)),
    )


def _prepare_demo(cfg: DictConfig) -> PreparedData:
    dataset = _build_demo(cfg)
    return PreparedData(
        dataset.directory, dataset.manifest | {"vocab_source": str(dataset.vocab_file)}, reused=False
    )


def _build_demo(cfg: DictConfig) -> PretrainingDataset:
    data = cfg.data
    return build_demo_dataset(
        data.cache_dir,
        num_documents=data.num_documents,
        corpus_seed=data.corpus_seed,
        vocab_size=data.vocab_size,
        lower_case=data.lower_case,
        max_seq_length=cfg.max_seq_length,
        max_predictions_per_seq=cfg.max_predictions_per_seq,
        masked_lm_prob=data.masked_lm_prob,
        short_seq_prob=data.short_seq_prob,
        dupe_factor=data.dupe_factor,
        whole_word_mask=data.whole_word_mask,
        seed=data.instance_seed,
    )


# data.name -> how to prepare it. Corpus options share one schema (corpus_schema) and one pipeline.
_PREPARERS = {
    "demo": _prepare_demo,
    "text_files": _prepare_corpus,
    "wikipedia_bookcorpus": _prepare_corpus,
    "nvidia_hdf5": _prepare_nvidia,
}


def _preparer(cfg: DictConfig) -> Any:
    name = cfg.data.name
    if name in _PREPARERS:
        return _PREPARERS[name]
    if "sources" in cfg.data:  # a user's own corpus option (corpus_schema) under another name
        return _prepare_corpus
    raise ConfigError(
        f"unknown data source {name!r}; available: {', '.join(_PREPARERS)} "
        "(or any option built on corpus_schema)"
    )


# what prepared shards fix, which a run's data settings cannot change
PREPARED_SETTINGS = ("masking", "masked_lm_prob", "whole_word_mask", "lower_case", "dupe_factor",
                     "short_seq_prob")


def prepare_data(cfg: DictConfig) -> PreparedData:
    """Prepare (or find in the cache) the data `cfg` names, without opening it for training."""
    if cfg.data.get("prepared_dir"):
        directory = Path(cfg.data.prepared_dir).expanduser()
        _, manifest, _ = open_prepared(
            directory,
            max_seq_length=cfg.max_seq_length,
            max_predictions_per_seq=cfg.max_predictions_per_seq,
            vocab_file=cfg.data.get("vocab_file"),
        )
        differ = [f"{key}={manifest[key]!r} (this run's data.{key}={cfg.data[key]!r})"
                  for key in PREPARED_SETTINGS if key in manifest and key in cfg.data
                  and manifest[key] != cfg.data[key]]
        if differ:
            logger.warning("data.prepared_dir=%s holds shards prepared with %s: they are used as they are",
                           directory, ", ".join(differ))
        return PreparedData(directory, {}, reused=True)
    return _preparer(cfg)(cfg)


def open_prepared_dataset(
    directory: str | Path,
    *,
    max_seq_length: int | None = None,
    max_predictions_per_seq: int | None = None,
    vocab_file: str | Path | None = None,
) -> PretrainingDataset:
    """A `PretrainingDataset` over prepared shards, refused (naming both sides) if they do not match."""
    store, manifest, own_vocab = open_prepared(
        directory,
        max_seq_length=max_seq_length,
        max_predictions_per_seq=max_predictions_per_seq,
        vocab_file=vocab_file,
    )
    dynamic = None
    if manifest["masking"] == "dynamic":
        tokenizer = load_tokenizer(own_vocab, lower_case=manifest.get("lower_case", True))
        dynamic = MaskingSpec.for_vocab(
            vocab_size=manifest["vocab_size"],
            special=special_token_ids(tokenizer),
            masked_lm_prob=manifest["masked_lm_prob"],
            max_predictions_per_seq=manifest["max_predictions_per_seq"],
            whole_word_mask=manifest["whole_word_mask"],
            is_continuation=continuation_mask(tokenizer) if manifest["whole_word_mask"] else None,
        )
    return PretrainingDataset(
        store,
        own_vocab,
        manifest,
        dynamic_masking=dynamic,
        masking_seed=int(manifest.get("masking_seed", 0)),
        directory=directory,
    )


def build_pretraining_dataset(cfg: DictConfig) -> PretrainingDataset:
    """The pre-training dataset named by ``cfg.data``: prepared (or reused from the cache), then opened."""
    if cfg.data.name == "demo":
        return _build_demo(cfg)
    prepared = prepare_data(cfg)
    vocab_file = cfg.data.get("vocab_file")
    return open_prepared_dataset(
        prepared.directory,
        max_seq_length=cfg.max_seq_length,
        max_predictions_per_seq=cfg.max_predictions_per_seq,
        vocab_file=vocab_file,
    )


def build_eval_dataset(
    paths: list[str] | tuple[str, ...],
    vocab_file: str | Path,
    *,
    max_seq_length: int,
    max_predictions_per_seq: int,
    cache_dir: str | Path,
    lower_case: bool = True,
    masked_lm_prob: float = 0.15,
    short_seq_prob: float = 0.1,
    whole_word_mask: bool = False,
    num_proc: int | None = 1,
    progress: bool = True,
) -> PretrainingDataset:
    """A held-out set: the text at ``paths`` (files, directories or globs in any local corpus format)
    as fixed instances, tokenized with ``vocab_file``: one pass over the text (dupe_factor 1) and
    static masks drawn with :data:`EVAL_SEED`, so every model evaluated on it with this vocabulary and
    these shapes scores the same predictions. Prepared once in ``cache_dir``, then found there.

    NVIDIA DeepLearningExamples hdf5 shards (one file, directory or glob of ``.hdf5``/``.h5``; MLPerf
    BERT's evaluation set is one) are taken as they are, masks included: the masking settings do not
    apply to them."""
    files = resolve_paths(tuple(str(p) for p in paths))
    hdf5 = [f for f in files if f.suffix.lower() in (".hdf5", ".h5")]
    if hdf5:
        if len(hdf5) != len(files) or len(paths) != 1:
            raise DataSourceError(
                f"held-out data {list(paths)} mixes NVIDIA hdf5 shards with other files or names several "
                "places; give one file, directory or glob of .hdf5 shards, or text files only"
            )
        prepared = convert_nvidia_hdf5(paths[0], vocab_file=vocab_file, lower_case=lower_case,
                                       cache_dir=Path(cache_dir).expanduser(), max_seq_length=max_seq_length,
                                       max_predictions_per_seq=max_predictions_per_seq,
                                       num_proc=_num_proc(num_proc), progress=progress)
        return open_prepared_dataset(prepared.directory, max_seq_length=max_seq_length,
                                     max_predictions_per_seq=max_predictions_per_seq)
    settings = CorpusSettings(
        sources=(SourceSpec(paths=tuple(str(p) for p in paths)),),
        vocab_file=Path(vocab_file),
        lower_case=lower_case,
        seed=EVAL_SEED,
        name="eval",
    )
    phase = InstanceSettings(
        max_seq_length=max_seq_length,
        max_predictions_per_seq=max_predictions_per_seq,
        masked_lm_prob=masked_lm_prob,
        short_seq_prob=short_seq_prob,
        dupe_factor=1,
        whole_word_mask=whole_word_mask,
        masking="static",
        seed=EVAL_SEED,
    )
    prepared = prepare_corpus(settings, phase, Path(cache_dir).expanduser(), num_proc=_num_proc(num_proc),
                              progress=progress)
    return open_prepared_dataset(prepared.directory, max_seq_length=max_seq_length,
                                 max_predictions_per_seq=max_predictions_per_seq)


def build_run_eval_dataset(cfg: DictConfig, vocab_file: str | Path) -> PretrainingDataset:
    """The held-out set of a pre-training run: ``cfg.eval_data`` with the run's vocabulary
    ``vocab_file``, shapes, ``data.lower_case`` and masking rate, in its data cache."""
    data = cfg.data
    return build_eval_dataset(
        cfg.eval_data,
        vocab_file,
        max_seq_length=cfg.max_seq_length,
        max_predictions_per_seq=cfg.max_predictions_per_seq,
        cache_dir=data.cache_dir,
        lower_case=bool(data.get("lower_case", True)),
        masked_lm_prob=float(data.get("masked_lm_prob", 0.15)),
        short_seq_prob=float(data.get("short_seq_prob", 0.1)),
        whole_word_mask=bool(data.get("whole_word_mask", False)),
        num_proc=data.get("num_proc"),
        progress=bool(cfg.get("progress_bar", True)),
    )
