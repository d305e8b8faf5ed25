"""Where the time of a pre-training step goes: the engine's own steps under ``torch.profiler``.

``bertrecipes.engine.train`` runs as ``bench_pretrain.py`` runs it (same overrides, same data);
the profiler skips ``--skip`` optimizer steps (compilation, autotuning, allocator warm-up), then
records ``--steps``. It prints the operators and kernels that take the most device time per step
(host time on a CPU), the number of kernel launches per step, and how busy the GPU was: device
kernel time / wall time of the recorded steps (a GPU waiting on the host shows up as a low
figure). ``--trace`` also writes a Chrome trace (chrome://tracing, Perfetto).

    python scripts/profile_step.py --model large --seq 128 --impl triton --json profile.json
    python scripts/profile_step.py --device cpu --model tiny --seq 32 --micro 2 --impl torch   # smoke
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pretrain import DEFAULT_MICRO, IMPLS, MODELS, compose, overrides_for  # noqa: E402


def device_time_us(event) -> float:
    """An averaged event's own device time (us), across torch versions' attribute names."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def is_kernel(event) -> bool:
    """A GPU kernel (or copy/memset) row, not a host-side row. Host rows (``aten::*``, custom ops,
    ``Optimizer.step#...``) carry the device time of the kernels they launched, and with CUDA
    activity the profiler also records GPU-side spans of ``ProfilerStep*`` and other user
    annotations: counting either would count those kernels twice."""
    from torch.autograd import DeviceType

    return (getattr(event, "device_type", None) == DeviceType.CUDA
            and not getattr(event, "is_user_annotation", False))


def kernel_ms(call, iters: int, name_part: str = "") -> float:
    """The GPU kernels' own milliseconds per ``call()`` (those whose name holds ``name_part``),
    summed by the profiler over ``iters`` calls after one untimed: no launch gaps, no host time.
    0.0 when the profiler saw no such kernel."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            call()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if is_kernel(e) and name_part in e.key]
    return sum(device_time_us(e) for e in rows) / 1e3 / iters


def measure_all(argv: list[str] | None, workdir: Path) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="large")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=None, help="default 64 at seq128, 8 at seq512")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--impl", choices=sorted(IMPLS), default="triton")
    parser.add_argument("--skip", type=int, default=3, help="optimizer steps before recording")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps recorded")
    parser.add_argument("--top", type=int, default=25, help="rows of the table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default="", help="Hydra data overrides, one string (default: demo corpus)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--trace", type=Path, default=None, help="also write a Chrome trace here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu for a smoke test", file=sys.stderr)
        return 2
    if not on_cuda:  # kernel=triton runs in Triton's interpreter (chosen before triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from torch.profiler import ProfilerActivity, profile, schedule

    from bertrecipes import engine

    micro = args.micro or DEFAULT_MICRO.get(args.seq, 8)
    steps = args.skip + 1 + args.steps  # skipped, one profiler warm-up, recorded
    overrides = overrides_for(args.model, args.seq, micro, args.dtype, args.impl, steps, args.device, 1.0,
                              workdir / "run", args.cache_dir or workdir / "cache", shlex.split(args.data))
    cfg = compose([*overrides, f"max_steps={steps}"])  # one log, at the end, after the recorded window
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    marks: list[float] = []
    window = schedule(wait=args.skip, warmup=1, active=args.steps)
    with profile(activities=activities, schedule=window) as prof:
        original = engine.OptimizerStep.__call__

        def profiled_step(*a, **kw):
            result = original(*a, **kw)
            if on_cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            prof.step()
            return result

        engine.OptimizerStep.__call__ = profiled_step
        try:
            engine.train(cfg, workdir / "run")
        finally:
            engine.OptimizerStep.__call__ = original
    wall_per_step = (marks[-1] - marks[-1 - args.steps]) / args.steps
    events = prof.key_averages()
    per_step = []
    for event in events:
        per_step.append({"name": event.key, "calls": event.count / args.steps,
                         "device_ms": device_time_us(event) / 1e3 / args.steps,
                         "host_ms": event.self_cpu_time_total / 1e3 / args.steps,
                         "kernel": is_kernel(event)})
    key = "device_ms" if on_cuda else "host_ms"
    per_step.sort(key=lambda e: -e[key])
    kernels = [e for e in per_step if e["kernel"]]
    device_ms = sum(e["device_ms"] for e in kernels)
    summary = {"model": args.model, "seq": args.seq, "micro": micro, "dtype": args.dtype, "impl": args.impl,
               "device": torch.cuda.get_device_name() if on_cuda else "cpu",
               "wall_ms_per_step": 1e3 * wall_per_step,
               "kernel_ms_per_step": device_ms if on_cuda else None,
               "gpu_busy": device_ms / (1e3 * wall_per_step) if on_cuda else None,
               "kernel_launches_per_step": sum(e["calls"] for e in kernels) if on_cuda else None,
               "top": per_step[:args.top]}

    print(f"{summary['device']}: BERT-{args.model} seq{args.seq} x {micro} {args.dtype} impl={args.impl}: "
          f"{summary['wall_ms_per_step']:.1f} ms per optimizer step")
    if on_cuda:
        print(f"kernels: {device_ms:.1f} ms per step ({summary['gpu_busy']:.0%} of wall), "
              f"{summary['kernel_launches_per_step']:.0f} launches per step")
    print(f"{'per step':<60}{'calls':>8}{'device ms':>11}{'host ms':>10}")
    for e in per_step[:args.top]:
        print(f"{e['name'][:59]:<60}{e['calls']:>8.1f}{e['device_ms']:>11.3f}{e['host_ms']:>10.3f}")
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    if args.json:
        from bertrecipes.atomic import write_json_atomic

        write_json_atomic(args.json, summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    # the runs' checkpoints and data cache live here, removed at the end however the run ends
    with tempfile.TemporaryDirectory(prefix="profile_step_") as workdir:
        return measure_all(argv, Path(workdir))


if __name__ == "__main__":
    sys.exit(main())
