"""Held-out evaluation during pre-training (``eval_data``): its scores against transformers on the
same weights (the exported checkpoint) and a float64 computation; evaluating changes no training
number; it runs when due and survives a resume; the set is fixed; the WikiText reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export_hf import TinyQA, randomize, save_ds
from test_pretrain import TINY

from bertrecipes.data import generate_demo_corpus
from bertrecipes.data.build import build_run_eval_dataset
from bertrecipes.data.sources import (
    DataSourceError,
    ReadStats,
    SourceSpec,
    detect_format,
    iter_source_documents,
    source_fingerprint,
)
from bertrecipes.distributed import DistContext
from bertrecipes.engine import train
from bertrecipes.errors import ConfigError
from bertrecipes.evaluation import evaluate_pretraining, main
from bertrecipes.interop import export_hf
from bertrecipes.model import BertConfig, BertForPreTraining

SHARED_WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext103"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """Documents of the demo corpus's grammar that training never sees (another generator seed)."""
    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    documents = generate_demo_corpus(30, seed=999)
    path.write_text("\n\n".join("\n".join(doc) for doc in documents) + "\n")
    return path


def records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def reference_scores(hf_model, dataset) -> dict[str, float]:
    """Scores in float64 from transformers' full-sequence logits, one sequence at a time."""
    hf_model = hf_model.double().eval()
    mlm_nll, mlm_hits, masked, nsp_nll, nsp_hits = 0.0, 0, 0, 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            x = dataset.get_batch([i])
            out = hf_model(input_ids=x["input_ids"], token_type_ids=x["token_type_ids"],
                           attention_mask=x["attention_mask"])
            keep = x["masked_lm_labels"][0] != -100
            positions, labels = x["masked_lm_positions"][0][keep], x["masked_lm_labels"][0][keep]
            log_probs = out.prediction_logits[0, positions].log_softmax(-1)
            mlm_nll -= float(log_probs[torch.arange(len(labels)), labels].sum())
            mlm_hits += int((log_probs.argmax(-1) == labels).sum())
            masked += len(labels)
            nsp = out.seq_relationship_logits[0].log_softmax(-1)
            label = int(x["next_sentence_labels"][0])
            nsp_nll -= float(nsp[label])
            nsp_hits += int(nsp.argmax() == label)
    n = len(dataset)
    return {"eval_mlm_loss": mlm_nll / masked, "eval_mlm_accuracy": mlm_hits / masked,
            "eval_nsp_loss": nsp_nll / n, "eval_nsp_accuracy": nsp_hits / n, "eval_samples": n,
            "eval_masked_tokens": masked}


