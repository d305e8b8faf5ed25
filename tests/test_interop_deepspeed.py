"""DeepSpeed (bing_bert) and NVIDIA DeepLearningExamples checkpoints, read without their code.

DeepSpeed: the engine's directory layout
(``latest`` -> ``<tag>/mp_rank_00_model_states.pt``, the weights under ``module``, fp16 in fp16 runs),
bing_bert's names (``dense_act``, ``PreAttentionLayerNorm`` / ``PostAttentionLayerNorm``) and the
fused transformer kernel's (``attn_qkvw``, ..., ``norm_b``).

The reference is transformers: its ``BertForPreTraining`` with random weights is written out the way
DeepSpeed lays those weights out (renamed here, in the test, from the documented layouts), imported,
and must give transformers' logits. Pre-LN models, which transformers lacks, must equal the same
weights given in our own names, through each of the two pre-LN namings. NVIDIA: ``ckpt_<step>.pt``
with the weights under ``model`` (``dense_act`` names, post-LN) and, mid-run, a pickled object of the
training script's own data-loader class, which cannot be imported where the checkpoint is read."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from test_interop_hf import padded_batch, randomize
from test_squad_engine import TINY, compose_squad, squad_files  # noqa: F401  (the fixture)

from bertrecipes.checkpoint import CheckpointError
from bertrecipes.interop import load_into_model, load_model_state
from bertrecipes.model import BertConfig, BertForPreTraining
from bertrecipes.squad.engine import run

transformers = pytest.importorskip("transformers")

# 64-dimensional heads, as every published BERT has (the config is then readable from the shapes)
ARCH = dict(vocab_size=21, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
            max_position_embeddings=16)
PADDED_VOCAB = 24  # DeepSpeed's BERT pads its vocabulary to a multiple of 8 rows


# DeepSpeedTransformerLayer's parameters (q, k, v are stacked into attn_qkvw / attn_qkvb). Its CUDA
# layer (csrc/transformer/ds_transformer_cuda.cpp) applies, post-LN, attn_n* after the attention's
# residual and norm_* after the feed-forward's; pre-LN, norm_* to the layer's input and attn_n* to
# the attention's residual, before the feed-forward.
KERNEL_NAMES = {"attention.output.dense.weight": "attn_ow", "attention.output.dense.bias": "attn_ob",
                "intermediate.dense_act.weight": "inter_w", "intermediate.dense_act.bias": "inter_b",
                "output.dense.weight": "output_w", "output.dense.bias": "output_b"}
KERNEL_NORMS = {False: {"attention.output.LayerNorm": "attn_n", "output.LayerNorm": "norm_"},  # post-LN
                True: {"attention.output.LayerNorm": "norm_", "output.LayerNorm": "attn_n"}}  # pre-LN


def to_bing_bert(hf_state: dict[str, torch.Tensor], kernel: bool, pre_ln: bool) -> dict[str, torch.Tensor]:
    """transformers' names -> bing_bert's (nvidia/modeling*.py, DeepSpeedTransformerLayer)."""
    out = {}
    for key, value in hf_state.items():
        if key.endswith("position_ids") or key == "cls.predictions.decoder.bias":
            continue
        if key in ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight",
                   "cls.predictions.bias"):  # padded to a multiple of 8 rows
            value = torch.cat([value, value.new_zeros((-value.shape[0] % 8, *value.shape[1:]))])
        key = re.sub(r"(intermediate|pooler|transform)\.dense\.", r"\1.dense_act.", key)
        layer = re.match(r"(bert\.encoder\.layer\.\d+)\.(.*)", key)
        if layer and kernel:
            prefix, rest = layer.groups()
            if rest.startswith("attention.self."):
                kind = rest.rsplit(".", 1)[1]
                if rest.startswith("attention.self.query."):
                    parts = [hf_state[f"{prefix}.attention.self.{n}.{kind}"] for n in ("query", "key",
                                                                                         "value")]
                    out[f"{prefix}.attn_qkv{kind[0]}"] = torch.cat(parts)
                continue
            norm, _, kind = rest.rpartition(".")
            if norm in KERNEL_NORMS[pre_ln]:
                out[f"{prefix}.{KERNEL_NORMS[pre_ln][norm]}{kind[0]}"] = value
            else:
                out[f"{prefix}.{KERNEL_NAMES[rest]}"] = value
            continue
        if layer and pre_ln:
            key = key.replace("attention.output.LayerNorm", "PreAttentionLayerNorm")
            key = key.replace("output.LayerNorm", "PostAttentionLayerNorm")
        out[key] = value
    return out


def write_deepspeed_checkpoint(save_dir: Path, module: dict[str, torch.Tensor], tag: str = "epoch1_step7",
                               steps: int = 7) -> Path:
    """What ``DeepSpeedEngine.save_checkpoint(save_dir, tag, client_state)`` writes for one rank."""
    (save_dir / tag).mkdir(parents=True, exist_ok=True)
    payload = {"module": module, "buffer_names": [], "optimizer": {"state": {}, "param_groups": []},
               "lr_scheduler": {"last_batch_iteration": steps}, "csr_tensor_module_names": set(),
               "skipped_steps": 0, "global_steps": steps, "global_samples": steps * 64, "dp_world_size": 1,
               "mp_world_size": 1, "ds_config": {"train_batch_size": 64}, "ds_version": "0.9.5",
               "epoch": 1, "last_global_step": steps, "last_global_data_samples": steps * 64}
    torch.save(payload, save_dir / tag / "mp_rank_00_model_states.pt")
    (save_dir / "latest").write_text(tag)
    return save_dir


def bing_bert_config(path: Path) -> Path:
    """bing_bert's training config (bert_large_lamb.json's shape): the architecture nested in it, with
    the vocabulary size its files carry (119547), which bing_bert replaces by its tokenizer's."""
    path.write_text(json.dumps({"name": "bing_bert_tiny", "bert_token_file": "bert-large-uncased",
                                "bert_model_file": "bert-large-uncased",
                                "bert_model_config": {"vocab_size_or_config_json_file": 119547,
                                                      **{k: v for k, v in ARCH.items() if k != "vocab_size"},
                                                      "hidden_act": "gelu", "type_vocab_size": 2}}))
    return path


