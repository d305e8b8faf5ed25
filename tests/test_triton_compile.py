"""The Triton ops under ``torch.compile``: each is a custom op pair (torch.library) that a compiled
graph calls as it is, so ``kernel=triton compile=true`` compiles the whole model as one graph.

* ``torch.library.opcheck`` on every op in every configuration the layer uses: the schema, the
  fake (meta) implementation against the real one, the autograd registration, and the output and
  gradients under AOT dispatch with dynamic shapes against eager.
* ``fullgraph=True`` (any graph break is an error) for the layer in both LayerNorm orders, padded
  and unpadded, every memory flag, dropout on; and for the whole pre-training model with a token
  count that changes between steps. Against the eager layer, which runs the autograd.Functions:
  bit for bit under ``aot_eager`` (the graph draws the dropout seeds from the same generator in
  the same order), and within fp32 rounding under Inductor.
* The dropout seeds are drawn per call inside the graph, not baked into it as constants.

Without a GPU the kernels run in Triton's interpreter (conftest.py selects it).
"""

from __future__ import annotations

import pytest
import torch
from triton_kernels import load_kernels

from bertrecipes.model import BertConfig, BertForPreTraining
from bertrecipes.model.bert import unpad_index, unpad_rows

kt, DEVICE = load_kernels()
OPS = torch.ops.kernels_triton


_CASES = torch.Generator().manual_seed(0)  # the op cases' inputs (built at collection: no global seed)


def _t(*shape, offset=0.0):
    return (torch.randn(*shape, generator=_CASES) + offset).to(DEVICE).requires_grad_()


def _op_cases():
    """(id, op, args) in the configurations TritonBertLayer calls."""
    seed = torch.tensor([7])
    mask = (torch.arange(9)[None] < torch.tensor([[9], [4]])).to(DEVICE)
    cu = torch.tensor([0, 9, 13], dtype=torch.int32, device=DEVICE)
    f32 = torch.float32
    return [
        ("attention-packed-mask", OPS.flash_attention,
         (_t(2, 9, 3, 2, 16), None, None, mask, None, 0, 0.1, 0.25, seed, False, True)),
        ("attention-qkv-recompute", OPS.flash_attention,
         (_t(2, 9, 2, 16), _t(2, 9, 2, 16), _t(2, 9, 2, 16), None, None, 0, 0.1, 0.25, seed, True, True)),
        ("attention-varlen-atomic", OPS.flash_attention,
         (_t(13, 3, 2, 16), None, None, None, cu, 9, 0.1, 0.25, seed, False, False)),
        ("post-ln", OPS.bias_dropout_residual_layernorm,
         (_t(2, 9, 32), _t(32), _t(2, 9, 32), _t(32, offset=1), _t(32), 1e-12, 0.1, seed, False, False, True,
          f32)),
        ("pre-ln-sum-invertible", OPS.bias_dropout_residual_layernorm,
         (_t(2, 9, 32), _t(32), _t(2, 9, 32), _t(32, offset=1), _t(32), 1e-12, 0.1, seed, True, True, True,
          f32)),
        ("residual-no-ln", OPS.bias_dropout_residual_layernorm,
         (_t(18, 32), _t(32), _t(18, 32), None, None, 0.0, 0.1, seed, False, False, False, None)),
        ("layer-norm", OPS.bias_dropout_residual_layernorm,
         (None, None, _t(18, 32), _t(32, offset=1), _t(32), 1e-12, 0.0, torch.tensor([0]), False, True, True,
          f32)),
        ("bias-gelu", OPS.bias_gelu, (_t(6, 32), _t(32), True)),
        ("bias-gelu-linear-checkpoint", OPS.bias_gelu_linear, (_t(6, 32), _t(32), _t(16, 32), True, True)),
        ("bias-gelu-linear-atomic", OPS.bias_gelu_linear, (_t(6, 32), _t(32), _t(16, 32), False, False)),
    ]


@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c[0])
def test_custom_op_passes_opcheck(case):
    _, op, args = case
    torch.library.opcheck(op, args)


def _config(pre_layer_norm, dropout=0.1):
    return BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout, max_position_embeddings=40,
                      pre_layer_norm=pre_layer_norm)


def _layer_case(pre_layer_norm, unpad):
    """A layer with every memory flag on, and its input, layout and output gradient."""
    torch.manual_seed(0)
    layer = kt.TritonBertLayer(_config(pre_layer_norm), normalize_invertible=True, gelu_checkpoint=True,
                               attn_dropout_checkpoint=True).to(DEVICE)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 17, 64, device=DEVICE)
    mask = (torch.arange(17)[None] < torch.tensor([[17], [9]])).to(DEVICE)
    layout = mask
    if unpad:
        layout = unpad_index(mask.cpu()).to(DEVICE)
        x = unpad_rows(x, layout)
    return layer, x, layout, torch.randn_like(x)


