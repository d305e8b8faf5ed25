"""Build the pre-training dataset a run's config names (``cfg.data``), for the training engine."""

from __future__ import annotations

from omegaconf import DictConfig

from bertrecipes.data.dataset import PretrainingDataset, build_demo_dataset
from bertrecipes.errors import ConfigError


def build_pretraining_dataset(cfg: DictConfig) -> PretrainingDataset:
    """The pre-training dataset named by ``cfg.data.name``."""
    data = cfg.data
    if data.name == "demo":
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
    raise ConfigError(f"unknown data source {data.name!r}; available: demo")
