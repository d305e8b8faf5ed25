"""The performance targets against what the benchmark JSON files measured, as a Markdown table.

Reads the JSON of ``bench_pretrain.py`` (rows), ``bench_squad.py`` (results), ``sync_check.py``,
``profile_step.py`` and ``bench_layer.py --check`` from files or folders, and prints (or writes,
``--markdown``) one line per target with the measured value, the reference it is compared with and
whether it is met.
A target whose rows are missing (not run, skipped, failed) says so instead of guessing.

    python scripts/bench_summary.py gpu_results/                    # every *.json in the folder
    python scripts/bench_summary.py a.json b.json --markdown summary.md

Targets (BERT-large, bf16, one GPU):
  seq128 x 64: MFU >= 55% (kernel=triton); samples/s >= 1.5 x transformers + fused AdamW and >= 1.2 x
  torch.compile (of that transformers model, ``hf_compile``; and of ours on kernel=torch, ``compile``);
  seq512 x 8: MFU >= 50%; the largest micro-batch at seq512 >= 1.5 x transformers' (ours: kernel=triton,
  with or without its memory flags, ``triton_lowmem``, whichever fits more).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OURS = "triton"


def load(paths: list[Path]) -> dict[str, list[dict]]:
    """Every JSON under ``paths``, sorted by kind: pretrain rows, squad cells, sync counts, checks."""
    found: dict[str, list[dict]] = {"pretrain": [], "squad": [], "syncs": [], "check": [], "profile": [],
                                    "optimizer": [], "tiles": [], "layer": [], "host": []}
    files = [f for p in paths for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    for path in files:
        record = json.loads(path.read_text())
        if record.get("kind") == "optimizer":
            found["optimizer"].append(record)
        elif record.get("kind") == "attention_tiles":
            found["tiles"].append(record)
        elif record.get("kind") == "layer":  # bench_layer.py's timings (their rows also name an impl)
            found["layer"] += [r | {"device": record.get("device")} for r in record["rows"]]
        elif record.get("kind") == "host":  # bench_host.py's (rows with an impl too)
            found["host"].append(record)
        elif "rows" in record and record["rows"] and "impl" in record["rows"][0]:
            found["pretrain"] += record["rows"]
        elif "results" in record:
            found["squad"] += [cell | {"device": record["meta"]["device"]} for cell in record["results"]]
        elif "total_per_step" in record:
            found["syncs"].append(record)
        elif "wall_ms_per_step" in record:
            found["profile"].append(record)
        elif "rows" in record and record["rows"] and "case" in record["rows"][0]:
            found["check"] += record["rows"]
    return found


def measured(rows: list[dict], impl: str, seq: int, key: str, model: str = "large", dtype: str = "bf16"):
    """The first measured value of ``key`` for (model, seq, dtype, impl), or None. Only rows that run
    the optimizer at every micro-batch count (accumulation 1, the issue's case)."""
    for row in rows:
        if ((row["model"], row["seq"], row["dtype"], row["impl"]) == (model, seq, dtype, impl)
                and row.get("accumulation", 1) == 1 and row.get(key) is not None):
            return row[key]
    return None


def targets(found: dict[str, list[dict]]) -> list[dict]:
    """One line per target: what it needs, what was measured, whether it is met (None: not measured)."""
    rows = found["pretrain"]
    lines = []

    def share(name: str, mfu, goal: float) -> None:
        lines.append({"target": name, "needed": f"{goal:.0%}", "value": mfu,
                      "measured": "not measured" if mfu is None else f"{mfu:.1%}",
                      "met": None if mfu is None else mfu >= goal})

    def ratio(name: str, ours, theirs, goal: float, what: str) -> None:
        value = ours / theirs if ours is not None and theirs else None
        lines.append({"target": name, "needed": f"{goal:g}x", "value": value,
                      "measured": "not measured" if value is None else
                      f"{value:.2f}x ({ours:.4g} vs {theirs:.4g} {what})",
                      "met": None if value is None else value >= goal})

    speed = {impl: measured(rows, impl, 128, "samples_per_sec")
             for impl in (OURS, "hf", "hf_compile", "compile")}
    share("seq128 MFU (kernel=triton)", measured(rows, OURS, 128, "mfu"), 0.55)
    ratio("seq128 samples/s vs transformers + fused AdamW", speed[OURS], speed["hf"], 1.5, "samples/s")
    ratio("seq128 samples/s vs transformers + torch.compile", speed[OURS], speed["hf_compile"], 1.2,
          "samples/s")
    ratio("seq128 samples/s vs torch.compile (kernel=torch)", speed[OURS], speed["compile"], 1.2, "samples/s")
    share("seq512 MFU (kernel=triton)", measured(rows, OURS, 512, "mfu"), 0.50)
    largest = [m for m in (measured(rows, impl, 512, "max_micro") for impl in (OURS, "triton_lowmem"))
               if m is not None]
    ratio("seq512 largest micro-batch vs transformers'", max(largest, default=None),
          measured(rows, "hf", 512, "max_micro"), 1.5, "sequences")
    return lines


def table_row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(found: dict[str, list[dict]]) -> str:
    devices = sorted({r["device"] for r in found["pretrain"] + found["squad"] if r.get("device")})
    out = [f"Device: {', '.join(devices) or 'none recorded'}", "",
           "| target | measured | needed | met |", "|---|---|---|---|"]
    for line in targets(found):
        met = {True: "yes", False: "no", None: "-"}[line["met"]]
        out.append(f"| {line['target']} | {line['measured']} | {line['needed']} | {met} |")
    rows = [r for r in found["pretrain"] if r.get("samples_per_sec") is not None]
    if rows:
        header = ("model", "seq", "micro", "dtype", "impl", "samples/s", "TFLOP/s", "MFU", "peak GB",
                  "max micro")
        out += ["", table_row(*header), "|---" * len(header) + "|"]
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            tflops = f"{r['tflops']:.1f}" if r.get("tflops") is not None else "-"
            memory = f"{r['peak_memory_gb']:.1f}" if r.get("peak_memory_gb") is not None else "-"
            micro = r["micro"] if r.get("accumulation", 1) == 1 else f"{r['micro']} x {r['accumulation']}"
            out.append(table_row(r["model"], r["seq"], micro, r["dtype"], r["impl"],
                                 f"{r['samples_per_sec']:.1f}", tflops, mfu, memory, r.get("max_micro", "-")))
    cells = [c for c in found["squad"] if c.get("status") == "ok"]
    if cells:
        header = ("SQuAD model", "kernel", "micro", "samples/s", "MFU", "peak GB")
        out += ["", table_row(*header), "|---" * len(header) + "|"]
        for c in cells:
            mfu = f"{100 * c['mfu']:.1f}%" if c.get("mfu") is not None else "-"
            memory = f"{c['peak_memory_gb']:.1f}" if c.get("peak_memory_gb") is not None else "-"
            out.append(table_row(c["model"], c["kernel"], c["micro_batch"], f"{c['samples_per_sec']:.1f}",
                                 mfu, memory))
    if found["layer"]:
        header = ("layer", "seq x micro", "impl", "fwd+bwd ms", "kernels ms", "peak MiB")
        out += ["", table_row(*header), "|---" * len(header) + "|"]
        for r in found["layer"]:
            kernels = f"{r['kernel_ms']:.3f}" if r.get("kernel_ms") else "-"
            out.append(table_row(r["model"], f"{r['seq']} x {r['micro_batch']}", r["impl"],
                                 f"{r['fwd+bwd']:.3f}", kernels, f"{r['peak_mib']:.0f}"))
    for record in found["host"]:
        rows = ", ".join(f"{r['impl']} {r['ms_per_step']:.1f} ms" for r in record["rows"])
        out.append(f"\nHost time per eager forward + backward, kernels stubbed ({record['args']['layers']} "
                   f"layers, {record['cpu']}): {rows}")
    for record in found["syncs"]:
        args = record["args"]
        run = f"{args['kernel']}, {args['precision']}"
        if "optimizer" in args:
            run += f", {args['optimizer']} fused={args['fused']}"
        out.append(f"\nSynchronisations per optimizer step ({run}): {record['total_per_step']:g}")
    for record in found["optimizer"]:
        floor = f", floor {record['floor_ms']:.2f} ms" if record.get("floor_ms") else ""
        rows = ", ".join(f"{r['row']} {r['ms']:.2f} ms" for r in record["results"])
        out.append(f"\nOptimizer step, BERT-{record['model']} ({record['parameters'] / 1e6:.0f}M parameters"
                   f"{floor}): {rows}")
    for record in found["tiles"]:
        tuned = "; ".join(
            f"{key}: " + ", ".join(f"{kernel} {tuple(blocks)}" for kernel, blocks in kernels.items())
            for key, kernels in record["table"].items())
        out.append(f"\nAttention tiles tuned on {record['device']} ({record['dtype']}): "
                   f"{tuned or 'the defaults'}")
    for record in found["profile"]:
        line = (f"\nProfile, BERT-{record['model']} seq{record['seq']} x {record['micro']} {record['dtype']} "
                f"{record['impl']}: {record['wall_ms_per_step']:.1f} ms per optimizer step")
        if record.get("gpu_busy") is not None:
            line += (f", kernels {record['kernel_ms_per_step']:.1f} ms ({record['gpu_busy']:.0%} busy), "
                     f"{record['kernel_launches_per_step']:.0f} launches")
        out.append(line)
    if found["check"]:
        ok = sum(r["ok"] for r in found["check"])
        out.append(f"\nLayer check: {ok}/{len(found['check'])} tensors within 2 x torch's error + atol")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", type=Path, nargs="+", help="JSON files or folders of them")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    text = markdown(load(args.paths))
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
