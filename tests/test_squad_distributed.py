"""SQuAD fine-tuning under torchrun (gloo, 2 CPU processes): the same losses, gradient norms and
predictions as one process with the same global batch (2 processes x micro 4 = 1 process x micro 4 x
accumulation 2); rank 0 alone writes and logs; a stop on one rank stops both, and the ZeRO-1
checkpoint it leaves resumes in one process to the one-process run's losses and predictions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_squad_engine import TINY, squad_files  # noqa: F401  (the fixture)

from bertrecipes.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent

# Dropout off: each process has its own random stream, so with dropout the runs differ by design.
COMMON = [*TINY, "dropout=0.0", "num_train_epochs=2", "checkpoint_steps=0", "distributed.timeout_minutes=2"]


def squad(args: list[str], nproc: int, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"), **env}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    launcher = launcher if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "bertrecipes.squad", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_training(a: list[dict], b: list[dict]) -> None:
    a, b = [r for r in a if "loss" in r], [r for r in b if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) > 10
    for x, y in zip(a, b, strict=True):
        assert x["samples"] == y["samples"] and x["lr"] == pytest.approx(y["lr"], rel=1e-12)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), x["step"]


@pytest.fixture(scope="module")
def runs(squad_files, tmp_path_factory):  # noqa: F811
    data, vocab = squad_files
    base = tmp_path_factory.mktemp("squad_dist")
    files = [f"train_file={data}", f"predict_file={data}", f"vocab_file={vocab}"]
    out = {}
    for name, nproc in (("single", 1), ("ddp", 2)):
        result = squad([*COMMON, *files, f"output_dir={base / name}"], nproc)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out[name], out[name + "_log"] = base / name, result.stdout + result.stderr
    out["files"], out["base"] = files, base
    return out


def test_two_processes_train_and_predict_as_one_process_with_accumulation(runs):
    single, ddp = records(runs["single"]), records(runs["ddp"])
    same_training(single, ddp)
    assert (runs["ddp"] / "predictions.json").read_text() == (runs["single"] / "predictions.json").read_text()
    scored = [r for r in ddp if "exact_match" in r]
    assert len(scored) == 1 and scored[0]["predict_windows"] == records(runs["single"])[-1]["predict_windows"]
    assert scored[0]["f1"] == pytest.approx(single[-1]["f1"], abs=1e-9)


def test_rank_zero_alone_writes_and_logs(runs):
    ddp = runs["ddp"]
    assert sorted(p.name for p in ddp.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in runs["single"].iterdir() if not p.name.startswith("."))
    assert len(records(ddp)) == len(records(runs["single"]))  # one copy of each record
    assert runs["ddp_log"].count("fine-tuning ") == 1, runs["ddp_log"][-3000:]  # not once per rank
    saved = load_checkpoint(ddp / "checkpoints")
    assert saved["world_size"] == 2 and saved["client_state"]["task"] == "squad"
    # each rank's own random stream (seed + rank), kept rank by rank: dropout is off here, so the
    # streams are still as seeded, and they differ
    rank0, rank1 = (state["torch"] for state in saved["rng_ranks"])
    assert not torch.equal(rank0, rank1)


def test_a_stop_on_rank_zero_stops_both_and_its_zero1_checkpoint_resumes_in_one_process(runs):
    out = runs["base"] / "zero1_stopped"
    stopped = squad([*COMMON, *runs["files"], f"output_dir={out}", "distributed.zero_stage=1",
                     "logger._target_=stop_logger.StopAtStep"], 2, STOP_AT_STEP="4")
    said = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and said.count("stopped at step") == 1, said[-3000:]  # rank 0's
    assert f"exitcode: {128 + signal.SIGTERM}" in said.replace("  ", " "), said[-3000:]
    step = load_checkpoint(out / "checkpoints")["train_state"]["global_step"]
    assert 4 <= step <= 5  # the other rank hears of the stop one step later, by an all-reduce
    assert not (out / "predictions.json").exists()

    resumed = squad([*COMMON, *runs["files"], f"output_dir={out}", "resume=true"], 1)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    same_training(records(runs["single"]), records(out))
    assert (out / "predictions.json").read_text() == (runs["single"] / "predictions.json").read_text()


def test_two_ranks_resume_with_their_own_dropout_streams(runs):
    """Dropout on, unpadded: the ranks' shapes differ, so their random streams drift apart. A stop
    and a 2-process resume must continue each rank's own stream: the uninterrupted run's losses."""
    dropout = [*COMMON, *runs["files"], "dropout=0.1", "kernel.unpad=true", "num_train_epochs=1",
               "do_predict=false"]
    whole, split = runs["base"] / "dropout_whole", runs["base"] / "dropout_split"
    result = squad([*dropout, f"output_dir={whole}"], 2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stopped = squad([*dropout, f"output_dir={split}", "logger._target_=stop_logger.StopAtStep"], 2,
                    STOP_AT_STEP="3")
    assert stopped.returncode != 0 and "stopped at step" in stopped.stdout + stopped.stderr
    resumed = squad([*dropout, f"output_dir={split}", "resume=true"], 2)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    steps = load_checkpoint(split / "checkpoints")["train_state"]["global_step"]
    assert steps == len([r for r in records(whole) if "loss" in r]) > 6
    for x, y in zip(records(whole), records(split), strict=True):
        assert (x["step"], x["loss"], x["grad_norm"]) == (y["step"], y["loss"], y["grad_norm"])


def test_fsdp_is_refused_with_the_strategies_that_work(runs, tmp_path):
    result = squad([*COMMON, *runs["files"], f"output_dir={tmp_path}", "distributed.strategy=fsdp"], 1)
    assert result.returncode == 2
    assert "distributed.strategy must be ddp for SQuAD fine-tuning" in result.stdout + result.stderr


def test_the_default_time_stamped_output_dir_is_one_directory_for_all_ranks(runs, tmp_path):
    """Without output_dir, each rank's Hydra names runs/<job>/<time>: the launcher's start time, so
    ranks that start 1.1 s apart still share one directory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "staggered_squad.py"), *COMMON, *runs["files"], "max_steps=1",
         "do_predict=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "bert_squad").iterdir()
    assert [r["step"] for r in records(run_dir)] == [1] and (run_dir / "checkpoints").is_dir()
