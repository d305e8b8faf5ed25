"""TritonBertLayer against bertrecipes' BertLayer on the same weights (post-LN and pre-LN, padding
mask): outputs, the input gradient and every parameter gradient; a whole bert_tiny-like
BertForPreTraining built with ``make_layer_factory()``; the memory flags changing what autograd
keeps, not what is computed; ``kernel=triton`` composing and reaching the layer through the engine.
Without a GPU the kernels run in Triton's interpreter (conftest.py selects it)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from saved_tensors import saved_bytes
from triton_kernels import load_kernels

from bertrecipes.model import BertConfig, BertForPreTraining, pretraining_loss
from bertrecipes.model.bert import BertLayer, unpad_index, unpad_rows

kt, DEVICE = load_kernels()
FLAGS = kt.LAYER_FLAGS


def layer_config(hidden=96, heads=3, pre_layer_norm=False, dropout=0.0, **overrides):
    return BertConfig(vocab_size=99, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                      intermediate_size=2 * hidden, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout, max_position_embeddings=40,
                      pre_layer_norm=pre_layer_norm, **overrides)


def random_state(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights large enough that attention is not uniform; LayerNorm gammas away from 0."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in module.state_dict().items():
        noise = torch.randn(tensor.shape, generator=g)
        state[name] = 1.0 + 0.3 * noise if name.endswith("LayerNorm.weight") else 0.15 * noise
    return state


def padded_input(batch, seq, hidden, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, hidden, generator=g).to(DEVICE)
    mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).to(DEVICE)
    return x, mask, torch.randn(batch, seq, hidden, generator=g).to(DEVICE)


def run_layer(layer, x, mask, grad):
    """Output, input gradient and parameter gradients (by name) for one grad_output."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = layer(x, mask)
    out.backward(grad)
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return out.detach(), x.grad, grads


def pretraining_step(model, ids, types, mask, positions, labels, nsp_labels):
    """MLM logits, NSP logits, loss and every parameter gradient of one pre-training step."""
    mlm, nsp = model(ids, types, mask, positions)
    loss, _, _ = pretraining_loss(mlm, nsp, labels, nsp_labels)
    loss.backward()
    return {"mlm": mlm.detach(), "nsp": nsp.detach(), "loss": loss.detach()}, \
        {n: p.grad for n, p in model.named_parameters()}


def assert_same_step(got, want):
    (outputs, grads), (want_outputs, want_grads) = got, want
    for key, value in want_outputs.items():
        torch.testing.assert_close(outputs[key], value, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, k=key: f"{k}: {m}")
    assert grads.keys() == want_grads.keys()
    for name, value in want_grads.items():
        torch.testing.assert_close(grads[name], value, atol=1e-6, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_same_parameter_names_and_shapes_as_bert_layer():
    for pre_layer_norm in (False, True):
        config = layer_config(pre_layer_norm=pre_layer_norm)
        ours = {name: p.shape for name, p in kt.TritonBertLayer(config).named_parameters()}
        theirs = {name: p.shape for name, p in BertLayer(config).named_parameters()}
        assert ours == theirs


@pytest.mark.parametrize("pre_layer_norm, hidden, heads, seq", [(False, 96, 3, 33), (True, 64, 2, 7)])
def test_layer_matches_bert_layer(pre_layer_norm, hidden, heads, seq):
    config = layer_config(hidden, heads, pre_layer_norm)
    reference = BertLayer(config).to(DEVICE).eval()
    reference.load_state_dict(random_state(reference))
    ours = kt.TritonBertLayer(config).to(DEVICE).eval()
    ours.load_state_dict(reference.state_dict())
    x, mask, grad = padded_input(2, seq, hidden, [seq, seq - 5])
    out, dx, grads = run_layer(ours, x, mask, grad)
    want_out, want_dx, want_grads = run_layer(reference, x, mask, grad)
    torch.testing.assert_close(out, want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dx, want_dx, atol=1e-4, rtol=1e-4)
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        # key.bias has a zero gradient in exact arithmetic (softmax ignores a per-query constant)
        scale = 1.0 if name.endswith("key.bias") else want.abs().max().item()
        torch.testing.assert_close(grads[name], want, atol=1e-4 * scale + 1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("pre_layer_norm", [False, True])
def test_bert_tiny_model_matches_torch_kernel(pre_layer_norm):
    config = BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=40, pre_layer_norm=pre_layer_norm)
    torch.manual_seed(0)
    reference = BertForPreTraining(config).to(DEVICE).eval()
    ours = BertForPreTraining(config, layer_factory=kt.make_layer_factory()).to(DEVICE).eval()
    ours.load_state_dict(reference.state_dict())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 99, (2, 17), generator=g)
    mask = (torch.arange(17)[None] < torch.tensor([[17], [11]])).long()
    ids = (ids * mask).to(DEVICE)
    types = torch.zeros_like(ids)
    positions = torch.tensor([[1, 4, 9], [2, 3, 10]], device=DEVICE)
    labels = torch.randint(5, 99, (2, 3), generator=g).to(DEVICE)
    nsp_labels = torch.tensor([0, 1], device=DEVICE)
    assert_same_step(pretraining_step(ours, ids, types, mask.to(DEVICE), positions, labels, nsp_labels),
                     pretraining_step(reference, ids, types, mask.to(DEVICE), positions, labels, nsp_labels))


