"""SQuAD fine-tuning throughput and peak memory per micro-batch size, kernel and model (CUDA only).

    python scripts/bench_squad.py                                    # BERT-base and -large, torch and triton
    python scripts/bench_squad.py --models large --kernels torch --micro-batches 4,8 --json out.json

Each cell times full training steps of ``BertForQuestionAnswering`` as ``python -m bertrecipes.squad``
runs them (forward under autocast, QA loss, scaled backward, unscale, global-norm clip, Adam step,
zero) on random windows of ``--seq`` tokens with no padding, after ``--warmup`` untimed steps. It
reports samples/s and the peak memory PyTorch allocated; a micro-batch that runs out of memory is
marked OOM (and the larger ones are not tried). A kernel that cannot be built (``kernel=triton``
without triton or kernels_triton) is marked unavailable. Prints a table; ``--json`` writes every cell
with the device, dtype and shapes, so a quoted figure can name what produced it.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bertrecipes.config import KernelConfig, ModelConfig
from bertrecipes.engine import build_layer_factory
from bertrecipes.errors import ConfigError
from bertrecipes.model import BertConfig
from bertrecipes.optim import Adam, build_param_groups
from bertrecipes.precision import autocast_context
from bertrecipes.squad.model import BertForQuestionAnswering, qa_loss

CONF = Path(__file__).resolve().parent.parent / "conf"
VOCAB_SIZE = 30522  # bert-base/large-uncased


def model_config(name: str) -> BertConfig:
    """BERT-base or -large as conf/model/bert_<name>.yaml defines it."""
    options = OmegaConf.load(CONF / "model" / f"bert_{name}.yaml")
    options.pop("defaults", None)
    fields = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(ModelConfig), options), resolve=True)
    fields["vocab_size"] = fields["vocab_size"] or VOCAB_SIZE
    return BertConfig(**fields)


def time_cell(config: BertConfig, kernel: str, micro_batch: int, seq: int, precision: str, steps: int,
              warmup: int, device: torch.device) -> dict:
    """samples/s and peak memory of ``steps`` training steps, or status OOM / unavailable."""
    try:
        layer_factory = build_layer_factory(OmegaConf.structured(KernelConfig(name=kernel)))
    except (ConfigError, ImportError) as e:
        return {"status": "unavailable", "error": str(e)}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model = optimizer = None
    try:
        model = BertForQuestionAnswering(config, layer_factory=layer_factory).to(device).train()
        optimizer = Adam(build_param_groups(model, 0.0), lr=3e-5, bias_correction=False)
        params = [p for p in model.parameters() if p.requires_grad]
        scale = 2.0**16 if precision == "fp16" else 1.0
        g = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(5, config.vocab_size, (micro_batch, seq), device=device, generator=g)
        question = min(64, seq // 2)  # [CLS] question [SEP] tokens, then the context
        types = (torch.arange(seq, device=device) >= question).long().expand(micro_batch, -1)
        mask = torch.ones_like(ids)
        starts = torch.randint(question, seq, (micro_batch,), device=device, generator=g)
        ends = torch.clamp(starts + 3, max=seq - 1)

        def step() -> None:
            with autocast_context(precision, device):
                start_logits, end_logits = model(ids, types, mask)
            (qa_loss(start_logits, end_logits, starts, ends) * scale).backward()
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / scale)
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_mul_(grads, torch.clamp(1.0 / (norm + 1e-6), max=1.0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        return {"status": "ok", "samples_per_sec": micro_batch * steps / elapsed,
                "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM", "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    except RuntimeError as e:  # a kernel that fails to compile or launch: record it, time the rest
        return {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        model = optimizer = None  # free the memory before the next cell
        gc.collect()
        torch.cuda.empty_cache()


def print_table(results: list[dict], micro_batches: list[int]) -> None:
    header = f"{'model':<7}{'kernel':<8}" + "".join(f"{f'mb={m}':>18}" for m in micro_batches)
    print(header)
    print("-" * len(header))
    rows: dict[tuple[str, str], dict[int, dict]] = {}
    for r in results:
        rows.setdefault((r["model"], r["kernel"]), {})[r["micro_batch"]] = r
    for (name, kernel), cells in rows.items():
        line = f"{name:<7}{kernel:<8}"
        for m in micro_batches:
            r = cells.get(m, {"status": "-"})
            text = (f"{r['samples_per_sec']:.1f}/s {r['peak_memory_gb']:.1f}G" if r["status"] == "ok"
                    else r["status"])
            line += f"{text:>18}"
        print(line)
    print("cells: samples/s and peak allocated GiB per micro-batch (training step incl. Adam)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="base,large", help="comma list of base, large (default: both)")
    parser.add_argument("--kernels", default="torch,triton", help="comma list of torch, triton")
    parser.add_argument("--micro-batches", default="4,8,12,16,24,32", help="micro-batch sizes to time")
    parser.add_argument("--seq", type=int, default=384, help="sequence length (SQuAD: 384)")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                        help="autocast dtype (BingBertSquad: fp16)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per cell")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--json", type=Path, help="write every cell here")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_squad.py measures GPU training steps and needs CUDA; torch.cuda.is_available() is "
              "False here. Nothing measured.", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    micro_batches = [int(m) for m in args.micro_batches.split(",")]
    results = []
    for name in args.models.split(","):
        config = model_config(name)
        for kernel in args.kernels.split(","):
            oom = False
            for micro_batch in micro_batches:
                cell = ({"status": "OOM", "note": "a smaller micro-batch ran out of memory"} if oom else
                        time_cell(config, kernel, micro_batch, args.seq, args.precision, args.steps,
                                  args.warmup, device))
                oom = oom or cell["status"] == "OOM"
                results.append({"model": name, "kernel": kernel, "micro_batch": micro_batch, **cell})
                print(f"bert-{name} kernel={kernel} micro_batch={micro_batch}: {cell}", file=sys.stderr)
                if cell["status"] == "unavailable":
                    results.extend({"model": name, "kernel": kernel, "micro_batch": m, **cell}
                                   for m in micro_batches if m > micro_batch)
                    break
    print_table(results, micro_batches)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                "precision": args.precision, "seq_len": args.seq, "steps": args.steps, "warmup": args.warmup,
                "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
