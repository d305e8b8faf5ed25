"""Hugging Face export: transformers loads the result with no missing/unexpected keys and computes our
logits; DS -> HF -> DS is bit-identical; pre-LN models and unsafe output directories are refused.

The reference is the transformers library reading the exported directory (``from_pretrained`` with
``output_loading_info=True``, ``BertTokenizer.from_pretrained``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from bertrecipes.checkpoint import CheckpointError, save_checkpoint
from bertrecipes.errors import UserError
from bertrecipes.export_hf import main
from bertrecipes.interop import export_hf, load_into_model, load_model_state
from bertrecipes.model import BertConfig, BertForPreTraining, BertModel

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=13, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
             max_position_embeddings=16)
# Cased-looking tokens ("Cat"): do_lower_case must then come from the run's config, not the vocabulary.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s", "a", "Cat"]
SHARED_TF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tf_bert_tiny"


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


class TinyQA(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)


def save_ds(root: Path, model: nn.Module, lower_case: bool | None = True) -> Path:
    """A checkpoint as the engine writes it: model, model_config, train_state, client_state.vocab_file,
    and the run's config.yaml."""
    vocab = root / "vocab.txt"
    root.mkdir(parents=True)
    vocab.write_text("\n".join(VOCAB) + "\n")
    config_yaml = None if lower_case is None else f"data:\n  lower_case: {str(lower_case).lower()}\n"
    save_checkpoint(root / "checkpoints", "global_step7",
                    {"model": model.state_dict(), "model_config": model.config.to_dict(),
                     "train_state": {"global_step": 7}},
                    client_state={"vocab_file": str(vocab)}, config_yaml=config_yaml)
    return root / "checkpoints"


def padded_batch():
    ids = torch.tensor([[2, 5, 6, 7, 3, 11, 12, 3], [2, 9, 10, 3, 0, 0, 0, 0]])
    types = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1], [0] * 8])
    return ids, types, (ids != 0).long()


@pytest.fixture
def exported(tmp_path):
    model = randomize(BertForPreTraining(BertConfig(**SMALL)))
    checkpoints = save_ds(tmp_path / "run", model)
    return model, checkpoints, export_hf(checkpoints, tmp_path / "hf")


def test_round_trip_ds_hf_ds_is_bit_identical(exported):
    model, checkpoints, out = exported
    original = load_model_state(checkpoints, ckpt_type="DS")
    assert original.global_step == 7 and original.vocab_file.name == "vocab.txt"
    back = load_model_state(out, ckpt_type="HF")
    assert back.config == original.config
    assert back.state_dict.keys() == original.state_dict.keys() == model.state_dict().keys()
    for key, tensor in original.state_dict.items():
        assert torch.equal(back.state_dict[key], tensor) and back.state_dict[key].dtype == tensor.dtype, key


def test_export_loads_in_transformers_with_our_logits(exported):
    model, _, out = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
    reference, info = transformers.BertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, types, mask = padded_batch()
    with torch.no_grad():
        mlm, nsp = model(ids, types, mask)
        expected = reference.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(mlm[real], expected.prediction_logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(nsp, expected.seq_relationship_logits, atol=1e-5, rtol=0)

    tokenizer = transformers.BertTokenizer.from_pretrained(out)
    # do_lower_case comes from the run's config.yaml (the vocabulary alone would say cased)
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is True
    assert tokenizer("The cats sat", "a CAT")["input_ids"] == [2, 5, 6, 10, 7, 3, 11, 6, 3]


def test_do_lower_case_from_vocabulary_without_run_config(tmp_path):
    model = randomize(BertForPreTraining(BertConfig(**SMALL)))
    checkpoints = save_ds(tmp_path / "run", model, lower_case=None)
    out = export_hf(checkpoints, tmp_path / "hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is False  # "Cat" is cased
    out = export_hf(checkpoints, tmp_path / "hf", do_lower_case=True, force=True)
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is True


def test_question_answering_export(tmp_path):
    model = randomize(TinyQA(BertConfig(**SMALL)))
    checkpoints = save_ds(tmp_path / "run", model)
    out = export_hf(checkpoints, tmp_path / "hf")  # qa_outputs present: exported as QA
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]
    reference, info = transformers.BertForQuestionAnswering.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, types, mask = padded_batch()
    with torch.no_grad():
        start, end = model.qa_outputs(model.bert(ids, types, mask)[0]).unbind(-1)
        expected = reference.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(start[mask.bool()], expected.start_logits[mask.bool()], atol=1e-5, rtol=0)
    torch.testing.assert_close(end[mask.bool()], expected.end_logits[mask.bool()], atol=1e-5, rtol=0)

    back = load_model_state(out, ckpt_type="HF")
    reloaded = TinyQA(back.config)
    load_into_model(reloaded, back, strict_heads=True)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match=r"as BertForPreTraining: it lacks .*--architecture qa"):
        export_hf(checkpoints, tmp_path / "hf2", architecture="pretraining")


