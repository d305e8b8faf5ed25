"""Checkpoint interop: import DS (ours), Hugging Face and TensorFlow BERT checkpoints; export to Hugging Face.

    from bertrecipes.interop import load_into_model, load_model_state
    imported = load_model_state("bert_model.ckpt", ckpt_type="TF")    # or "HF", "DS"
    load_into_model(model, imported)                                   # checks shapes, names leftovers

    python -m bertrecipes.export_hf runs/x/checkpoints hf_model/      # DS -> Hugging Face directory
"""

from bertrecipes.interop.export import export_hf, hf_config_dict, to_hf_state_dict
from bertrecipes.interop.load import (
    CKPT_TYPES,
    ImportedCheckpoint,
    LoadReport,
    detect_checkpoint_type,
    load_into_model,
    load_model_state,
    read_bert_config,
)
from bertrecipes.interop.tf_bundle import TFBundle
from bertrecipes.interop.vocab import check_vocab_file, fit_vocab_size, is_padded_vocab, vocab_file_size

__all__ = [
    "CKPT_TYPES",
    "ImportedCheckpoint",
    "LoadReport",
    "TFBundle",
    "check_vocab_file",
    "detect_checkpoint_type",
    "export_hf",
    "fit_vocab_size",
    "hf_config_dict",
    "is_padded_vocab",
    "load_into_model",
    "load_model_state",
    "read_bert_config",
    "to_hf_state_dict",
    "vocab_file_size",
]
