"""Pre-training throughput: samples/s, model TFLOP/s, MFU, peak memory and the largest micro-batch.

Real training steps (forward, backward, optimizer step) through ``bertrecipes.engine.train`` on our
data loader, for each implementation:

* ``triton``        - ``kernel=triton`` (fused Triton layer, unpadded: varlen flash attention)
* ``triton_padded`` - ``kernel=triton kernel.unpad=false`` (the same kernels on the padded batch)
* ``torch``         - ``kernel=torch`` (PyTorch eager, SDPA attention)
* ``torch_unpad``   - ``kernel=torch kernel.unpad=true`` (projections/FFN on real tokens only)
* ``compile``       - ``kernel=torch compile=true`` (``torch.compile`` of the model)
* ``compile_graphs`` - ``compile=true compile_mode=reduce-overhead`` (the same, replayed as CUDA graphs)
* ``hf``      - ``transformers.BertForPreTraining`` (``attn_implementation="sdpa"``) with
  ``torch.optim.AdamW(fused=True)``: what a user would pick instead; same batches, same precision.

FLOPs are counted analytically (``bertrecipes.model.training_flops_per_sample``: 3 x forward matmul
FLOPs of the encoder, attention, pooler and the MLM head at the masked positions), the same count
for every implementation, so TFLOP/s compare like samples/s. MFU = model TFLOP/s / the large-matmul
TFLOP/s measured in the same run on the same device and dtype. The count is for the padded
shape (``seq`` tokens per sample) whichever implementation runs, so an unpadded run that skips
padding shows its saving as more samples/s (and a higher MFU by this count); the ``real`` column
is the fraction of token slots that hold real tokens in the measured batches.

    python scripts/bench_pretrain.py --json bench_pretrain.json                    # the full table (GPU)
    python scripts/bench_pretrain.py --find-max-micro --models large --seqs 512    # micro-batch limit
    python scripts/bench_pretrain.py --device cpu --models tiny --seqs 64 --dtypes fp32 --steps 2 \\
        --impls torch,hf                                                           # smoke test on CPU
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"tiny": "bert_tiny", "base": "bert_base", "large": "bert_large"}
# micro-batch per seq length: DeepSpeed's BERT-large recipe (64 at 128, 8 at 512)
DEFAULT_MICRO = {128: 64, 512: 8}
PREDICTIONS = {128: 20, 512: 80}
VOCAB = 30528  # BERT's 30522 padded to a multiple of 8, as NVIDIA's recipe does
IMPLS = {  # the overrides of each implementation of ours ("hf" is run by run_hf)
    "triton": ["kernel=triton"],
    "triton_padded": ["kernel=triton", "kernel.unpad=false"],
    "torch": ["kernel=torch"],
    "torch_unpad": ["kernel=torch", "kernel.unpad=true"],
    "compile": ["kernel=torch", "compile=true"],
    "compile_graphs": ["kernel=torch", "compile=true", "compile_mode=reduce-overhead"],
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bertrecipes.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("pretrain", overrides=overrides)


def overrides_for(model: str, seq: int, micro: int, dtype: str, impl: str, steps: int, device: str,
                  peak: float | None, out: Path, cache: Path) -> list[str]:
    preds = PREDICTIONS.get(seq, max(1, round(seq * 0.15)))
    ov = [
        f"model={MODELS[model]}", f"model.vocab_size={VOCAB}", f"precision={dtype}",
        f"max_seq_length={seq}", f"max_predictions_per_seq={preds}",
        f"train_batch_size={micro}", f"train_micro_batch_size_per_gpu={micro}",
        # two logging windows of `steps` steps: the first is warm-up (allocator, autotuning,
        # compilation); the second is the measurement
        f"max_steps={2 * steps}", f"steps_per_print={steps}", "checkpoint_at_end=false",
        "progress_bar=false", f"device={device}", f"output_dir={out}", f"data.cache_dir={cache}",
        *IMPLS[impl],
    ]
    if peak:
        ov.append(f"peak_tflops={peak}")
    return ov


def run_ours(args, model, seq, micro, *, dtype, impl, peak, workdir: Path) -> dict:
    from bertrecipes.engine import train

    out = Path(tempfile.mkdtemp(dir=workdir))
    cfg = compose(overrides_for(model, seq, micro, dtype, impl, args.steps, args.device, peak, out,
                                workdir / "cache"))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    train(cfg, out)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return {"samples_per_sec": last["samples_per_sec"], "tflops": last.get("tflops"), "mfu": last.get("mfu"),
            "peak_memory_gb": last.get("max_memory_gb"),
            "real_token_fraction": last["tokens_per_sec"] / (last["samples_per_sec"] * seq)}


def run_hf(args, model, seq, micro, *, dtype, peak, workdir: Path) -> dict:
    """transformers BertForPreTraining + fused AdamW on the same loader and batches."""
    import transformers

    from bertrecipes.data import PretrainingLoader
    from bertrecipes.data.build import build_pretraining_dataset
    from bertrecipes.engine import build_model_config
    from bertrecipes.model import training_flops_per_sample
    from bertrecipes.precision import DTYPES

    cfg = compose(overrides_for(model, seq, micro, dtype, "torch", args.steps, args.device, peak,
                                workdir / "hf", workdir / "cache"))
    device = torch.device(args.device)
    dataset = build_pretraining_dataset(cfg)
    ours = build_model_config(cfg.model, dataset.vocab_size, seq)
    hf_config = transformers.BertConfig(
        vocab_size=ours.vocab_size, hidden_size=ours.hidden_size, num_hidden_layers=ours.num_hidden_layers,
        num_attention_heads=ours.num_attention_heads, intermediate_size=ours.intermediate_size,
        max_position_embeddings=ours.max_position_embeddings, attn_implementation="sdpa",
    )
    net = transformers.BertForPreTraining(hf_config).to(device).train()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01, fused=fused)
    amp_dtype = DTYPES[dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    batches = iter(PretrainingLoader(dataset, micro, seed=0, pin_memory=device.type == "cuda"))

    def step() -> None:
        b = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        # HF takes MLM labels at every position (-100 = not predicted); padded predictions point at
        # position 0 ([CLS], never predicted) and carry -100 already.
        labels = torch.full_like(b["input_ids"], -100)
        labels.scatter_(1, b["masked_lm_positions"], b["masked_lm_labels"])
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            out = net(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                      attention_mask=b["attention_mask"], labels=labels,
                      next_sentence_label=b["next_sentence_labels"])
        scaler.scale(out.loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.steps):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    samples_per_sec = args.steps * micro / (time.perf_counter() - t0)
    flops = training_flops_per_sample(ours, seq, cfg.max_predictions_per_seq)
    tflops = samples_per_sec * flops / 1e12 if device.type == "cuda" else None
    return {"samples_per_sec": samples_per_sec, "tflops": tflops,
            "mfu": tflops / peak if tflops and peak else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fits(fn, micro: int) -> bool:
    try:
        fn(micro)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def largest_micro(fn, start: int = 8, limit: int = 4096) -> int:
    """Largest micro-batch for which ``fn(micro)`` runs without running out of memory (doubling, then
    bisection)."""
    lo, hi = 0, start
    while hi <= limit and fits(fn, hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(fn, mid) else (lo, mid)
    return lo


def measure_peak(device: str, dtype: str) -> float | None:
    from bertrecipes.metrics import measure_peak_tflops
    from bertrecipes.precision import DTYPES

    if not device.startswith("cuda"):
        return None
    rates = [measure_peak_tflops(torch.device(device), DTYPES[dtype] if dtype != "fp32" else torch.float32)
             for _ in range(3)]
    return statistics.median(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="large,base", help="comma list of tiny, base, large")
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--impls", default="triton,triton_padded,torch,compile,hf",
                        help=f"comma list of {', '.join([*IMPLS, 'hf'])}")
    parser.add_argument("--micro", type=int, default=None,
                        help="micro-batch (default 64 at seq128, 8 at seq512)")
    parser.add_argument("--steps", type=int, default=10, help="steps per window (one warm-up, one measured)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--find-max-micro", action="store_true", help="also search the largest micro-batch")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu for a smoke test", file=sys.stderr)
        return 2

    unknown = sorted(set(args.impls.split(",")) - {*IMPLS, "hf"})
    if unknown:
        print(f"unknown --impls {unknown}; choose from {[*IMPLS, 'hf']}", file=sys.stderr)
        return 2

    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    for dtype in args.dtypes.split(","):
        peak = measure_peak(args.device, dtype)
        for model in args.models.split(","):
            for seq in map(int, args.seqs.split(",")):
                micro = args.micro or DEFAULT_MICRO.get(seq, 8)
                for impl in args.impls.split(","):
                    row = {"device": device_name, "dtype": dtype, "model": model, "seq": seq, "micro": micro,
                           "impl": impl, "matmul_peak_tflops": peak}

                    if impl == "hf":
                        once = partial(run_hf, args, model, seq, dtype=dtype, peak=peak, workdir=workdir)
                    else:
                        once = partial(run_ours, args, model, seq, dtype=dtype, impl=impl, peak=peak,
                                       workdir=workdir)

                    try:
                        row.update(once(micro))
                    except torch.cuda.OutOfMemoryError:
                        row["error"] = "OOM"
                    except Exception as e:  # one failing implementation must not hide the others
                        row["error"] = f"{type(e).__name__}: {e}"[:200]
                    if args.find_max_micro and "error" not in row:
                        row["max_micro"] = largest_micro(once, start=micro)
                    rows.append(row)
                    print_row(row, header=len(rows) == 1)
    if args.json:
        record = {"rows": rows, "args": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")
    return 0


def fmt(value, spec: str, width: int) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return f"{'-':>{width}}" if missing else format(value, spec)


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'device':<24} {'dtype':<5} {'model':<6} {'seq':>4} {'micro':>5} {'impl':<13} "
              f"{'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GB':>7} {'real':>5} {'max micro':>9}")
    key = (f"{row['device'][:24]:<24} {row['dtype']:<5} {row['model']:<6} {row['seq']:>4} "
           f"{row['micro']:>5} {row['impl']:<13}")
    if "error" in row:
        print(f"{key} {row['error']}")
        return
    print(f"{key} {fmt(row['samples_per_sec'], '10.1f', 10)} {fmt(row['tflops'], '8.1f', 8)} "
          f"{fmt(row['mfu'], '6.1%', 6)} {fmt(row['peak_memory_gb'], '7.2f', 7)} "
          f"{fmt(row.get('real_token_fraction'), '5.2f', 5)} {fmt(row.get('max_micro'), '9d', 9)}")


if __name__ == "__main__":
    sys.exit(main())
