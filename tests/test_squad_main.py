"""``python -m bertrecipes.squad``'s last log line says what the run did: fine-tuning for N steps, or
prediction alone with a model fine-tuned before (not "N training steps" when nothing trained)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bertrecipes.data.tokenizer import train_wordpiece
from bertrecipes.squad.__main__ import done_line
from bertrecipes.squad.engine import run

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=bert_tiny", "model.hidden_size=16", "model.num_hidden_layers=1", "model.num_attention_heads=2",
        "model.intermediate_size=32", "max_seq_length=48", "doc_stride=16", "max_query_length=12",
        "train_batch_size=4", "train_micro_batch_size_per_gpu=4", "predict_batch_size=16", "max_steps=3",
        "progress_bar=false", "device=cpu"]


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """A SQuAD file with answers, the same without them, and a run fine-tuned on the first for 3 steps."""
    root = tmp_path_factory.mktemp("squad_main")
    context = "Alice was born in Paris in 1901. Bruno was born in Rome in 1922."
    qas = [{"id": f"q{i}", "question": question, "answers": [{"text": answer,
                                                              "answer_start": context.index(answer)}]}
           for i, (question, answer) in enumerate([("Where was Alice born?", "Paris"),
                                                   ("When was Bruno born?", "1922"),
                                                   ("Where was Bruno born?", "Rome")])]
    data = root / "tiny-v1.1.json"
    data.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": qas}]}]}))
    unanswered = root / "unanswered-v1.1.json"
    unanswered.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": [{**q, "answers": []} for q in qas]}]}]}))
    vocab = train_wordpiece([[context, *(q["question"] for q in qas)]], vocab_size=100, lower_case=True,
                            out_path=root / "vocab.txt")
    cfg = squad_cfg(f"train_file={data}", f"predict_file={data}", f"vocab_file={vocab}",
                    f"output_dir={root / 'ft'}")
    return data, unanswered, cfg, run(cfg)


def squad_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("squad", overrides=[*TINY, *overrides])


def test_a_fine_tuning_run_says_its_steps_and_scores(fine_tuned):
    _, _, cfg, summary = fine_tuned
    scores = summary["eval"]
    assert done_line(cfg, summary) == (f"done: fine-tuned for 3 steps, then predicted; exact_match "
                                       f"{scores['exact_match']:.2f}, f1 {scores['f1']:.2f}; outputs in "
                                       f"{cfg.output_dir}")


def test_a_prediction_alone_says_it_trained_nothing(fine_tuned, tmp_path):
    data, unanswered, first, _ = fine_tuned
    checkpoints = Path(first.output_dir) / "checkpoints"
    cfg = squad_cfg("do_train=false", f"predict_file={data}", f"model_file={checkpoints}",
                    f"output_dir={tmp_path / 'predict'}")
    summary = run(cfg)
    scores = summary["eval"]
    assert done_line(cfg, summary) == (
        f"done: predicted with a model fine-tuned for 3 steps (no training in this run); exact_match "
        f"{scores['exact_match']:.2f}, f1 {scores['f1']:.2f}; outputs in {tmp_path / 'predict'}")

    cfg = squad_cfg("do_train=false", f"predict_file={unanswered}", f"model_file={checkpoints}",
                    f"output_dir={tmp_path / 'unscored'}")
    assert done_line(cfg, run(cfg)) == ("done: predicted with a model fine-tuned for 3 steps (no training in "
                                        "this run); not scored (the predict file has no answers); outputs in "
                                        f"{tmp_path / 'unscored'}")


def test_the_command_line_logs_the_line(fine_tuned, tmp_path):
    data, _, first, _ = fine_tuned
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "bertrecipes.squad", *TINY, "do_train=false",
                             f"predict_file={data}", f"model_file={Path(first.output_dir) / 'checkpoints'}",
                             f"output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    said = result.stdout + result.stderr
    assert ("done: predicted with a model fine-tuned for 3 steps (no training in this run); exact_match "
            in said)
    assert "training steps" not in said
