"""SQuAD fine-tuning end to end on CPU: a tiny SQuAD-format file made here, bert_tiny from scratch,
train a few steps, predict, score; the recipe's defaults; prediction from the run's checkpoint;
clear errors from the command line."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from torch._dynamo.utils import counters

from bertrecipes.checkpoint import load_checkpoint, save_checkpoint
from bertrecipes.data.tokenizer import train_wordpiece
from bertrecipes.errors import UserError
from bertrecipes.model import BertConfig, BertForPreTraining
from bertrecipes.squad.config import register_squad_configs
from bertrecipes.squad.engine import run, run_and_report
from bertrecipes.squad.evaluate import evaluate_files

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")

register_squad_configs()

NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Esther", "Farid"]
CITIES = ["Paris", "Lisbon", "Berlin", "Madrid", "Rome", "Vienna"]
FILLER = "the river was long and cold in winter while the old bridge stood near the market".split()


@pytest.fixture(scope="module")
def squad_files(tmp_path_factory):
    """A SQuAD v1.1 file (3 articles, 24 questions, contexts longer than one window) and a vocab."""
    root = tmp_path_factory.mktemp("squad")
    rng = random.Random(0)
    articles = []
    for a in range(3):
        paragraphs = []
        for p in range(4):
            name, city, year = rng.choice(NAMES), rng.choice(CITIES), str(rng.randint(1800, 1999))
            filler = " ".join(rng.choices(FILLER, k=40))
            context = f"{filler}. {name} was born in {city} in {year}. {filler}."
            paragraphs.append({"context": context, "qas": [
                {"id": f"a{a}p{p}where", "question": f"Where was {name} born?",
                 "answers": [{"text": city, "answer_start": context.index(f"in {city}") + 3}]},
                {"id": f"a{a}p{p}when", "question": f"When was {name} born?",
                 "answers": [{"text": year, "answer_start": context.index(year)},
                             {"text": f"in {year}", "answer_start": context.index(f"in {year}")}]},
            ]})
        articles.append({"title": f"article {a}", "paragraphs": paragraphs})
    data = root / "tiny-v1.1.json"
    data.write_text(json.dumps({"version": "1.1", "data": articles}))
    docs = [[p["context"], *(q["question"] for q in p["qas"])] for art in articles for p in art["paragraphs"]]
    vocab = train_wordpiece(docs, vocab_size=200, lower_case=True, out_path=root / "vocab.txt")
    return data, vocab


TINY = [
    "model=bert_tiny",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.intermediate_size=64",
    "max_seq_length=64",
    "doc_stride=24",
    "max_query_length=12",
    "train_batch_size=8",
    "train_micro_batch_size_per_gpu=4",
    "predict_batch_size=16",
    "steps_per_print=1",
    "progress_bar=false",
    "device=cpu",
    "optimizer.lr=1e-3",
]


def compose_squad(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("squad", overrides=list(overrides))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_defaults_are_bingbertsquads_recipe():
    cfg = compose_squad("output_dir=/tmp/x")
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu) == (24, 3)
    assert cfg.optimizer._target_ == "bertrecipes.optim.Adam" and cfg.optimizer.lr == pytest.approx(3e-5)
    assert cfg.optimizer.weight_decay == 0.0 and cfg.optimizer.bias_correction is False
    assert cfg.num_train_epochs == 2 and cfg.max_grad_norm == 1.0 and cfg.dropout == 0.1
    assert cfg.scheduler._target_ == "bertrecipes.optim.WarmupLinear"
    assert cfg.scheduler.warmup_proportion == pytest.approx(0.1)
    assert (cfg.max_seq_length, cfg.doc_stride, cfg.max_query_length) == (384, 128, 64)
    assert (cfg.n_best_size, cfg.max_answer_length) == (20, 30)
    assert cfg.ckpt_type == "DS" and cfg.do_train and cfg.do_predict
    assert cfg.do_lower_case is None  # as the checkpoint was trained (BingBertSquad passes it for uncased)


@pytest.mark.parametrize("override", ["doc_strid=64", "optimizer.lrr=1e-3", "n_best=3"])
def test_misspelled_keys_are_errors_naming_them(override):
    with pytest.raises(ConfigCompositionException) as info:
        compose_squad(override)
    assert override.split("=")[0].split(".")[-1] in str(info.value)


def test_train_predict_evaluate_end_to_end(squad_files, tmp_path):
    data, vocab = squad_files
    out = tmp_path / "run"
    cfg = compose_squad(*TINY, f"train_file={data}", f"predict_file={data}", f"vocab_file={vocab}",
                        "num_train_epochs=2", f"output_dir={out}")
    summary = run(cfg)

    # The schedule: ceil(2 epochs x windows / 8) steps, linear warm-up over 10% then BingBertSquad's
    # linear decay, 1 - x.
    train_records = [r for r in read_metrics(out) if "loss" in r]
    windows = round(train_records[-1]["samples"] / train_records[-1]["epoch"])
    total = math.ceil(2 * windows / 8)
    assert summary["global_step"] == total == len(train_records) and windows > 24  # long contexts
    for r in train_records:
        x = (r["step"] - 1) / total
        assert r["lr"] == pytest.approx(1e-3 * (x / 0.1 if x < 0.1 else 1 - x), rel=1e-9, abs=1e-15)
        assert {"samples_per_sec", "tokens_per_sec", "grad_norm", "skipped_steps"} <= set(r)
    assert train_records[-1]["loss"] < train_records[0]["loss"]

    # Predictions for every question, n-best lists, and a scored record equal to the evaluator's.
    predictions = json.loads((out / "predictions.json").read_text())
    articles = json.loads(data.read_text())["data"]
    questions = [q["id"] for a in articles for p in a["paragraphs"] for q in p["qas"]]
    assert sorted(predictions) == sorted(questions)
    nbest = json.loads((out / "nbest_predictions.json").read_text())
    for qid, entries in nbest.items():
        assert 1 <= len(entries) <= 20 and entries[0]["text"] == predictions[qid]
        assert set(entries[0]) == {"text", "probability", "start_logit", "end_logit"}
        assert sum(e["probability"] for e in entries) == pytest.approx(1.0)
    eval_record = read_metrics(out)[-1]
    assert eval_record["step"] == total and eval_record["predict_questions"] == 24
    scores = evaluate_files(data, out / "predictions.json")
    assert {k: eval_record[k] for k in ("exact_match", "f1")} == scores
    assert summary["eval"]["f1"] == eval_record["f1"]

    # The checkpoint holds the QA model, its config and its vocabulary; predicting from it alone
    # gives the same answers.
    checkpoint = load_checkpoint(out / "checkpoints")
    assert "qa_outputs.weight" in checkpoint["model"]
    assert checkpoint["client_state"]["vocab_file"] == str(vocab)
    assert checkpoint["model_config"]["hidden_size"] == 32
    again = tmp_path / "predict_only"
    run(compose_squad(*TINY, "do_train=false", f"predict_file={data}", f"model_file={out / 'checkpoints'}",
                      f"output_dir={again}"))
    assert json.loads((again / "predictions.json").read_text()) == predictions
    (record,) = read_metrics(again)  # the step the fine-tuned model was saved at
    assert record["step"] == total and (record["exact_match"], record["f1"]) == (eval_record["exact_match"],
                                                                               eval_record["f1"])
    # The unpadded encoder gives the same real-token logits, so the same answers: exactly unpadded,
    # or in token-count buckets (filler rows dropped from the logits)
    for bucket in (0, 48):
        unpadded = tmp_path / f"predict_unpadded_{bucket}"
        run(compose_squad(*TINY, "do_train=false", "kernel.unpad=true", f"kernel.unpad_bucket={bucket}",
                          f"predict_file={data}", f"model_file={out / 'checkpoints'}",
                          f"output_dir={unpadded}"))
        assert json.loads((unpadded / "predictions.json").read_text()) == predictions, bucket


@pytest.mark.parametrize("kernel", ["kernel=torch", "kernel=triton"])
def test_compiled_fine_tuning_follows_the_eager_run(squad_files, tmp_path, kernel):
    """``compile=true``: training and prediction through torch.compile (Inductor) give the eager
    run's losses and gradient norms step by step, within fp32 rounding, and its scores. Dropout
    off, as Inductor's random numbers are its own. The checkpoint keeps the model's own names.
    (The Triton kernels run in the interpreter here: training only, to keep the test short.)"""
    triton = kernel == "kernel=triton"
    if triton:
        pytest.importorskip("triton")
    data, vocab = squad_files
    common = [*TINY, kernel, "dropout=0.0", "max_steps=3", f"train_file={data}", f"predict_file={data}",
              f"vocab_file={vocab}", f"do_predict={not triton}", *(["train_batch_size=4"] if triton else [])]
    torch._dynamo.reset()
    runs, graphs = {}, {}
    for name in ("eager", "compiled"):
        out = tmp_path / name
        counters.clear()
        run(compose_squad(*common, f"compile={name == 'compiled'}", f"output_dir={out}"))
        runs[name], graphs[name] = read_metrics(out), counters["stats"]["unique_graphs"]
    assert graphs["eager"] == 0 and graphs["compiled"] >= 1  # compile=true did go through Dynamo
    train_records = {name: [r for r in records if "loss" in r] for name, records in runs.items()}
    assert len(train_records["eager"]) == 3
    for got, want in zip(train_records["compiled"], train_records["eager"], strict=True):
        assert got["step"] == want["step"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-3)
    if not triton:
        assert runs["compiled"][-1]["f1"] == pytest.approx(runs["eager"][-1]["f1"], abs=1e-6)
    checkpoint = load_checkpoint(tmp_path / "compiled" / "checkpoints")
    assert "qa_outputs.weight" in checkpoint["model"]


def test_fine_tune_from_a_pretraining_checkpoint_with_accumulation(squad_files, tmp_path):
    """bert_tiny pre-trained for 2 steps on the demo data, then fine-tuned (DS checkpoint path)."""
    data, vocab = squad_files
    # not the model group's architecture (TINY: intermediate 64, post-LN), to see which one is recorded
    config = BertConfig(vocab_size=208, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, pre_layer_norm=True)
    save_checkpoint(tmp_path / "pt", "global_step2",
                    state={"model": BertForPreTraining(config).state_dict(),
                           "model_config": config.to_dict()},
                    client_state={"vocab_file": str(vocab)})
    out = tmp_path / "run"
    summary = run(compose_squad(*TINY, f"train_file={data}", f"predict_file={data}",
                                f"model_file={tmp_path / 'pt'}", "train_micro_batch_size_per_gpu=2",
                                "max_steps=3", f"output_dir={out}"))
    assert summary["global_step"] == 3 and [r["samples"] for r in read_metrics(out)[:3]] == [8, 16, 24]
    assert (out / "predictions.json").is_file() and "f1" in summary["eval"]
    # the run's config.yaml records the checkpoint's architecture, with the run's dropout
    recorded = OmegaConf.load(out / "config.yaml").model
    dropout = OmegaConf.load(out / "config.yaml").dropout
    expected = config.to_dict() | {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    assert {k: v for k, v in recorded.items() if k != "pad_vocab_to_multiple_of"} == {
        k: expected[k] for k in recorded if k != "pad_vocab_to_multiple_of"}
    assert recorded.intermediate_size == 48 and recorded.pre_layer_norm and recorded.vocab_size == 208


def test_do_lower_case_follows_the_checkpoint_it_fine_tunes_and_predicts_from(squad_files, tmp_path, caplog):
    """A cased pre-training run (data.lower_case=false, with a vocabulary that alone would say uncased):
    fine-tuning and then predicting from the fine-tuned run keep its case unless told otherwise."""
    data, vocab = squad_files
    config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    save_checkpoint(tmp_path / "pt", "global_step2",
                    state={"model": BertForPreTraining(config).state_dict(),
                           "model_config": config.to_dict()},
                    client_state={"vocab_file": str(vocab)}, config_yaml="data:\n  lower_case: false\n")
    common = [*TINY, f"predict_file={data}"]
    run(compose_squad(*common, f"train_file={data}", f"model_file={tmp_path / 'pt'}", "max_steps=2",
                      f"output_dir={tmp_path / 'ft'}"))
    assert OmegaConf.load(tmp_path / "ft" / "config.yaml").do_lower_case is False
    run(compose_squad(*common, "do_train=false", f"model_file={tmp_path / 'ft' / 'checkpoints'}",
                      f"output_dir={tmp_path / 'pred'}"))
    assert OmegaConf.load(tmp_path / "pred" / "config.yaml").do_lower_case is False
    fine_tuned = json.loads((tmp_path / "ft" / "predictions.json").read_text())
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text()) == fine_tuned
    # lower-casing the same model's input changes what it answers (the vocabulary is uncased)
    caplog.clear()
    run(compose_squad(*common, "do_train=false", "do_lower_case=true",
                      f"model_file={tmp_path / 'ft' / 'checkpoints'}", f"output_dir={tmp_path / 'lower'}"))
    assert "do_lower_case=True, but" in caplog.text and "do_lower_case says False" in caplog.text
    assert json.loads((tmp_path / "lower" / "predictions.json").read_text()) != fine_tuned


def test_a_vocabulary_other_than_the_checkpoints_is_refused(squad_files, tmp_path):
    data, vocab = squad_files
    config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    state = {"model": BertForPreTraining(config).state_dict(), "model_config": config.to_dict()}
    save_checkpoint(tmp_path / "pt", "global_step2", state=state, client_state={"vocab_file": str(vocab)})
    other = tmp_path / "other.txt"  # as many tokens, another order
    lines = vocab.read_text().splitlines()
    other.write_text("\n".join([*lines[:5], *reversed(lines[5:])]) + "\n")
    common = [*TINY, f"train_file={data}", f"predict_file={data}", "max_steps=1"]
    differs = f"vocab_file={other} differs from the vocabulary .* was trained with"
    with pytest.raises(UserError, match=differs):
        run(compose_squad(*common, f"model_file={tmp_path / 'pt'}", f"vocab_file={other}",
                          f"output_dir={tmp_path / 'a'}"))
    # the same tokens in another file are the same vocabulary
    same = tmp_path / "same.txt"
    same.write_bytes(vocab.read_bytes())
    run(compose_squad(*common, "do_predict=false", f"model_file={tmp_path / 'pt'}", f"vocab_file={same}",
                      f"output_dir={tmp_path / 'b'}"))
    # a checkpoint without its vocabulary: the rows must be the tokens, or them padded
    tokens = len(lines)
    assert tokens == 140
    for rows, fits in ((144, True), (256, True), (200, False), (30522, False)):
        config = BertConfig(vocab_size=rows, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64)
        state = {"model": BertForPreTraining(config).state_dict(), "model_config": config.to_dict()}
        save_checkpoint(tmp_path / f"pt{rows}", "global_step2", state=state)
        cfg = compose_squad(*common, "do_predict=false", f"model_file={tmp_path / f'pt{rows}'}",
                            f"vocab_file={vocab}", f"output_dir={tmp_path / f'r{rows}'}")
        if fits:
            assert run(cfg)["global_step"] == 1
        else:
            with pytest.raises(UserError, match=f"vocabulary has 140 tokens but .* was trained with {rows}"):
                run(cfg)


def test_lower_case_setting_reads_the_record_beside_the_checkpoint(tmp_path):
    from bertrecipes.interop.export import lower_case_setting

    uncased, cased = tmp_path / "uncased.txt", tmp_path / "cased.txt"
    uncased.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\ncat\n##s\n")
    cased.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\nCat\n##s\n")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    weights = folder / "weights.bin"
    assert lower_case_setting(weights, uncased) == (True, None)  # no record: the vocabulary decides
    assert lower_case_setting(weights, cased) == (False, None)
    (folder / "tokenizer_config.json").write_text('{"do_lower_case": false}')  # a Hugging Face folder
    record = f"{folder / 'tokenizer_config.json'}: do_lower_case"
    assert lower_case_setting(weights, uncased) == (False, record)
    (folder / "config.yaml").write_text("do_lower_case: true\n")  # a fine-tuning run's config wins
    assert lower_case_setting(weights, cased)[0] is True
    (folder / "config.yaml").write_text("data:\n  lower_case: false\n")  # a pre-training run's
    assert lower_case_setting(weights, uncased) == (False, f"{folder / 'config.yaml'}: data.lower_case")
    (folder / "config.yaml").write_text("data: [unclosed\n")  # unreadable: the next record
    (folder / "tokenizer_config.json").unlink()
    assert lower_case_setting(weights, cased) == (False, None)


@pytest.mark.parametrize("overrides, message", [
    (["train_file=null"], "do_train=true needs train_file"),
    (["do_train=false", "do_predict=false"], "nothing to do"),
    (["ckpt_type=PT"], "ckpt_type must be one of DS, HF, TF"),
    (["windows_without_answer=keep"], "windows_without_answer must be one of drop, cls, got 'keep'"),
    (["vocab_file=null"], "no vocabulary: set vocab_file"),
    (["vocab_file=/nonexistent/vocab.txt"], "/nonexistent/vocab.txt"),
    (["max_query_length=62"], "leaves no room for the context"),
    (["train_batch_size=9"], "not divisible"),
    (["model_file=/nonexistent/ckpt"], "/nonexistent/ckpt does not exist"),
    (["model.max_position_embeddings=32"], "exceeds model.max_position_embeddings=32"),
    (["compile=true", "compile_mode=fast"],
     "compile_mode must be one of default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs, "
     "got 'fast'"),
])
def test_bad_settings_are_user_errors(squad_files, tmp_path, overrides, message):
    data, vocab = squad_files
    cfg = compose_squad(*TINY, f"train_file={data}", f"predict_file={data}", f"vocab_file={vocab}",
                        f"output_dir={tmp_path}", *overrides)
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        run(cfg)


def test_unlocatable_answers_are_counted_in_the_summary(squad_files, tmp_path):
    data, vocab = squad_files
    broken = json.loads(data.read_text())
    broken["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 0
    broken["data"][1]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = 10 ** 6
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    summary = run(compose_squad(*TINY, f"train_file={path}", "do_predict=false", f"vocab_file={vocab}",
                                "max_steps=1", f"output_dir={tmp_path / 'run'}"))
    assert summary["skipped_examples"] == 2


def test_command_line_run(squad_files, tmp_path):
    data, vocab = squad_files
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "bertrecipes.squad", *TINY, f"train_file={data}",
                           f"predict_file={data}", f"vocab_file={vocab}", "max_steps=2", f"output_dir={out}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "predictions.json").is_file() and (out / ".hydra" / "config.yaml").is_file()
    assert "exact_match" in (out / "metrics.jsonl").read_text()
    assert "exact_match" in (out / "squad.log").read_text()  # the run's log, named for it


def test_a_malformed_file_is_one_line_and_exit_status_2(squad_files, tmp_path, caplog):
    data, vocab = squad_files
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "a"}]}]}]}')
    cfg = compose_squad(*TINY, f"train_file={bad}", f"predict_file={data}", f"vocab_file={vocab}",
                        f"output_dir={tmp_path / 'run'}")
    with pytest.raises(SystemExit) as info:
        run_and_report(cfg)
    assert info.value.code == 2
    assert f"{bad}: data[0].paragraphs[0].qas[0] has no key 'question'" in caplog.text
    assert "Traceback" not in caplog.text


def test_a_train_file_without_usable_windows_says_why(squad_files, tmp_path):
    data, vocab = squad_files
    lost = tmp_path / "lost.json"  # every answer_start points elsewhere: nothing to train on
    lost.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [{
        "context": "Paris is a city in France.",
        "qas": [{"id": "q", "question": "Where is Paris?",
                 "answers": [{"text": "France", "answer_start": 0}]}],
    }]}]}))
    with pytest.raises(UserError, match="gives no training windows: no answer was found in its context at "
                                        "answer_start, or none fits whole in a window of max_seq_length=64"):
        run(compose_squad(*TINY, f"train_file={lost}", f"predict_file={data}", f"vocab_file={vocab}",
                          f"output_dir={tmp_path / 'run'}"))


class RecordingLogger:
    """A dashboard logger (the interface WandbLogger has) that keeps what it is given."""

    runs: list[RecordingLogger] = []

    def __init__(self, run_config=None, output_dir=None, default_name=None):
        self.run_config, self.records, self.finished = run_config, [], False
        RecordingLogger.runs.append(self)

    def log(self, metrics, step):
        self.records.append((step, dict(metrics)))

    def finish(self):
        self.finished = True


def test_the_dashboard_logger_gets_the_training_and_evaluation_records(squad_files, tmp_path):
    data, vocab = squad_files
    run(compose_squad(*TINY, f"train_file={data}", f"predict_file={data}", f"vocab_file={vocab}",
                      "max_steps=2", f"logger._target_={__name__}.RecordingLogger", f"output_dir={tmp_path}"))
    (logger,) = RecordingLogger.runs
    assert logger.finished and logger.run_config["job_name"] == "bert_squad"
    assert [step for step, _ in logger.records] == [1, 2, 2]
    assert "loss" in logger.records[0][1] and {"exact_match", "f1"} <= set(logger.records[-1][1])
    assert [r for _, r in logger.records] == read_metrics(tmp_path)


def test_a_hugging_face_folder_given_as_ours_names_the_right_ckpt_type(squad_files, tmp_path):
    data, vocab = squad_files
    hf = tmp_path / "hf_bert"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="looks like a .*Hugging Face.* checkpoint .it holds "
                                        "model.safetensors.*use ckpt_type=HF"):
        run(compose_squad(*TINY, f"train_file={data}", f"vocab_file={vocab}", f"model_file={hf}",
                          "do_predict=false", "max_steps=1", f"output_dir={tmp_path / 'run'}"))


def test_a_squad_key_added_with_plus_that_nothing_reads_is_refused(squad_files, tmp_path):
    data, vocab = squad_files
    with pytest.raises(UserError, match="unknown top-level key.s. max_stpes"):
        run(compose_squad(*TINY, f"train_file={data}", f"vocab_file={vocab}", "+max_stpes=1",
                          f"output_dir={tmp_path / 'run'}"))
    with pytest.raises(UserError, match="unknown key.s. kernel.unpadd .* Valid keys of kernel: "):
        run(compose_squad(*TINY, f"train_file={data}", f"vocab_file={vocab}", "+kernel.unpadd=true",
                          f"output_dir={tmp_path / 'run'}"))


def test_fine_tuning_into_a_used_output_dir_is_refused_but_predicting_there_is_not(squad_files, tmp_path):
    data, vocab = squad_files
    out = tmp_path / "run"
    run(compose_squad(*TINY, f"train_file={data}", f"vocab_file={vocab}", "do_predict=false", "max_steps=1",
                      f"output_dir={out}"))
    with pytest.raises(UserError, match="already holds a fine-tuning run .checkpoints/."):
        run(compose_squad(*TINY, f"train_file={data}", f"vocab_file={vocab}", "do_predict=false",
                          "max_steps=1", f"output_dir={out}"))
    summary = run(compose_squad(*TINY, "do_train=false", f"predict_file={data}",
                                f"model_file={out / 'checkpoints'}", f"output_dir={out}"))
    assert "exact_match" in summary["eval"] and (out / "predictions.json").is_file()
