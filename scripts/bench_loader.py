"""Benchmark the training loader on prepared shards: samples/s from disk, per sequence length.

    python scripts/bench_loader.py DIR [DIR ...] [--micro 64] [--workers 0 2] [--seconds 10] [--json out.json]

DIR is a prepared phase directory (printed by `python -m bertrecipes.prepare_data`, e.g.
``~/.cache/bertrecipes/text_files-<hash>/seq128-<hash>``). For each directory and worker count it
iterates `PretrainingLoader` (the engine's loader: random order over all shards, rank 0 of
`--world-size`, batches as long tensors) for `--seconds`, after asking the OS to drop the shards from
the page cache (``posix_fadvise(DONTNEED)``, so the first pass really reads the disk: "cold") and
again with the files cached ("warm"). Prints a table; `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from bertrecipes.data import PretrainingLoader
from bertrecipes.data.build import open_prepared_dataset


def drop_page_cache(directory: Path) -> None:
    for path in directory.rglob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(directory: Path, micro: int, workers: int, world_size: int, seconds: float, cold: bool) -> dict:
    dataset = open_prepared_dataset(directory)
    if cold:
        drop_page_cache(directory)
    loader = PretrainingLoader(dataset, micro, seed=0, rank=0, world_size=world_size, num_workers=workers)
    batches = samples = tokens = 0
    start = time.perf_counter()
    first = None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start  # includes worker start-up
        batches += 1
        samples += len(batch["length"])
        tokens += int(batch["length"].sum())
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    return {
        "directory": str(directory),
        "max_seq_length": dataset.max_seq_length,
        "micro_batch": micro,
        "num_workers": workers,
        "cache": "cold" if cold else "warm",
        "batches": batches,
        "samples": samples,
        "seconds": elapsed,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "first_batch_s": first,
        "instances": len(dataset),
        "shard_mb": sum(p.stat().st_size for p in directory.rglob("*.npy")) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--micro", type=int, default=64, help="micro-batch size (bing_bert seq128: 64)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    rows = []
    for directory in args.dirs:
        for workers in args.workers:
            for cold in (True, False):
                rows.append(
                    measure(directory.expanduser(), args.micro, workers, args.world_size, args.seconds, cold)
                )
    print(
        f"\n{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, load average "
        f"{os.getloadavg()[0]:.1f}, micro-batch {args.micro}, world size {args.world_size} (rank 0 measured)"
    )
    header = (
        f"{'seq':>4s} {'instances':>10s} {'shards MB':>9s} {'workers':>7s} {'cache':>5s} {'samples/s':>10s} "
        f"{'tokens/s':>11s} {'1st batch s':>11s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['max_seq_length']:4d} {r['instances']:10,d} {r['shard_mb']:9.0f} {r['num_workers']:7d} "
            f"{r['cache']:>5s} {r['samples_per_s']:10,.0f} {r['tokens_per_s']:11,.0f} "
            f"{r['first_batch_s']:11.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(os.sys.argv), "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
