"""Benchmark and check one BERT transformer layer on a CUDA GPU.

Timing (default): forward, backward and forward+backward (CUDA events, warm-up, median of N) and
peak memory above the inputs, for BERT-large (1024/16/4096) and BERT-base (768/12/3072) layers at
seq 128 x micro-batch 64 and seq 512 x micro-batch 8, training mode (dropout 0.1), a key-padding
mask, fp32 weights under autocast (as ``bertrecipes.engine`` runs). Implementations:

* ``triton``: ``kernels_triton.TritonBertLayer`` (``kernel=triton``; ``--flags`` sets its options);
* ``triton-unpad``: the same layer on the batch's real tokens packed ``[tokens, hidden]`` (what
  ``kernel.unpad=true`` runs: varlen attention, no work on padding);
* ``torch``: ``bertrecipes``' ``BertLayer`` eager (``kernel=torch``, SDPA attention);
* ``triton.compile``: the Triton layer through ``torch.compile`` (one graph: Inductor around the
  Triton ops, which it calls as custom ops);
* ``torch.compile``: the torch layer through ``torch.compile``;
* ``transformers``: Hugging Face's ``BertLayer`` (``attn_implementation="sdpa"``), same weights;
* ``attn triton`` / ``attn sdpa-flash``: attention alone, our kernel vs SDPA's flash backend (no mask,
  which that backend cannot take), same q/k/v and dropout.

``--check`` instead runs the low-precision correctness rule for fp16 and bf16, post-LN and pre-LN,
flags off and on, padded and unpadded (packed real tokens, varlen attention): for the output and
every gradient,
``|triton - fp32 ref| <= 2 * |torch same dtype - fp32 ref| + atol * max|fp32 ref|``.

    python scripts/bench_layer.py --dtype bf16 --json bench_bf16.json
    python scripts/bench_layer.py --check
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

SHAPES = [  # name, hidden, heads, intermediate, seq, micro-batch
    ("bert-large", 1024, 16, 4096, 128, 64),
    ("bert-large", 1024, 16, 4096, 512, 8),
    ("bert-base", 768, 12, 3072, 128, 64),
    ("bert-base", 768, 12, 3072, 512, 8),
]
CHECK_SHAPE = (768, 12, 3072, 128, 8)  # --check: BERT-base layer, seq 128, micro-batch 8
CPU_CHECK_SHAPE = (64, 2, 128, 16, 3)  # --check --device cpu: the same rule in Triton's interpreter
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = "cuda"
IMPLS = ("triton", "triton-unpad", "triton.compile", "torch", "torch.compile", "transformers")
FLAGS = ("normalize_invertible", "gelu_checkpoint", "attn_dropout_checkpoint", "stochastic_mode")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="autocast dtype (timing)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--shapes", nargs="+", type=int, default=None, metavar="I",
                        help="indices into the shape list (default: all four)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20, help="timed iterations (median reported)")
    parser.add_argument("--dropout", type=float, default=0.1, help="hidden and attention-prob dropout")
    parser.add_argument("--pre-layer-norm", action="store_true", help="pre-LN layers instead of post-LN")
    parser.add_argument("--flags", nargs="*", choices=FLAGS, default=[],
                        help="TritonBertLayer options to turn on")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--check", action="store_true", help="run the fp16/bf16 correctness rule instead")
    parser.add_argument("--atol", type=float, default=1e-3, help="--check: atol, relative to max|fp32 ref|")
    parser.add_argument("--check-dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"],
                        help="--check: the autocast dtypes to check, in order (bf16, the benchmarks' "
                             "dtype, first: a check cut short by a time limit has checked it)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: --check only, at a tiny shape in Triton's interpreter (slow; a smoke "
                             "test of this script, not of the GPU)")
    return parser.parse_args(argv)


def bert_config(hidden, heads, intermediate, dropout, pre_layer_norm):
    from bertrecipes.model import BertConfig

    return BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=intermediate,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                      pre_layer_norm=pre_layer_norm)


def reference_layer(config, seed=0):
    """bertrecipes' BertLayer with BERT's initialisation (normal(0.02) weights, zero biases)."""
    from bertrecipes.model.bert import BertLayer

    torch.manual_seed(seed)
    layer = BertLayer(config)
    for name, p in layer.named_parameters():
        if name.endswith("LayerNorm.weight"):
            torch.nn.init.ones_(p)
        else:  # biases too (not zero), so that every gradient path is exercised
            torch.nn.init.normal_(p, std=0.02)
    return layer.to(DEVICE)


def hf_layer(config, state):
    import transformers
    from transformers.models.bert.modeling_bert import BertLayer as HFBertLayer

    hf_config = transformers.BertConfig(
        hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size, hidden_act="gelu", layer_norm_eps=config.layer_norm_eps,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob, attn_implementation="sdpa")
    layer = HFBertLayer(hf_config).to(DEVICE)
    layer.load_state_dict(state, strict=True)
    return layer


def build(impl: str, config, reference, flags):
    """A callable (x, key_padding_mask) -> output for one implementation, and its module."""
    if impl == "torch":
        return reference, reference
    if impl == "torch.compile":
        module = copy.deepcopy(reference)
        return torch.compile(module), module
    if impl in ("triton", "triton-unpad", "triton.compile"):
        from kernels_triton import TritonBertLayer

        module = TritonBertLayer(config, **dict.fromkeys(flags, True)).to(DEVICE)
        module.load_state_dict(reference.state_dict())
        return (torch.compile(module) if impl == "triton.compile" else module), module
    module = hf_layer(config, reference.state_dict())

    def call(x, mask):  # Hugging Face takes an additive [B, 1, 1, S] mask in the compute dtype
        dtype = torch.get_autocast_dtype(DEVICE) if torch.is_autocast_enabled(DEVICE) else x.dtype
        additive = torch.zeros(mask.shape, device=x.device, dtype=dtype)
        additive.masked_fill_(~mask, torch.finfo(dtype).min)
        out = module(x, additive[:, None, None, :])
        return out[0] if isinstance(out, tuple) else out

    return call, module


def padding_mask(batch, seq, seed=0):
    """Lengths uniform in [3/4 seq, seq]: some padding, as pre-training batches have."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3 * seq // 4, seq + 1, (batch,), generator=g)
    return (torch.arange(seq)[None] < lengths[:, None]).to(DEVICE)


