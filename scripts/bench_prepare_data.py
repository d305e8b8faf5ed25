"""Benchmark data preparation: bertrecipes' pipeline vs a plain pure-Python implementation of the same
algorithm, on the same corpus, one core each (and bertrecipes with every core).

    python scripts/bench_prepare_data.py --paths ../shared/data/wiki \
        --vocab ../shared/data/vocab/bert-base-uncased-vocab.txt --seq 128 --limit-docs 3000 \
        --json bench_prepare.json

Both sides read the corpus with the same reader and split sentences with the same splitter; they
differ in what bertrecipes makes fast: tokenization (`CachedWordEncoder` over the `tokenizers`
library vs the original pure-Python BERT tokenizer, `transformers`' BertTokenizerLegacy) and
instance creation (offsets + vectorised assembly and masking vs Google's list-based loops, written
out below with `random.Random`). The baseline is slow, so by default it runs on the first
`--limit-docs` documents only; bertrecipes runs on that same subset (the like-for-like rows) and on
the whole corpus. Throughput is uncompressed input MB/s and corpus tokens/s; "per core" is shown two
ways: wall-clock MB/s divided by the processes used, and MB per CPU-second (user + system time of
all processes, which other load on a shared machine distorts much less). Prints a table; `--json`
writes the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bertrecipes.data.prepare import CorpusSettings, InstanceSettings, prepare_corpus
from bertrecipes.data.sentences import split_sentences
from bertrecipes.data.sources import ReadStats, SourceSpec, mix_documents


def baseline(
    documents: list[list[str]],
    vocab_file: str,
    lower_case: bool,
    seq: int,
    max_pred: int,
    dupe_factor: int,
    seed: int,
) -> dict[str, float]:
    """Google's create_pretraining_data algorithm, plainly in Python: lists, random.Random, one process."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    tokenizer = BertTokenizerLegacy(vocab_file, do_lower_case=lower_case)
    vocab = tokenizer.vocab
    start, cpu_start = time.perf_counter(), time.process_time()
    docs = []
    for lines in documents:
        doc = []
        for line in lines:
            for sentence in split_sentences(line):
                ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(sentence))
                if ids:
                    doc.append(ids)
        if doc:
            docs.append(doc)
    tokenize_seconds = time.perf_counter() - start

    rng = random.Random(seed)
    cls, sep, mask = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]
    special = {vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    words = [i for i in range(len(vocab)) if i not in special]
    instances = []
    max_tokens = seq - 3
    for _ in range(dupe_factor):
        for d, document in enumerate(docs):
            target = max_tokens if rng.random() >= 0.1 else rng.randint(2, max_tokens)
            chunk, length, i = [], 0, 0
            while i < len(document):
                chunk.append(document[i])
                length += len(document[i])
                if i == len(document) - 1 or length >= target:
                    a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                    tokens_a = [t for s in chunk[:a_end] for t in s]
                    if len(docs) > 1 and (len(chunk) == 1 or rng.random() < 0.5):
                        is_random = True
                        other = rng.randrange(len(docs) - 1)
                        other += other >= d
                        random_doc = docs[other]
                        tokens_b = []
                        for s in random_doc[rng.randrange(len(random_doc)) :]:
                            tokens_b.extend(s)
                            if len(tokens_b) >= target - len(tokens_a):
                                break
                        i -= len(chunk) - a_end
                    elif len(chunk) >= 2:
                        is_random = False
                        tokens_b = [t for s in chunk[a_end:] for t in s]
                    else:
                        chunk, length, i = [], 0, i + 1
                        continue
                    while len(tokens_a) + len(tokens_b) > max_tokens:
                        trunc = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
                        if rng.random() < 0.5:
                            del trunc[0]
                        else:
                            trunc.pop()
                    tokens = [cls, *tokens_a, sep, *tokens_b, sep]
                    candidates = [p for p, t in enumerate(tokens) if t not in special]
                    rng.shuffle(candidates)
                    k = min(max_pred, max(1, int(round(len(tokens) * 0.15))))
                    positions = sorted(candidates[:k])
                    labels = [tokens[p] for p in positions]
                    for p in positions:
                        r = rng.random()
                        tokens[p] = mask if r < 0.8 else tokens[p] if r < 0.9 else rng.choice(words)
                    instances.append((tokens, len(tokens_a), positions, labels, is_random))
                    chunk, length = [], 0
                i += 1
    rng.shuffle(instances)
    input_ids = np.zeros((len(instances), seq), dtype=np.int32)
    for row, (tokens, *_rest) in enumerate(instances):
        input_ids[row, : len(tokens)] = tokens
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "tokenize_seconds": tokenize_seconds,
        "instances": len(instances),
        "tokens": sum(len(s) for d in docs for s in d),
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ours(
    paths: list[str],
    vocab_file: str,
    lower_case: bool,
    seq: int,
    max_pred: int,
    dupe_factor: int,
    seed: int,
    num_proc: int,
    limit_docs: int | None,
) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        if limit_docs is not None:  # the baseline's subset, as one text file
            subset = work / "subset.txt"
            docs = itertools.islice(
                mix_documents([SourceSpec(paths=tuple(paths))], 0, ReadStats()), limit_docs
            )
            subset.write_text("".join("\n".join(lines) + "\n\n" for lines, _ in docs), encoding="utf-8")
            paths = [str(subset)]
        settings = CorpusSettings(
            sources=(SourceSpec(paths=tuple(paths)),),
            vocab_file=Path(vocab_file),
            lower_case=lower_case,
            seed=seed,
        )
        phase = InstanceSettings(
            max_seq_length=seq, max_predictions_per_seq=max_pred, dupe_factor=dupe_factor, seed=seed
        )
        start, cpu_start, children_start = time.perf_counter(), time.process_time(), _children_cpu()
        prepared = prepare_corpus(settings, phase, work / "cache", num_proc=num_proc, progress=False)
        seconds = time.perf_counter() - start
        # Worker processes are joined when prepare_corpus returns, so their CPU time is counted here.
        cpu_seconds = time.process_time() - cpu_start + _children_cpu() - children_start
        stats = prepared.manifest["stats"]
        return {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "instances": stats["instances"],
            "tokens": stats["tokens"],
            "input_bytes": stats["read"]["input_bytes"],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--paths", nargs="+", required=True, help="corpus files/directories (any format)")
    parser.add_argument("--vocab", required=True, help="BERT vocab.txt")
    parser.add_argument("--cased", action="store_true")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--max-pred", type=int, default=None, help="default: 20 at 128, 80 at 512")
    parser.add_argument("--dupe-factor", type=int, default=5)
    parser.add_argument(
        "--limit-docs",
        type=int,
        default=3000,
        help="documents for the (slow) baseline and the like-for-like row; 0 = all",
    )
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--skip-full", action="store_true", help="skip bertrecipes on the whole corpus")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    max_pred = args.max_pred or (20 if args.seq <= 128 else 80)
    lower = not args.cased
    limit = args.limit_docs or None

    stats = ReadStats()
    subset_docs = [
        lines
        for lines, _ in itertools.islice(
            mix_documents([SourceSpec(paths=tuple(args.paths))], 0, stats), limit
        )
    ]
    subset_bytes = sum(len("\n".join(d).encode()) for d in subset_docs)

    rows = []
    base = baseline(subset_docs, args.vocab, lower, args.seq, max_pred, args.dupe_factor, 12345)
    rows.append(("pure Python (Google's algorithm)", len(subset_docs), subset_bytes, 1, base))
    for procs in sorted({1, args.num_proc}):
        result = ours(
            args.paths, args.vocab, lower, args.seq, max_pred, args.dupe_factor, 12345, procs, limit
        )
        rows.append(
            (
                f"bertrecipes, {procs} process{'es' if procs > 1 else ''}",
                len(subset_docs),
                result["input_bytes"],
                procs,
                result,
            )
        )
    if not args.skip_full:
        for procs in sorted({1, args.num_proc}):
            result = ours(
                args.paths, args.vocab, lower, args.seq, max_pred, args.dupe_factor, 12345, procs, None
            )
            rows.append(
                (
                    f"bertrecipes, {procs} process{'es' if procs > 1 else ''}, whole corpus",
                    None,
                    result["input_bytes"],
                    procs,
                    result,
                )
            )

    print(
        f"\nseq {args.seq}, max_pred {max_pred}, dupe_factor {args.dupe_factor}, "
        f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
        f"load average {os.getloadavg()[0]:.1f} (other work on the machine slows the wall-clock figures)"
    )
    # Two views of "per core": wall-clock MB/s divided by the processes used, and MB per CPU-second
    # (user + system time of every process), which a busy shared machine distorts far less.
    header = (
        f"{'implementation':44s} {'docs':>7s} {'MB':>6s} {'wall s':>7s} {'CPU s':>7s} {'instances':>10s} "
        f"{'tokens':>11s} {'MB/s':>6s} {'tok/s':>9s} {'MB/s/proc':>9s} {'MB/CPU-s':>8s} {'x/proc':>6s} "
        f"{'x/CPU-s':>7s}"
    )
    print(header)
    print("-" * len(header))
    base_rate = subset_bytes / 1e6 / base["seconds"]
    base_cpu_rate = subset_bytes / 1e6 / base["cpu_seconds"]
    out = []
    for name, docs, nbytes, procs, r in rows:
        mb_s = nbytes / 1e6 / r["seconds"]
        per_proc = mb_s / procs
        per_cpu = nbytes / 1e6 / r["cpu_seconds"]
        print(
            f"{name:44s} {docs if docs else '-':>7} {nbytes / 1e6:6.1f} {r['seconds']:7.1f} "
            f"{r['cpu_seconds']:7.1f} {r['instances']:10,d} {r['tokens']:11,d} {mb_s:6.2f} "
            f"{r['tokens'] / r['seconds']:9,.0f} {per_proc:9.2f} {per_cpu:8.2f} {per_proc / base_rate:5.1f}x "
            f"{per_cpu / base_cpu_rate:6.1f}x"
        )
        out.append(
            {
                "implementation": name,
                "documents": docs,
                "input_mb": nbytes / 1e6,
                "processes": procs,
                **r,
                "mb_per_s": mb_s,
                "tokens_per_s": r["tokens"] / r["seconds"],
                "mb_per_s_per_process": per_proc,
                "mb_per_cpu_second": per_cpu,
                "speedup_per_process": per_proc / base_rate,
                "speedup_per_cpu_second": per_cpu / base_cpu_rate,
            }
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "seq": args.seq,
                    "max_predictions_per_seq": max_pred,
                    "dupe_factor": args.dupe_factor,
                    "command": " ".join(sys.argv),
                    "cores": len(os.sched_getaffinity(0)),
                    "rows": out,
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
