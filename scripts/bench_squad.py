"""SQuAD fine-tuning throughput, model TFLOP/s, MFU and peak memory per micro-batch size and kernel.

    python scripts/bench_squad.py                                    # BERT-base and -large, all kernels
    python scripts/bench_squad.py --models large --kernels torch,hf --micro-batches 4,8 --json out.json
    python scripts/bench_squad.py --squad-file dev-v1.1.json --vocab-file vocab.txt   # real padding
    python scripts/bench_squad.py --device cpu --models tiny --micro-batches 2 --seq 64   # smoke test

Each cell times full training steps of ``BertForQuestionAnswering`` as ``python -m
bertrecipes.squad`` runs them (forward under autocast, QA loss, scaled backward, unscale,
global-norm clip, Adam step, zero) after ``--warmup`` untimed steps. Kernels: ``torch``,
``torch_unpad`` (``kernel.unpad=true``), ``triton`` (unpadded, varlen attention), ``triton_padded``,
``compile`` (``torch.compile`` of the torch model), ``triton_compile`` (of the unpadded Triton
model: one graph calling the Triton ops; ``compile=true kernel=triton``), ``compile_graphs`` and
``triton_graphs`` (the padded torch and Triton models with ``compile_mode=reduce-overhead``: the
step replays as CUDA graphs), ``triton_graphs_bucket`` (the unpadded Triton model as CUDA graphs,
its packed rows rounded up to a multiple of 256: ``kernel.unpad_bucket=256``), and ``hf``:
transformers' ``BertForQuestionAnswering`` (sdpa) with ``torch.optim.AdamW`` (fused on CUDA) and
``GradScaler``, the reference user's choice, on the same windows. The windows hold random token
ids; without ``--squad-file`` every window is full (``--seq`` real tokens, so unpadding has nothing
to skip); with it, each micro-batch takes the attention masks
of real SQuAD windows (features built as ``python -m bertrecipes.squad`` builds them, shuffled), so
the padding is what training meets. TFLOP/s counts ``qa_training_flops_per_sample`` on the padded
shape for every kernel (so skipped padding shows as more samples/s); MFU divides by a large matmul
measured in the same run (or ``--peak-tflops``). A micro-batch that runs out of memory is marked OOM
(and the larger ones are not tried); a kernel that cannot be built (``kernel=triton`` without
triton) is marked unavailable. Prints a table; ``--json`` is rewritten after every cell with the
device, dtype and shapes, so a quoted figure can name what produced it and a run cut short keeps
what it measured."""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bertrecipes.atomic import write_json_atomic
from bertrecipes.config import KernelConfig, ModelConfig
from bertrecipes.engine import (
    OptimizerStep,
    TrainState,
    batch_to_device,
    build_layer_factory,
    graph_step_marker,
)
from bertrecipes.errors import ConfigError
from bertrecipes.metrics import measure_peak_tflops
from bertrecipes.model import BertConfig
from bertrecipes.optim import Adam, build_param_groups
from bertrecipes.precision import DTYPES, LossScaler, autocast_context
from bertrecipes.squad.model import BertForQuestionAnswering, qa_loss, qa_training_flops_per_sample

CONF = Path(__file__).resolve().parent.parent / "conf"
VOCAB_SIZE = 30522  # bert-base/large-uncased
# name -> (kernel.name, kernel.unpad); hf is transformers'
KERNELS = {"torch": ("torch", False), "torch_unpad": ("torch", True), "triton": ("triton", True),
           "triton_padded": ("triton", False), "compile": ("torch", False),
           "triton_compile": ("triton", True), "compile_graphs": ("torch", False),
           "triton_graphs": ("triton", False), "triton_graphs_bucket": ("triton", True), "hf": None}
COMPILE_MODES = {"compile": "default", "triton_compile": "default", "compile_graphs": "reduce-overhead",
                 "triton_graphs": "reduce-overhead",
                 "triton_graphs_bucket": "reduce-overhead"}  # the kernels run through torch.compile
UNPAD_BUCKETS = {"triton_graphs_bucket": 256}  # kernel.unpad_bucket (0: the exact token count)