def test_pre_layer_norm_model_is_refused(tmp_path):
    model = BertForPreTraining(BertConfig(**SMALL, pre_layer_norm=True))
    checkpoints = save_ds(tmp_path / "run", model)
    with pytest.raises(CheckpointError, match=r"pre-LN model \(pre_layer_norm=true.*post-LN only") as err:
        export_hf(checkpoints, tmp_path / "hf")
    assert "state.pt" in str(err.value) and "model.pre_layer_norm=false" in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_output_directory_rules(exported, tmp_path):
    _, checkpoints, out = exported
    with pytest.raises(UserError, match=f"{out} exists and is not empty.*--force"):
        export_hf(checkpoints, out)
    (out / "stale.txt").write_text("old")
    export_hf(checkpoints, out, force=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_hf(checkpoints, empty) / "config.json").is_file()
    with pytest.raises(ValueError, match="architecture must be one of .*'mlm'"):
        export_hf(checkpoints, tmp_path / "x", architecture="mlm")


def test_command_line(exported, tmp_path, capsys):
    _, checkpoints, _ = exported
    assert main([str(checkpoints), str(tmp_path / "cli"), "--ckpt-type", "ds", "--no-do-lower-case"]) == 0
    assert json.loads((tmp_path / "cli" / "tokenizer_config.json").read_text())["do_lower_case"] is False
    assert main([str(tmp_path / "missing"), str(tmp_path / "cli2")]) == 2
    assert "error: checkpoint path" in capsys.readouterr().err
    assert main([str(checkpoints), str(tmp_path / "cli3"), "--ckpt-type", "HF"]) == 2
    assert "use ckpt_type=DS" in capsys.readouterr().err


def test_output_path_the_os_refuses_is_a_one_line_error(exported, tmp_path, capsys, monkeypatch):
    _, checkpoints, _ = exported
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    for out in (a_file / "x", a_file / "deeper" / "x"):
        assert main([str(checkpoints), str(out)]) == 2
        assert capsys.readouterr().err == f"error: cannot create {out}: {a_file} is not a directory\n"

    import errno

    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "out" / "hf"
    with pytest.raises(UserError) as info:
        export_hf(checkpoints, out)
    assert str(info.value) == f"cannot write {out}: No space left on device"
    assert list((tmp_path / "out").iterdir()) == []  # the partial export is removed


@pytest.mark.skipif(not SHARED_TF.is_dir(), reason=f"{SHARED_TF} absent (the shared data folder)")
def test_tensorflow_checkpoint_to_hugging_face(tmp_path):
    out = tmp_path / "hf"
    assert main([str(SHARED_TF / "bert_model.ckpt"), str(out), "--ckpt-type", "TF"]) == 0
    reference, info = transformers.BertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    imported = load_model_state(SHARED_TF, ckpt_type="TF")
    ours = BertForPreTraining(imported.config).eval()
    load_into_model(ours, imported, strict_heads=True)
    ids = torch.tensor([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 10, 3]])
    mask = (ids != 0).long()
    with torch.no_grad():
        mlm, nsp = ours(ids, torch.zeros_like(ids), mask)
        expected = reference.eval()(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(mlm[mask.bool()], expected.prediction_logits[mask.bool()], atol=1e-5, rtol=0)
    torch.testing.assert_close(nsp, expected.seq_relationship_logits, atol=1e-5, rtol=0)
