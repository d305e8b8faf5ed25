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
* The dropout seeds are drawn per call inside the graph, on the device, not baked into it as
  constants, and no op reads a tensor on the host: so CUDA graphs (``mode="reduce-overhead"``) can
  capture the layer's forward and backward, the Triton ops and their seed draws included (checked
  on a GPU).

Without a GPU the kernels run in Triton's interpreter (conftest.py selects it).
"""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

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
    seed = torch.tensor([7], device=DEVICE)
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
        ("pre-ln-sum-branch-scale", OPS.bias_dropout_residual_layernorm,
         (_t(2, 9, 32), _t(32), _t(2, 9, 32), _t(32, offset=1), _t(32), 1e-12, 0.1, seed, True, False, True,
          f32, 1.8)),
        ("residual-no-ln", OPS.bias_dropout_residual_layernorm,
         (_t(18, 32), _t(32), _t(18, 32), None, None, 0.0, 0.1, seed, False, False, False, None)),
        ("layer-norm", OPS.bias_dropout_residual_layernorm,
         (None, None, _t(18, 32), _t(32, offset=1), _t(32), 1e-12, 0.0, None, False, True, True, f32)),
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


def _layer_case(pre_layer_norm, unpad, bucket=0):
    """A layer with every memory flag on, and its input, layout and output gradient (``bucket``:
    the packed rows rounded up with filler, as ``kernel.unpad_bucket``)."""
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
        layout = unpad_index(mask.cpu(), bucket).to(DEVICE)
        x = unpad_rows(x, layout)
    return layer, x, layout, torch.randn_like(x)


def _layer_step(fn, layer, x, layout, grad, seed=5):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    if seed is not None:  # None: go on from the generator's state
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


@pytest.mark.parametrize("unpad,bucket", [(True, 0), (False, 0), (True, 8)],
                         ids=["unpadded", "padded", "bucketed"])
def test_whole_model_compiles_as_one_graph_equal_to_eager(unpad, bucket):
    """``kernel=triton compile=true``: BertForPreTraining on the Triton layers is one graph, in
    training mode (dropout on), with a different number of real tokens at every step (unpadded:
    a different packed shape; bucketed: filler rows and sequences up to a multiple of 8), and each
    step equals the eager model's bit for bit."""
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
        layout = unpad_index(mask, bucket).to(DEVICE) if unpad else None
        steps = []
        for model, params in ((eager, eager), (compiled, twin)):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            mlm, nsp = model(ids, None, mask.to(DEVICE), positions, unpadded=layout)
            (mlm.square().mean() + nsp.square().mean()).backward()
            steps.append([mlm.detach(), nsp.detach(), *(p.grad for p in params.parameters())])
        for got, want in zip(steps[1], steps[0], strict=True):
            assert torch.equal(got, want), lengths


def test_graphs_call_the_ops_with_seeds_drawn_on_the_device():
    """The forward and backward graphs of the layer call the custom ops; the forward draws every
    dropout seed with an op of the graph on the inputs' device (``randint``, never a constant), and
    the backward replays the forward's seeds instead of drawing its own. No op is tagged
    ``cudagraph_unsafe``: nothing in them needs the host, so a CUDA-graph capture records the
    draws with the kernels and every replay gets new masks."""
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
    forward, backward = (gm.graph for gm in graphs)
    ops = [node for g in (forward, backward) for node in g.nodes
           if node.op == "call_function" and str(node.target).startswith("kernels_triton.")]
    base = {"flash_attention", "bias_dropout_residual_layernorm", "bias_gelu_linear"}
    assert {str(node.target) for node in ops} == {f"kernels_triton.{name}{suffix}.default" for name in base
                                                  for suffix in ("", "_backward")}
    assert not any(torch.Tag.cudagraph_unsafe in node.target.tags for node in ops)

    draws = [node for node in forward.nodes if node.op == "call_function" and "randint" in str(node.target)]
    assert len(draws) == 3  # attention, and the two dropout + residual ends
    assert all(torch.device(node.kwargs["device"]) == x.device for node in draws)
    seed_arg = {"kernels_triton.flash_attention.default": 8,  # the schemas' seed positions
                "kernels_triton.bias_dropout_residual_layernorm.default": 7}
    seeds = [node.args[seed_arg[str(node.target)]] for node in forward.nodes if str(node.target) in seed_arg]
    assert sorted(map(str, seeds)) == sorted(node.name for node in draws)
    assert not any(node.op == "call_function" and "randint" in str(node.target) for node in backward.nodes)
    assert {node.name for node in draws} <= {node.name for node in backward.nodes if node.op == "placeholder"}