def time_fwd_bwd(fn, modules, inputs, grad, dtype, warmup, iters):
    """Median forward, backward and forward+backward milliseconds (CUDA events around each call:
    the GPU's time, waits for the host's launches included), the kernels' own milliseconds per
    forward+backward (the profiler's kernel rows: what the GPU spends computing), and peak MiB above
    the inputs, weights and (for the memory run) no gradients yet."""
    def clear():
        for m in modules:
            m.zero_grad(set_to_none=True)
        for t in inputs:
            t.grad = None

    def forward():
        with torch.autocast(DEVICE, dtype=dtype):
            return fn(*inputs)

    times = {"fwd": [], "bwd": [], "fwd+bwd": []}
    for i in range(warmup + iters):
        clear()
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        out = forward()
        mid.record()
        out.backward(grad)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times["fwd"].append(start.elapsed_time(mid))
            times["bwd"].append(mid.elapsed_time(end))
            times["fwd+bwd"].append(start.elapsed_time(end))
        del out
    from profile_step import kernel_ms

    def step():
        clear()
        forward().backward(grad)

    kernels = kernel_ms(step, iters)
    clear()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward().backward(grad)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {k: statistics.median(v) for k, v in times.items()} | {"kernel_ms": kernels or None,
                                                                   "peak_mib": peak}


