"""Host time of an eager training step with the device's work taken away.

On a GPU, an eager step costs the larger of two times: the kernels' and the host's (Python, the
dispatcher and autograd launching them). With small micro-batches, unpadded seq512 batches or
SQuAD's, the kernels can be the shorter one, and the GPU then waits for the host. This script times
the host's part alone, on the CPU: every Triton launch is replaced by a no-op (the kernels would
otherwise run in Triton's interpreter), and the model has BERT-large's depth (24 layers) at a tiny
width and batch (hidden 64, 2 x 32 tokens), so the PyTorch operators it still runs on the CPU cost
little beyond their dispatch; the host's work per operator does not depend on the shapes. It prints, per
implementation, milliseconds per forward + backward (the fastest of ``--steps``: other work on the
machine only adds to it), the Python function calls per step (counted by cProfile in a separate
pass) and the Triton launches per step:

* ``triton``        - our model on the Triton layer, unpadded (``kernel=triton``)
* ``triton_padded`` - the same on the padded batch (``kernel.unpad=false``)
* ``torch``         - our model on PyTorch layers (``kernel=torch``)
* ``torch_unpad``   - the same, unpadded
* ``hf``            - ``transformers.BertForPreTraining`` (sdpa), the reference user's model

The figures are this CPU's; a GPU host runs the same Python faster or slower. Where the host time
per step exceeds the kernels' (``scripts/profile_step.py`` shows how busy the GPU was),
``compile_mode=reduce-overhead`` (CUDA graphs; with unpadding, ``kernel.unpad_bucket``) removes it.

    python scripts/bench_host.py --json host.json
    python scripts/bench_host.py --layers 2 --steps 3 --impls triton,hf     # smoke
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: launches go through the interpreter

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bertrecipes.model import BertConfig, BertForPreTraining, pretraining_loss  # noqa: E402

IMPLS = ("triton", "triton_padded", "torch", "torch_unpad", "hf")
WIDTH = dict(vocab_size=128, hidden_size=64, num_attention_heads=2, intermediate_size=128,
             max_position_embeddings=128)


class StubbedLaunches:
    """Every Triton launch (through the interpreter) does nothing but count itself."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> StubbedLaunches:
        from triton.runtime.interpreter import InterpretedFunction

        self._run = InterpretedFunction.run
        stub = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            stub.count += 1

        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._run


def make_batch(batch: int, seq: int, predictions: int) -> dict[str, torch.Tensor]:
    """Sequences of decreasing length (a quarter of the slots padding), masked positions inside."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(seq, seq // 2, batch).long()
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    positions = torch.stack([torch.randperm(seq // 2, generator=g)[:predictions] for _ in range(batch)])
    return {"input_ids": torch.randint(5, WIDTH["vocab_size"], (batch, seq), generator=g) * mask,
            "attention_mask": mask, "masked_lm_positions": positions,
            "masked_lm_labels": torch.randint(5, WIDTH["vocab_size"], (batch, predictions), generator=g),
            "next_sentence_labels": torch.zeros(batch, dtype=torch.long)}


def make_step(impl: str, layers: int, b: dict[str, torch.Tensor]):
    """One forward + backward of ``impl`` on batch ``b``, as a callable."""
    if impl == "hf":
        import transformers

        config = transformers.BertConfig(**{k: v for k, v in WIDTH.items()}, num_hidden_layers=layers,
                                         attn_implementation="sdpa")
        model = transformers.BertForPreTraining(config).train()
        labels = torch.full_like(b["input_ids"], -100)
        labels.scatter_(1, b["masked_lm_positions"], b["masked_lm_labels"])

        def step() -> None:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels,
                        next_sentence_label=b["next_sentence_labels"])
            out.loss.backward()

        return step
    factory = None
    if impl.startswith("triton"):
        import kernels_triton

        factory = kernels_triton.make_layer_factory()
    unpad = impl in ("triton", "torch_unpad")
    model = BertForPreTraining(BertConfig(**WIDTH, num_hidden_layers=layers), layer_factory=factory,
                               unpad=unpad).train()

    def step() -> None:
        layout = model.bert.layout(b["attention_mask"])  # as the engine: on the host copy
        mlm, nsp = model(b["input_ids"], None, b["attention_mask"], b["masked_lm_positions"], unpadded=layout)
        pretraining_loss(mlm, nsp, b["masked_lm_labels"], b["next_sentence_labels"])[0].backward()

    return step


def measure(impl: str, args) -> dict:
    batch = make_batch(args.micro, args.seq, args.predictions)
    with StubbedLaunches() as launches:
        step = make_step(impl, args.layers, batch)
        for _ in range(args.warmup):
            step()
        launches.count = 0
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        launches_per_step = launches.count / args.steps
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            step()
        profiler.disable()
    calls = pstats.Stats(profiler).total_calls / args.steps
    # the fastest step: the host's own cost (other processes on the machine only ever add to it)
    return {"impl": impl, "ms_per_step": 1e3 * min(times), "python_calls_per_step": calls,
            "triton_launches_per_step": launches_per_step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    parser.add_argument("--layers", type=int, default=24, help="encoder depth (24: BERT-large)")
    parser.add_argument("--micro", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--predictions", type=int, default=4, help="masked positions per sequence")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the fastest is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: dispatch, not math)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        parser.error(f"unknown --impls {unknown}; choose from {list(IMPLS)}")
    if (min(args.layers, args.micro, args.steps) < 1 or args.seq < 4
            or not 0 < args.predictions <= args.seq // 2):
        parser.error("need --layers, --micro, --steps >= 1, --seq >= 4 and 0 < --predictions <= seq / 2")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = {"kind": "host", "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "python": platform.python_version(), "args": vars(args) | {"json": str(args.json)}}
    rows = []
    print(f"host time per eager forward + backward, kernels stubbed: {args.layers} layers, micro "
          f"{args.micro} x seq {args.seq}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'impl':<15}{'ms/step':>10}{'python calls':>14}{'triton launches':>17}")
    for impl in impls:
        row = measure(impl, args)
        rows.append(row)
        print(f"{impl:<15}{row['ms_per_step']:>10.2f}{row['python_calls_per_step']:>14.0f}"
              f"{row['triton_launches_per_step']:>17.0f}", flush=True)
        if args.json:
            from bertrecipes.atomic import write_json_atomic

            write_json_atomic(args.json, meta | {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
