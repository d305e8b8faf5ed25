"""Progressive layer dropping (``progressive_layer_drop``): the keep-ratio schedule and per-layer
probabilities against their formulas, the draws' frequencies, the encoder with skipped and scaled
layers against an independent float64 implementation (outputs and gradients, pre-LN and post-LN,
padded and unpadded), the Triton layer's branch scale against the PyTorch layer's, and the engine:
metrics, exact resume, no change when nothing is dropped, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bertrecipes.engine import train
from bertrecipes.errors import ConfigError
from bertrecipes.layer_drop import ProgressiveLayerDrop, expected_layers, keep_probabilities, pld_theta
from bertrecipes.model import BertConfig, BertForPreTraining, training_flops_per_sample

# ----------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("theta,gamma", [(0.5, 0.001), (0.3, 0.05), (1.0, 0.01)])
def test_keep_ratio_follows_deepspeeds_formula(theta, gamma):
    for step in (0, 1, 10, 500, 10_000):
        want = (1 - theta) * math.exp(-gamma * step) + theta  # theta_bar(t) of the PLD paper
        assert pld_theta(step, theta, gamma) == pytest.approx(want, rel=1e-15)
    assert pld_theta(0, theta, gamma) == 1.0  # every layer at the first step
    # DeepSpeed's engine updates theta after a step from the count before it: step n+1 uses theta(n-1)
    pld = ProgressiveLayerDrop(4, theta, gamma, seed=0)
    assert pld.theta_at(0) == pld.theta_at(1) == 1.0
    assert [pld.theta_at(n) for n in (2, 11, 501)] == [pld_theta(n - 1, theta, gamma) for n in (2, 11, 501)]


def test_layer_keep_probabilities_fall_linearly_with_depth():
    p = keep_probabilities(24, 0.5)
    assert p[0] == 1.0
    assert p[-1] == pytest.approx(1 - 23 / 24 * 0.5)
    assert np.diff(p) == pytest.approx([-0.5 / 24] * 23)
    # the mean depth a micro-batch runs: L - (1 - theta) (L - 1) / 2
    assert expected_layers(24, 0.5) == pytest.approx(24 - 0.5 * 23 / 2)
    assert expected_layers(24, 0.5) / 24 == pytest.approx(0.760, abs=5e-4)  # the docstring's figure


def test_draws_keep_each_layer_at_its_probability_and_are_reproducible():
    pld = ProgressiveLayerDrop(num_layers=6, theta=0.4, gamma=1.0, seed=3)  # theta(t) = 0.4 from step 40
    p = keep_probabilities(6, 0.4)
    draws = np.array([pld.draw(step, micro) for step in range(100, 350) for micro in range(8)])
    for i in range(6):
        kept = draws[:, i] > 0
        assert set(draws[kept, i]) == {p[i]}  # a kept layer carries its own keep probability
        n = len(draws)
        assert abs(kept.mean() - p[i]) < 4 * math.sqrt(p[i] * (1 - p[i]) / n) + 1e-12, i
    assert pld.draw(107, 3) == ProgressiveLayerDrop(6, 0.4, 1.0, seed=3).draw(107, 3)
    assert len({pld.draw(107, micro) for micro in range(20)}) > 1
    assert len({pld.draw(step, 3) for step in range(100, 120)}) > 1
    assert len({ProgressiveLayerDrop(6, 0.4, 1.0, seed=s).draw(100, 0) for s in range(20)}) > 1
    assert ProgressiveLayerDrop(6, 0.4, 0.0, seed=3).draw(100, 0) == (1.0,) * 6  # gamma 0: theta(t) = 1
    negative = ProgressiveLayerDrop(6, 0.4, 1.0, seed=-1)  # any seed the run takes
    assert len({negative.draw(100, micro) for micro in range(20)}) > 1


@pytest.mark.parametrize("theta,gamma", [(0.0, 0.001), (1.5, 0.001), (0.5, -1.0), (0.5, float("nan"))])
def test_bad_settings_are_refused_naming_them(theta, gamma):
    with pytest.raises(ConfigError, match="progressive_layer_drop"):
        ProgressiveLayerDrop(4, theta, gamma, seed=0)


def test_flop_count_takes_the_layers_that_ran():
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=256)
    full = training_flops_per_sample(config, 128, 20)
    heads = training_flops_per_sample(config, 128, 20, layers=0)
    assert training_flops_per_sample(config, 128, 20, layers=4) == full
    assert training_flops_per_sample(config, 128, 20, layers=2.5) == \
        pytest.approx(heads + 2.5 / 4 * (full - heads))
    h, i = 64, 256
    assert full - heads == pytest.approx(3 * 4 * 128 * (2 * (4 * h * h + 2 * h * i) + 4 * 128 * h))


# ----------------------------------------------------------------------------- the model


def reference_encoder(params: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor,
                      config: BertConfig, layer_keep) -> torch.Tensor:
    """BERT's encoder written out with functional ops from the parameters, PLD as bing_bert's
    modelingpreln_layerdrop.py applies it (skip, or scale both branches by 1 / keep)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    d = hidden // heads
    batch, seq, _ = x.shape
    bias = torch.zeros(batch, 1, 1, seq, dtype=x.dtype).masked_fill(~mask[:, None, None, :], -math.inf)

    def ln(h, name):
        weight, bias_ = params[name + ".weight"], params[name + ".bias"]
        return F.layer_norm(h, (hidden,), weight, bias_, config.layer_norm_eps)

    for i, keep in enumerate(layer_keep):
        if keep == 0:
            continue
        scale = 1.0 / keep
        prefix = f"bert.encoder.layer.{i}."

        def lin(h, name, prefix=prefix):
            return F.linear(h, params[prefix + name + ".weight"], params[prefix + name + ".bias"])

        def attention(h, lin=lin):
            q, k, v = (lin(h, f"attention.self.{n}").view(batch, seq, heads, d).transpose(1, 2)
                       for n in ("query", "key", "value"))
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
            return lin((probs @ v).transpose(1, 2).reshape(batch, seq, hidden), "attention.output.dense")

        def ffn(h, lin=lin):
            return lin(F.gelu(lin(h, "intermediate.dense")), "output.dense")

        if config.pre_layer_norm:
            x = x + scale * attention(ln(x, prefix + "attention.output.LayerNorm"))
            x = x + scale * ffn(ln(x, prefix + "output.LayerNorm"))
        else:
            x = ln(x + scale * attention(x), prefix + "attention.output.LayerNorm")
            x = ln(x + scale * ffn(x), prefix + "output.LayerNorm")
    return ln(x, "bert.encoder.FinalLayerNorm") if config.pre_layer_norm else x


