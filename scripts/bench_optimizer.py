"""Time the optimizer step alone at a model's real parameter shapes, next to its memory-traffic floor.

Rows (each the whole accumulation-boundary step: gradient norm, overflow flag, unscale and clip,
the update, zeroing; in fp32 master weights, with a dynamic fp16 loss scale so unscaling is real):

* ``lamb_fused`` / ``adam_fused``: the engine's ``OptimizerStep`` with our fused Triton step (the
  unscale and clip factor folded into the kernel's gradient read; the overflow skip on the device);
* ``lamb_foreach`` / ``adam_foreach``: the same step with the ``torch._foreach_*`` ops;
* ``torch_adamw``: the Hugging Face user's step: ``GradScaler.unscale_``, ``clip_grad_norm_``,
  ``torch.optim.AdamW(fused=True)`` through ``GradScaler.step``/``update``.

The floor: any of these updates must read the gradient, both moments and the weight, and write both
moments and the weight: 28 bytes per fp32 parameter. Divided by the bandwidth of a large
device-to-device copy measured in the same run, that is the fewest milliseconds a step can take;
``x floor`` says how far a row is from it. The LAMB update makes two passes (its trust ratio needs
per-tensor norms of the update before the weights move), so its own floor is 40 bytes per parameter.

    python scripts/bench_optimizer.py                                 # BERT-large on CUDA
    python scripts/bench_optimizer.py --model base --json optim.json
    python scripts/bench_optimizer.py --model tiny --device cpu --rows lamb_foreach,torch_adamw
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_squad import model_config  # noqa: E402

from bertrecipes.engine import OptimizerStep, TrainState  # noqa: E402
from bertrecipes.model import BertForPreTraining  # noqa: E402
from bertrecipes.optim import Adam, Lamb, build_param_groups  # noqa: E402
from bertrecipes.precision import LossScaler  # noqa: E402

ROWS = ("lamb_fused", "lamb_foreach", "adam_fused", "adam_foreach", "torch_adamw")
FLOOR_BYTES = 28  # per fp32 parameter: read g, m, v, p; write m, v, p
LAMB_FLOOR_BYTES = 40  # two passes: + read p, m, v and write p again


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbs(device: torch.device, numel: int, repeats: int = 10) -> float | None:
    """GB/s of a device-to-device copy of ``numel`` fp32 (bytes read + written per second)."""
    if device.type != "cuda":
        return None
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * 4 * numel * repeats / (time.perf_counter() - t0) / 1e9


def make_step(row: str, model: torch.nn.Module, device: torch.device):
    """A callable running one optimizer step of ``row`` on the model's current gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    if row == "torch_adamw":
        optimizer = torch.optim.AdamW(build_param_groups(model, 0.01), lr=1e-4, fused=device.type == "cuda")
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
        scaler.scale(torch.ones((), device=device))  # the scale exists from the first scaled loss on

        def torch_step() -> None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        return torch_step
    name, implementation = row.split("_")
    make = {"lamb": Lamb, "adam": Adam}[name]
    optimizer = make(build_param_groups(model, 0.01), lr=1e-4, fused=implementation == "fused")
    scaler = LossScaler(scale=2.0**16, dynamic=True, device=device)
    return OptimizerStep(params, optimizer, scaler, lambda step: 1e-4, TrainState(), max_grad_norm=1.0)


def time_row(row: str, model: torch.nn.Module, device: torch.device, steps: int, warmup: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 2.0**16 for p in params]  # scaled as an fp16 backward leaves them
    step = make_step(row, model, device)
    times = []
    for i in range(warmup + steps):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if isinstance(step, OptimizerStep):
        step.resolve()
        assert step.state.skipped_steps == 0, "a finite step was skipped"
    return {"row": row, "ms": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "base", "large"), default="large")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown --rows {unknown}; choose from {list(ROWS)}")
    device = torch.device(args.device)
    if device.type != "cuda" and any(r.endswith("_fused") for r in rows):
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("the fused rows need CUDA (or TRITON_INTERPRET=1 for a slow CPU check)")

    torch.manual_seed(0)
    model = BertForPreTraining(model_config(args.model)).to(device)
    numel = sum(p.numel() for p in model.parameters())
    bandwidth = copy_bandwidth_gbs(device, min(numel, 256 * 2**20))
    floor_ms = FLOOR_BYTES * numel / (bandwidth * 1e9) * 1e3 if bandwidth else None
    results = []
    for row in rows:
        r = time_row(row, model, device, args.steps, args.warmup)
        r["x_floor"] = r["ms"] / floor_ms if floor_ms else None
        results.append(r)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"optimizer step of BERT-{args.model} ({numel / 1e6:.1f}M fp32 parameters) on {where}")
    if bandwidth:
        print(f"copy bandwidth {bandwidth:.0f} GB/s; floor {floor_ms:.2f} ms at {FLOOR_BYTES} B/parameter "
              f"(LAMB's two passes: {floor_ms * LAMB_FLOOR_BYTES / FLOOR_BYTES:.2f} ms)")
    print(f"{'row':14} {'ms':>9} {'min ms':>9} {'x floor':>8}")
    for r in results:
        x = f"{r['x_floor']:.2f}" if r["x_floor"] else "-"
        print(f"{r['row']:14} {r['ms']:9.2f} {r['ms_min']:9.2f} {x:>8}")
    if args.json:
        from bertrecipes.atomic import write_json_atomic

        write_json_atomic(args.json, {"kind": "optimizer", "device": where, "model": args.model,
                                      "parameters": numel, "copy_bandwidth_gbs": bandwidth,
                                      "floor_ms": floor_ms, "steps": args.steps, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