@pytest.mark.parametrize("pre_layer_norm", [False, True])
def test_unpadded_layer_matches_padded_bert_layer(pre_layer_norm):
    """Packed real tokens [T, H] through varlen flash attention equal BertLayer on the padded batch
    at the real positions, for the output, the input gradient and every parameter gradient."""
    hidden, heads, seq = 64, 2, 19
    config = layer_config(hidden, heads, pre_layer_norm)
    reference = BertLayer(config).to(DEVICE).eval()
    reference.load_state_dict(random_state(reference))
    ours = kt.TritonBertLayer(config).to(DEVICE).eval()
    ours.load_state_dict(reference.state_dict())
    x, mask, grad = padded_input(3, seq, hidden, [seq, 11, 3])
    grad = grad * mask[..., None]  # padding rows carry no gradient in either layout
    layout = unpad_index(mask.cpu()).to(DEVICE)
    out, dx, grads = run_layer(ours, unpad_rows(x, layout), layout, unpad_rows(grad, layout))
    want_out, want_dx, want_grads = run_layer(reference, x, mask, grad)
    torch.testing.assert_close(out, unpad_rows(want_out, layout), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dx, unpad_rows(want_dx, layout), atol=1e-4, rtol=1e-4)
    for name, want in want_grads.items():
        scale = 1.0 if name.endswith("key.bias") else want.abs().max().item()
        torch.testing.assert_close(grads[name], want, atol=1e-4 * scale + 1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_unpadded_triton_model_matches_padded_torch_model():
    config = BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=40, pre_layer_norm=True)
    torch.manual_seed(0)
    reference = BertForPreTraining(config).to(DEVICE).eval()
    ours = BertForPreTraining(config, layer_factory=kt.make_layer_factory(), unpad=True).to(DEVICE).eval()
    ours.load_state_dict(reference.state_dict())
    g = torch.Generator().manual_seed(3)
    mask = (torch.arange(17)[None] < torch.tensor([[17], [6]])).long()
    ids = (torch.randint(5, 99, (2, 17), generator=g) * mask).to(DEVICE)
    positions = torch.tensor([[1, 4, 9], [2, 3, 0]], device=DEVICE)
    labels = torch.tensor([[7, 8, 9], [10, 11, -100]], device=DEVICE)
    nsp_labels = torch.tensor([0, 1], device=DEVICE)
    assert_same_step(pretraining_step(ours, ids, None, mask.to(DEVICE), positions, labels, nsp_labels),
                     pretraining_step(reference, ids, None, mask.to(DEVICE), positions, labels, nsp_labels))