@pytest.fixture(scope="module")
def reference():
    return randomize(transformers.BertForPreTraining(transformers.BertConfig(**ARCH)).double())


def logits(model, ids, types, mask):
    with torch.no_grad():
        return model(ids, types, mask)


def assert_transformers_logits(imported, reference) -> None:
    """``imported`` in our model (its padded rows trimmed) gives transformers' logits (float64)."""
    model = BertForPreTraining(dataclasses.replace(imported.config, vocab_size=ARCH["vocab_size"]))
    model = model.double().eval()
    report = load_into_model(model, imported, strict_heads=True)
    assert report.missing_keys == [] and report.unexpected_keys == []
    ids, types, mask = padded_batch(ARCH["vocab_size"])
    mlm, nsp = logits(model, ids, types, mask)
    expected = reference(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(mlm[real], expected.prediction_logits[real].detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(nsp, expected.seq_relationship_logits.detach(), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kernel", [False, True], ids=["bing_bert_names", "transformer_kernel"])
def test_post_ln_checkpoint_gives_transformers_logits(reference, tmp_path, kernel):
    module = to_bing_bert(reference.state_dict(), kernel=kernel, pre_ln=False)
    save_dir = write_deepspeed_checkpoint(tmp_path / "saved_models" / "bing_bert", module)
    imported = load_model_state(save_dir, "DS", origin_bert_config_file=bing_bert_config(tmp_path / "c.json"))
    assert imported.global_step == 7 and imported.config.pre_layer_norm is False
    assert imported.source.endswith("epoch1_step7/mp_rank_00_model_states.pt")
    assert imported.config.vocab_size == PADDED_VOCAB  # the rows it holds
    assert_transformers_logits(imported, reference)


def test_pre_ln_checkpoints_in_both_namings_equal_our_own_names(tmp_path):
    ours = randomize(BertForPreTraining(BertConfig(**ARCH, pre_layer_norm=True)).double(), seed=3)
    hf_names = {**ours.state_dict(), "cls.predictions.decoder.weight": ours.state_dict()[
        "bert.embeddings.word_embeddings.weight"]}
    ids, types, mask = padded_batch(ARCH["vocab_size"])
    expected_mlm, expected_nsp = logits(ours, ids, types, mask)
    for kernel in (False, True):
        module = to_bing_bert(hf_names, kernel=kernel, pre_ln=True)
        assert ("bert.encoder.layer.0.PreAttentionLayerNorm.weight" in module) is not kernel
        path = write_deepspeed_checkpoint(tmp_path / f"k{kernel}", module) / "epoch1_step7"
        imported = load_model_state(path, "DS")  # no config: read from the shapes
        assert imported.config == BertConfig(**{**ARCH, "vocab_size": PADDED_VOCAB}, pre_layer_norm=True)
        model = BertForPreTraining(BertConfig(**ARCH, pre_layer_norm=True)).double().eval()
        report = load_into_model(model, imported, strict_heads=True)
        assert report.missing_keys == [] and report.unexpected_keys == []
        mlm, nsp = logits(model, ids, types, mask)
        real = mask.bool()
        torch.testing.assert_close(mlm[real], expected_mlm[real], atol=0, rtol=0)
        torch.testing.assert_close(nsp, expected_nsp, atol=0, rtol=0)


def test_a_pre_ln_checkpoint_into_a_post_ln_model_names_the_setting(tmp_path):
    ours = randomize(BertForPreTraining(BertConfig(**ARCH, pre_layer_norm=True)), seed=3)
    write_deepspeed_checkpoint(tmp_path / "pre", to_bing_bert(ours.state_dict(), kernel=True, pre_ln=True))
    imported = load_model_state(tmp_path / "pre", "DS")
    with pytest.raises(CheckpointError, match="is pre-LN but the model is post-LN: set model.pre_layer_n"):
        load_into_model(BertForPreTraining(BertConfig(**ARCH)), imported)


def test_fp16_weights_become_fp32_and_the_file_itself_can_be_named(reference, tmp_path):
    module = {k: v.half() for k, v in to_bing_bert(reference.state_dict(), kernel=True, pre_ln=False).items()}
    write_deepspeed_checkpoint(tmp_path / "ckpt", module, tag="epoch3_step100", steps=100)
    imported = load_model_state(tmp_path / "ckpt" / "epoch3_step100" / "mp_rank_00_model_states.pt", "DS")
    assert imported.global_step == 100
    assert all(t.dtype == torch.float32 for t in imported.state_dict.values())
    query = reference.state_dict()["bert.encoder.layer.1.attention.self.value.weight"]
    assert torch.equal(imported.state_dict["bert.encoder.layer.1.attention.self.value.weight"],
                       query.half().float())


def test_squad_fine_tunes_from_a_bing_bert_checkpoint(squad_files, tmp_path):  # noqa: F811
    data, vocab = squad_files
    vocab_size = len(Path(vocab).read_text().splitlines())
    arch = {**ARCH, "vocab_size": vocab_size, "max_position_embeddings": 64}
    reference = randomize(transformers.BertForPreTraining(transformers.BertConfig(**arch)), seed=5)
    module = to_bing_bert(reference.state_dict(), kernel=True, pre_ln=False)
    padded = module["bert.embeddings.word_embeddings.weight"].shape[0]
    assert padded % 8 == 0
    save_dir = write_deepspeed_checkpoint(tmp_path / "bing", module)
    summary = run(compose_squad(*[o for o in TINY if not o.startswith("model.")], f"train_file={data}",
                                f"predict_file={data}", f"vocab_file={vocab}", f"model_file={save_dir}",
                                "ckpt_type=DS", "max_steps=2", f"output_dir={tmp_path / 'run'}"))
    assert summary["global_step"] == 2 and "f1" in summary["eval"]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "global_step2" / "state.pt", weights_only=False)
    assert saved["model_config"]["hidden_size"] == 128 and saved["model_config"]["num_attention_heads"] == 2


def test_bad_deepspeed_checkpoints_are_named(reference, tmp_path):
    module = to_bing_bert(reference.state_dict(), kernel=False, pre_ln=False)
    write_deepspeed_checkpoint(tmp_path / "mp", module)
    (tmp_path / "mp" / "epoch1_step7" / "mp_rank_01_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model-parallel checkpoint"):
        load_model_state(tmp_path / "mp", "DS")

    # ZeRO stage 3: per-rank files whose module holds empty placeholders for partitioned weights
    (tmp_path / "zero3" / "global_step5").mkdir(parents=True)
    torch.save({"module": {k: torch.empty(0) for k in module}, "ds_version": "0.9.5"},
               tmp_path / "zero3" / "global_step5" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    (tmp_path / "zero3" / "latest").write_text("global_step5")
    with pytest.raises(CheckpointError, match="only empty placeholders.*zero_to_fp32.py"):
        load_model_state(tmp_path / "zero3", "DS")

    # releases that wrote no `latest`: the tags are listed
    write_deepspeed_checkpoint(tmp_path / "nolatest", module, tag="global_step3")
    write_deepspeed_checkpoint(tmp_path / "nolatest", module, tag="global_step9")
    (tmp_path / "nolatest" / "latest").unlink()
    with pytest.raises(CheckpointError, match="checkpoints .global_step3, global_step9. but no 'latest'"):
        load_model_state(tmp_path / "nolatest", "DS")

    broken = write_deepspeed_checkpoint(tmp_path / "broken", module) / "epoch1_step7"
    broken = broken / "mp_rank_00_model_states.pt"
    broken.write_bytes(broken.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model_states.pt is not a readable DeepSpeed checkpoint"):
        load_model_state(tmp_path / "broken", "DS")

    odd = to_bing_bert(randomize(transformers.BertForPreTraining(transformers.BertConfig(
        **{**ARCH, "hidden_size": 96, "num_attention_heads": 3}))).state_dict(), kernel=False, pre_ln=False)
    write_deepspeed_checkpoint(tmp_path / "odd", odd)
    with pytest.raises(CheckpointError, match="hidden size 96 is not a multiple of 64.*origin_bert_config"):
        load_model_state(tmp_path / "odd", "DS")
    with pytest.raises(CheckpointError, match="looks like a bertrecipes .DS. checkpoint .it holds latest"):
        load_model_state(tmp_path / "odd", "HF")


def test_sparse_attention_layout_is_dropped_with_a_warning(reference, tmp_path, caplog):
    module = to_bing_bert(reference.state_dict(), kernel=False, pre_ln=False)
    module["bert.encoder.layer.0.attention.self.sparse_self_attention.master_layout"] = torch.ones(2, 4, 4)
    write_deepspeed_checkpoint(tmp_path / "sparse", module)
    imported = load_model_state(tmp_path / "sparse", "DS")
    assert not any("master_layout" in k for k in imported.state_dict)
    assert "sparse attention" in caplog.text


# ------------------------------------------------------------------ NVIDIA DeepLearningExamples

class _ShardedLoader:
    """Stands for the training script's data loader, pickled into NVIDIA's checkpoints mid-run."""

    def __init__(self, files):
        self.files = files


def save_nvidia_checkpoint(path: Path, model_state: dict[str, torch.Tensor], with_loader: bool) -> Path:
    """What DeepLearningExamples' run_pretraining.py saves: ``torch.save({'model': ..., 'optimizer':
    ..., 'master params': ..., 'files': ..., 'epoch': ..., 'data_loader': ...}, 'ckpt_<step>.pt')``,
    the loader being an object of a class of that script (a module not importable when loading)."""
    import sys
    import types

    script = types.ModuleType("run_pretraining_script")
    loader_class = type("PretrainingLoader", (_ShardedLoader,), {"__module__": script.__name__})
    script.PretrainingLoader = loader_class
    sys.modules[script.__name__] = script
    try:
        torch.save({"model": model_state, "optimizer": {"state": {}, "param_groups": [{"lr": 6e-3}]},
                    "master params": [t.clone() for t in list(model_state.values())[:2]],
                    "files": [3, "part_00003.hdf5"], "epoch": 0,
                    "data_loader": loader_class(["a.hdf5"]) if with_loader else None}, path)
    finally:
        del sys.modules[script.__name__]
    return path


def test_nvidia_checkpoint_gives_transformers_logits_with_its_loader_pickled(reference, tmp_path, caplog):
    model_state = to_bing_bert(reference.state_dict(), kernel=False, pre_ln=False)  # dense_act, post-LN
    assert "bert.encoder.layer.0.intermediate.dense_act.weight" in model_state
    path = save_nvidia_checkpoint(tmp_path / "ckpt_8601.pt", model_state, with_loader=True)
    (tmp_path / "bert_config.json").write_text(json.dumps({**ARCH, "hidden_act": "gelu"}))  # NVIDIA's
    imported = load_model_state(path, "DS", origin_bert_config_file=tmp_path / "bert_config.json")
    assert "run_pretraining_script.PretrainingLoader" in caplog.text  # skipped, and said so
    assert imported.global_step == 8601 and imported.config.pre_layer_norm is False
    assert_transformers_logits(imported, reference)


def test_an_nvidia_results_directory_gives_its_newest_checkpoint(reference, tmp_path):
    from bertrecipes.interop.load import detect_checkpoint_type

    model_state = to_bing_bert(reference.state_dict(), kernel=False, pre_ln=False)
    for step in (900, 8601, 1200):
        save_nvidia_checkpoint(tmp_path / f"ckpt_{step}.pt", model_state, with_loader=False)
    assert detect_checkpoint_type(tmp_path)[0] == "DS"
    imported = load_model_state(tmp_path, "DS")
    assert imported.global_step == 8601 and imported.source.endswith("ckpt_8601.pt")
    with pytest.raises(CheckpointError, match="ckpt_8601.pt, an NVIDIA DeepLearningExamples .*ckpt_type=DS"):
        load_model_state(tmp_path, "HF")


def test_nvidia_squad_checkpoint_brings_its_qa_layer(squad_files, tmp_path):  # noqa: F811
    """NVIDIA's run_squad.py saves {'model': BertForQuestionAnswering's state}: predicting from it
    uses its qa_outputs, as our SQuAD run does with transformers' same model."""
    from bertrecipes.squad.engine import build_model, load_initial_model

    _, vocab = squad_files
    vocab_size = len(Path(vocab).read_text().splitlines())
    arch = {**ARCH, "vocab_size": vocab_size, "max_position_embeddings": 64}
    qa = randomize(transformers.BertForQuestionAnswering(transformers.BertConfig(**arch)), seed=7)
    save_nvidia_checkpoint(tmp_path / "pytorch_model.pt",
                           to_bing_bert(qa.state_dict(), kernel=False, pre_ln=False), with_loader=False)
    cfg = compose_squad("do_train=false", f"model_file={tmp_path / 'pytorch_model.pt'}", "dropout=0.0",
                        f"vocab_file={vocab}", "max_seq_length=64", "output_dir=/tmp/unused")
    model = build_model(cfg, load_initial_model(cfg), vocab_size).eval()
    ids, types, mask = padded_batch(vocab_size)
    with torch.no_grad():
        start, end = model(ids, types, mask)
        expected = qa(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(start[real], expected.start_logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(end[real], expected.end_logits[real], atol=1e-5, rtol=0)