def tiny_config(pre_layer_norm: bool, layers: int = 4) -> BertConfig:
    return BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      max_position_embeddings=16, pre_layer_norm=pre_layer_norm)


@pytest.mark.parametrize("pre_layer_norm", [True, False])
def test_encoder_skips_and_scales_layers_as_the_reference(pre_layer_norm):
    torch.manual_seed(0)
    config = tiny_config(pre_layer_norm)
    model = BertForPreTraining(config).double().train()
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    mask = torch.arange(10)[None] < torch.tensor([10, 7, 4])[:, None]
    grad = torch.randn_like(x)
    keep = (1.0, 0.0, 0.7, 0.4)

    out = model.bert.encoder(x, mask, keep)
    out.backward(grad)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    want = reference_encoder(params, x, mask, config, keep)
    want.backward(grad)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        if not name.startswith("bert.encoder."):
            continue
        if name.startswith("bert.encoder.layer.1."):  # skipped: no gradient at all
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    # every layer at 1: the plain encoder
    torch.testing.assert_close(model.bert.encoder(x, mask, (1.0,) * 4), model.bert.encoder(x, mask))
    with pytest.raises(ValueError, match=r"one number in \[0, 1\] for each of the 4 layers"):
        model.bert.encoder(x, mask, (1.0,) * 3)
    with pytest.raises(ValueError, match=r"got \(1.0, 1.5, 1.0, 1.0\)"):
        model.bert.encoder(x, mask, (1.0, 1.5, 1.0, 1.0))
    # in eval mode every layer runs, unscaled (DeepSpeed passes the draw to training forwards only)
    model.eval()
    torch.testing.assert_close(model.bert.encoder(x, mask, keep), model.bert.encoder(x, mask), rtol=0, atol=0)