@contextlib.contextmanager
def _host_reads():
    """Records every read of a tensor's value by the host that kernels_triton's code makes (its
    innermost frame), forward or backward, inside custom ops too: the Tensor methods that read a
    value are wrapped while it is open. (A TorchFunctionMode would not see into custom ops or the
    backward.) Each such read is a device synchronisation, and a CUDA-graph capture would freeze it."""
    sites: list[str] = []
    originals = {name: getattr(torch.Tensor, name)
                 for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")}

    def recording(read):
        def wrapper(self, *args, **kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if "/kernels_triton/" in f.filename]
            if frames:
                sites.append(f"{Path(frames[-1].filename).name}:{frames[-1].name}")
            return read(self, *args, **kwargs)
        return wrapper

    for name, read in originals.items():
        setattr(torch.Tensor, name, recording(read))
    try:
        yield sites
    finally:
        for name, read in originals.items():
            setattr(torch.Tensor, name, read)


def test_the_ops_never_read_a_tensor_on_the_host():
    """Eager and as the custom ops a compiled graph calls, forward and backward, the ops launch their
    kernels without reading any tensor's value on the host: the seeds stay on the device, the
    kernels load them."""
    layer, x, layout, grad = _layer_case(pre_layer_norm=True, unpad=True)
    with _host_reads() as eager:
        _layer_step(layer, layer, x, layout, grad)
    with _host_reads() as ops:  # the custom ops, forward and backward, one by one
        for _, op, args in _op_cases():
            outputs = op(*args)
            outputs = [t for t in ([outputs] if isinstance(outputs, torch.Tensor) else outputs)
                       if t.requires_grad and t.numel()]
            torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    assert eager == []
    assert ops == []


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("bucket", [None, 16], ids=["padded", "bucketed"])
def test_cuda_graph_replays_draw_new_masks(bucket):
    """``compile_mode=reduce-overhead kernel=triton``, padded (``kernel.unpad=false``) or unpadded
    in buckets (``kernel.unpad_bucket``): Inductor captures the layer's forward and backward, Triton
    ops and seed draws included, as CUDA graphs (no skip), and every replay draws new dropout masks;
    without dropout the replays equal the eager layer."""
    from torch._dynamo.utils import counters

    layer, x, layout, grad = _layer_case(pre_layer_norm=False, unpad=bucket is not None, bucket=bucket or 0)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)

    def step():  # as the engine: a new graph step per forward; copies, as replays reuse the outputs
        torch.compiler.cudagraph_mark_step_begin()
        got = _layer_step(compiled, layer, x, layout, grad, seed=None)
        return {name: t.clone() for name, t in got.items()}

    torch.manual_seed(0)
    steps = [step() for _ in range(4)]  # warm-up, recording, replays
    assert counters["inductor"]["cudagraph_skips"] == 0
    for earlier, later in zip(steps, steps[1:], strict=False):
        assert not torch.equal(earlier["out"], later["out"])
        assert not torch.equal(earlier["dx"], later["dx"])
    layer.eval()
    want = _layer_step(layer, layer, x, layout, grad)
    for _ in range(3):
        got = step()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4)
    assert counters["inductor"]["cudagraph_skips"] == 0
