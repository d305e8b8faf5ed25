"""Count the host-device synchronisations of a pre-training optimizer step on CUDA, and say where
each one comes from.

After a one-step warm-up run, the engine (``bertrecipes.engine.train``) runs twice on a small BERT,
``--steps`` and then 2 x ``--steps`` optimizer steps, logging and checkpointing only at the end, under
``torch.cuda.set_sync_debug_mode("warn")``, which warns at every operation that makes the host wait
for the GPU. The second run's count minus the first's, divided by ``--steps``, is the number per
optimizer step (set-up, warm-up and the final log cancel out). The engine is built to have none with
the fused Triton optimizer steps (LAMB's and Adam's): an overflowed (fp16) step is skipped on the
device, and the host reads the step's overflow flag one step late from a pinned copy
(``engine.OptimizerStep``). The foreach ops (``--fused false``) cannot skip on the device and read
the flag: one per step.

    python scripts/sync_check.py                            # kernel=triton, bf16, accumulation 2
    python scripts/sync_check.py --kernel torch --precision fp16 --json sync.json
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pretrain import compose  # noqa: E402


def count_syncs(overrides: list[str], steps: int, workdir: Path) -> collections.Counter:
    """Synchronising operations of one ``train`` of ``steps`` optimizer steps, by source line."""
    from bertrecipes.engine import train

    out = Path(tempfile.mkdtemp(dir=workdir))
    cfg = compose([*overrides, f"max_steps={steps}", f"steps_per_print={steps}", f"output_dir={out}",
                   f"data.cache_dir={workdir / 'cache'}"])
    sources: collections.Counter = collections.Counter()
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return original(message, category, filename, lineno, file, line)
        # the innermost frame in bertrecipes or kernels_triton names the cause
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "bertrecipes" in f.filename or "kernels_triton" in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames else \
            f"{Path(filename).name}:{lineno}"
        sources[where] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(cfg, out)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = original
    return sources


def measure_all(argv: list[str] | None, workdir: Path) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=("triton", "torch"), default="triton")
    parser.add_argument("--unpad", choices=("true", "false"), default=None,
                        help="kernel.unpad (default: the kernel's own default)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--optimizer", choices=("lamb", "adam"), default="lamb")
    parser.add_argument("--fused", choices=("null", "true", "false"), default="null",
                        help="optimizer.fused (null: the Triton step on CUDA when triton is there)")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sync_check.py counts CUDA synchronisations and needs a CUDA GPU; nothing measured.",
              file=sys.stderr)
        return 2

    micro = 8
    overrides = [f"kernel={args.kernel}", f"precision={args.precision}", f"optimizer={args.optimizer}",
                 "model=bert_tiny", "max_seq_length=128", "max_predictions_per_seq=20",
                 f"train_batch_size={micro * args.accumulation}", f"train_micro_batch_size_per_gpu={micro}",
                 "checkpoint_at_end=false", "progress_bar=false", "device=cuda", "peak_tflops=1",
                 "data.pin_memory=true"]  # as training runs: a copy from pageable memory may wait
    if args.unpad is not None:
        overrides.append(f"kernel.unpad={args.unpad}")
    overrides.append(f"optimizer.fused={args.fused}")
    count_syncs(overrides, 1, workdir)  # warm-up: what only a first run does (compiles, library set-up)
    short = count_syncs(overrides, args.steps, workdir)
    long = count_syncs(overrides, 2 * args.steps, workdir)
    per_step = {where: (long[where] - short[where]) / args.steps for where in long | short}
    per_step = {where: n for where, n in sorted(per_step.items(), key=lambda kv: -kv[1]) if n}
    total = sum(per_step.values())
    print(f"{args.kernel} kernel, {args.precision}, {args.optimizer} (fused={args.fused}), "
          f"accumulation {args.accumulation}: {total:g} synchronisations per optimizer step")
    for where, n in per_step.items():
        print(f"  {n:6.2f}  {where}")
    if args.json:
        from bertrecipes.atomic import write_json_atomic

        write_json_atomic(args.json, {"device": torch.cuda.get_device_name(), "args": vars(args) | {
            "json": str(args.json)}, "per_step": per_step, "total_per_step": total,
            "runs": {"short": dict(short), "long": dict(long)}})
    return 0


def main(argv: list[str] | None = None) -> int:
    # the runs' checkpoints and data cache live here, removed at the end however the run ends
    with tempfile.TemporaryDirectory(prefix="sync_check_") as workdir:
        return measure_all(argv, Path(workdir))


if __name__ == "__main__":
    sys.exit(main())