def test_eval_scores_equal_transformers_on_the_exported_weights(make_cfg, tmp_path, heldout):
    transformers = pytest.importorskip("transformers")
    cfg = make_cfg(*TINY, "max_steps=2", f"eval_data=[{heldout}]", "eval_batch_size=5",
                   output_dir=tmp_path / "run")
    summary = train(cfg)
    train_rows, evals = records(tmp_path / "run")
    assert [r["step"] for r in evals] == [2]  # eval_steps=0: once, after the last step
    assert summary["last_eval"] == evals[0]

    dataset = build_run_eval_dataset(cfg, load_vocab(tmp_path / "run"))  # the cached set, reopened
    hf_dir = export_hf(tmp_path / "run" / "checkpoints", tmp_path / "hf", architecture="pretraining")
    hf_model = transformers.BertForPreTraining.from_pretrained(hf_dir)
    expected = reference_scores(hf_model, dataset)
    got = evals[0]
    assert got["eval_samples"] == expected["eval_samples"] == len(dataset) > 10
    assert got["eval_masked_tokens"] == expected["eval_masked_tokens"]
    for key in ("eval_mlm_loss", "eval_nsp_loss"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    for key in ("eval_mlm_accuracy", "eval_nsp_accuracy"):
        assert got[key] == pytest.approx(expected[key], abs=1.5 / expected["eval_masked_tokens"]), key
    assert got["eval_loss"] == pytest.approx(got["eval_mlm_loss"] + got["eval_nsp_loss"], rel=1e-12)
    assert got["eval_mlm_perplexity"] == pytest.approx(np.exp(expected["eval_mlm_loss"]), rel=1e-5)

    # The command line scores the run's checkpoint, and its Hugging Face export, on the same set.
    for checkpoint, kind in ((tmp_path / "run" / "checkpoints", "DS"), (hf_dir, "HF")):
        out = tmp_path / f"scores_{kind}.json"
        # Ours: the set's shapes come from the run's config.yaml; HF: given as flags.
        flags = [] if kind == "DS" else ["--max-seq-length", str(cfg.max_seq_length),
                                         "--max-predictions-per-seq", str(cfg.max_predictions_per_seq)]
        assert main([str(checkpoint), "--ckpt-type", kind, "--eval-data", str(heldout), *flags,
                     "--batch-size", "7", "--cache-dir", str(cfg.data.cache_dir), "--output", str(out)]) == 0
        scores = json.loads(out.read_text())
        assert scores["eval_samples"] == got["eval_samples"], kind
        for key in ("eval_loss", "eval_mlm_loss", "eval_mlm_accuracy", "eval_nsp_accuracy"):
            assert scores[key] == pytest.approx(got[key], rel=1e-6), (kind, key)


def load_vocab(run_dir: Path) -> Path:
    from bertrecipes.checkpoint import load_checkpoint

    return Path(load_checkpoint(run_dir / "checkpoints")["client_state"]["vocab_file"])


def test_evaluating_changes_no_training_number_and_survives_a_resume(make_cfg, tmp_path, heldout):
    common = [*TINY, "total_training_steps=5", f"eval_data=[{heldout}]", "eval_steps=2",
              "max_eval_samples=30"]
    plain = tmp_path / "plain"
    train(make_cfg(*TINY, "total_training_steps=5", "max_steps=5", output_dir=plain))
    straight = tmp_path / "straight"
    train(make_cfg(*common, "max_steps=5", output_dir=straight))
    split = tmp_path / "split"
    train(make_cfg(*common, "max_steps=3", output_dir=split))
    train(make_cfg(*common, "max_steps=5", "resume=true", output_dir=split))

    base, _ = records(plain)
    steps, evals = records(straight)
    assert [r["step"] for r in evals] == [2, 4, 5]  # every eval_steps, and after the last step
    assert all(r["eval_samples"] == 30 for r in evals)
    for key in ("loss", "mlm_loss", "nsp_loss", "grad_norm", "lr"):  # dropout on: RNG untouched too
        assert [r[key] for r in steps] == [r[key] for r in base], key

    split_steps, split_evals = records(split)
    # The first half evaluated at 2 and at its last step, 3; the resumed half at 4 and 5.
    assert [r["step"] for r in split_evals] == [2, 3, 4, 5]
    assert [r["loss"] for r in split_steps] == [r["loss"] for r in steps]
    by_step = {r["step"]: r for r in split_evals}
    for r in evals:
        assert by_step[r["step"]] == r
    train(make_cfg(*common, "max_steps=5", "resume=true", output_dir=split))  # nothing left to do
    assert records(split)[1] == split_evals


def test_a_failing_evaluation_loses_no_training(make_cfg, tmp_path, heldout, monkeypatch):
    """Evaluations run after the checkpoint of their step, so one that fails (out of memory, say)
    leaves the training saved."""
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory in the evaluation")

    monkeypatch.setattr("bertrecipes.engine.evaluate_pretraining", fail)
    # a periodic evaluation, due at the step of a periodic checkpoint
    with pytest.raises(RuntimeError, match="out of memory in the evaluation"):
        train(make_cfg(*TINY, "max_steps=3", f"eval_data=[{heldout}]", "eval_steps=2", "checkpoint_steps=2",
                       output_dir=tmp_path / "periodic"))
    assert (tmp_path / "periodic" / "checkpoints" / "global_step2").is_dir()
    # resumed, the run first does the evaluation that failed, then goes on
    monkeypatch.undo()
    train(make_cfg(*TINY, "max_steps=3", f"eval_data=[{heldout}]", "eval_steps=2", "checkpoint_steps=2",
                   "resume=true", output_dir=tmp_path / "periodic"))
    steps, evals = records(tmp_path / "periodic")
    assert [r["step"] for r in evals] == [2, 3] and [r["step"] for r in steps] == [1, 2, 3]
    monkeypatch.setattr("bertrecipes.engine.evaluate_pretraining", fail)
    # the evaluation after the last step
    with pytest.raises(RuntimeError, match="out of memory in the evaluation"):
        train(make_cfg(*TINY, "max_steps=3", f"eval_data=[{heldout}]", output_dir=tmp_path / "end"))
    assert (tmp_path / "end" / "checkpoints" / "global_step3").is_dir()


def test_throughput_leaves_paused_time_out(monkeypatch):
    from bertrecipes.metrics import Throughput

    clock = [100.0]
    monkeypatch.setattr("bertrecipes.metrics.time.perf_counter", lambda: clock[0])
    meter = Throughput(torch.device("cpu"))
    meter.reset(samples=0, tokens=0)
    clock[0] += 2.0  # 2 s of training
    with meter.paused():
        clock[0] += 30.0  # an evaluation
    clock[0] += 2.0
    assert meter.rates(samples=400, tokens=8000) == (100.0, 2000.0)


def tiny_model(vocab_size: int) -> BertForPreTraining:
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return BertForPreTraining(config)


def test_scores_are_token_weighted_and_split_evenly_over_ranks(make_cfg, heldout, monkeypatch):
    cfg = make_cfg(*TINY, f"eval_data=[{heldout}]")
    from bertrecipes.data.build import build_pretraining_dataset

    vocab = build_pretraining_dataset(cfg).vocab_file
    dataset = build_run_eval_dataset(cfg, vocab)
    model = tiny_model(dataset.vocab_size).train()
    n = 2 * (len(dataset) // 2)
    whole = evaluate_pretraining(model, dataset, batch_size=n, device=torch.device("cpu"), max_samples=n)
    assert model.training  # its mode is given back
    # Batches of 3 sequences: a mean of batch means would differ; the token-weighted mean does not.
    small = evaluate_pretraining(model, dataset, batch_size=3, device=torch.device("cpu"), max_samples=n)
    for key, value in whole.items():
        assert small[key] == pytest.approx(value, rel=1e-6), key
    # Two ranks without a process group (the all-reduce left out): each returns its own share's
    # scores, and the shares cover the set between them.
    monkeypatch.setattr("bertrecipes.distributed.all_reduce_sum", lambda tensor, ctx: tensor)
    shares = [evaluate_pretraining(model, dataset, batch_size=4, device=torch.device("cpu"), max_samples=n,
                                   ctx=DistContext(rank=r, world_size=2, local_rank=r))
              for r in (0, 1)]
    assert [s["eval_samples"] for s in shares] == [n // 2, n // 2]
    tokens = sum(s["eval_masked_tokens"] for s in shares)
    assert tokens == whole["eval_masked_tokens"]
    pooled = sum(s["eval_mlm_loss"] * s["eval_masked_tokens"] for s in shares) / tokens
    assert pooled == pytest.approx(whole["eval_mlm_loss"], rel=1e-6)
    # An odd count: each rank scores the same number, the last instance is left out.
    odd = [evaluate_pretraining(model, dataset, batch_size=4, device=torch.device("cpu"), max_samples=n - 1,
                                ctx=DistContext(rank=r, world_size=2, local_rank=r)) for r in (0, 1)]
    assert [s["eval_samples"] for s in odd] == [n // 2 - 1, n // 2 - 1]
    first = evaluate_pretraining(model, dataset, batch_size=n, device=torch.device("cpu"), max_samples=n - 2)
    tokens = sum(s["eval_masked_tokens"] for s in odd)
    assert tokens == first["eval_masked_tokens"]
    pooled = sum(s["eval_mlm_loss"] * s["eval_masked_tokens"] for s in odd) / tokens
    assert pooled == pytest.approx(first["eval_mlm_loss"], rel=1e-6)
    with pytest.raises(ConfigError, match="too few for 2 process"):
        evaluate_pretraining(model, dataset, batch_size=4, device=torch.device("cpu"), max_samples=1,
                             ctx=DistContext(rank=0, world_size=2, local_rank=0))


def test_the_set_does_not_depend_on_the_run_seeds(make_cfg, heldout):
    a = make_cfg(*TINY, f"eval_data=[{heldout}]", "seed=1", "data.instance_seed=1")
    b = make_cfg(*TINY, f"eval_data=[{heldout}]", "seed=2", "data.instance_seed=2")
    from bertrecipes.data.build import build_pretraining_dataset

    vocab = build_pretraining_dataset(a).vocab_file
    da, db = build_run_eval_dataset(a, vocab), build_run_eval_dataset(b, vocab)
    assert da.directory == db.directory
    ba, bb = da.get_batch(np.arange(len(da))), db.get_batch(np.arange(len(db)))
    assert all(torch.equal(ba[k], bb[k]) for k in ba)
    # static masks at the training data's rate, about 15% of the real tokens (CLS/SEP never masked)
    rate = float((ba["masked_lm_labels"] != -100).sum()) / float(ba["length"].sum())
    assert 0.10 < rate < 0.16


SENTENCES = ["the cat sat on a mat.", "a cat sat on the mat.", "the mats sat on a cat.", "a mat sat."]


def small_checkpoint(tmp_path: Path, drop: tuple[str, ...] = (), qa: bool = False) -> Path:
    from test_export_hf import SMALL

    config = BertConfig(**SMALL)
    model = randomize(TinyQA(config) if qa else BertForPreTraining(config))
    checkpoints = save_ds(tmp_path / "ckpt", model)
    if drop:  # rewrite the checkpoint without some tensors
        from bertrecipes.checkpoint import load_checkpoint, save_checkpoint

        payload = load_checkpoint(checkpoints)
        state = {k: v for k, v in payload["model"].items() if not k.startswith(drop)}
        save_checkpoint(checkpoints, "global_step8", {**payload, "model": state},
                        client_state=payload["client_state"])
    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(" ".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(4)) + "\n")
    return checkpoints


def score_small(tmp_path: Path, checkpoints: Path, capsys) -> tuple[int, str, str]:
    code = main([str(checkpoints), "--eval-data", str(tmp_path / "small.txt"), "--max-seq-length", "16",
                 "--max-predictions-per-seq", "3", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_checkpoint_without_nsp_head_is_scored_on_masked_lm_alone(tmp_path, capsys):
    checkpoints = small_checkpoint(tmp_path, drop=("cls.seq_relationship.",))
    code, out, err = score_small(tmp_path, checkpoints, capsys)
    assert code == 0, err
    scores = json.loads(out[out.index("{"):])
    assert sorted(scores) == ["eval_masked_tokens", "eval_mlm_accuracy", "eval_mlm_loss",
                              "eval_mlm_perplexity", "eval_samples"]
    assert scores["eval_masked_tokens"] > 0


def test_a_checkpoint_without_masked_lm_head_is_refused_by_name(tmp_path, capsys):
    code, out, err = score_small(tmp_path, small_checkpoint(tmp_path, qa=True), capsys)
    assert code == 2
    assert "has no masked-LM head (cls.predictions.*)" in err and "state.pt" in err


def test_a_sequence_longer_than_the_checkpoint_positions_is_refused(tmp_path, capsys):
    checkpoints = small_checkpoint(tmp_path)
    code = main([str(checkpoints), "--eval-data", str(tmp_path / "small.txt"), "--max-seq-length", "32",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 2
    assert "max_seq_length=32 exceeds the checkpoint's max_position_embeddings=16" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("eval_steps=-1", "eval_steps must be >= 0"),
    ("eval_batch_size=0", "eval_batch_size must be a positive integer or null, got 0"),
    ("max_eval_samples=0", "max_eval_samples must be a positive integer or null, got 0"),
])
def test_bad_eval_settings_fail_before_any_work(make_cfg, tmp_path, heldout, override, message):
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(*TINY, f"eval_data=[{heldout}]", override, output_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_eval_data_names_the_path(make_cfg, tmp_path):
    with pytest.raises(DataSourceError, match="no_such_heldout"):
        train(make_cfg(*TINY, f"eval_data=[{tmp_path / 'no_such_heldout.txt'}]", output_dir=tmp_path / "run"))


# As WikiText-103's files have it: every line starts and ends with a space.
WIKITEXT = "".join(f" {line} \n" for line in [
    '',
    '= Lobster =',
    '',
    'The lobster @-@ like animal is 0 @.@ 7 kg , or 1 @,@ 500 g . It has a <unk> claw , <unk> @-@ like .',
    '',
    '= = Description = =',
    '',
    '<unk> lives in the sea .',
    '',
    '= = = Range = = =',
    '',
    'It is found near <unk> , in 1932 @,@',
    '',
    '= Crab =',
    '',
    'A crab walks sideways .',
    '',
])


def test_command_line_checks_the_output_directory_before_the_work(tmp_path, capsys):
    checkpoints = small_checkpoint(tmp_path)
    code = main([str(checkpoints), "--eval-data", str(tmp_path / "small.txt"), "--output",
                 str(tmp_path / "missing" / "scores.json"), "--cache-dir", str(tmp_path / "cache")])
    assert code == 2
    assert "its directory does not exist" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # nothing was prepared


@pytest.mark.parametrize("device, gpus, message", [
    ("cuda", 0, "error: --device cuda: CUDA is not available on this machine (use auto or cpu)"),
    ("cuda:1", 0, "error: --device cuda:1: CUDA is not available on this machine (use auto or cpu)"),
    ("cuda:5", 2, "error: --device cuda:5: this machine has 2 GPUs (cuda:0 to cuda:1)"),
    ("gpu", 0, "error: --device gpu: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("mps", 0, "error: --device mps: must be auto, cpu, cuda or cuda:N, got 'mps'"),
])
def test_command_line_names_a_bad_device_by_its_flag_before_the_work(tmp_path, capsys, monkeypatch, device,
                                                                     gpus, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    checkpoints = small_checkpoint(tmp_path)
    code = main([str(checkpoints), "--eval-data", str(tmp_path / "small.txt"), "--device", device,
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 2
    assert capsys.readouterr().err == message + "\n"
    assert not (tmp_path / "cache").exists()  # nothing was prepared


@pytest.mark.parametrize("flag", ["--batch-size", "--max-samples", "--max-seq-length"])
def test_command_line_refuses_a_non_positive_count_by_flag(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--eval-data", str(tmp_path), flag, "0"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be a positive integer, got 0" in capsys.readouterr().err


def test_wikitext_reader_splits_articles_and_undoes_the_tokenization(tmp_path):
    path = tmp_path / "wiki.valid.tokens"
    path.write_text(WIKITEXT)
    other = tmp_path / "corpus.txt"  # no .tokens suffix: recognised by its first line
    other.write_text(WIKITEXT)
    assert detect_format(path) == detect_format(other) == "wikitext"
    # A plain text file that merely opens with a "= Notes =" line stays plain text.
    notes = tmp_path / "notes.txt"
    notes.write_text("= Notes =\nFirst line.\n\nSecond document.\n")
    assert detect_format(notes) == "text"
    # Files read as WikiText under format auto get a cache key of their own; others keep theirs.
    assert source_fingerprint(SourceSpec(paths=(str(other),)))["files"][0][3:] == ["wikitext"]
    assert len(source_fingerprint(SourceSpec(paths=(str(notes),)))["files"][0]) == 3
    docs = [doc for doc, _ in iter_source_documents(SourceSpec(paths=(str(path),)), ReadStats())]
    assert docs == [
        ["The lobster-like animal is 0.7 kg , or 1,500 g . It has a claw , -like .", "lives in the sea .",
         "It is found near , in 1932,"],
        ["A crab walks sideways ."],
    ]


@pytest.mark.skipif(not SHARED_WIKITEXT.is_dir(), reason="needs ../shared/data/wikitext103")
def test_wikitext103_validation_split_as_a_heldout_set(make_cfg):
    vocab = SHARED_WIKITEXT.parent / "vocab" / "bert-base-uncased-vocab.txt"
    source = SourceSpec(paths=(str(SHARED_WIKITEXT / "wiki.valid.tokens"),))
    docs = [doc for doc, _ in iter_source_documents(source, ReadStats())]
    assert len(docs) == 60  # WikiText-103's validation split has 60 articles
    assert not any(mark in line for doc in docs for line in doc for mark in ("<unk>", "@-@", "@,@", "@.@"))
    cfg = make_cfg(f"eval_data=[{SHARED_WIKITEXT / 'wiki.valid.tokens'}]")
    dataset = build_run_eval_dataset(cfg, vocab)
    batch = dataset.get_batch(np.arange(len(dataset)))
    real = batch["attention_mask"].bool()
    # Each article's text goes into instances once (dupe_factor 1): about 224K WordPiece tokens
    # in ~2,300 sequences of at most 128.
    assert 1500 < len(dataset) < 4000
    # Lower-cased with the uncased vocabulary, the text has almost no unknown words: [UNK] is id 100.
    assert float((batch["input_ids"][real] == 100).float().mean()) < 0.002
    masked = batch["masked_lm_labels"] != -100
    assert 0.12 < float(masked.sum()) / float(real.sum()) < 0.16


def test_command_line_under_torchrun_splits_the_set_and_reports_once(tmp_path, capsys):
    """Two ranks score half of the set each and all-reduce: the scores of one process, printed once
    (the held-out cache built by rank 0 while rank 1 waits)."""
    import os
    import subprocess
    import sys

    checkpoints = small_checkpoint(tmp_path)
    args = [str(checkpoints), "--eval-data", str(tmp_path / "small.txt"), "--max-seq-length", "16",
            "--max-predictions-per-seq", "3", "--max-samples", "4", "--device", "cpu"]
    assert main([*args, "--cache-dir", str(tmp_path / "cache1")]) == 0
    out = capsys.readouterr().out
    alone = json.loads(out[out.index("{"):])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "bertrecipes.evaluation", *args, "--cache-dir", str(tmp_path / "cache2"),
         "--output", str(tmp_path / "scores.json")],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('"eval_samples"') == 1
    both = json.loads((tmp_path / "scores.json").read_text())
    assert both["eval_samples"] == alone["eval_samples"] == 4
    assert both["eval_masked_tokens"] == alone["eval_masked_tokens"]
    for key in alone:
        assert both[key] == pytest.approx(alone[key], rel=1e-6), key
    # a set too small for the ranks: one line, once, in the command line's own terms
    few = [*args[:-4], "--max-samples", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "cache2")]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "bertrecipes.evaluation", *few],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("error: the held-out set has") == 1, result.stderr[-3000:]
    assert "(--max-samples=1): too few for 2 process(es); give --eval-data more text or raise --max-samples" \
        in result.stderr


def test_nccl_on_a_cpu_run_is_named(monkeypatch):
    from bertrecipes.distributed import DistributedConfig, init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="distributed.backend=nccl needs CUDA devices and this run is on "
                                          r"cpu: use gloo or null \(auto\)"):
        init_distributed(DistributedConfig(backend="nccl"), torch.device("cpu"))