def test_unpadded_model_drops_layers_as_the_padded_one():
    torch.manual_seed(1)
    config = tiny_config(pre_layer_norm=True)
    padded = BertForPreTraining(config).double().train()
    unpadded = BertForPreTraining(config, unpad=True).double().train()
    unpadded.load_state_dict(padded.state_dict())
    ids = torch.randint(5, 50, (3, 12))
    mask = (torch.arange(12)[None] < torch.tensor([12, 9, 5])[:, None]).long()
    positions = torch.tensor([[1, 2], [3, 8], [0, 4]])
    keep = (1.0, 0.6, 0.0, 0.45)
    for a, b in zip(padded(ids, None, mask, positions, layer_keep=keep),
                    unpadded(ids, None, mask, positions, layer_keep=keep), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and dropping changes the result (the draw reaches the encoder)
    assert not torch.allclose(padded(ids, None, mask, positions, layer_keep=keep)[0],
                              padded(ids, None, mask, positions)[0])


@pytest.mark.parametrize("pre_layer_norm", [True, False])
def test_triton_layer_scales_its_branches_as_the_torch_layer(pre_layer_norm):
    from triton_kernels import load_kernels

    kt, device = load_kernels()
    from bertrecipes.model.bert import BertLayer

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=16, pre_layer_norm=pre_layer_norm)
    torch.manual_seed(2)
    ours = BertLayer(config).to(device)
    fused = kt.TritonBertLayer(config).to(device)
    fused.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 32, device=device)
    mask = (torch.arange(8)[None] < torch.tensor([8, 5])[:, None]).to(device)
    grad = torch.randn_like(x)
    results = []
    for layer in (ours, fused):
        xi = x.clone().requires_grad_()
        out = layer(xi, mask, branch_scale=1 / 0.55)
        out.backward(grad)
        results.append((out.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (a, ga, pa), (b, gb, pb) = results
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], rtol=1e-4, atol=1e-5, msg=name)
    unscaled = fused(x, mask)
    assert not torch.allclose(unscaled, b, atol=1e-3)  # the scale does reach the fused layer
    # the scale is the kernels' argument: the backward keeps what an unscaled layer keeps
    from saved_tensors import saved_bytes

    _, scaled_bytes = saved_bytes(lambda: fused(x.clone().requires_grad_(), mask, branch_scale=1 / 0.55))
    _, plain_bytes = saved_bytes(lambda: fused(x.clone().requires_grad_(), mask))
    assert scaled_bytes == plain_bytes


# ----------------------------------------------------------------------------- the engine

