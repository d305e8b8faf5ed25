"""Pick the flash-attention tiles for this GPU: time each kernel (forward, dK/dV, dQ) of the
varlen attention a training step runs, at BERT-large's attention shapes, under a few block
configurations each, and write the fastest as a table the kernels read from
``$KERNELS_TRITON_ATTENTION_BLOCKS``.

A configuration counts only if it runs (no out-of-resources) and gives the same output and
gradient as the default tiles within bf16 rounding (tiles only reorder fp32 sums; a tiling bug
shows as O(1) errors). A kernel's entry is written only where the best configuration beats the
default by more than ``--min-gain``; otherwise the defaults stay.

    python scripts/tune_attention.py --out blocks.json --json tune_report.json
    KERNELS_TRITON_ATTENTION_BLOCKS=blocks.json python -m bertrecipes.pretrain kernel=triton ...
    TRITON_INTERPRET=1 python scripts/tune_attention.py --device cpu --smoke   # the plumbing, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name -> (batch, max_seqlen, heads, head_dim): BERT-large at the recipe's two phases
SHAPES = {"seq128": (64, 128, 16, 64), "seq512": (8, 512, 16, 64)}
SMOKE_SHAPES = {"seq24": (2, 24, 1, 16)}
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; the defaults are tried too
CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3),
            (128, 64, 8, 3), (128, 64, 4, 2), (128, 64, 4, 4)],
    "dkdv": [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 4, 2),
             (16, 128, 4, 3)],
    "dq": [(128, 32, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2)],
}
SMOKE_CANDIDATES = {kind: [(16, 16, 1, 1), (32, 16, 1, 1)] for kind in CANDIDATES}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(batch: int, seq: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    """Packed qkv of ``batch`` sequences of random real lengths in [seq/2, seq] (the longest is
    ``seq``), their cu_seqlens, and an output gradient."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    total = int(cu[-1])
    qkv = torch.randn(total, 3, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    do = torch.randn(total, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    return qkv.requires_grad_(), cu.to(device), do


class Tiles:
    """``attention._blocks`` with one kernel's tiles replaced (the launchers look it up per call)."""

    def __init__(self, attention, kind: str | None = None, blocks: tuple[int, ...] | None = None):
        self.attention, self.kind, self.blocks = attention, kind, blocks

    def __enter__(self):
        self.original = self.attention._blocks
        kind, blocks, original = self.kind, self.blocks, self.original

        def patched(head_dim, dtype, max_seqlen=0):
            table = dict(original(head_dim, dtype, max_seqlen))
            if kind is not None:
                table[kind] = blocks
            return table

        self.attention._blocks = patched
        return self

    def __exit__(self, *exc):
        self.attention._blocks = self.original


def run(attention, qkv, cu, seq, dropout, do):
    """Output and packed gradient of one forward + backward (fixed dropout seed)."""
    qkv.grad = None
    out = attention.flash_attention_varlen_qkvpacked(qkv, cu, seq, dropout, seed=1234)
    (grad,) = torch.autograd.grad(out, qkv, do)
    return out.detach(), grad


def time_kind(attention, kind, qkv, cu, seq, dropout, do, iters, device) -> float:
    """ms per call of the forward (``fwd``) or of the backward (``dkdv``, ``dq``: both backward
    kernels run; only the one under test changes). On a GPU, the kernels' own time from the
    profiler, summed over ``iters`` calls: one BERT attention kernel runs for tens of microseconds,
    less than the host needs to launch it, so a wall clock around each call would time the host.
    (Only the attention's own kernels count: not the small copy of the dropout seed.)
    On a CPU (the interpreter), the median wall time of a call."""
    if kind == "fwd":
        def call():
            with torch.no_grad():
                attention.flash_attention_varlen_qkvpacked(qkv, cu, seq, dropout, seed=1234)
    else:
        out = attention.flash_attention_varlen_qkvpacked(qkv, cu, seq, dropout, seed=1234)

        def call():
            torch.autograd.grad(out, qkv, do, retain_graph=True)
    if device.type == "cuda":
        from profile_step import kernel_ms

        ms = kernel_ms(call, iters, "_attn_")  # the attention kernels only, not the seed's copy
        if ms > 0:
            return ms
        print("the profiler saw no kernels: timing by the wall clock", file=sys.stderr)
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def agrees(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The largest difference from the default tiles' output and gradient, relative to their scale."""
    return max(float((a.float() - b.float()).abs().max()) / (float(b.float().abs().max()) + 1e-6)
               for a, b in zip(got, want, strict=True))


def winners(timings: dict, cases: dict, min_gain: float) -> dict[str, dict]:
    """The table: per shape key and kernel, the fastest tile, where it beats the default's time by
    more than ``min_gain``."""
    table: dict[str, dict] = {}
    for (name, kind), times in timings.items():
        default_ms = times.get(tuple(cases[name][5][kind]))
        best = min(times, key=times.get)
        if default_ms and times[best] < default_ms * (1 - min_gain):
            table.setdefault(cases[name][6], {})[kind] = list(best)
    return table


def tune(args, shapes, candidates, device, dtype, started: float,
         save=lambda table, report: None) -> tuple[dict, list[dict]]:
    """Try the tiles round-robin over the kernels (the i-th candidate of each kernel, then the
    i+1-th), each at every shape, so a spent time budget (``args.time_budget`` seconds from
    ``started``, a ``time.perf_counter()``) leaves every kernel some candidates; the defaults go
    first. ``save`` gets the table and the report after every trial (a stage killed mid-way keeps
    what it measured). Returns the table of winners and every trial."""
    from kernels_triton import attention

    cases = {}
    for name, (batch, seq, heads, head_dim) in shapes.items():
        qkv, cu, do = make_inputs(batch, seq, heads, head_dim, dtype, device)
        with Tiles(attention):
            want = run(attention, qkv, cu, seq, args.dropout, do)
        cases[name] = (qkv, cu, do, seq, want, attention._blocks(head_dim, dtype, seq),
                       attention.blocks_key(head_dim, dtype, seq))
    kinds = ("fwd", "dkdv", "dq")
    defaults = next(iter(cases.values()))[5]
    tried = {kind: [defaults[kind]] + [c for c in candidates[kind] if c != defaults[kind]] for kind in kinds}
    timings: dict[tuple[str, str], dict[tuple, float]] = {}
    report: list[dict] = []
    for i in range(max(len(t) for t in tried.values())):
        for kind in kinds:
            if i >= len(tried[kind]):
                continue
            blocks = tried[kind][i]
            for name, (qkv, cu, do, seq, want, _, key) in cases.items():
                entry = {"shape": name, "key": key, "kernel": kind, "blocks": list(blocks)}
                if time.perf_counter() - started > args.time_budget:
                    report.append(entry | {"status": "budget"})
                    continue
                try:
                    with Tiles(attention, kind, blocks):
                        error = agrees(run(attention, qkv, cu, seq, args.dropout, do), want)
                        if error > args.tolerance:
                            entry |= {"status": "wrong", "error": error}
                        else:
                            ms = time_kind(attention, kind, qkv, cu, seq, args.dropout, do, args.iters,
                                           device)
                            entry |= {"status": "ok", "error": error, "ms": ms}
                            timings.setdefault((name, kind), {})[tuple(blocks)] = ms
                except Exception as e:  # out of resources, an invalid tile: not a candidate here
                    entry |= {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
                report.append(entry)
                save(winners(timings, cases, args.min_gain), report)
                detail = f"{entry['ms']:8.3f} ms" if "ms" in entry else entry.get("reason", "")[:60]
                print(f"{name:7} {kind:5} {str(tuple(blocks)):20} {entry['status']:6} {detail}", flush=True)
    table = winners(timings, cases, args.min_gain)
    save(table, report)
    return table, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--dropout", type=float, default=0.1, help="attention-prob dropout (training)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest difference from the default tiles, relative to the output's scale")
    parser.add_argument("--min-gain", type=float, default=0.03, help="fraction a tile must save to be kept")
    parser.add_argument("--time-budget", type=float, default=float("inf"),
                        help="seconds from the start; the tiles left when it is spent are skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and tiles (for the interpreter)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the table, for $KERNELS_TRITON_ATTENTION_BLOCKS")
    parser.add_argument("--json", type=Path, default=None, help="every timing")
    args = parser.parse_args(argv)
    started = time.perf_counter()  # the budget counts the imports and the default tiles' compiles too
    device = torch.device(args.device)
    if device.type == "cpu":  # the kernels run in Triton's interpreter (chosen before triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: use --device cpu --smoke under TRITON_INTERPRET=1 for a plumbing check",
              file=sys.stderr)
        return 2
    shapes, candidates = (SMOKE_SHAPES, SMOKE_CANDIDATES) if args.smoke else (SHAPES, CANDIDATES)
    from bertrecipes.atomic import write_json_atomic

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def save(table: dict, report: list[dict]) -> None:
        if args.out:
            write_json_atomic(args.out, table)
        if args.json:
            write_json_atomic(args.json, {"kind": "attention_tiles", "device": where, "dtype": args.dtype,
                                          "table": table, "results": report})

    table, _ = tune(args, shapes, candidates, device, DTYPES[args.dtype], started, save)
    print("tuned:", json.dumps(table) if table else "nothing beats the defaults")
    return 0


if __name__ == "__main__":
    sys.exit(main())
