"""SQuAD fine-tuning resumes exactly: after a crash or a stop signal, ``resume=true`` continues from
the latest checkpoint and logs, predicts and saves what the uninterrupted run does (dropout on, so
the random state must come back too); the settings that fix the windows' order must not change."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from test_squad_engine import TINY, compose_squad, read_metrics, squad_files  # noqa: F401  (the fixture)

from bertrecipes.checkpoint import list_checkpoints, load_checkpoint
from bertrecipes.errors import UserError
from bertrecipes.squad.engine import run, shuffled_windows, windows_from

TIMING = ("samples_per_sec", "tokens_per_sec", "predict_samples_per_sec")


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


class FailingLogger:
    """A dashboard logger that fails at ``fail_at`` (a crash mid-run), or sends this process a
    SIGTERM there (a stop request: the run saves a checkpoint at the end of the step)."""

    fail_at: int | None = None
    stop_at: int | None = None

    def __init__(self, run_config=None, output_dir=None, default_name=None):
        pass

    def log(self, metrics, step):
        if step == FailingLogger.fail_at and "loss" in metrics:
            raise RuntimeError(f"crash at step {step}")
        if step == FailingLogger.stop_at and "loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)

    def finish(self):
        pass


@pytest.fixture
def failing_logger():
    yield FailingLogger
    FailingLogger.fail_at = FailingLogger.stop_at = None


def squad_cfg(data, vocab, out, *overrides):
    return compose_squad(*TINY, f"train_file={data}", f"predict_file={data}", f"vocab_file={vocab}",
                         "num_train_epochs=2", "dropout=0.1", "checkpoint_steps=3", "keep_last_checkpoints=2",
                         f"output_dir={out}", *overrides)


@pytest.fixture(scope="module")
def uninterrupted(squad_files, tmp_path_factory):  # noqa: F811
    data, vocab = squad_files
    out = tmp_path_factory.mktemp("whole")
    summary = run(squad_cfg(data, vocab, out))
    assert summary["global_step"] > 7  # the splits below fall inside the run, across an epoch
    return out, summary


def test_windows_from_continues_the_order_at_any_position():
    for n, start in ((7, 0), (7, 5), (7, 7), (7, 16), (1, 3)):
        whole = shuffled_windows(n, seed=3)
        expected = [next(whole) for _ in range(start + 20)][start:]
        resumed = windows_from(n, 3, start)
        assert [next(resumed) for _ in range(20)] == expected


def test_a_crashed_run_resumes_to_the_uninterrupted_runs_losses(squad_files, uninterrupted,  # noqa: F811
                                                                 tmp_path, failing_logger):
    data, vocab = squad_files
    whole, whole_summary = uninterrupted
    out = tmp_path / "run"
    failing_logger.fail_at = 5  # checkpoints at 3 (and 6): the crash loses steps 4 and 5
    with pytest.raises(RuntimeError, match="crash at step 5"):
        run(squad_cfg(data, vocab, out, f"logger._target_={__name__}.FailingLogger"))
    assert list_checkpoints(out / "checkpoints") == ["global_step3"]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]  # step 5 crashed in the dashboard

    summary = run(squad_cfg(data, vocab, out, "resume=true"))
    assert summary["global_step"] == whole_summary["global_step"]
    assert comparable(read_metrics(out)) == comparable(read_metrics(whole))  # steps 4, 5 again, then on
    # samples/s and tokens/s count from the checkpoint: their ratio is the data's, as uninterrupted
    for resumed, reference in zip(read_metrics(out)[3:-1], read_metrics(whole)[3:-1], strict=True):
        assert resumed["samples_per_sec"] / resumed["tokens_per_sec"] == pytest.approx(
            reference["samples_per_sec"] / reference["tokens_per_sec"], rel=1e-9), resumed["step"]
    assert json.loads((out / "predictions.json").read_text()) == json.loads(
        (whole / "predictions.json").read_text())
    resumed, reference = load_checkpoint(out / "checkpoints"), load_checkpoint(whole / "checkpoints")
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    assert resumed["train_state"] == reference["train_state"]


def test_a_torchrun_restart_after_a_crash_continues_without_resume_true(squad_files, uninterrupted,  # noqa: F811
                                                                         tmp_path, failing_logger,
                                                                         monkeypatch):
    data, vocab = squad_files
    whole, _ = uninterrupted
    out = tmp_path / "run"
    failing_logger.fail_at = 5
    with pytest.raises(RuntimeError, match="crash at step 5"):
        run(squad_cfg(data, vocab, out, f"logger._target_={__name__}.FailingLogger"))
    failing_logger.fail_at = None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun --max-restarts relaunched it
    run(squad_cfg(data, vocab, out))  # the same command
    assert comparable(read_metrics(out)) == comparable(read_metrics(whole))
    assert (out / "predictions.json").read_text() == (whole / "predictions.json").read_text()


def test_a_stopped_run_resumes_to_the_uninterrupted_run(squad_files, uninterrupted, tmp_path,  # noqa: F811
                                                         failing_logger):
    data, vocab = squad_files
    whole, _ = uninterrupted
    out = tmp_path / "run"
    failing_logger.stop_at = 4
    stopped = run(squad_cfg(data, vocab, out, f"logger._target_={__name__}.FailingLogger"))
    assert stopped["stopped"] and stopped["stop_signal"] == signal.SIGTERM and stopped["global_step"] == 4
    assert not (out / "predictions.json").exists()
    assert list_checkpoints(out / "checkpoints") == ["global_step3", "global_step4"]  # saved on the stop

    run(squad_cfg(data, vocab, out, "resume=true"))
    assert comparable(read_metrics(out)) == comparable(read_metrics(whole))
    assert (out / "predictions.json").read_text() == (whole / "predictions.json").read_text()


def test_a_stop_during_the_last_step_predicts_nothing_and_resume_predicts(squad_files, uninterrupted,  # noqa: F811
                                                                           tmp_path, failing_logger):
    data, vocab = squad_files
    whole, whole_summary = uninterrupted
    out = tmp_path / "run"
    failing_logger.stop_at = whole_summary["global_step"]
    stopped = run(squad_cfg(data, vocab, out, f"logger._target_={__name__}.FailingLogger"))
    assert stopped["stopped"] and stopped["global_step"] == whole_summary["global_step"]
    assert not (out / "predictions.json").exists()
    run(squad_cfg(data, vocab, out, "resume=true"))
    assert (out / "predictions.json").read_text() == (whole / "predictions.json").read_text()
    assert comparable(read_metrics(out)) == comparable(read_metrics(whole))


def test_resume_after_training_finished_only_predicts(squad_files, uninterrupted, tmp_path):  # noqa: F811
    """A crash in prediction: resume=true trains no further and redoes the prediction once."""
    data, vocab = squad_files
    whole, whole_summary = uninterrupted
    out = tmp_path / "run"
    run(squad_cfg(data, vocab, out))
    before = load_checkpoint(out / "checkpoints")
    summary = run(squad_cfg(data, vocab, out, "resume=true"))
    assert summary["global_step"] == whole_summary["global_step"]
    records = read_metrics(out)
    assert comparable(records) == comparable(read_metrics(whole))  # one prediction record, not two
    assert sum("exact_match" in r for r in records) == 1
    after = load_checkpoint(out / "checkpoints")
    assert after["path"] == before["path"]
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())


def test_resume_with_different_window_settings_is_refused_naming_them(squad_files, tmp_path,  # noqa: F811
                                                                     caplog):
    data, vocab = squad_files
    out = tmp_path / "run"
    run(squad_cfg(data, vocab, out, "max_steps=1", "do_predict=false"))
    with pytest.raises(UserError, match=r"saved with doc_stride=24 \(now 20\), seed=42 \(now 7\)"):
        run(squad_cfg(data, vocab, out, "max_steps=2", "resume=true", "doc_stride=20", "seed=7"))
    # a micro-batch that fits another GPU changes neither the windows nor their order
    summary = run(squad_cfg(data, vocab, out, "max_steps=2", "resume=true", "do_predict=false",
                            "train_micro_batch_size_per_gpu=2"))
    assert summary["global_step"] == 2
    # the same train_file named another way (a link to it) is the same setting; another one is not
    link = tmp_path / "link.json"
    link.symlink_to(data)
    summary = run(compose_squad(*TINY, f"train_file={link}", f"predict_file={data}", f"vocab_file={vocab}",
                                "num_train_epochs=2", "dropout=0.1", "checkpoint_steps=3",
                                "keep_last_checkpoints=2", f"output_dir={out}", "max_steps=3", "resume=true",
                                "do_predict=false"))
    assert summary["global_step"] == 3
    other = tmp_path / "other.json"
    other.write_text(data.read_text())
    with pytest.raises(UserError, match="saved with train_file="):
        run(squad_cfg(other, vocab, out, "max_steps=4", "resume=true"))
    # a run saved before windows_without_answer existed trained on every window, [CLS] labels included
    saved = load_checkpoint(out / "checkpoints")["path"]
    config = Path(saved).parent / "config.yaml"
    newer = ("windows_without_answer", "rescale_after_warmup")
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if not line.strip().startswith(newer)))
    with pytest.raises(UserError, match="saved with windows_without_answer='cls' \\(now 'drop'\\)"):
        run(squad_cfg(link, vocab, out, "max_steps=4", "resume=true"))
    caplog.set_level(logging.WARNING, logger="bertrecipes.engine")
    summary = run(squad_cfg(link, vocab, out, "max_steps=4", "resume=true", "do_predict=false",
                            "windows_without_answer=cls"))
    assert summary["global_step"] == 4
    assert "saved when warmup_linear decayed as (1 - x)/(1 - warmup)" in caplog.text


def test_resume_with_another_optimizer_or_vocabulary_is_refused_before_anything_changes(
        squad_files, uninterrupted, tmp_path):  # noqa: F811
    data, vocab = squad_files
    whole, _ = uninterrupted
    out = tmp_path / "run"
    run(squad_cfg(data, vocab, out, "max_steps=2"))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="saved with optimizer bertrecipes.optim.Adam and this one has "
                                        "bertrecipes.optim.Lamb"):
        run(squad_cfg(data, vocab, out, "max_steps=2", "resume=true", "optimizer=lamb"))
    other_vocab = tmp_path / "vocab.txt"
    other_vocab.write_text(Path(vocab).read_text() + "extra\n")
    with pytest.raises(UserError, match=f"vocab_file={other_vocab} differs from the vocabulary the run was"):
        run(squad_cfg(data, other_vocab, out, "max_steps=2", "resume=true"))
    assert (out / "metrics.jsonl").read_text() == before  # the finished run's records, scores included


def test_predicting_into_a_runs_directory_keeps_its_training_records_and_config(squad_files, tmp_path):  # noqa: F811
    data, vocab = squad_files
    out = tmp_path / "run"
    run(squad_cfg(data, vocab, out, "max_steps=4", "do_predict=false"))
    config, training = (out / "config.yaml").read_text(), read_metrics(out)
    for _ in range(2):  # a second prediction replaces the first one's record
        run(compose_squad(*TINY, "do_train=false", f"predict_file={data}", f"output_dir={out}",
                          f"model_file={out / 'checkpoints'}"))
    records = read_metrics(out)
    assert records[:-1] == training and records[-1]["step"] == 4 and "f1" in records[-1]
    assert (out / "config.yaml").read_text() == config
    run(squad_cfg(data, vocab, out, "max_steps=6", "resume=true", "do_predict=false"))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_resume_errors_name_what_is_missing(squad_files, tmp_path):  # noqa: F811
    data, vocab = squad_files
    with pytest.raises(UserError, match=f"resume=true but no checkpoint in {tmp_path / 'a' / 'checkpoints'}"):
        run(squad_cfg(data, vocab, tmp_path / "a", "resume=true"))
    with pytest.raises(UserError, match="resume=true continues fine-tuning, but do_train=false"):
        run(squad_cfg(data, vocab, tmp_path / "b", "resume=true", "do_train=false"))
    # a pre-training checkpoint in checkpoints/ is not a fine-tuning run to continue
    from bertrecipes.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "c" / "checkpoints", "global_step1", state={"model": {}})
    with pytest.raises(UserError, match="is not a SQuAD fine-tuning checkpoint"):
        run(squad_cfg(data, vocab, tmp_path / "c", "resume=true"))


@pytest.mark.parametrize("key,value", [("checkpoint_steps", -1), ("keep_last_checkpoints", -2),
                                       ("max_grad_norm", -1.0)])
def test_negative_checkpoint_and_clipping_settings_are_refused(squad_files, tmp_path, key, value):  # noqa: F811
    data, vocab = squad_files
    with pytest.raises(UserError, match=f"{key} must be >= 0, got {value}"):
        run(squad_cfg(data, vocab, tmp_path / "run", f"{key}={value}"))


def test_shuffled_windows_are_a_permutation_per_epoch():
    order = shuffled_windows(5, seed=0)
    epochs = [[next(order) for _ in range(5)] for _ in range(3)]
    assert all(sorted(e) == list(range(5)) for e in epochs)
    assert epochs[1] == np.random.default_rng([0, 1]).permutation(5).tolist()