@pytest.mark.parametrize("pre_layer_norm", [False, True])
def test_bucketed_rows_change_no_real_row_with_dropout_on(pre_layer_norm):
    """``kernel.unpad_bucket``: filler rows (and filler sequences for the varlen attention) up to a
    multiple of the bucket leave the real rows' output and input gradient, and every parameter
    gradient, as the exact layout gives them, with dropout on (hidden and attention): the dropout
    masks are keyed by row and by sequence, so real rows keep theirs. (One sequence is full length,
    so both layouts have max_seqlen = S, which keys the attention masks.) The filler rows get no
    gradient."""
    hidden, heads, seq = 64, 2, 17
    ours = kt.TritonBertLayer(layer_config(hidden, heads, pre_layer_norm, dropout=0.1)).to(DEVICE).train()
    ours.load_state_dict(random_state(ours))
    x, mask, grad = padded_input(3, seq, hidden, [seq, 6, 11])
    runs = []
    for bucket in (0, 16):
        layout = unpad_index(mask.cpu(), bucket).to(DEVICE)
        real = int(mask.sum())
        packed_grad = unpad_rows(grad, layout)
        packed_grad[real:] = 0  # no loss reads a filler row
        torch.manual_seed(5)
        runs.append(run_layer(ours, unpad_rows(x, layout), layout, packed_grad))
    (want_out, want_dx, want), (out, dx, got) = runs
    assert out.shape[0] == 48 and want_out.shape[0] == real == 34
    # 34 rows against 48: on a GPU cuBLAS may pick another GEMM kernel (another summation order) per
    # row count, so last-bit differences; a real row reading a filler row would be off by far more
    torch.testing.assert_close(out[:real], want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx[:real], want_dx, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(dx[real:]) == 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    torch.manual_seed(6)  # dropout is really on: another seed, another output
    assert not torch.allclose(run_layer(ours, unpad_rows(x, layout), layout, packed_grad)[0], out)


@pytest.mark.parametrize("pre_layer_norm", [False, True])
def test_memory_flags_change_what_is_saved_not_what_is_computed(pre_layer_norm):
    batch, seq, hidden, heads = 2, 33, 64, 2
    config = layer_config(hidden, heads, pre_layer_norm, dropout=0.1)
    base = kt.TritonBertLayer(config).to(DEVICE)
    base.load_state_dict(random_state(base))
    x, mask, grad = padded_input(batch, seq, hidden, [seq, 20])
    tokens, intermediate = batch * seq, config.intermediate_size

    w_next = torch.randn(hidden, hidden, device=DEVICE, requires_grad=True)

    def kept_by(flags):
        layer = kt.TritonBertLayer(config, **flags).to(DEVICE)
        layer.load_state_dict(base.state_dict())
        torch.manual_seed(0)  # the dropout seeds are drawn from torch's generator
        # A projection after the layer keeps its output, as the next layer's QKV projection does.
        out, kept = saved_bytes(lambda: F.linear(layer(x, mask), w_next))
        return out.detach(), kept

    out, baseline = kept_by({})
    expected_saving = {
        # two LayerNorm inputs [tokens, hidden] and their means, minus the two betas kept instead
        "normalize_invertible": 2 * (tokens * hidden * 4 + tokens * 4 - hidden * 4),
        "gelu_checkpoint": tokens * intermediate * 4,  # the GELU output
        # the log-sum-exp; the attention output stays, as the output projection's input
        "attn_dropout_checkpoint": batch * heads * seq * 4,
        "stochastic_mode": 0,
    }
    for flag in FLAGS:
        flagged_out, kept = kept_by({flag: True})
        assert torch.equal(flagged_out, out), flag
        assert baseline - kept == expected_saving[flag], flag

    # Backward with every flag on (dropout active, same seeds) against every flag off; flags off
    # twice: the deterministic reductions give bitwise the same gradients.
    results = []
    for flags in ({}, dict.fromkeys(FLAGS, True), {}):
        layer = kt.TritonBertLayer(config, **flags).to(DEVICE)
        layer.load_state_dict(base.state_dict())
        torch.manual_seed(0)
        results.append(run_layer(layer, x, mask, grad))
    (out_off, dx_off, grads_off), (out_on, dx_on, grads_on), (out_again, dx_again, grads_again) = results
    assert torch.equal(out_again, out_off) and torch.equal(dx_again, dx_off)
    assert all(torch.equal(grads_again[name], g) for name, g in grads_off.items())
    assert torch.equal(out_on, out_off)
    torch.testing.assert_close(dx_on, dx_off, atol=1e-5, rtol=1e-5)
    for name, want in grads_off.items():
        torch.testing.assert_close(grads_on[name], want, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_kernel_triton_config_builds_triton_layers(make_cfg):
    from bertrecipes.engine import build_layer_factory

    cfg = make_cfg("kernel=triton", "kernel.gelu_checkpoint=true", "model=bert_tiny")
    assert cfg.kernel.name == "triton" and cfg.kernel.gelu_checkpoint and not cfg.kernel.stochastic_mode
    assert cfg.kernel.unpad  # kernel=triton packs real tokens by default
    factory = build_layer_factory(cfg.kernel)
    layer = factory(layer_config())
    assert isinstance(layer, kt.TritonBertLayer) and layer.gelu_checkpoint and not layer.normalize_invertible


@pytest.mark.parametrize("pre_layer_norm", [False, True])
def test_layer_under_fp16_autocast_within_twice_torch_error(pre_layer_norm):
    """The engine's mixed precision: fp32 weights, fp16 GEMMs and kernels (our LayerNorm outputs are
    fp16, so the next projection keeps the same tensor; torch's autocast LayerNorm returns fp32)."""
    config = layer_config(64, 2, pre_layer_norm)
    reference = BertLayer(config).to(DEVICE).eval()
    reference.load_state_dict(random_state(reference, seed=5))
    ours = kt.TritonBertLayer(config).to(DEVICE).eval()
    ours.load_state_dict(reference.state_dict())
    x, mask, grad = padded_input(2, 33, 64, [33, 20], seed=6)
    fp32 = run_layer(reference, x, mask, grad)
    with torch.autocast(DEVICE, dtype=torch.float16):
        torch_fp16 = run_layer(reference, x, mask, grad)
        ours_fp16 = run_layer(ours, x, mask, grad)
    def named(result):
        out, dx, grads = result
        return {"out": out, "dx": dx, **grads}

    want, torch_got, got = named(fp32), named(torch_fp16), named(ours_fp16)
    for name in want:
        if name != "out":
            assert got[name].dtype == torch.float32, name  # gradients of fp32 leaves
        # atol relative to the tensor's scale: where torch stays in fp32 (a LayerNorm's dbeta) its
        # error is 0, ours sums the gradient of an fp16 output
        atol = 1e-3 * want[name].abs().max().item()
        torch_err = (torch_got[name].float() - want[name]).abs().max().item()
        assert (got[name].float() - want[name]).abs().max().item() <= 2 * torch_err + atol, name


def test_pretraining_with_kernel_triton_follows_kernel_torch(make_cfg, tmp_path):
    """The engine end to end with kernel=triton (unpadded, varlen attention): with dropout off, two
    optimizer steps log the losses and gradient norms of kernel=torch (padded), and the held-out
    evaluation after them its scores."""
    from bertrecipes.data import generate_demo_corpus
    from bertrecipes.engine import train

    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n\n".join("\n".join(doc) for doc in generate_demo_corpus(6, seed=999)) + "\n")
    tiny = ["data.num_documents=40", "data.vocab_size=300", "data.dupe_factor=1", "max_seq_length=48",
            "max_predictions_per_seq=6", "model=bert_tiny", "model.hidden_size=32",
            "model.intermediate_size=64", "model.num_attention_heads=2", "model.hidden_dropout_prob=0",
            "model.attention_probs_dropout_prob=0", "train_batch_size=4", "train_micro_batch_size_per_gpu=2",
            "max_steps=2", "steps_per_print=1", f"device={DEVICE}",  # compiled kernels take CUDA tensors
            f"eval_data=[{heldout}]", "max_eval_samples=6", "eval_batch_size=4"]
    runs = {}
    for kernel in ("torch", "triton"):
        out = tmp_path / kernel
        train(make_cfg(*tiny, f"kernel={kernel}", output_dir=out))
        runs[kernel] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "mlm_loss", "nsp_loss", "grad_norm", "eval_mlm_loss", "eval_nsp_loss"):
        want = torch.tensor([r[key] for r in runs["torch"] if key in r], dtype=torch.float64)
        got = torch.tensor([r[key] for r in runs["triton"] if key in r], dtype=torch.float64)
        assert len(want) == (1 if key.startswith("eval") else 2)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=key)