def bench(args, save=lambda rows: None) -> list[dict]:
    """The timing rows; ``save`` gets them after every row (a run cut short keeps what it timed)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bertrecipes.model.bert import unpad_index, unpad_rows
    from kernels_triton import flash_attention

    dtype = DTYPES[args.dtype]
    rows = []
    shapes = [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES
    for name, hidden, heads, intermediate, seq, batch in shapes:
        # Dynamo marks a frame dynamic once it saw two shapes: compile each shape from a clean slate,
        # so the compiled rows time the static graph a run of that shape gets
        torch._dynamo.reset()
        config = bert_config(hidden, heads, intermediate, args.dropout, args.pre_layer_norm)
        reference = reference_layer(config).train()
        g = torch.Generator(device=DEVICE).manual_seed(1)
        x = torch.randn(batch, seq, hidden, device=DEVICE, generator=g, requires_grad=True)
        grad = torch.randn(batch, seq, hidden, device=DEVICE, generator=g, dtype=dtype)
        mask = padding_mask(batch, seq)
        shape = dict(model=name, seq=seq, micro_batch=batch, dtype=args.dtype)
        for impl in args.impls:
            fn, module = build(impl, config, reference, args.flags)
            module.train()
            if impl == "triton-unpad":  # the batch's real tokens packed [T, H], varlen attention
                layout = unpad_index(mask.cpu()).to(DEVICE)
                packed = unpad_rows(x.detach(), layout).requires_grad_()
                result = time_fwd_bwd(lambda xp, fn=fn, layout=layout: fn(xp, layout), [module], [packed],
                                      unpad_rows(grad, layout), dtype, args.warmup, args.iters)
            else:
                result = time_fwd_bwd(lambda x, fn=fn, mask=mask: fn(x, mask), [module], [x], grad, dtype,
                                      args.warmup, args.iters)
            rows.append(shape | {"impl": impl} | result)
            save(rows)
            del fn, module
            torch.cuda.empty_cache()

        head_dim = hidden // heads
        q, k, v = (torch.randn(batch, seq, heads, head_dim, device=DEVICE, dtype=dtype, generator=g,
                               requires_grad=True) for _ in range(3))
        grad_attn = torch.randn(batch, seq, heads, head_dim, device=DEVICE, dtype=dtype, generator=g)

        def ours(q, k, v):
            return flash_attention(q, k, v, None, args.dropout)

        def sdpa_flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     dropout_p=args.dropout)
            return out.transpose(1, 2)

        for impl, fn in (("attn triton", ours), ("attn sdpa-flash", sdpa_flash)):
            result = time_fwd_bwd(fn, [], [q, k, v], grad_attn, dtype, args.warmup, args.iters)
            rows.append(shape | {"impl": impl} | result)
            save(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'model':<11}{'seq x mb':>10}  {'impl':<16}{'fwd ms':>9}{'bwd ms':>9}{'fwd+bwd':>9}" \
             f"{'kernels':>9}{'peak MiB':>10}{'vs torch':>10}"
    print(header)
    print("-" * len(header))
    baseline = {}
    for r in rows:
        key = (r["model"], r["seq"], r["micro_batch"])
        if r["impl"] in ("torch", "attn sdpa-flash"):
            baseline[key, r["impl"].startswith("attn")] = r["fwd+bwd"]
    for r in rows:
        key = (r["model"], r["seq"], r["micro_batch"])
        base = baseline.get((key, r["impl"].startswith("attn")))
        speedup = f"{base / r['fwd+bwd']:.2f}x" if base else "-"
        kernels = f"{r['kernel_ms']:>9.3f}" if r.get("kernel_ms") else f"{'-':>9}"
        print(f"{r['model']:<11}{r['seq']:>5} x {r['micro_batch']:<2}  {r['impl']:<16}{r['fwd']:>9.3f}"
              f"{r['bwd']:>9.3f}{r['fwd+bwd']:>9.3f}{kernels}{r['peak_mib']:>10.0f}{speedup:>10}")
    print("(ms: CUDA events around each call; kernels: the kernels' own ms per fwd+bwd, no launch gaps;\n"
          " vs torch: the torch layer's fwd+bwd time / this one's; attention rows against sdpa-flash)")


def _three_way(name, got, same_dtype, ref, atol) -> dict:
    kernel_err = (got.float() - ref).abs().max().item()
    torch_err = (same_dtype.float() - ref).abs().max().item()
    bound = 2 * torch_err + atol * ref.abs().max().item()
    return {"tensor": name, "kernel_err": kernel_err, "torch_err": torch_err, "ok": kernel_err <= bound}


def _layer_grads(layer, x, mask, grad, autocast_dtype) -> dict[str, torch.Tensor]:
    """Output, input gradient and parameter gradients; autocast_dtype None = plain fp32. ``mask`` is
    the key-padding mask of a padded ``x`` [batch, seq, hidden], or the layout of a packed one."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = layer(x, mask)
    out.backward(grad.to(out.dtype))
    return {"out": out.detach(), "dx": x.grad} | {n: p.grad for n, p in layer.named_parameters()}


def _at_real_rows(grads: dict[str, torch.Tensor], layout) -> dict[str, torch.Tensor]:
    """A padded layer's output and input gradient at the real tokens, packed as the unpadded layer
    returns them; parameter gradients as they are."""
    from bertrecipes.model.bert import unpad_rows

    return grads | {name: unpad_rows(grads[name], layout) for name in ("out", "dx")}


def _attention_grads(fn, qkv, mask, grad, dtype, **kwargs) -> dict[str, torch.Tensor]:
    leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in qkv]
    out = fn(*leaves, mask, 0.1, **kwargs)
    out.backward(grad.to(dtype))
    return {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}


