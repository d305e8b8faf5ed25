"""Compile every Triton kernel launch of a BERT training step for a GPU target, on any machine.

No GPU needed: the launches are recorded on the CPU (Triton's interpreter, kernels not executed,
GPU tile sizes forced), then each distinct launch (kernel, argument types, constexprs, warps,
stages) is compiled ahead of time by Triton for the target (``--arch 90`` = H100) down to a cubin
with the ptxas Triton ships. Reports per launch the shared memory and registers (from
``cuobjdump --dump-resource-usage``), how many of the PTX's global loads and stores move 16 bytes
per thread (vectorised) against all of them, and fails when a launch does not compile or needs more shared
memory than the architecture has (the "out of resources" a GPU would raise at launch time).

Recorded: ``TritonBertLayer`` forward + backward at BERT-large's widths (hidden 1024, 16 heads of 64,
FFN 4096) and BERT-base's, under fp16 and bf16 autocast and in fp32, post-LN and pre-LN, padded
(key-padding mask) and unpadded (varlen), with and without dropout, with each memory flag; and the
fused LAMB and Adam steps, plain, with the device-side overflow flag and with the gradient scale.

    python scripts/compile_kernels.py                         # sm_90, the full matrix
    python scripts/compile_kernels.py --arch 80 --quick --json compile_sm80.json
    python scripts/compile_kernels.py --smoke                 # one bf16 step (what the tests run)
    python scripts/compile_kernels.py --tiles                 # the attention tiles tune_attention.py tries
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import kernels_triton  # noqa: E402  (interpreted in the recording process, compiled in the other)
from bertrecipes.model import BertConfig  # noqa: E402
from bertrecipes.model.bert import unpad_index, unpad_rows  # noqa: E402

# Shared memory one block may use (opt-in maximum), per compute capability (CUDA programming guide).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
                 torch.int32: "*i32", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}
LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg"}


class Recorder:
    """Replaces the interpreter's launch: remembers (kernel, args) and runs nothing."""

    def __init__(self) -> None:
        self.launches: dict[str, dict] = {}

    def __enter__(self) -> Recorder:
        self._run = InterpretedFunction.run
        recorder = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            recorder.add(fn_self.fn, args, kwargs)

        InterpretedFunction.run = run
        kernels_triton.utils.FORCE_GPU_TILES = True
        return self

    def __exit__(self, *exc) -> None:
        InterpretedFunction.run = self._run
        kernels_triton.utils.FORCE_GPU_TILES = False

    def add(self, fn, args, kwargs) -> None:
        jit = JITFunction(fn)
        signature, constexprs, divisible = {}, {}, []
        values = dict(zip(jit.arg_names[:len(args)], args, strict=True))
        values.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
        for param in jit.params:
            value = values.get(param.name, param.default)
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
            else:
                signature[param.name] = type_of(value)
                if divisible_by_16(value):
                    divisible.append(param.name)
        options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
        launch = {"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
                  "constexprs": constexprs, "divisible": divisible, "options": options}
        self.launches.setdefault(json.dumps(launch, sort_keys=True), launch)


