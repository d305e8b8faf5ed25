"""Padded vocabularies (NVIDIA pads 30522 -> 30528; here 13 <-> 16) load both ways; other sizes are errors.

Reference: the model the checkpoint came from. Trimming or zero-padding the unused rows must leave
the MLM logits of every real token as they were.
"""

from __future__ import annotations

import json

import pytest
import torch

from bertrecipes.checkpoint import CheckpointError, save_checkpoint
from bertrecipes.interop import check_vocab_file, fit_vocab_size, load_into_model, load_model_state
from bertrecipes.model import BertConfig, BertForPreTraining

SMALL = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
             max_position_embeddings=16)


def random_model(vocab_size: int, seed: int = 0) -> BertForPreTraining:
    torch.manual_seed(seed)
    model = BertForPreTraining(BertConfig(vocab_size=vocab_size, **SMALL))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def save_ds(directory, model: BertForPreTraining):
    return save_checkpoint(directory, "global_step5", {"model": model.state_dict(),
                                                      "model_config": model.config.to_dict()})


def logits(model, vocab_size: int):
    ids = torch.tensor([[2, 5, 7, 12, 3, 0], [2, 1, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        mlm, nsp = model(ids, torch.zeros_like(ids), mask)
    return mlm[mask.bool()], nsp


@pytest.mark.parametrize("saved, wanted", [(16, 13), (13, 16)])
def test_padded_vocab_loads_both_ways(tmp_path, saved, wanted):
    source = random_model(saved)
    imported = load_model_state(save_ds(tmp_path, source), ckpt_type="DS")
    assert imported.config.vocab_size == saved
    target = BertForPreTraining(BertConfig(vocab_size=wanted, **SMALL)).eval()
    load_into_model(target, imported, strict_heads=True)

    real = min(saved, wanted)
    source_mlm, source_nsp = logits(source, saved)
    target_mlm, target_nsp = logits(target, wanted)
    assert torch.equal(target.bert.embeddings.word_embeddings.weight[:real],
                       source.bert.embeddings.word_embeddings.weight[:real])
    assert target.cls.predictions.decoder.weight is target.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(target_mlm[:, :real], source_mlm[:, :real], atol=1e-6, rtol=0)
    torch.testing.assert_close(target_nsp, source_nsp, atol=1e-6, rtol=0)
    if wanted > saved:  # added rows are zeros: their logits are 0
        assert torch.all(target.bert.embeddings.word_embeddings.weight[saved:] == 0)
        assert torch.all(target_mlm[:, saved:] == 0)


@pytest.mark.parametrize("saved, wanted", [(13, 24), (16, 8), (13, 17), (24, 16)])
def test_real_vocab_mismatch_names_both_sizes(saved, wanted):
    state = {k: v for k, v in random_model(saved).state_dict().items()}
    with pytest.raises(CheckpointError, match=f"checkpoint vocabulary {saved} vs tokenizer/config {wanted}"):
        fit_vocab_size(state, wanted, source="ckpt.pt")


def test_vocab_mismatch_when_loading_names_file(tmp_path):
    imported = load_model_state(save_ds(tmp_path, random_model(13)), ckpt_type="DS")
    with pytest.raises(CheckpointError, match="checkpoint vocabulary 13 vs tokenizer/config 30") as err:
        load_into_model(BertForPreTraining(BertConfig(vocab_size=30, **SMALL)), imported)
    assert imported.source in str(err.value) and imported.source.endswith("state.pt")


def test_config_json_with_unpadded_vocab_size_describes_the_padded_tensors(tmp_path):
    """NVIDIA's bert_config.json says 30522 while its tensors have 30528 rows."""
    transformers = pytest.importorskip("transformers")
    model = transformers.BertForPreTraining(transformers.BertConfig(vocab_size=16, **SMALL))
    model.save_pretrained(tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "vocab_size": 13}))
    imported = load_model_state(tmp_path / "hf", ckpt_type="HF")
    assert imported.config.vocab_size == 16


def test_check_vocab_file(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(f"t{i}\n" for i in range(13)))
    assert check_vocab_file(vocab, 13) == 13
    assert check_vocab_file(vocab, 16) == 13  # the checkpoint is padded
    with pytest.raises(CheckpointError, match=r"vocab\.txt has 13 tokens but ckpt has a vocabulary of 24"):
        check_vocab_file(vocab, 24, source="ckpt")
    with pytest.raises(CheckpointError, match=str(vocab)):
        check_vocab_file(vocab, 24)
    vocab.write_text("".join(f"t{i}\n" for i in range(16)))
    with pytest.raises(CheckpointError, match="16 tokens .* vocabulary of 13 rows"):
        check_vocab_file(vocab, 13)
