"""Pre-training throughput: samples/s, model TFLOP/s, MFU, peak memory and the largest micro-batch.

Real training steps (forward, backward, optimizer step) through ``bertrecipes.engine.train`` on our
data loader, for each implementation:

* ``triton``        - ``kernel=triton`` (fused Triton layer, unpadded: varlen flash attention)
* ``triton_padded`` - ``kernel=triton kernel.unpad=false`` (the same kernels on the padded batch)
* ``triton_stochastic`` - ``kernel=triton kernel.stochastic_mode=true`` (DeepSpeed's faster, not
  bitwise reproducible reductions: dQ by atomics instead of a second attention pass)
* ``triton_lowmem`` - ``kernel=triton`` with DeepSpeed's memory flags on (``normalize_invertible``,
  ``gelu_checkpoint``, ``attn_dropout_checkpoint``): what fits the largest micro-batch
* ``torch``         - ``kernel=torch`` (PyTorch eager, SDPA attention)
* ``torch_unpad``   - ``kernel=torch kernel.unpad=true`` (projections/FFN on real tokens only)
* ``compile``       - ``kernel=torch compile=true`` (``torch.compile`` of the model)
* ``compile_graphs`` - ``compile=true compile_mode=reduce-overhead`` (the same, replayed as CUDA graphs)
* ``triton_compile`` - ``kernel=triton compile=true`` (one graph: the Triton ops are custom ops it
  calls, Inductor compiles the GEMMs, embeddings, unpadding, the heads and the loss around them)
* ``triton_graphs`` - ``kernel=triton kernel.unpad=false compile=true compile_mode=reduce-overhead``
  (the same on the padded batch, whose fixed shapes let the model's forward and backward, Triton
  ops included, replay as CUDA graphs)
* ``triton_graphs_bucket`` - ``kernel=triton kernel.unpad_bucket=256 compile=true
  compile_mode=reduce-overhead`` (CUDA graphs on the unpadded batch: the packed rows rounded up to a
  multiple of 256 with filler, so one graph per bucket of token counts)
* ``hf``      - ``transformers.BertForPreTraining`` (``attn_implementation="sdpa"``) with
  ``torch.optim.AdamW(fused=True)``: what a user would pick instead; same batches, same precision.
* ``hf_compile`` - the same transformers model through ``torch.compile`` (what that user gets from
  ``Trainer(torch_compile=True)``).

FLOPs are counted analytically (``bertrecipes.model.training_flops_per_sample``: 3 x forward matmul
FLOPs of the encoder, attention, pooler and the MLM head at the masked positions), the same count
for every implementation, so TFLOP/s compare like samples/s. MFU = model TFLOP/s / the large-matmul
TFLOP/s measured in the same run on the same device and dtype. The count is for the padded
shape (``seq`` tokens per sample) whichever implementation runs, so an unpadded run that skips
padding shows its saving as more samples/s (and a higher MFU by this count); the ``real`` column
is the fraction of token slots that hold real tokens in the measured batches.

The largest micro-batch (``--find-max-micro``) is bracketed, not guessed: peak memory is measured
at two micro-batches, the linear fit (memory = fixed + per-sample x micro) predicts the largest that
fits the card, and short probes (``--probe-steps`` optimizer steps each) move from there until one
micro-batch runs and the next one up (the step is ``--micro-resolution`` of it) runs out of memory.
The row reports both (``max_micro``, ``oom_micro``).

The JSON is rewritten (atomically) after every row, and ``--time-budget`` skips the rows that would
start after it, so a run cut short still leaves every finished row on disk.

    python scripts/bench_pretrain.py --json bench_pretrain.json                    # the full table (GPU)
    python scripts/bench_pretrain.py --find-max-micro --models large --seqs 512    # micro-batch limit
    python scripts/bench_pretrain.py --data "data=text_files data.paths=[wiki.txt] data.vocab_file=vocab.txt"
    python scripts/bench_pretrain.py --device cpu --models tiny --seqs 64 --dtypes fp32 --steps 2 \\
        --impls torch,hf                                                           # smoke test on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODELS = {"tiny": "bert_tiny", "base": "bert_base", "large": "bert_large"}
# micro-batch per seq length: DeepSpeed's BERT-large recipe (64 at 128, 8 at 512)
DEFAULT_MICRO = {128: 64, 512: 8}
PREDICTIONS = {128: 20, 512: 80}
VOCAB = 30528  # BERT's 30522 padded to a multiple of 8, as NVIDIA's recipe does
IMPLS = {  # the overrides of each implementation of ours ("hf" is run by run_hf)
    "triton": ["kernel=triton"],
    "triton_padded": ["kernel=triton", "kernel.unpad=false"],
    "triton_stochastic": ["kernel=triton", "kernel.stochastic_mode=true"],
    "triton_lowmem": ["kernel=triton", "kernel.normalize_invertible=true", "kernel.gelu_checkpoint=true",
                      "kernel.attn_dropout_checkpoint=true"],
    "torch": ["kernel=torch"],
    "torch_unpad": ["kernel=torch", "kernel.unpad=true"],
    "compile": ["kernel=torch", "compile=true"],
    "compile_graphs": ["kernel=torch", "compile=true", "compile_mode=reduce-overhead"],
    "triton_compile": ["kernel=triton", "compile=true"],
    "triton_graphs": ["kernel=triton", "kernel.unpad=false", "compile=true", "compile_mode=reduce-overhead"],
    "triton_graphs_bucket": ["kernel=triton", "kernel.unpad_bucket=256", "compile=true",
                             "compile_mode=reduce-overhead"],
}
HF_IMPLS = ("hf", "hf_compile")  # transformers' model, eager and through torch.compile (run by run_hf)
FLOPS_FORMULA = ("3 x forward matmul FLOPs per sample (bertrecipes.model.training_flops_per_sample): "
                 "layers x seq x [2(4H^2 + 2HI) + 4 seq H] + preds x 2(H^2 + HV) + 2(H^2 + 2H)")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bertrecipes.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("pretrain", overrides=overrides)


def overrides_for(model: str, seq: int, micro: int, dtype: str, impl: str, steps: int, device: str,
                  peak: float | None, out: Path, cache: Path, data: list[str] = (),
                  accumulation: int = 1) -> list[str]:
    preds = PREDICTIONS.get(seq, max(1, round(seq * 0.15)))
    ov = [
        f"model={MODELS[model]}", f"model.vocab_size={VOCAB}", f"precision={dtype}",
        f"max_seq_length={seq}", f"max_predictions_per_seq={preds}",
        f"train_batch_size={micro * accumulation}", f"train_micro_batch_size_per_gpu={micro}",
        # two logging windows of `steps` steps: the first is warm-up (allocator, autotuning,
        # compilation); the second is the measurement
        f"max_steps={2 * steps}", f"steps_per_print={steps}", "checkpoint_at_end=false",
        "progress_bar=false", f"device={device}", f"output_dir={out}", f"data.cache_dir={cache}",
        *data, *IMPLS[impl],
    ]
    if peak:
        ov.append(f"peak_tflops={peak}")
    return ov


def run_ours(args, model, seq, micro, steps=None, *, dtype, impl, peak, workdir: Path) -> dict:
    from bertrecipes.engine import train

    out = Path(tempfile.mkdtemp(dir=workdir))
    cfg = compose(overrides_for(model, seq, micro, dtype, impl, steps or args.steps, args.device, peak, out,
                                args.cache_dir or workdir / "cache", args.data, args.accumulation))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    from torch._dynamo.utils import counters

    skips_before = counters["inductor"]["cudagraph_skips"]
    train(cfg, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if len(records) < 2 or records[-1]["step"] != 2 * (steps or args.steps):  # e.g. SIGTERM: a clean stop
        raise RuntimeError(f"the run stopped at step {records[-1]['step'] if records else 0} of "
                           f"{2 * (steps or args.steps)}, before the end of its measured window")
    first, last = records[0], records[-1]  # the warm-up window, the measured one
    return {"samples_per_sec": last["samples_per_sec"], "tflops": last.get("tflops"), "mfu": last.get("mfu"),
            "peak_memory_gb": last.get("max_memory_gb"),
            "real_token_fraction": last["tokens_per_sec"] / (last["samples_per_sec"] * seq),
            # measured steps that overflowed (fp16) and skipped their update: they cost less than real ones
            "skipped_steps": last["skipped_steps"] - first["skipped_steps"],
            # graphs Inductor did not capture as CUDA graphs (reduce-overhead rows: 0 means all were)
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips_before}


def run_hf(args, model, seq, micro, steps=None, *, dtype, peak, workdir: Path, compile: bool = False) -> dict:
    """transformers BertForPreTraining + fused AdamW on the same loader and batches (``compile``:
    its forward through ``torch.compile``)."""
    import transformers
    from hf_reference import HFUserStep, hf_bert_config

    from bertrecipes.data import PretrainingLoader
    from bertrecipes.data.build import build_pretraining_dataset
    from bertrecipes.engine import build_model_config
    from bertrecipes.model import training_flops_per_sample
    from bertrecipes.precision import DTYPES

    steps = steps or args.steps
    cfg = compose(overrides_for(model, seq, micro, dtype, "torch", steps, args.device, peak,
                                workdir / "hf", args.cache_dir or workdir / "cache", args.data))
    device = torch.device(args.device)
    dataset = build_pretraining_dataset(cfg)
    ours = build_model_config(cfg.model, dataset.vocab_size, seq)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    net = transformers.BertForPreTraining(hf_bert_config(ours)).to(device).train()
    forward = torch.compile(net) if compile else net
    user = HFUserStep(net, device, dtype, lr=1e-4, weight_decay=0.01, accumulation=args.accumulation)
    amp_dtype = DTYPES[dtype]
    batches = iter(PretrainingLoader(dataset, micro, seed=cfg.seed, pin_memory=device.type == "cuda"))
    real_tokens = 0

    def step() -> None:
        nonlocal real_tokens
        host = next(batches)
        real_tokens += int(host["length"].sum())
        b = {k: v.to(device, non_blocking=True) for k, v in host.items()}
        # HF takes MLM labels at every position (-100 = not predicted); padded predictions point at
        # position 0 ([CLS], never predicted) and carry -100 already.
        labels = torch.full_like(b["input_ids"], -100)
        labels.scatter_(1, b["masked_lm_positions"], b["masked_lm_labels"])
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            out = forward(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                          attention_mask=b["attention_mask"], labels=labels,
                          next_sentence_label=b["next_sentence_labels"])
        user.update(out.loss)

    micro_steps = steps * args.accumulation  # `steps` optimizer steps per window, as ours
    for _ in range(micro_steps):
        step()
    sync(device)
    real_tokens = 0
    t0 = time.perf_counter()
    for _ in range(micro_steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - t0
    samples_per_sec = micro_steps * micro / elapsed
    flops = training_flops_per_sample(ours, seq, cfg.max_predictions_per_seq)
    tflops = samples_per_sec * flops / 1e12 if device.type == "cuda" else None
    return {"samples_per_sec": samples_per_sec, "tflops": tflops,
            "mfu": tflops / peak if tflops and peak else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "real_token_fraction": real_tokens / (micro_steps * micro * seq)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(error: BaseException) -> bool:
    """Out of device memory: torch's allocator error, or a library's own (Triton loading a kernel,
    cuBLAS creating a workspace) as a RuntimeError naming it."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def free_memory() -> None:
    """Give back what a failed run left (its tensors are only freed once their cycles are collected)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_or_oom(fn: Callable[[int], dict], micro: int) -> float | None:
    """Peak memory (GB) of ``fn(micro)``, or None when it runs out of memory."""
    try:
        return fn(micro).get("peak_memory_gb") or 0.0
    except RuntimeError as e:
        if is_oom(e):
            return None
        raise
    finally:
        free_memory()


def largest_micro(peak_at: Callable[[int], float | None], start: int, capacity_gb: float | None,
                  resolution: float = 0.05, max_probes: int = 12,
                  out_of_time: Callable[[], bool] = lambda: False,
                  known: dict[int, float | None] | None = None) -> dict:
    """Bracket the largest micro-batch that runs: ``peak_at(m)`` is the peak memory (GB) of a short
    run at micro-batch ``m``, or None when it runs out of memory. Upwards from ``start`` each next
    probe is the linear fit's prediction for ``capacity_gb`` (memory grows linearly with the batch),
    else a doubling; then it closes in until ``oom_micro - max_micro <= max(1, resolution *
    max_micro)``. ``known`` holds peaks already measured (not run again). Returns max_micro, oom_micro
    (None if never reached), the probes in order (known ones first) and whether the bracket closed."""
    peaks = dict(known or {})
    probes: list[tuple[int, float | None]] = list(peaks.items())

    def fits(m: int) -> bool:
        if m not in peaks:
            peaks[m] = peak_at(m)
            probes.append((m, peaks[m]))
        return peaks[m] is not None

    def can_probe(m: int) -> bool:  # known for free, or a probe still allowed
        return m in peaks or (len(probes) < max_probes and not out_of_time())

    def step(m: int) -> int:
        return max(1, int(m * resolution))

    def predicted() -> int | None:  # the linear fit through the two largest micro-batches that ran
        ran = sorted((m, p) for m, p in probes if p is not None)
        if capacity_gb is None or len(ran) < 2 or ran[-1][1] <= ran[-2][1]:
            return None
        (m1, p1), (m2, p2) = ran[-2:]
        per_sample = (p2 - p1) / (m2 - m1)
        return int(m2 + (capacity_gb - p2) / per_sample)

    lo, hi = 0, None
    m = start
    while m >= 1 and can_probe(m):  # downwards if start fails
        if fits(m):
            lo = m
            break
        hi, m = m, m // 2
    if lo == 0:
        return {"max_micro": 0, "oom_micro": hi, "probes": probes, "closed": False}
    while hi is None and len(probes) < max_probes and not out_of_time():  # upwards
        guess = predicted()
        m = max(guess, lo + step(lo)) if guess is not None else 2 * lo
        if fits(m):
            lo = m
        else:
            hi = m
    tried_below_hi = False
    while hi is not None and hi - lo > step(lo) and len(probes) < max_probes and not out_of_time():
        # the prediction (or the OOM next to it) is usually close: try just below the OOM first
        m = hi - step(hi) if not tried_below_hi and hi - step(hi) > lo else (lo + hi) // 2
        tried_below_hi = True
        if fits(m):
            lo = m
        else:
            hi = m
    closed = hi is not None and hi - lo <= step(lo)
    return {"max_micro": lo, "oom_micro": hi, "probes": probes, "closed": closed}


def measure_peak(device: str, dtype: str) -> float | None:
    from bertrecipes.metrics import measure_peak_tflops
    from bertrecipes.precision import DTYPES

    if not device.startswith("cuda"):
        return None
    return measure_peak_tflops(torch.device(device), DTYPES[dtype], repeats=3)


def versions() -> dict:
    """Library versions, and the tuned attention tiles in force (``$KERNELS_TRITON_ATTENTION_BLOCKS``)."""
    found = {"torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    path = os.environ.get("KERNELS_TRITON_ATTENTION_BLOCKS")
    found["attention_blocks"] = json.loads(Path(path).read_text()) if path else None
    return found


def measure_all(argv: list[str] | None, workdir: Path) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="large,base", help="comma list of tiny, base, large")
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--impls", default="triton,triton_padded,torch,compile,hf",
                        help=f"comma list of {', '.join([*IMPLS, *HF_IMPLS])}")
    parser.add_argument("--micro", type=int, default=None,
                        help="micro-batch (default 64 at seq128, 8 at seq512)")
    parser.add_argument("--steps", type=int, default=10, help="steps per window (one warm-up, one measured)")
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro-batches per optimizer step (1: every step runs the optimizer, the "
                             "hardest case; the recipe accumulates hundreds, which hides the optimizer)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default="", help="Hydra data overrides, one string (default: the demo "
                        "corpus), e.g. \"data=text_files data.paths=[wiki.txt] data.vocab_file=vocab.txt\"")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="data cache to reuse across runs (default: a fresh temporary one)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="MFU denominator (default: a large matmul measured in this run)")
    parser.add_argument("--find-max-micro", action="store_true", help="also bracket the largest micro-batch")
    parser.add_argument("--probe-steps", type=int, default=1, help="optimizer steps per window of a probe")
    parser.add_argument("--micro-resolution", type=float, default=0.05,
                        help="--find-max-micro closes the bracket to this fraction of the micro-batch")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no row (and no probe) after this many seconds; later rows are skipped")
    parser.add_argument("--json", type=Path, default=None, help="rewritten after every row")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu for a smoke test", file=sys.stderr)
        return 2
    if args.accumulation < 1:
        print(f"--accumulation must be >= 1, got {args.accumulation}", file=sys.stderr)
        return 2
    if args.device == "cpu":  # kernel=triton runs in Triton's interpreter (chosen before triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.data = shlex.split(args.data)
    unknown = sorted(set(args.impls.split(",")) - {*IMPLS, *HF_IMPLS})
    if unknown:
        print(f"unknown --impls {unknown}; choose from {[*IMPLS, *HF_IMPLS]}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        print(f"unknown --models {unknown}; choose from {list(MODELS)}", file=sys.stderr)
        return 2

    def out_of_time() -> bool:
        return args.time_budget is not None and time.monotonic() - started > args.time_budget

    rows: list[dict] = []
    on_cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if on_cuda else "cpu"
    capacity = (torch.cuda.get_device_properties(torch.device(args.device)).total_memory / 2**30
                if on_cuda else None)
    meta = {"device": device_name, "memory_gb": capacity, **versions(), "flops": FLOPS_FORMULA,
            "command": shlex.join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
            "steps": args.steps}

    def save() -> None:
        if args.json:
            from bertrecipes.atomic import write_json_atomic

            write_json_atomic(args.json, {"meta": meta, "rows": rows})

    rows_total = len(args.dtypes.split(",")) * len(args.models.split(",")) * len(args.seqs.split(",")) * len(
        args.impls.split(","))

    def probe_budget() -> Callable[[], bool]:
        """out_of_time for one row's micro-batch probes: an even share of what is left of the budget
        among this row and those after it, so one implementation's probes cannot starve the next."""
        if args.time_budget is None:
            return out_of_time
        left = args.time_budget - (time.monotonic() - started)
        # called once the row has run, before it is appended: its probes and each row still to come
        deadline = time.monotonic() + left / (rows_total - len(rows))
        return lambda: out_of_time() or time.monotonic() > deadline

    for dtype in args.dtypes.split(","):
        peak = args.peak_tflops or (None if out_of_time() else measure_peak(args.device, dtype))
        meta.setdefault("matmul_peak_tflops", {})[dtype] = peak
        for model in args.models.split(","):
            for seq in map(int, args.seqs.split(",")):
                micro = args.micro or DEFAULT_MICRO.get(seq, 8)
                for impl in args.impls.split(","):
                    row = {"device": device_name, "dtype": dtype, "model": model, "seq": seq, "micro": micro,
                           "accumulation": args.accumulation, "impl": impl, "matmul_peak_tflops": peak}
                    if impl in HF_IMPLS:
                        once = partial(run_hf, args, model, seq, dtype=dtype, peak=peak, workdir=workdir,
                                       compile=impl == "hf_compile")
                    else:
                        once = partial(run_ours, args, model, seq, dtype=dtype, impl=impl, peak=peak,
                                       workdir=workdir)
                    if out_of_time():
                        row["skipped"] = f"time budget ({args.time_budget:g} s) spent"
                    else:
                        # compile from a clean slate (no recompiles or dynamic shapes from an earlier row's
                        # frames), and free an earlier row's CUDA graphs: their pool would count in this
                        # row's peak memory
                        torch._dynamo.reset()
                        free_memory()
                        try:
                            row.update(once(micro))
                        except Exception as e:  # one failing implementation must not hide the others
                            row["error"] = "OOM" if is_oom(e) else f"{type(e).__name__}: {e}"[:300]
                        if "error" in row:  # out of the handler: its traceback no longer holds the run
                            free_memory()
                    probe_out_of_time = probe_budget()
                    rows.append(row)
                    save()  # the row stands even if its probes are cut short
                    if args.find_max_micro and "samples_per_sec" in row:
                        probes = [(micro, row.get("peak_memory_gb") or 0.0)]

                        def probe(m, once=once, row=row, probes=probes):
                            peak_gb = peak_or_oom(partial(once, steps=args.probe_steps), m)
                            probes.append((m, peak_gb))
                            row["max_micro_probes"] = list(probes)
                            save()
                            return peak_gb

                        try:
                            found = largest_micro(probe, micro, capacity, args.micro_resolution,
                                                  out_of_time=probe_out_of_time, known=dict(probes))
                            row.update(max_micro=found["max_micro"], oom_micro=found["oom_micro"],
                                       max_micro_closed=found["closed"], max_micro_probes=found["probes"])
                        except Exception as e:  # a probe that fails otherwise than by OOM
                            row["max_micro_error"] = f"{type(e).__name__}: {e}"[:300]
                        if "max_micro_error" in row:
                            free_memory()
                        save()
                    print_row(row, header=len(rows) == 1)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def fmt(value, spec: str, width: int) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return f"{'-':>{width}}" if missing else format(value, spec)


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'device':<24} {'dtype':<5} {'model':<6} {'seq':>4} {'micro':>5} {'impl':<20} "
              f"{'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GB':>7} {'real':>5} {'max micro':>9}")
    micro = row["micro"] if row.get("accumulation", 1) == 1 else f"{row['micro']}x{row['accumulation']}"
    key = (f"{row['device'][:24]:<24} {row['dtype']:<5} {row['model']:<6} {row['seq']:>4} "
           f"{micro:>5} {row['impl']:<20}")
    if "samples_per_sec" not in row:
        print(f"{key} {row.get('error') or row.get('skipped')}", flush=True)
        return
    limit = row.get("max_micro")
    if limit is not None:
        limit = f"{limit}" + ("" if row.get("max_micro_closed") else "?")
    print(f"{key} {fmt(row['samples_per_sec'], '10.1f', 10)} {fmt(row['tflops'], '8.1f', 8)} "
          f"{fmt(row['mfu'], '6.1%', 6)} {fmt(row['peak_memory_gb'], '7.2f', 7)} "
          f"{fmt(row.get('real_token_fraction'), '5.2f', 5)} {fmt(limit, '>9', 9)}", flush=True)
    if row.get("skipped_steps"):
        print(f"{'':<24} ^ {row['skipped_steps']} measured steps overflowed (fp16) and skipped their update",
              flush=True)
    if row.get("cudagraph_skips") and "reduce-overhead" in " ".join(IMPLS.get(row["impl"], ())):
        print(f"{'':<24} ^ Inductor ran {row['cudagraph_skips']} graph(s) without CUDA graphs (see the log)",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    # the runs' checkpoints and data cache live here, removed at the end however the run ends
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as workdir:
        return measure_all(argv, Path(workdir))


if __name__ == "__main__":
    sys.exit(main())