def divisible_by_16(value) -> bool:
    """What Triton's GPU launcher specialises on (``tt.divisibility``): a pointer 16-byte aligned, an
    integer divisible by 16. The recording runs BERT's real widths (strides and row lengths are as
    on the GPU), so the compile sees the alignment a training step's launches get."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument of type {type(value).__name__}: {value!r}")


def exercise_layer(config: BertConfig, dtype: torch.dtype, unpad: bool, dropout: float, flags: dict) -> None:
    """One forward and backward of a TritonBertLayer as training runs it."""
    layer = kernels_triton.TritonBertLayer(config, **flags).train()
    for module in layer.modules():  # dropout is read from the modules
        if hasattr(module, "dropout_p"):
            module.dropout_p = dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    batch, seq = 2, 16
    x = torch.randn(batch, seq, config.hidden_size, requires_grad=True)
    mask = torch.arange(seq)[None] < torch.tensor([[seq], [seq - 5]])
    layout = mask
    if unpad:
        layout = unpad_index(mask)
        x = unpad_rows(x.detach(), layout).requires_grad_()
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        out = layer(x, layout)
    out.float().sum().backward()


def exercise_optimizers() -> None:
    """The fused LAMB and Adam steps: plain, with the device-side overflow flag, and with the flag and
    the gradient scale (the engine's step)."""
    from bertrecipes.optim import Adam, Lamb

    params = [torch.nn.Parameter(torch.randn(n)) for n in (5000, 7)]
    for make in (lambda: Lamb(params, fused=True), lambda: Adam(params, fused=True),
                 lambda: Adam(params, fused=True, adam_w_mode=False)):
        for scalars in ({}, {"found_inf": torch.zeros(1)}, {"found_inf": torch.zeros(1),
                                                            "grad_scale": torch.ones(())}):
            for p in params:
                p.grad = torch.randn_like(p)
            make().step(**scalars)


def exercise_tiles() -> None:
    """The varlen attention's forward and backward (bf16, dropout, 16 heads of 64) under every
    candidate tile of scripts/tune_attention.py, so a GPU session tunes only among tiles that build."""
    from tune_attention import CANDIDATES, Tiles

    qkv = torch.randn(24, 3, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 16, 24], dtype=torch.int32)
    for kind, candidates in CANDIDATES.items():
        for blocks in candidates:
            with Tiles(kernels_triton.attention, kind, blocks):
                out = kernels_triton.flash_attention_varlen_qkvpacked(qkv, cu, 16, 0.1, seed=1)
                torch.autograd.grad(out.float().sum(), qkv)


def record(mode: str) -> Recorder:
    if mode == "tiles":
        with Recorder() as recorder:
            exercise_tiles()
        return recorder
    if mode == "smoke":  # the launches of one bf16 BERT-large training step (tests)
        with Recorder() as recorder:
            config = BertConfig(vocab_size=100, hidden_size=1024, num_attention_heads=16,
                                intermediate_size=4096, num_hidden_layers=1, pre_layer_norm=True)
            exercise_layer(config, torch.bfloat16, True, 0.1, {})
            exercise_optimizers()
        return recorder
    quick = mode == "quick"
    widths = [(1024, 16, 4096)] if quick else [(1024, 16, 4096), (768, 12, 3072)]
    dtypes = [torch.bfloat16, torch.float16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    flag_sets = [{}] + [{name: True} for name in kernels_triton.LAYER_FLAGS]
    with Recorder() as recorder:
        for (hidden, heads, ffn), pre_ln in itertools.product(widths, (False, True)):
            config = BertConfig(vocab_size=100, hidden_size=hidden, num_attention_heads=heads,
                                intermediate_size=ffn, num_hidden_layers=1, pre_layer_norm=pre_ln)
            for dtype, unpad, dropout in itertools.product(dtypes, (False, True), (0.0, 0.1)):
                exercise_layer(config, dtype, unpad, dropout, {})
            for flags in flag_sets[1:]:
                exercise_layer(config, dtypes[0], True, 0.1, flags)
        exercise_optimizers()
    return recorder


def resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(found.get("REG", -1)), "spill_bytes": int(found.get("LOCAL", 0))}


def memory_ops(ptx: str) -> dict:
    """Global loads and stores in the PTX, by width: how many move 16 bytes per thread (``.v4`` of
    32-bit words, or ``.v2`` of 64-bit) against one word (or two) at a time."""
    ops = re.findall(r"\b(ld|st)\.global(?:\.[\w:]+?)*?(?:\.(v2|v4|v8))?\.([bfsu])(\d+)\b", ptx)
    counts = {"vector_loads": 0, "scalar_loads": 0, "vector_stores": 0, "scalar_stores": 0}
    for op, vec, _, bits in ops:
        wide = int(vec[1:] if vec else 1) * int(bits) >= 128
        counts[f"{'vector' if wide else 'scalar'}_{'loads' if op == 'ld' else 'stores'}"] += 1
    return counts


