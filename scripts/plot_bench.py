"""Bar chart (PNG) of samples/s per implementation from ``bench_pretrain.py --json`` output.

    python scripts/plot_bench.py bench_pretrain.json docs/bench_pretrain.png
    python scripts/plot_bench.py seq128.json seq512.json compile.json chart.png   # several runs, one chart

Needs matplotlib (`pip install matplotlib`); one group of bars per (model, seq, dtype), one bar per
implementation, labelled with its samples/s. Rows that were skipped or failed have no bar.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_files", type=Path, nargs="+", help="bench_pretrain.py --json outputs")
    parser.add_argument("png_file", type=Path)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for path in args.json_files for r in json.loads(path.read_text())["rows"]
            if r.get("samples_per_sec") is not None]
    for r in rows:  # a run with gradient accumulation is its own bar
        r["impl"] += f" (accumulation {r['accumulation']})" if r.get("accumulation", 1) > 1 else ""
    groups = sorted({(r["model"], r["seq"], r["dtype"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(groups)), 4))
    for i, impl in enumerate(impls):
        values = [next((r["samples_per_sec"] for r in rows if (r["model"], r["seq"], r["dtype"]) == g
                        and r["impl"] == impl), 0.0) for g in groups]
        bars = ax.bar([x + i * width for x in range(len(groups))], values, width, label=impl)
        ax.bar_label(bars, labels=[f"{v:.3g}" if v else "" for v in values], fontsize=7)
    ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"BERT-{m}\nseq{s} {d}" for m, s, d in groups])
    ax.set_ylabel("samples/s")
    device = rows[0]["device"] if rows else ""
    ax.set_title(f"Pre-training throughput, {device}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    args.png_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png_file, dpi=120)
    print(f"wrote {args.png_file}")


if __name__ == "__main__":
    main()
