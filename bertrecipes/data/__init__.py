"""Pre-training data: corpora -> sentences -> WordPiece ids -> MLM/NSP instance shards -> a resumable loader.

    python -m bertrecipes.prepare_data data=text_files data.paths=[corpus/] data.vocab_file=vocab.txt \
        +phase=seq128                       # raw text to memory-mapped shards (parallel, cached)

    from bertrecipes.data import PretrainingLoader, open_prepared_dataset
    ds = open_prepared_dataset("~/.cache/bertrecipes/text_files-<hash>/seq128-<hash>", max_seq_length=128)
    batches = iter(PretrainingLoader(ds, micro_batch_size=64, seed=0, num_workers=2))

Modules: `sources` (text, WikiExtractor, JSONL, parquet, hub datasets; weighted mixing), `sentences`
(rule-based splitter), `tokenizer` (BERT WordPiece; `CachedWordEncoder`), `instances` (Google's
create_pretraining_data), `masking` (static/dynamic masks), `prepare` (the parallel pipeline),
`shards` (on-disk format, manifest, mismatch checks), `hdf5` (NVIDIA shards), `dataset` (torch
Dataset and loader), `build` (what a run's config names), `demo_corpus` (the embedded corpus).
"""

from bertrecipes.data.build import build_pretraining_dataset, open_prepared_dataset, prepare_data
from bertrecipes.data.dataset import PretrainingDataset, PretrainingLoader, build_demo_dataset
from bertrecipes.data.demo_corpus import generate_demo_corpus
from bertrecipes.data.instances import InstanceArrays, TokenizedChunk, create_instance_rows, create_instances
from bertrecipes.data.masking import MaskingSpec, mask_batch, row_keys
from bertrecipes.data.prepare import CorpusSettings, DataPreparationError, InstanceSettings, prepare_corpus
from bertrecipes.data.sentences import split_sentences
from bertrecipes.data.shards import PreparedDataMismatch, open_prepared
from bertrecipes.data.sources import DataSourceError, SourceSpec, mix_documents
from bertrecipes.data.tokenizer import (
    SPECIAL_TOKENS,
    CachedWordEncoder,
    SpecialTokens,
    continuation_mask,
    load_tokenizer,
    read_vocab,
    special_token_ids,
    train_wordpiece,
    vocab_sha256,
)

__all__ = [
    "SPECIAL_TOKENS",
    "CachedWordEncoder",
    "CorpusSettings",
    "DataPreparationError",
    "DataSourceError",
    "InstanceArrays",
    "InstanceSettings",
    "MaskingSpec",
    "PreparedDataMismatch",
    "PretrainingDataset",
    "PretrainingLoader",
    "SourceSpec",
    "SpecialTokens",
    "TokenizedChunk",
    "build_demo_dataset",
    "build_pretraining_dataset",
    "continuation_mask",
    "create_instance_rows",
    "create_instances",
    "generate_demo_corpus",
    "load_tokenizer",
    "mask_batch",
    "mix_documents",
    "open_prepared",
    "open_prepared_dataset",
    "prepare_corpus",
    "prepare_data",
    "read_vocab",
    "row_keys",
    "special_token_ids",
    "split_sentences",
    "train_wordpiece",
    "vocab_sha256",
]
