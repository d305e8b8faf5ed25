"""Multi-process training on CPU with torchrun + gloo: 2 processes equal 1 process with the same
global batch; checkpoints move between world sizes; ZeRO-1 equals plain DDP; no hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bertrecipes.data import generate_demo_corpus

ROOT = Path(__file__).resolve().parent.parent

# Dropout off: with it on, rank 1's dropout masks differ from the second micro-batch's masks of a
# single process (each process has its own RNG stream), so the runs would differ by design.
TINY = [
    "data.num_documents=120", "data.vocab_size=400", "data.dupe_factor=2",
    "max_seq_length=64", "max_predictions_per_seq=10",
    "model.hidden_size=32", "model.intermediate_size=64",
    "model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0",
    "train_batch_size=8", "train_micro_batch_size_per_gpu=4",
    "steps_per_print=1", "progress_bar=false", "device=cpu", "total_training_steps=7",
    "scheduler.warmup_proportion=0.2", "scheduler.decay_step=2", "scheduler.decay_rate=0.9",
]


def run(args: list[str], cache: Path, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "BERTRECIPES_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "bertrecipes.pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "bertrecipes.pretrain", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return result


def losses(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def evals(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "eval_loss" in r]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """5 steps each: 1 process; 2 processes under DDP, ZeRO-1 and FSDP; DDP and FSDP unpadded."""
    base = tmp_path_factory.mktemp("dist")
    cache = base / "cache"
    heldout = base / "heldout.txt"  # scored after the last step: 40 sequences, 20 per rank
    heldout.write_text("\n\n".join("\n".join(doc) for doc in generate_demo_corpus(30, seed=999)) + "\n")
    evaluation = [f"eval_data=[{heldout}]", "max_eval_samples=40", "eval_batch_size=6"]
    out = {}
    for name, nproc, extra in [
        ("single", 1, []),
        ("ddp", 2, []),
        ("zero1", 2, ["distributed.zero_stage=1"]),
        ("fsdp", 2, ["distributed.strategy=fsdp"]),
        ("ddp_unpad", 2, ["kernel.unpad=true"]),
        ("fsdp_unpad", 2, ["distributed.strategy=fsdp", "kernel.unpad=true"]),
    ]:
        result = run([*TINY, "max_steps=5", f"output_dir={base / name}", *evaluation, *extra], cache, nproc)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out[name] = base / name
    out["cache"], out["heldout"] = cache, heldout
    return out


def test_two_processes_equal_one_process_with_accumulation(runs):
    single, ddp = losses(runs["single"]), losses(runs["ddp"])
    assert [r["step"] for r in ddp] == [1, 2, 3, 4, 5]
    assert [r["samples"] for r in ddp] == [r["samples"] for r in single] == [8, 16, 24, 32, 40]
    for a, b in zip(single, ddp, strict=True):
        for key in ("loss", "mlm_loss", "nsp_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)
        assert b["lr"] == a["lr"]


@pytest.mark.parametrize("sharded", ["zero1", "fsdp"])
def test_zero1_and_fsdp_equal_plain_ddp(runs, sharded):
    ddp, zero = losses(runs["ddp"]), losses(runs[sharded])
    for a, b in zip(ddp, zero, strict=True):
        for key in ("loss", "mlm_loss", "nsp_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)
        # the trust ratios logged: of every parameter, though ZeRO-1 ranks each step their own shard
        for key in ("lamb_coeff_min", "lamb_coeff_max", "lamb_coeff_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)


@pytest.mark.parametrize("unpadded", ["ddp_unpad", "fsdp_unpad"])
def test_unpadded_encoder_under_ddp_and_fsdp_equals_one_padded_process(runs, unpadded):
    single, other = losses(runs["single"]), losses(runs[unpadded])
    for a, b in zip(single, other, strict=True):
        for key in ("loss", "mlm_loss", "nsp_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "fsdp_unpad"])
def test_held_out_scores_under_ddp_and_fsdp_equal_one_process(runs, name):
    (single,), (other,) = evals(runs["single"]), evals(runs[name])
    assert single["step"] == other["step"] == 5
    assert single["eval_samples"] == other["eval_samples"] == 40
    assert single["eval_masked_tokens"] == other["eval_masked_tokens"]
    for key in ("eval_loss", "eval_mlm_loss", "eval_nsp_loss", "eval_mlm_accuracy", "eval_nsp_accuracy"):
        assert other[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key


def test_a_held_out_set_too_small_for_the_ranks_fails_before_training(runs, tmp_path):
    out = tmp_path / "small_eval"
    heldout = runs["heldout"]
    result = run([*TINY, "max_steps=3", f"output_dir={out}", f"eval_data=[{heldout}]", "max_eval_samples=1"],
                 runs["cache"], nproc=2, timeout=240)
    assert result.returncode != 0
    assert "too few for 2 process(es)" in result.stdout + result.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_only_rank_zero_writes(runs):
    names = sorted(p.name for p in runs["ddp"].iterdir() if not p.name.startswith("."))
    assert names == ["checkpoints", "config.yaml", "metrics.jsonl", "pretrain.log"]  # the last: Hydra's
    assert len(losses(runs["ddp"])) == 5  # one line per step, not one per rank
    assert len(evals(runs["ddp"])) == 1


def test_each_rank_draws_from_its_own_random_stream_and_the_checkpoint_keeps_each(runs):
    """Seed + rank after the (identical) initial weights: dropout is off in these runs, so the saved
    streams are as seeded, one per rank, and they differ."""
    from bertrecipes.checkpoint import load_checkpoint

    saved = load_checkpoint(runs["ddp"] / "checkpoints")
    assert len(saved["rng_ranks"]) == 2
    rank0, rank1 = (state["torch"] for state in saved["rng_ranks"])
    assert not rank0.equal(rank1)
    assert saved["rng"]["torch"].equal(rank0)  # rank 0's, as one process saves it


@pytest.mark.parametrize("source", ["ddp", "zero1", "fsdp"])
def test_two_process_checkpoint_resumes_in_one_process(runs, source, tmp_path):
    # Continue the 2-process run for two more steps in 1 process; compare with a 1-process run that
    # goes straight to step 7 (the same global batches, so the same losses).
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(runs[source], resumed)
    result = run([*TINY, "max_steps=7", "resume=true", f"output_dir={resumed}"], runs["cache"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    straight = tmp_path / "straight"
    result = run([*TINY, "max_steps=7", f"output_dir={straight}"], runs["cache"])
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(straight), losses(resumed)
    assert [r["step"] for r in b] == list(range(1, 8))
    for ra, rb in zip(a[5:], b[5:], strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
    if source == "fsdp":  # its optimizer state is keyed by name: another optimizer is still refused
        other = tmp_path / "other"
        shutil.copytree(runs[source], other)
        result = run([*TINY, "max_steps=7", "resume=true", "optimizer=adam", f"output_dir={other}"],
                     runs["cache"])
        said = result.stdout + result.stderr
        assert result.returncode == 2 and "does not fit this run's optimizer" in said, said[-2000:]


def test_layer_drop_under_ddp_equals_one_process_and_fsdp_is_refused(tmp_path):
    """Progressive layer dropping draws per global micro-batch: rank r's micro-batch m is the one
    process's micro-batch 2m + r, so the ranks skip different layers (DDP with
    find_unused_parameters, through no_sync micro-batches) and the losses are the one process's."""
    pld = ["model.num_hidden_layers=4", "model.pre_layer_norm=true", "progressive_layer_drop.enabled=true",
           "progressive_layer_drop.theta=0.2", "progressive_layer_drop.gamma=0.8", "max_steps=5",
           "train_batch_size=16"]  # accumulation 2 on each of 2 ranks: DDP's no_sync with unused layers
    out = {}
    for name, nproc, extra in [("single", 1, []), ("ddp", 2, []), ("zero1", 2, ["distributed.zero_stage=1"])]:
        out[name] = tmp_path / name
        result = run([*TINY, *pld, f"output_dir={out[name]}", *extra], tmp_path / "cache", nproc)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    single = losses(out["single"])
    assert min(r["pld_layers"] for r in single) < 0.8  # layers were dropped
    for name in ("ddp", "zero1"):
        for a, b in zip(single, losses(out[name]), strict=True):
            for key in ("loss", "mlm_loss", "nsp_loss", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (name, a["step"], key)
            assert b["pld_layers"] == a["pld_layers"]
    result = run([*TINY, *pld, f"output_dir={tmp_path / 'fsdp'}", "distributed.strategy=fsdp"],
                 tmp_path / "cache", nproc=2)
    assert result.returncode != 0
    assert "distributed.strategy=ddp" in result.stdout + result.stderr
    assert not (tmp_path / "fsdp" / "metrics.jsonl").exists()


def test_data_built_for_longer_than_the_collective_timeout_does_not_fail_the_run(tmp_path):
    """Rank 0 builds the data cache (seconds here, hours for a real corpus) while the other ranks wait
    on the rendezvous store, outside the collective timeout (1.8 s here)."""
    slow = [a for a in TINY if not a.startswith("data.num_documents")]
    out = tmp_path / "run"
    result = run([*slow, "data.num_documents=4000", "distributed.timeout_minutes=0.03", "max_steps=2",
                  f"output_dir={out}"], tmp_path / "cache", nproc=2, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [r["step"] for r in losses(out)] == [1, 2]


def test_uneven_data_ends_epochs_cleanly_on_every_rank(tmp_path):
    # 3 micro-batches per rank per epoch at most; 12 steps cross several epoch ends.
    small = [a for a in TINY if not a.startswith(("data.num_documents", "total_training_steps"))]
    out = tmp_path / "uneven"
    result = run([*small, "data.num_documents=12", "data.dupe_factor=1", "max_steps=12",
                  f"output_dir={out}"], tmp_path / "cache", nproc=2, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = losses(out)
    assert records[-1]["step"] == 12 and records[-1]["epoch"] >= 2


def test_a_dying_rank_makes_the_others_exit(tmp_path):
    out = tmp_path / "dies"
    env = {**os.environ, "BERTRECIPES_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dying_rank.py"), *TINY, "max_steps=50", f"output_dir={out}",
           "distributed.timeout_minutes=1"]
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "rank 1 dies at step 3" in result.stdout + result.stderr
    assert time.monotonic() - started < 200


def test_each_process_binds_its_own_indexed_gpu(monkeypatch):
    """``device=auto`` gives ``cuda`` without an index: under torchrun NCCL is bound to
    ``cuda:LOCAL_RANK`` (``init_process_group`` refuses a device without an index), and in one
    process a ``cuda:N`` run makes GPU N current (Triton launches on the current device)."""
    import torch
    import torch.distributed

    from bertrecipes import distributed
    from bertrecipes.distributed import DistContext, DistributedConfig, device_for_rank, init_distributed

    current, calls = [0], {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.__setitem__(0, torch.device(d).index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: calls.update(kw))
    monkeypatch.setattr(distributed, "_largest_over_ranks", lambda value, device: value)  # no collective
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = init_distributed(DistributedConfig(), torch.device("cuda"))
    assert calls["device_id"] == torch.device("cuda", 1) and current[0] == 1
    assert device_for_rank(torch.device("cuda"), ctx) == torch.device("cuda", 1)

    current[0] = 0
    assert device_for_rank(torch.device("cuda", 2), DistContext()) == torch.device("cuda", 2)
    assert current[0] == 2  # made current
    assert device_for_rank(torch.device("cuda"), DistContext()) == torch.device("cuda", 2)
    assert device_for_rank(torch.device("cpu"), DistContext()) == torch.device("cpu")


def test_ranks_agree_on_the_restart_and_refuse_different_output_dirs(tmp_path):
    """torchelastic counts restarts per node: the ranks take the largest count, so a node whose
    workers did not fail also continues the run; output_dirs the ranks resolved differently (two
    nodes' time-stamped defaults) are refused on every rank, in one line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "rank_agreement.py")]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "rank 0 attempt 1" in out and "rank 1 attempt 1" in out
    for rank in (0, 1):
        assert (f"rank {rank} refused: the ranks resolved different output_dirs (rank {rank}: "
                f"/runs/node{rank}): give one") in out