def real_window_masks(squad_file: Path, vocab_file: Path, seq: int) -> torch.Tensor:
    """Attention masks [windows, seq] of the file's training windows, shuffled: doc_stride 128 and
    max_query_length 64 as BingBertSquad (each at most half the window, for short test windows)."""
    from bertrecipes.data.tokenizer import load_tokenizer
    from bertrecipes.squad.data import build_features, read_squad_examples

    features = build_features(read_squad_examples(squad_file), load_tokenizer(vocab_file), seq,
                              min(128, seq // 2), min(64, seq // 2), is_training=True)
    masks = torch.from_numpy(features.attention_mask).long()
    return masks[torch.randperm(len(masks), generator=torch.Generator().manual_seed(0))]


def model_config(name: str) -> BertConfig:
    """BERT-base or -large as conf/model/bert_<name>.yaml defines it."""
    options = OmegaConf.load(CONF / "model" / f"bert_{name}.yaml")
    options.pop("defaults", None)
    fields = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(ModelConfig), options), resolve=True)
    fields.pop("pad_vocab_to_multiple_of")
    fields["vocab_size"] = fields["vocab_size"] or VOCAB_SIZE
    return BertConfig(**fields)


def make_inputs(config: BertConfig, micro_batch: int, seq: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Random windows of ``seq`` tokens ([CLS] question [SEP] context) and answer positions."""
    g = torch.Generator().manual_seed(0)
    question = min(64, seq // 2)  # [CLS] question [SEP] tokens, then the context
    host = {"input_ids": torch.randint(5, config.vocab_size, (micro_batch, seq), generator=g),
            "token_type_ids": (torch.arange(seq) >= question).long().expand(micro_batch, -1).contiguous(),
            "attention_mask": torch.ones(micro_batch, seq, dtype=torch.long)}
    starts = torch.randint(question, question + 16, (micro_batch,), generator=g)
    return host, starts, starts + 3


def ours_step(config: BertConfig, kernel: str, micro_batch: int, seq: int, precision: str,
              device: torch.device, next_masks) -> Callable[[], None]:
    """One training step of ours as ``python -m bertrecipes.squad`` runs it: forward under autocast,
    QA loss, scaled backward, then the engine's ``OptimizerStep`` (unscale, overflow check, clip to
    1.0, Adam step, zero)."""
    kernel_name, unpad = KERNELS[kernel]
    layer_factory = build_layer_factory(OmegaConf.structured(KernelConfig(name=kernel_name)))
    model = BertForQuestionAnswering(config, layer_factory=layer_factory, unpad=unpad,
                                     unpad_bucket=UNPAD_BUCKETS.get(kernel, 0)).to(device).train()
    forward = torch.compile(model, mode=COMPILE_MODES[kernel]) if kernel in COMPILE_MODES else model
    optimizer = Adam(build_param_groups(model, 0.0), lr=3e-5, bias_correction=False)
    params = [p for p in model.parameters() if p.requires_grad]
    # fp16: the recipe's dynamic scale from 2^16 (a static one would skip every step after an overflow)
    fp16 = precision == "fp16"
    scaler = LossScaler(scale=2.0**16 if fp16 else 1.0, dynamic=fp16, device=device)
    state = TrainState()
    graphs = COMPILE_MODES.get(kernel) == "reduce-overhead"  # as the engine runs CUDA graphs
    step_optimizer = OptimizerStep(params, optimizer, scaler, lambda _: 3e-5, state, max_grad_norm=1.0,
                                   keep_grads=graphs)
    mark_graph_step = graph_step_marker(graphs)
    host, starts, ends = make_inputs(config, micro_batch, seq)
    starts, ends = starts.to(device), ends.to(device)

    def step() -> None:
        mark_graph_step()
        host["attention_mask"] = next_masks(host["attention_mask"])
        batch, layout = batch_to_device(host, device, model.bert)
        with autocast_context(precision, device):
            start_logits, end_logits = forward(batch["input_ids"], batch["token_type_ids"],
                                               batch["attention_mask"], unpadded=layout)
        (qa_loss(start_logits, end_logits, starts, ends) * step_optimizer.loss_scale).backward()
        step_optimizer()

    def skipped_steps() -> int:  # fp16 overflows so far (a skipped step does less work)
        step_optimizer.resolve()
        return state.skipped_steps

    step.skipped_steps = skipped_steps
    return step


def hf_step(config: BertConfig, micro_batch: int, seq: int, precision: str, device: torch.device,
            next_masks) -> Callable[[], None]:
    """transformers' BertForQuestionAnswering (sdpa attention) with torch.optim.AdamW (fused on CUDA) and
    GradScaler: what a Hugging Face user runs; the same windows, precision and clipping."""
    import transformers
    from hf_reference import HFUserStep, hf_bert_config

    model = transformers.BertForQuestionAnswering(hf_bert_config(config)).to(device).train()
    user = HFUserStep(model, device, precision, lr=3e-5, weight_decay=0.0)
    host, starts, ends = make_inputs(config, micro_batch, seq)
    starts, ends = starts.to(device), ends.to(device)

    def step() -> None:
        host["attention_mask"] = next_masks(host["attention_mask"])
        # pinned, as Trainer's loader pins (dataloader_pin_memory): from pageable memory the copy may
        # wait for the GPU, which ours (batch_to_device pins) does not
        pin = device.type == "cuda"
        batch = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in host.items()}
        with autocast_context(precision, device):
            out = model(**batch, start_positions=starts, end_positions=ends)
        user.update(out.loss)

    return step


def time_cell(config: BertConfig, kernel: str, micro_batch: int, seq: int, precision: str, steps: int,
              warmup: int, device: torch.device, masks: torch.Tensor | None = None,
              peak_tflops: float | None = None) -> dict:
    """samples/s, TFLOP/s, MFU and peak memory of ``steps`` training steps, or status OOM / unavailable."""
    on_cuda = device.type == "cuda"
    windows = 0

    def next_masks(current: torch.Tensor) -> torch.Tensor:
        nonlocal windows
        if masks is None:  # every window full
            return current
        rows = torch.arange(windows, windows + micro_batch) % len(masks)  # the next real windows' padding
        windows += micro_batch
        return masks[rows]

    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = None
    from torch._dynamo.utils import counters

    graph_skips = counters["inductor"]["cudagraph_skips"]
    try:
        try:
            step = (hf_step(config, micro_batch, seq, precision, device, next_masks) if kernel == "hf" else
                    ours_step(config, kernel, micro_batch, seq, precision, device, next_masks))
        except (ConfigError, ImportError) as e:
            return {"status": "unavailable", "error": str(e)}
        skipped = getattr(step, "skipped_steps", None)
        for _ in range(warmup):
            step()
        sync(device)
        skipped_before = skipped() if skipped else None
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        samples_per_sec = micro_batch * steps / (time.perf_counter() - t0)
        tflops = samples_per_sec * qa_training_flops_per_sample(config, seq) / 1e12
        return {"status": "ok", "samples_per_sec": samples_per_sec, "tflops": tflops,
                "mfu": tflops / peak_tflops if peak_tflops else None,
                "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None,
                # of the timed steps, how many overflowed (fp16) and skipped their update
                "skipped_steps": skipped() - skipped_before if skipped else None,
                # graphs Inductor did not capture as CUDA graphs (the *_graphs kernels: 0 means all were)
                "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - graph_skips}
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM", "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    except RuntimeError as e:  # a kernel that fails to compile or launch: record it, time the rest
        return {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        step = None  # free the memory before the next cell
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cell_text(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"]
    text = f"{r['samples_per_sec']:.1f}/s"
    if r.get("mfu") is not None:
        text += f" {r['mfu']:.0%}"
    if r.get("peak_memory_gb") is not None:
        text += f" {r['peak_memory_gb']:.1f}G"
    if r.get("skipped_steps"):
        text += f" !{r['skipped_steps']}skip"
    return text


def print_table(results: list[dict], micro_batches: list[int]) -> None:
    header = f"{'model':<7}{'kernel':<21}" + "".join(f"{f'mb={m}':>22}" for m in micro_batches)
    print(header)
    print("-" * len(header))
    rows: dict[tuple[str, str], dict[int, dict]] = {}
    for r in results:
        rows.setdefault((r["model"], r["kernel"]), {})[r["micro_batch"]] = r
    for (name, kernel), cells in rows.items():
        print(f"{name:<7}{kernel:<21}" + "".join(f"{cell_text(cells.get(m, {'status': '-'})):>22}"
                                                 for m in micro_batches))
    print("cells: samples/s, MFU and peak allocated GiB per micro-batch (training step incl. the optimizer);"
          " !Nskip: N timed steps overflowed in fp16 and skipped their update")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="base,large", help="comma list of tiny, base, large")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {', '.join(KERNELS)}")
    parser.add_argument("--squad-file", type=Path, help="take the windows' padding from this SQuAD json")
    parser.add_argument("--vocab-file", type=Path, help="WordPiece vocabulary for --squad-file")
    parser.add_argument("--micro-batches", default="4,8,12,16,24,32", help="micro-batch sizes to time")
    parser.add_argument("--seq", type=int, default=384, help="sequence length (SQuAD: 384)")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                        help="autocast dtype (BingBertSquad: fp16)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per cell")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (default when there is one) or cpu (a smoke test: no memory or MFU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="MFU denominator (default: a large matmul measured in this run, CUDA only)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no cell after this many seconds; later cells are marked skipped")
    parser.add_argument("--json", type=Path, help="write every cell here (rewritten after each)")
    args = parser.parse_args(argv)
    started = time.monotonic()

    unknown = sorted(set(args.kernels.split(",")) - set(KERNELS))
    if unknown:
        parser.error(f"unknown --kernels {unknown}; choose from {list(KERNELS)}")
    unknown = sorted(set(args.models.split(",")) - {"tiny", "base", "large"})
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from ['tiny', 'base', 'large']")
    if (args.squad_file is None) != (args.vocab_file is None):
        parser.error("--squad-file and --vocab-file go together")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device} but torch.cuda.is_available() is False here; use --device cpu for a "
              "smoke test. Nothing measured.", file=sys.stderr)
        return 2
    if args.device == "cpu":  # kernel=triton runs in Triton's interpreter (chosen before triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device(args.device)
    micro_batches = [int(m) for m in args.micro_batches.split(",")]
    masks = real_window_masks(args.squad_file, args.vocab_file, args.seq) if args.squad_file else None
    real_fraction = float(masks.float().mean()) if masks is not None else 1.0
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = measure_peak_tflops(device, DTYPES[args.precision], repeats=3)
    from bench_pretrain import versions

    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            **versions(), "precision": args.precision, "seq_len": args.seq, "steps": args.steps,
            "warmup": args.warmup, "real_token_fraction": real_fraction, "matmul_peak_tflops": peak,
            "flops": "3 x forward matmul FLOPs per window "
                     "(bertrecipes.squad.model.qa_training_flops_per_sample)",
            "command": shlex.join(["bench_squad.py", *(sys.argv[1:] if argv is None else argv)])}
    results: list[dict] = []
    for name in args.models.split(","):
        config = model_config(name)
        for kernel in args.kernels.split(","):
            oom = False
            for micro_batch in micro_batches:
                if args.time_budget is not None and time.monotonic() - started > args.time_budget:
                    cell = {"status": "skipped", "note": f"time budget ({args.time_budget:g} s) spent"}
                elif oom:
                    cell = {"status": "OOM", "note": "a smaller micro-batch ran out of memory"}
                else:
                    cell = time_cell(config, kernel, micro_batch, args.seq, args.precision, args.steps,
                                     args.warmup, device, masks, peak)
                oom = oom or cell["status"] == "OOM"
                results.append({"model": name, "kernel": kernel, "micro_batch": micro_batch, **cell})
                print(f"bert-{name} kernel={kernel} micro_batch={micro_batch}: {cell}", file=sys.stderr,
                      flush=True)
                if args.json:
                    write_json_atomic(args.json, {"meta": meta, "results": results})
                if cell["status"] == "unavailable":
                    results.extend({"model": name, "kernel": kernel, "micro_batch": m, **cell}
                                   for m in micro_batches if m > micro_batch)
                    break
    print_table(results, micro_batches)
    if args.json:
        write_json_atomic(args.json, {"meta": meta, "results": results})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
