"""Pre-training data: synthetic demo corpus, WordPiece tokenizer, MLM/NSP instances, cached dataset, loader.

    from bertrecipes.data import build_demo_dataset, PretrainingLoader
    ds = build_demo_dataset("cache", num_documents=2000, corpus_seed=0, vocab_size=4000, lower_case=True,
                            max_seq_length=128, max_predictions_per_seq=20, masked_lm_prob=0.15,
                            short_seq_prob=0.1, dupe_factor=5, whole_word_mask=False, seed=12345)
    batches = iter(PretrainingLoader(ds, micro_batch_size=32, seed=0))
"""

from bertrecipes.data.dataset import PretrainingDataset, PretrainingLoader, build_demo_dataset
from bertrecipes.data.demo_corpus import generate_demo_corpus
from bertrecipes.data.instances import InstanceArrays, create_instances
from bertrecipes.data.tokenizer import (
    SPECIAL_TOKENS,
    SpecialTokens,
    continuation_mask,
    load_tokenizer,
    read_vocab,
    special_token_ids,
    train_wordpiece,
)

__all__ = [
    "SPECIAL_TOKENS",
    "InstanceArrays",
    "PretrainingDataset",
    "PretrainingLoader",
    "SpecialTokens",
    "build_demo_dataset",
    "continuation_mask",
    "create_instances",
    "generate_demo_corpus",
    "load_tokenizer",
    "read_vocab",
    "special_token_ids",
    "train_wordpiece",
]
