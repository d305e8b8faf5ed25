"""SQuAD fine-tuning throughput and peak memory per micro-batch size, kernel and model (CUDA only).

    python scripts/bench_squad.py                                    # BERT-base and -large, all kernels
    python scripts/bench_squad.py --models large --kernels torch --micro-batches 4,8 --json out.json
    python scripts/bench_squad.py --squad-file dev-v1.1.json --vocab-file vocab.txt   # real padding

Each cell times full training steps of ``BertForQuestionAnswering`` as ``python -m bertrecipes.squad``
runs them (forward under autocast, QA loss, scaled backward, unscale, global-norm clip, Adam step,
zero) after ``--warmup`` untimed steps. Kernels: ``torch``, ``torch_unpad`` (``kernel.unpad=true``),
``triton`` (unpadded, varlen attention) and ``triton_padded``. The windows hold random token ids;
without ``--squad-file`` every window is full (``--seq`` real tokens, so unpadding has nothing to
skip); with it, each micro-batch takes the attention masks of real SQuAD windows (features built as
``python -m bertrecipes.squad`` builds them, shuffled), so the padding is what training meets. It
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
from bertrecipes.engine import batch_to_device, build_layer_factory
from bertrecipes.errors import ConfigError
from bertrecipes.model import BertConfig
from bertrecipes.optim import Adam, build_param_groups
from bertrecipes.precision import autocast_context
from bertrecipes.squad.model import BertForQuestionAnswering, qa_loss

CONF = Path(__file__).resolve().parent.parent / "conf"
VOCAB_SIZE = 30522  # bert-base/large-uncased
KERNELS = {"torch": ("torch", False), "torch_unpad": ("torch", True), "triton": ("triton", True),
           "triton_padded": ("triton", False)}  # name -> (kernel.name, kernel.unpad)


def real_window_masks(squad_file: Path, vocab_file: Path, seq: int) -> torch.Tensor:
    """Attention masks [windows, seq] of the file's training windows (doc_stride 128, query 64), shuffled."""
    from bertrecipes.data.tokenizer import load_tokenizer
    from bertrecipes.squad.data import build_features, read_squad_examples

    features = build_features(read_squad_examples(squad_file), load_tokenizer(vocab_file), seq, 128, 64,
                              is_training=True)
    masks = torch.from_numpy(features.attention_mask).long()
    return masks[torch.randperm(len(masks), generator=torch.Generator().manual_seed(0))]


def model_config(name: str) -> BertConfig:
    """BERT-base or -large as conf/model/bert_<name>.yaml defines it."""
    options = OmegaConf.load(CONF / "model" / f"bert_{name}.yaml")
    options.pop("defaults", None)
    fields = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(ModelConfig), options), resolve=True)
    fields["vocab_size"] = fields["vocab_size"] or VOCAB_SIZE
    return BertConfig(**fields)


def time_cell(config: BertConfig, kernel: str, micro_batch: int, seq: int, precision: str, steps: int,
              warmup: int, device: torch.device, masks: torch.Tensor | None = None) -> dict:
    """samples/s and peak memory of ``steps`` training steps, or status OOM / unavailable."""
    kernel_name, unpad = KERNELS[kernel]
    try:
        layer_factory = build_layer_factory(OmegaConf.structured(KernelConfig(name=kernel_name)))
    except (ConfigError, ImportError) as e:
        return {"status": "unavailable", "error": str(e)}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model = optimizer = None
    try:
        model = BertForQuestionAnswering(config, layer_factory=layer_factory, unpad=unpad).to(device).train()
        optimizer = Adam(build_param_groups(model, 0.0), lr=3e-5, bias_correction=False)
        params = [p for p in model.parameters() if p.requires_grad]
        scale = 2.0**16 if precision == "fp16" else 1.0
        g = torch.Generator().manual_seed(0)
        question = min(64, seq // 2)  # [CLS] question [SEP] tokens, then the context
        host = {"input_ids": torch.randint(5, config.vocab_size, (micro_batch, seq), generator=g),
                "token_type_ids": (torch.arange(seq) >= question).long().expand(micro_batch, -1),
                "attention_mask": torch.ones(micro_batch, seq, dtype=torch.long)}
        starts = torch.randint(question, question + 16, (micro_batch,), generator=g).to(device)
        ends = starts + 3
        windows = 0

        def step() -> None:
            nonlocal windows
            if masks is not None:  # the next real windows' padding
                rows = torch.arange(windows, windows + micro_batch) % len(masks)
                host["attention_mask"] = masks[rows]
                windows += micro_batch
            batch, layout = batch_to_device(host, device, unpad)
            with autocast_context(precision, device):
                start_logits, end_logits = model(batch["input_ids"], batch["token_type_ids"],
                                                 batch["attention_mask"], unpadded=layout)
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
    header = f"{'model':<7}{'kernel':<14}" + "".join(f"{f'mb={m}':>18}" for m in micro_batches)
    print(header)
    print("-" * len(header))
    rows: dict[tuple[str, str], dict[int, dict]] = {}
    for r in results:
        rows.setdefault((r["model"], r["kernel"]), {})[r["micro_batch"]] = r
    for (name, kernel), cells in rows.items():
        line = f"{name:<7}{kernel:<14}"
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
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {', '.join(KERNELS)}")
    parser.add_argument("--squad-file", type=Path, help="take the windows' padding from this SQuAD json")
    parser.add_argument("--vocab-file", type=Path, help="WordPiece vocabulary for --squad-file")
    parser.add_argument("--micro-batches", default="4,8,12,16,24,32", help="micro-batch sizes to time")
    parser.add_argument("--seq", type=int, default=384, help="sequence length (SQuAD: 384)")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                        help="autocast dtype (BingBertSquad: fp16)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per cell")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--json", type=Path, help="write every cell here")
    args = parser.parse_args(argv)

    unknown = sorted(set(args.kernels.split(",")) - set(KERNELS))
    if unknown:
        parser.error(f"unknown --kernels {unknown}; choose from {list(KERNELS)}")
    if (args.squad_file is None) != (args.vocab_file is None):
        parser.error("--squad-file and --vocab-file go together")
    if not torch.cuda.is_available():
        print("bench_squad.py measures GPU training steps and needs CUDA; torch.cuda.is_available() is "
              "False here. Nothing measured.", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    micro_batches = [int(m) for m in args.micro_batches.split(",")]
    masks = real_window_masks(args.squad_file, args.vocab_file, args.seq) if args.squad_file else None
    real_fraction = float(masks.float().mean()) if masks is not None else 1.0
    results = []
    for name in args.models.split(","):
        config = model_config(name)
        for kernel in args.kernels.split(","):
            oom = False
            for micro_batch in micro_batches:
                cell = ({"status": "OOM", "note": "a smaller micro-batch ran out of memory"} if oom else
                        time_cell(config, kernel, micro_batch, args.seq, args.precision, args.steps,
                                  args.warmup, device, masks))
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
                "real_token_fraction": real_fraction,
                "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