def compile_one(launch: dict, arch: int) -> dict:
    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{launch['kernel']} is not a compiled kernel here (is TRITON_INTERPRET set?)")
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in launch.get("divisible", ())}
    src = ASTSource(fn, launch["signature"], constexprs=launch["constexprs"], attrs=attrs)
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch["options"]))
    result = {"shared_bytes": kernel.metadata.shared, "seconds": time.perf_counter() - t0}
    result.update(resource_usage(kernel.asm["cubin"]))
    result.update(memory_ops(kernel.asm["ptx"]))
    return result


def describe(launch: dict) -> str:
    dtypes = sorted({t.lstrip("*") for t in launch["signature"].values() if t in ("*fp32", "*fp16", "*bf16")})
    flags = [k for k, v in launch["constexprs"].items() if v is True]
    sizes = [f"{k}={v}" for k, v in launch["constexprs"].items()
             if isinstance(v, int) and not isinstance(v, bool) and k.isupper()]
    opts = [f"{k[4:] if k.startswith('num_') else k}={v}" for k, v in launch["options"].items()]
    return " ".join(["/".join(dtypes), *sizes, *flags, *opts])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100, 80 = A100)")
    parser.add_argument("--quick", action="store_true", help="BERT-large widths, bf16/fp16 only")
    parser.add_argument("--smoke", action="store_true", help="one bf16 BERT-large pre-LN step, unpadded")
    parser.add_argument("--tiles", action="store_true",
                        help="the attention under every candidate tile of scripts/tune_attention.py")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--record-to", type=Path, help=argparse.SUPPRESS)  # the recording subprocess
    args = parser.parse_args(argv)
    if args.record_to:
        if not kernels_triton.INTERPRET:
            raise SystemExit("--record-to runs under TRITON_INTERPRET=1")
        mode = "tiles" if args.tiles else "smoke" if args.smoke else "quick" if args.quick else "full"
        args.record_to.write_text(json.dumps(list(record(mode).launches.values())))
        return 0
    if kernels_triton.INTERPRET:
        raise SystemExit("unset TRITON_INTERPRET: this process compiles the kernels")
    limit = SHARED_LIMIT.get(args.arch)

    with tempfile.TemporaryDirectory() as tmp:
        recorded = Path(tmp) / "launches.json"
        command = [sys.executable, __file__, "--record-to", str(recorded),
                   *(["--quick"] if args.quick else []), *(["--smoke"] if args.smoke else []),
                   *(["--tiles"] if args.tiles else [])]
        subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"}, check=True)
        launches = json.loads(recorded.read_text())
    print(f"{len(launches)} distinct launches recorded; compiling for sm_{args.arch} "
          f"(triton {triton.__version__})", file=sys.stderr)
    rows, failures = [], 0
    for launch in launches:
        row = {"kernel": launch["kernel"], "variant": describe(launch)}
        try:
            row.update(compile_one(launch, args.arch))
            if limit is not None and row["shared_bytes"] > limit:
                row["error"] = f"needs {row['shared_bytes']} B of shared memory, sm_{args.arch} has {limit}"
        except Exception as e:  # a compile error: report it with the launch that caused it
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        failures += "error" in row
        rows.append(row)
        status = row.get("error") or (f"shared {row['shared_bytes']:>6} B  regs {row['registers']:>3}  "
                                      f"spill {row['spill_bytes']} B  16-byte ld/st "
                                      f"{row['vector_loads']}/{row['vector_stores']} of "
                                      f"{row['vector_loads'] + row['scalar_loads']}/"
                                      f"{row['vector_stores'] + row['scalar_stores']}  {row['seconds']:.1f}s")
        print(f"{row['kernel']:<36} {row['variant'][:70]:<70} {status}")
    print(f"{len(rows) - failures}/{len(rows)} launches compile for sm_{args.arch}"
          + (f" within {limit} B of shared memory" if limit else ""))
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "rows": rows},
                                        indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