def _layer_step(fn, layer, x, layout, grad, seed=5):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = fn(x, layout)
    out.backward(grad)
    return {"out": out.detach(), "dx": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
@pytest.mark.parametrize("pre_layer_norm", [False, True], ids=["post-ln", "pre-ln"])
def test_layer_compiles_as_one_graph_equal_to_eager(pre_layer_norm, unpad):
    layer, x, layout, grad = _layer_case(pre_layer_norm, unpad)
    want = _layer_step(layer, layer, x, layout, grad)
    torch._dynamo.reset()
    got = _layer_step(torch.compile(layer, backend="aot_eager", fullgraph=True), layer, x, layout, grad)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("pre_layer_norm", [False, True], ids=["post-ln", "pre-ln"])
def test_layer_under_autocast_compiles_equal_to_eager(pre_layer_norm):
    """bf16 autocast, as the engine runs: the graph hands the ops the same low-precision inputs and
    output dtypes as eager (fp32 weights cast by autocast, LayerNorm outputs in bf16)."""
    device_type = torch.device(DEVICE).type

    def autocast(fn):
        def call(x, layout):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return fn(x, layout)
        return call

    layer, x, layout, grad = _layer_case(pre_layer_norm, unpad=True)
    want = _layer_step(autocast(layer), layer, x, layout, grad)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = _layer_step(autocast(compiled), layer, x, layout, grad)
    assert want["out"].dtype == (torch.float32 if pre_layer_norm else torch.bfloat16)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("pre_layer_norm", [False, True], ids=["post-ln", "pre-ln"])
def test_layer_under_inductor_matches_eager(pre_layer_norm):
    """Inductor compiles the GEMMs and glue around the custom ops. Its own random numbers differ
    from eager's, so ``fallback_random`` makes it draw the seeds with torch's generator, as eager."""
    import torch._inductor.config as inductor_config

    layer, x, layout, grad = _layer_case(pre_layer_norm, unpad=True)
    want = _layer_step(layer, layer, x, layout, grad)
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        got = _layer_step(torch.compile(layer, backend="inductor", fullgraph=True), layer, x, layout, grad)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_dropout_draws_a_new_seed_every_call():
    """A seed baked into the graph would give the same dropout mask at every step."""
    layer, x, layout, grad = _layer_case(pre_layer_norm=False, unpad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    first = _layer_step(compiled, layer, x, layout, grad, seed=1)["out"]
    again = _layer_step(compiled, layer, x, layout, grad, seed=1)["out"]
    other = _layer_step(compiled, layer, x, layout, grad, seed=2)["out"]
    torch.manual_seed(3)
    successive = [compiled(x, layout) for _ in range(2)]
    assert torch.equal(first, again)  # the seeds come from torch's generator: reproducible
    assert not torch.equal(first, other)
    assert not torch.equal(successive[0], successive[1])
    layer.eval()  # no dropout: the compiled layer is deterministic without a seed
    assert torch.equal(compiled(x, layout), compiled(x, layout))


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
def test_whole_model_compiles_as_one_graph_equal_to_eager(unpad):
    """``kernel=triton compile=true``: BertForPreTraining on the Triton layers is one graph, in
    training mode (dropout on), with a different number of real tokens at every step (unpadded:
    a different packed shape), and each step equals the eager model's bit for bit."""
    config = _config(pre_layer_norm=False)
    torch.manual_seed(0)
    eager = BertForPreTraining(config, layer_factory=kt.make_layer_factory(), unpad=unpad).to(DEVICE)
    twin = BertForPreTraining(config, layer_factory=kt.make_layer_factory(), unpad=unpad).to(DEVICE)
    twin.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    positions = torch.tensor([[1, 4, 9], [2, 3, 0]], device=DEVICE)
    g = torch.Generator().manual_seed(4)
    for lengths in ([17, 9], [12, 5], [17, 3]):
        mask = (torch.arange(17)[None] < torch.tensor(lengths)[:, None]).long()
        ids = (torch.randint(5, 99, (2, 17), generator=g) * mask).to(DEVICE)
        layout = unpad_index(mask).to(DEVICE) if unpad else None
        steps = []
        for model, params in ((eager, eager), (compiled, twin)):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            mlm, nsp = model(ids, None, mask.to(DEVICE), positions, unpadded=layout)
            (mlm.square().mean() + nsp.square().mean()).backward()
            steps.append([mlm.detach(), nsp.detach(), *(p.grad for p in params.parameters())])
        for got, want in zip(steps[1], steps[0], strict=True):
            assert torch.equal(got, want), lengths


def test_graphs_call_the_ops_and_keep_them_out_of_cuda_graphs():
    """The forward and backward graphs of the layer call the custom ops, and every one carries
    ``cudagraph_unsafe``: each reads its dropout seed on the host, which a CUDA-graph capture would
    freeze (the same mask at every replay), so Inductor must leave them out of its CUDA graphs."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    layer, x, layout, grad = _layer_case(pre_layer_norm=False, unpad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    _layer_step(compiled, layer, x, layout, grad)
    assert len(graphs) == 2  # forward, backward
    ops = [node.target for gm in graphs for node in gm.graph.nodes
           if node.op == "call_function" and str(node.target).startswith("kernels_triton.")]
    base = {"flash_attention", "bias_dropout_residual_layernorm", "bias_gelu_linear"}
    assert {str(op) for op in ops} == {f"kernels_triton.{name}{suffix}.default" for name in base
                                       for suffix in ("", "_backward")}
    assert all(torch.Tag.cudagraph_unsafe in op.tags for op in ops)