def check(args, save=lambda results: None) -> list[dict]:
    """The three-way rule on a BERT-base layer (padding mask, dropout off: the RNGs differ) and on
    attention alone with dropout, its mask replayed in the reference. ``save`` gets the results so
    far after every case (a check cut short keeps them)."""
    from bertrecipes.model.bert import unpad_index, unpad_rows
    from kernels_triton import TritonBertLayer, attention_dropout_mask, attention_ref, flash_attention

    hidden, heads, intermediate, seq, batch = CHECK_SHAPE if DEVICE == "cuda" else CPU_CHECK_SHAPE
    g = torch.Generator(device=DEVICE).manual_seed(2)
    x, grad = (torch.randn(batch, seq, hidden, device=DEVICE, generator=g) for _ in range(2))
    qkv = [torch.randn(batch, seq, heads, hidden // heads, device=DEVICE, generator=g) for _ in range(3)]
    grad_attn = torch.randn(batch, seq, heads, hidden // heads, device=DEVICE, generator=g)
    mask = padding_mask(batch, seq)
    results = []
    for dtype_name in args.check_dtypes:
        dtype = DTYPES[dtype_name]
        for pre_layer_norm in (False, True):
            order = "pre" if pre_layer_norm else "post"
            config = bert_config(hidden, heads, intermediate, 0.0, pre_layer_norm)
            reference = reference_layer(config).eval()
            ref = _layer_grads(reference, x, mask, grad, None)
            same = _layer_grads(reference, x, mask, grad, dtype)
            for flags in ((), FLAGS):
                ours = TritonBertLayer(config, **dict.fromkeys(flags, True)).to(DEVICE).eval()
                ours.load_state_dict(reference.state_dict())
                got = _layer_grads(ours, x, mask, grad, dtype)
                case = f"{dtype_name} {order}-LN flags={'all' if flags else 'none'}"
                results += [{"case": case} | _three_way(n, got[n], same[n], ref[n], args.atol) for n in ref]
                save(results)
            # unpadded (kernel.unpad=true, the pre-training default): packed real tokens through varlen
            # attention against the padded references at the real rows
            layout = unpad_index(mask.cpu()).to(DEVICE)
            real_grad = grad * mask[..., None]  # padding rows carry no gradient in either layout
            ref, same = (_at_real_rows(_layer_grads(reference, x, mask, real_grad, d), layout)
                         for d in (None, dtype))
            ours = TritonBertLayer(config).to(DEVICE).eval()
            ours.load_state_dict(reference.state_dict())
            got = _layer_grads(ours, unpad_rows(x, layout), layout, unpad_rows(real_grad, layout), dtype)
            case = f"{dtype_name} {order}-LN unpadded"
            results += [{"case": case} | _three_way(n, got[n], same[n], ref[n], args.atol) for n in ref]
            save(results)

        keep = attention_dropout_mask(1234, batch, heads, seq, 0.1, DEVICE)
        ref = _attention_grads(attention_ref, qkv, mask, grad_attn, torch.float32, dropout_mask=keep)
        same = _attention_grads(attention_ref, qkv, mask, grad_attn, dtype, dropout_mask=keep)
        got = _attention_grads(flash_attention, qkv, mask, grad_attn, dtype, seed=1234)
        case = f"{dtype_name} attention, dropout replayed"
        results += [{"case": case} | _three_way(n, got[n], same[n], ref[n], args.atol) for n in ref]
        save(results)
    return results


def print_check(results: list[dict]) -> None:
    print(f"{'case':<40}{'tensor':<40}{'|triton-ref|':>14}{'|torch-ref|':>14}  ok")
    for r in results:
        print(f"{r['case']:<40}{r['tensor']:<40}{r['kernel_err']:>14.3e}{r['torch_err']:>14.3e}  "
              f"{'yes' if r['ok'] else 'NO'}")
    failed = sum(not r["ok"] for r in results)
    print(f"{len(results) - failed}/{len(results)} within 2 x torch's error + atol")


def main(argv=None) -> int:
    global DEVICE
    args = parse_args(argv)
    if args.device == "cpu":
        if not args.check:
            print("--device cpu runs --check only (timings on Triton's interpreter mean nothing)",
                  file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("bench_layer.py needs a CUDA GPU (torch.cuda.is_available() is False). On a CPU, run "
              "--check --device cpu, or the kernels' tests: pytest tests/test_triton_*.py", file=sys.stderr)
        return 2
    meta = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
            "triton": __import__("triton").__version__, "args": vars(args)}
    def save(rows: list[dict]) -> None:
        if args.json:
            from bertrecipes.atomic import write_json_atomic

            # "layer": the timing rows (the check's rows carry a "case" instead)
            write_json_atomic(args.json, meta | ({} if args.check else {"kind": "layer"}) | {"rows": rows})

    if args.check:
        results = check(args, save)
        print_check(results)
        rows, status = results, int(not all(r["ok"] for r in results))
    else:
        order = "pre" if args.pre_layer_norm else "post"
        print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {args.dtype} autocast, "
              f"dropout {args.dropout}, {order}-LN, flags {args.flags or 'none'}")
        rows, status = bench(args, save), 0
        print_table(rows)
    save(rows)
    return status


if __name__ == "__main__":
    sys.exit(main())