TINY = [
    "data.num_documents=120", "data.vocab_size=400", "data.dupe_factor=2",
    "max_seq_length=64", "max_predictions_per_seq=10",
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=4",
    "model.pre_layer_norm=true",
    "train_batch_size=8", "train_micro_batch_size_per_gpu=4", "steps_per_print=1",
    "scheduler.warmup_proportion=0.2", "scheduler.decay_step=2", "scheduler.decay_rate=0.9",
]
PLD = ["progressive_layer_drop.enabled=true", "progressive_layer_drop.theta=0.3",
       "progressive_layer_drop.gamma=0.4"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_logs_the_keep_ratio_and_the_layers_run(make_cfg, tmp_path):
    train(make_cfg(*TINY, *PLD, "max_steps=5", output_dir=tmp_path / "pld"))
    train(make_cfg(*TINY, "max_steps=5", output_dir=tmp_path / "full"))
    pld, full = read_metrics(tmp_path / "pld"), read_metrics(tmp_path / "full")
    draws = ProgressiveLayerDrop(4, 0.3, 0.4, seed=42)
    for record in pld:
        step = record["step"]
        assert record["pld_theta"] == pytest.approx(pld_theta(max(step - 2, 0), 0.3, 0.4))
        ran = sum(k > 0 for micro in range(2) for k in draws.draw(step - 1, micro))
        assert record["pld_layers"] == pytest.approx(ran / 8)
    assert pld[0]["pld_layers"] == 1.0 and min(r["pld_layers"] for r in pld) < 1.0
    assert pld[0]["loss"] == full[0]["loss"]  # the first step runs every layer, unscaled
    assert pld[-1]["loss"] != full[-1]["loss"]
    assert "pld_theta" not in full[0]


def test_keeping_every_layer_changes_nothing(make_cfg, tmp_path):
    """theta 1: every layer at probability 1, so the run is the plain one (dropout on: the draws do
    not touch the run's random streams)."""
    train(make_cfg(*TINY, "max_steps=3", "progressive_layer_drop.enabled=true",
                   "progressive_layer_drop.theta=1.0", output_dir=tmp_path / "pld"))
    train(make_cfg(*TINY, "max_steps=3", output_dir=tmp_path / "full"))
    a, b = read_metrics(tmp_path / "pld"), read_metrics(tmp_path / "full")
    for key in ("loss", "grad_norm", "lamb_coeff_mean"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert [r["pld_layers"] for r in a] == [1.0] * 3


def test_a_resumed_run_drops_the_layers_of_the_uninterrupted_one(make_cfg, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_cfg(*TINY, *PLD, "total_training_steps=6", "max_steps=6", output_dir=straight))
    train(make_cfg(*TINY, *PLD, "total_training_steps=6", "max_steps=3", output_dir=split))
    train(make_cfg(*TINY, *PLD, "total_training_steps=6", "max_steps=6", "resume=true", output_dir=split))
    a, b = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "pld_theta", "pld_layers"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert min(r["pld_layers"] for r in a[3:]) < 1.0  # layers were dropped after the resume


def test_compile_with_layer_drop_is_refused(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="compile=false"):
        train(make_cfg(*TINY, *PLD, "max_steps=1", "compile=true"))


def test_post_ln_with_layer_drop_warns(make_cfg, tmp_path, caplog):
    train(make_cfg(*TINY, *PLD, "max_steps=1", "model.pre_layer_norm=false"))
    assert "model.pre_layer_norm=true" in caplog.text


def test_a_bad_theta_fails_before_any_data_work(make_cfg, tmp_path, monkeypatch):
    import bertrecipes.engine as engine

    def no_data(*args, **kwargs):
        raise AssertionError("the data were prepared before the settings were checked")

    monkeypatch.setattr(engine, "build_pretraining_dataset", no_data)
    with pytest.raises(ConfigError, match=r"progressive_layer_drop.theta must be in \(0, 1\], got 0.0"):
        train(make_cfg(*TINY, "max_steps=1", "progressive_layer_drop.enabled=true",
                       "progressive_layer_drop.theta=0.0"))
    with pytest.raises(ConfigError, match="model.pad_vocab_to_multiple_of must be a positive integer, got 0"):
        train(make_cfg(*TINY, "max_steps=1", "model.pad_vocab_to_multiple_of=0"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_layer_drop_with_kernel_triton_follows_kernel_torch(make_cfg, tmp_path):
    """The engine with kernel=triton (unpadded) and layers dropped: dropout off, the losses and
    gradient norms of kernel=torch (padded) with the same draws."""
    from triton_kernels import load_kernels

    _, device = load_kernels()
    tiny = ["data.num_documents=40", "data.vocab_size=300", "data.dupe_factor=1", "max_seq_length=48",
            "max_predictions_per_seq=6", "model.num_hidden_layers=4", "model.hidden_size=32",
            "model.intermediate_size=64", "model.num_attention_heads=2", "model.hidden_dropout_prob=0",
            "model.attention_probs_dropout_prob=0", "model.pre_layer_norm=true", "train_batch_size=4",
            "train_micro_batch_size_per_gpu=2", "max_steps=3", "steps_per_print=1", f"device={device}",
            "progressive_layer_drop.enabled=true", "progressive_layer_drop.theta=0.2",
            "progressive_layer_drop.gamma=2.0"]
    runs = {}
    for kernel in ("torch", "triton"):
        train(make_cfg(*tiny, f"kernel={kernel}", output_dir=tmp_path / kernel))
        runs[kernel] = read_metrics(tmp_path / kernel)
    assert runs["torch"][-1]["pld_layers"] < 1.0
    for key in ("loss", "grad_norm", "pld_layers"):
        want = torch.tensor([r[key] for r in runs["torch"]], dtype=torch.float64)
        got = torch.tensor([r[key] for r in runs["triton"]], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=key)


def test_a_layer_skipped_for_a_whole_step_is_still_stepped_as_deepspeed_does(make_cfg, tmp_path):
    """Its gradient is zero, not none: LAMB still steps it (moments, weight decay, trust ratio), so
    every parameter's step count is the run's."""
    from bertrecipes.checkpoint import load_checkpoint

    draws = ProgressiveLayerDrop(4, 0.2, 1.0, seed=42)
    skipped = [(step, layer) for step in range(5) for layer in range(4)
               if all(draws.draw(step, micro)[layer] == 0.0 for micro in range(2))]
    assert skipped == [(3, 3)]  # the last layer, for the whole of the fourth step
    pld = ["progressive_layer_drop.enabled=true", "progressive_layer_drop.theta=0.2",
           "progressive_layer_drop.gamma=1.0"]
    train(make_cfg(*TINY, *pld, "max_steps=5", output_dir=tmp_path / "run"))
    saved = load_checkpoint(tmp_path / "run" / "checkpoints")["optimizer"]["state"]
    assert {int(state["step"]) for state in saved.values()} == {5}


def test_the_keep_ratio_continues_from_the_init_from_checkpoint(make_cfg, tmp_path):
    """A phase started from a checkpoint keeps counting its steps, as DeepSpeed's restored global step."""
    train(make_cfg(*TINY, *PLD, "max_steps=3", output_dir=tmp_path / "one"))
    train(make_cfg(*TINY, *PLD, "max_steps=2", f"init_from={tmp_path / 'one' / 'checkpoints'}",
                   output_dir=tmp_path / "two"))
    first = read_metrics(tmp_path / "two")[0]
    assert first["step"] == 1 and first["pld_theta"] == pytest.approx(pld_theta(2, 0.3, 0.4))
    # and a resume keeps that count
    train(make_cfg(*TINY, *PLD, "max_steps=3", "resume=true", output_dir=tmp_path / "two"))
    assert read_metrics(tmp_path / "two")[-1]["pld_theta"] == pytest.approx(pld_theta(4, 0.3, 0.4))


def test_resuming_with_other_layer_drop_settings_warns(make_cfg, tmp_path, caplog):
    train(make_cfg(*TINY, "max_steps=2", output_dir=tmp_path / "run"))
    train(make_cfg(*TINY, *PLD, "max_steps=3", "resume=true", output_dir=tmp_path / "run"))
    assert "progressive_layer_drop was off when the run was saved" in caplog.text
    caplog.clear()
    train(make_cfg(*TINY, *PLD, "max_steps=4", "resume=true", output_dir=tmp_path / "run"))
    assert "progressive_layer_drop was" not in caplog.text
