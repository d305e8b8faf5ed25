"""End-to-end pre-training on the embedded demo data (tiny shapes, CPU): exact resume, fp16
overflow handling, phase initialisation, and clear errors on bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from torch._dynamo.utils import counters

from bertrecipes.checkpoint import CheckpointError, load_checkpoint
from bertrecipes.data.dataset import PretrainingDataset
from bertrecipes.engine import train
from bertrecipes.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parent.parent

# A run small enough for a few seconds on 2 CPU cores, with dropout on (so RNG state matters for
# exact resume) and gradient accumulation (2 micro-batches per step).
TINY = [
    "data.num_documents=120",
    "data.vocab_size=400",
    "data.dupe_factor=2",
    "max_seq_length=64",
    "max_predictions_per_seq=10",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "train_batch_size=8",
    "train_micro_batch_size_per_gpu=4",
    "steps_per_print=1",
    "scheduler.warmup_proportion=0.2",
    "scheduler.decay_step=2",
    "scheduler.decay_rate=0.9",
]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_exact_resume_logs_identical_losses(make_cfg, tmp_path):
    # The schedule's horizon is fixed; the first half of the split run just stops early.
    straight = tmp_path / "straight"
    train(make_cfg(*TINY, "total_training_steps=6", "max_steps=6", output_dir=straight))

    split = tmp_path / "split"
    train(make_cfg(*TINY, "total_training_steps=6", "max_steps=3", output_dir=split))
    train(make_cfg(*TINY, "total_training_steps=6", "max_steps=6", "resume=true", output_dir=split))

    a, b = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "mlm_loss", "nsp_loss", "lr", "grad_norm", "samples", "lamb_coeff_mean"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    wa = load_checkpoint(straight / "checkpoints")["model"]
    wb = load_checkpoint(split / "checkpoints")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_metrics_have_the_documented_fields_and_lr_follows_the_schedule(make_cfg, tmp_path):
    summary = train(make_cfg(*TINY, "max_steps=4", "scheduler.lr_offset=1e-4", output_dir=tmp_path))
    records = read_metrics(tmp_path)
    for key in ("step", "samples", "loss", "mlm_loss", "nsp_loss", "lr", "grad_norm",
                "samples_per_sec", "tokens_per_sec"):
        assert key in records[0], key
    assert [r["samples"] for r in records] == [8, 16, 24, 32]
    # step k (1-based) uses schedule step k-1: bing_bert's warmup (x/warmup)^2 then decay.
    base, total, warmup = 1e-2, 4, 0.2
    expected = []
    for s in range(4):
        x = s / total
        factor = (x / warmup) ** 2 if x < warmup else 0.9 ** ((s - warmup * total) / 2)
        expected.append(base * factor + 1e-4)
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12)
    assert summary["train_state"]["schedule_step"] == 4
    assert (tmp_path / "config.yaml").is_file()


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(make_cfg, tmp_path):
    first = tmp_path / "first"
    train(make_cfg(*TINY, "max_steps=1", output_dir=first))
    before = load_checkpoint(first / "checkpoints")

    # A loss scale of 2^40 overflows fp16 gradients for real (no mock): the step must be skipped.
    second = tmp_path / "second"
    train(make_cfg(*TINY, "max_steps=1", "precision=fp16", "precision.initial_scale_power=40",
                   "precision.hysteresis=1", f"init_from={first / 'checkpoints'}", output_dir=second))
    after = load_checkpoint(second / "checkpoints")
    for name, tensor in before["model"].items():
        assert torch.equal(tensor, after["model"][name]), name
    assert after["optimizer"]["state"] == {}
    assert after["train_state"]["schedule_step"] == 0 and after["train_state"]["skipped_steps"] == 1
    assert after["scaler"]["scale"] == 2.0**39
    record = read_metrics(second)[-1]
    assert record["loss_scale"] == 2.0**39 and record["grad_norm"] is None
    assert record["lamb_coeff_min"] is None and record["lamb_coeff_mean"] is None  # present, null


def test_fp16_overflow_at_the_minimum_scale_stops_the_run(make_cfg, tmp_path):
    """DeepSpeed's rule: an overflow with the scale at min_loss_scale (hysteresis spent) ends the run."""
    fp16 = ["precision=fp16", "precision.initial_scale_power=40", "precision.hysteresis=1",
            f"precision.min_loss_scale={2.0**39}"]  # 2^40 and 2^39 both overflow on this model
    with pytest.raises(UserError, match="overflowed with the fp16 loss scale already at its minimum"):
        train(make_cfg(*TINY, "max_steps=4", *fp16, output_dir=tmp_path / "a"))
    summary = train(make_cfg(*TINY, "max_steps=4", *fp16, "precision.raise_error_at_min_scale=false",
                             output_dir=tmp_path / "b"))
    assert summary["train_state"]["skipped_steps"] == 4


def test_resume_applies_changed_optimizer_and_precision_settings(make_cfg, tmp_path, caplog):
    out = tmp_path / "run"
    train(make_cfg(*TINY, "max_steps=2", "precision=fp16", output_dir=out))
    caplog.set_level(logging.WARNING, logger="bertrecipes.engine")
    train(make_cfg(*TINY, "max_steps=4", "resume=true", "optimizer.max_coeff=0.05", "precision=fp16",
                   "precision.loss_scale=128", output_dir=out))
    assert "max_coeff 10.0 -> 0.05" in caplog.text
    assert "saved with a dynamic loss scale at 65536; this run's precision settings give a static loss " \
           "scale of 128, which now applies" in caplog.text
    resumed = read_metrics(out)[2:]
    assert [r["step"] for r in resumed] == [3, 4]
    assert all(r["lamb_coeff_max"] <= 0.05 + 1e-7 and r["loss_scale"] == 128 for r in resumed)
    # the state of another optimizer is refused, naming it
    with pytest.raises(CheckpointError, match="does not fit this run's optimizer .bertrecipes.optim.Adam."):
        train(make_cfg(*TINY, "max_steps=5", "resume=true", "optimizer=adam", "precision=fp16",
                       output_dir=out))


def test_fp16_overflows_mid_run_hold_the_schedule_and_move_the_scale(make_cfg, tmp_path):
    """Real fp16 overflows in the middle of a run (scale 2^18, doubling every 2 clean steps, so it
    keeps climbing back into overflow). The host learns each step's overflow one step late, so this
    checks the bookkeeping end to end: an overflowed step logs no gradient norm and counts as
    skipped; the LR of every step is the schedule at the number of steps that did not overflow before
    it; the scale follows DeepSpeed's rules (hysteresis 1: halve on overflow; double after 2 clean)."""
    total = 10
    train(make_cfg(*TINY, f"max_steps={total}", "precision=fp16", "precision.initial_scale_power=18",
                   "precision.hysteresis=1", "precision.loss_scale_window=2", output_dir=tmp_path))
    records = read_metrics(tmp_path)
    overflowed = [r["grad_norm"] is None for r in records]
    assert any(overflowed[2:]) and overflowed.count(False) >= 4, overflowed  # overflows mid-run

    base, warmup = 1e-2, 0.2
    scale, clean_run, advanced = 2.0**18, 0, 0
    for record, overflow in zip(records, overflowed, strict=True):
        x = advanced / total
        factor = (x / warmup) ** 2 if x < warmup else 0.9 ** ((advanced - warmup * total) / 2)
        assert record["lr"] == pytest.approx(base * factor, rel=1e-12), record["step"]
        if overflow:
            scale, clean_run = scale / 2, 0
        else:
            advanced, clean_run = advanced + 1, clean_run + 1
            if clean_run % 2 == 0:
                scale *= 2
        assert record["loss_scale"] == scale, record["step"]
        assert record["skipped_steps"] == record["step"] - advanced
        # a skipped step computed no trust ratios: none logged (not the last step's again)
        coeffs = [record[f"lamb_coeff_{k}"] for k in ("min", "max", "mean")]
        assert coeffs == [None] * 3 if overflow else all(isinstance(c, float) for c in coeffs), record
    final = load_checkpoint(tmp_path / "checkpoints")
    assert final["train_state"]["schedule_step"] == advanced
    assert final["scaler"]["scale"] == scale and final["scaler"]["overflows"] == overflowed.count(True)


def test_fp16_and_bf16_train_on_cpu(make_cfg, tmp_path):
    for dtype in ("fp16", "bf16"):
        summary = train(make_cfg(*TINY, "max_steps=2", f"precision={dtype}", output_dir=tmp_path / dtype))
        assert summary["global_step"] == 2
        assert summary["last_metrics"]["loss"] is not None


def test_init_from_loads_weights_only_with_fresh_optimizer_and_schedule(make_cfg, tmp_path):
    phase1 = tmp_path / "p1"
    train(make_cfg(*TINY, "max_steps=3", output_dir=phase1))
    phase2 = tmp_path / "p2"
    train(make_cfg(*TINY, "max_steps=1", "optimizer.lr=0.0",
                   f"init_from={phase1 / 'checkpoints'}", output_dir=phase2))
    a = load_checkpoint(phase1 / "checkpoints")
    b = load_checkpoint(phase2 / "checkpoints")
    # lr 0: the weights are exactly phase 1's, the optimizer state is one step old, counters restart.
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    first_param_state = next(iter(b["optimizer"]["state"].values()))
    assert int(first_param_state["step"]) == 1
    assert b["train_state"]["global_step"] == 1 and b["train_state"]["last_global_data_samples"] == 8


def test_rewarmup_false_continues_the_schedule(make_cfg, tmp_path):
    phase1 = tmp_path / "p1"
    train(make_cfg(*TINY, "max_steps=3", output_dir=phase1))
    phase2 = tmp_path / "p2"
    summary = train(make_cfg(*TINY, "max_steps=1", "rewarmup=false", f"init_from={phase1 / 'checkpoints'}",
                             output_dir=phase2))
    assert summary["train_state"]["schedule_step"] == 4


def test_a_torchrun_restart_continues_from_the_checkpoint_or_starts_over(make_cfg, tmp_path, monkeypatch):
    """TORCHELASTIC_RESTART_COUNT > 0 (torchrun --max-restarts relaunched the workers): the same
    command continues the run as resume=true would, or, with no checkpoint yet, starts over."""
    straight = tmp_path / "straight"
    train(make_cfg(*TINY, "total_training_steps=6", "max_steps=6", output_dir=straight))
    split = tmp_path / "split"
    train(make_cfg(*TINY, "total_training_steps=6", "max_steps=3", output_dir=split))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    train(make_cfg(*TINY, "total_training_steps=6", "max_steps=6", output_dir=split))  # no resume=true
    assert [(r["step"], r["loss"]) for r in read_metrics(split)] == \
        [(r["step"], r["loss"]) for r in read_metrics(straight)]

    # a failed attempt that wrote metrics but no checkpoint: the restart starts over, not refused
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n')
    train(make_cfg(*TINY, "total_training_steps=6", "max_steps=2", output_dir=failed))
    assert [r["loss"] for r in read_metrics(failed)] == [r["loss"] for r in read_metrics(straight)[:2]]


def test_resume_without_checkpoint_is_a_clear_error(make_cfg, tmp_path):
    with pytest.raises(CheckpointError, match=f"resume=true but no checkpoint in {tmp_path / 'checkpoints'}"):
        train(make_cfg(*TINY, "max_steps=1", "resume=true", output_dir=tmp_path))


def test_a_run_killed_before_its_first_checkpoint_resumes_by_starting_over(make_cfg, tmp_path, caplog,
                                                                           monkeypatch):
    straight = tmp_path / "straight"
    train(make_cfg(*TINY, "total_training_steps=3", "max_steps=3", output_dir=straight))
    out = tmp_path / "run"  # a crash at step 3, before the run's checkpoint at the end
    monkeypatch.setenv("STOP_AT_STEP", "3")
    with pytest.raises(RuntimeError, match="crash at step 3"):
        train(make_cfg(*TINY, "total_training_steps=3", "max_steps=3",
                       "logger._target_=stop_logger.CrashAtStep", output_dir=out))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3] and not (out / "checkpoints").exists()
    # ... and a save killed midway left its .tmp
    leftover = out / "checkpoints" / ".global_step2.x1y2z3.tmp"
    leftover.mkdir(parents=True)
    (leftover / "state.pt").write_bytes(b"half a checkpoint")
    caplog.set_level(logging.WARNING, logger="bertrecipes.engine")
    train(make_cfg(*TINY, "total_training_steps=3", "max_steps=3", "resume=true", output_dir=out))
    assert "stopped before it saved a checkpoint: starting it over" in caplog.text
    a, b = read_metrics(straight), read_metrics(out)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert not leftover.exists()  # the first complete save removed what the killed one left
    assert (out / "checkpoints" / "global_step3").is_dir()
    # not started over: a run that saves no checkpoints at all, or a later phase without its init_from
    none = tmp_path / "none"
    train(make_cfg(*TINY, "max_steps=2", "checkpoint_steps=0", "checkpoint_at_end=false", output_dir=none))
    with pytest.raises(ConfigError, match="saves no checkpoints .*nothing to resume"):
        train(make_cfg(*TINY, "max_steps=3", "resume=true", output_dir=none))
    phase2 = tmp_path / "phase2"
    with pytest.raises(RuntimeError, match="crash at step 3"):
        train(make_cfg(*TINY, "max_steps=3", f"init_from={straight / 'checkpoints'}",
                       "init_from_required=true", "logger._target_=stop_logger.CrashAtStep",
                       output_dir=phase2))
    with pytest.raises(ConfigError, match="stopped before it saved a checkpoint, so it starts over, and job"):
        train(make_cfg(*TINY, "max_steps=2", "resume=true", "init_from_required=true", output_dir=phase2))


def test_a_run_stopped_in_its_data_build_starts_over_on_resume(make_cfg, tmp_path, monkeypatch, caplog):
    """A job preempted while it builds its data cache (hours on a real corpus) has written nothing but
    its config: a requeued resume=true starts it over instead of failing for want of checkpoints."""
    import bertrecipes.engine as engine

    build = engine.build_pretraining_dataset

    def preempted(cfg):
        raise RuntimeError("preempted while building the data")

    out = tmp_path / "run"
    monkeypatch.setattr(engine, "build_pretraining_dataset", preempted)
    with pytest.raises(RuntimeError, match="preempted"):
        train(make_cfg(*TINY, "max_steps=2", output_dir=out))
    assert (out / "config.yaml").is_file() and not (out / "checkpoints").exists()
    monkeypatch.setattr(engine, "build_pretraining_dataset", build)
    caplog.set_level(logging.WARNING, logger="bertrecipes.engine")
    summary = train(make_cfg(*TINY, "max_steps=2", "resume=true", output_dir=out))
    assert summary["global_step"] == 2
    assert "stopped before it saved a checkpoint: starting it over" in caplog.text


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(make_cfg, tmp_path, caplog):
    out = tmp_path / "run"
    train(make_cfg(*TINY, "total_training_steps=3", "max_steps=2", output_dir=out))
    metrics = out / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 3, "samples": 2')  # the process died writing step 3's record
    caplog.set_level(logging.WARNING, logger="bertrecipes.metrics")
    train(make_cfg(*TINY, "total_training_steps=3", "max_steps=3", "resume=true", output_dir=out))
    assert "dropping its last line, cut short" in caplog.text
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    # a damaged line that is not the last is not guessed at
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], lines[1][:10], lines[2]]) + "\n")
    with pytest.raises(UserError, match=f"{metrics}, line 2: not a JSON record"):
        train(make_cfg(*TINY, "total_training_steps=3", "max_steps=4", "resume=true", output_dir=out))


def test_resume_refuses_another_seed_or_data_and_goes_on_with_any_micro_batch(make_cfg, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(*TINY, "max_steps=3", output_dir=out))  # 3 x 8 = 24 samples consumed
    with pytest.raises(ConfigError, match=r"saved with seed=\d+ \(now 7\): the seed fixes the order"):
        train(make_cfg(*TINY, "max_steps=4", "resume=true", "seed=7", output_dir=out))
    with pytest.raises(ConfigError, match=r"data is not the saved run's \(\d+ instances then, \d+ now\)"):
        train(make_cfg(*TINY, "max_steps=4", "resume=true", "data.dupe_factor=3", output_dir=out))
    # the data is one stream, so a micro-batch that does not divide the position goes on from it
    summary = train(make_cfg(*TINY, "max_steps=5", "resume=true", "train_batch_size=10",
                             "train_micro_batch_size_per_gpu=5", output_dir=out))
    assert summary["train_state"]["last_global_data_samples"] == 24 + 2 * 10
    # a checkpoint saved before the stream was continuous keeps its order, cut to whole micro-batches:
    # there a micro-batch off the position is refused, naming ones that fit
    state_file = out / "checkpoints" / "global_step5" / "state.pt"
    saved = torch.load(state_file, weights_only=False)
    assert saved["client_state"].pop("data_order") == "continuous"
    torch.save(saved, state_file)
    with pytest.raises(ConfigError, match=r"consumed 44 samples, not a multiple of "
                                          r"train_micro_batch_size_per_gpu=8 x 1 ranks, and was saved before "
                                          r"the data became one continuous stream .*such as 2, 4, 11"):
        train(make_cfg(*TINY, "max_steps=6", "resume=true", "train_batch_size=8",
                       "train_micro_batch_size_per_gpu=8", output_dir=out))
    summary = train(make_cfg(*TINY, "max_steps=6", "resume=true", "train_batch_size=4",
                             "train_micro_batch_size_per_gpu=4", output_dir=out))
    assert summary["train_state"]["last_global_data_samples"] == 48
    again = torch.load(out / "checkpoints" / "global_step6" / "state.pt", weights_only=False)
    assert again["client_state"]["data_order"] == "whole_batches"


def test_resume_keeps_the_architecture_and_applies_a_new_dropout(make_cfg, tmp_path, caplog):
    out = tmp_path / "run"
    train(make_cfg(*TINY, "max_steps=1", output_dir=out))
    # another head count loads the same tensors: without the check it would silently train another model
    with pytest.raises(ConfigError, match=r"saved with model.num_attention_heads=2 \(now 4\): a resumed run "
                                          r"keeps its architecture"):
        train(make_cfg(*TINY, "max_steps=2", "resume=true", "model.num_attention_heads=4", output_dir=out))
    with pytest.raises(ConfigError, match=r"model.intermediate_size=64 \(now 128\), "
                                          r"model.pre_layer_norm=False \(now True\)"):
        train(make_cfg(*TINY, "max_steps=2", "resume=true", "model.intermediate_size=128",
                       "model.pre_layer_norm=true", output_dir=out))
    caplog.set_level(logging.WARNING, logger="bertrecipes.engine")
    summary = train(make_cfg(*TINY, "max_steps=2", "resume=true", "model.hidden_dropout_prob=0.2",
                             output_dir=out))
    assert summary["global_step"] == 2
    assert "model.hidden_dropout_prob was 0.1 when the run was saved and is 0.2 now" in caplog.text


def test_a_checkpoint_of_other_shapes_names_the_tensors(tmp_path):
    from bertrecipes.engine import load_model_weights
    from bertrecipes.model import BertConfig, BertForPreTraining

    small = BertForPreTraining(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32))
    wide = BertForPreTraining(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=48))
    with pytest.raises(CheckpointError, match=r"x.pt does not match the model: bert.encoder.layer.0.*"
                                              r"\(48, 16\) in the checkpoint, \(32, 16\) in the model"):
        load_model_weights(small, {"model": wide.state_dict()}, "x.pt")
    load_model_weights(small, {"model": small.state_dict()}, "x.pt")


def test_phase_two_continues_the_optimizer_state_of_phase_one(make_cfg, tmp_path, caplog):
    """load_optimizer_states (bing_bert's --load_training_checkpoint restores the optimizer): phase 2's
    first LAMB step updates phase 1's moments. With the same weights, data and seed the gradient g of
    that step is the fresh-optimizer run's too, so m = beta1 m_1 + (1 - beta1) g is beta1 m_1 plus the
    fresh run's m, v likewise with beta2, and the step counts continue."""
    phase1 = tmp_path / "p1"
    train(make_cfg(*TINY, "max_steps=3", output_dir=phase1))
    saved = {}
    for load in ("true", "false", "null"):
        out = tmp_path / f"p2_{load}"
        train(make_cfg(*TINY, "max_steps=1", f"init_from={phase1 / 'checkpoints'}",
                       f"load_optimizer_states={load}", output_dir=out))
        saved[load] = torch.load(out / "checkpoints" / "global_step1" / "state.pt", weights_only=False)
    first = torch.load(phase1 / "checkpoints" / "global_step3" / "state.pt", weights_only=False)["optimizer"]
    beta1, beta2 = make_cfg(*TINY).optimizer.betas
    loaded, fresh = saved["true"]["optimizer"]["state"], saved["false"]["optimizer"]["state"]
    assert len(loaded) == len(fresh) == len(first["state"]) > 10
    for index, state in loaded.items():
        old, new = first["state"][index], fresh[index]
        assert (int(state["step"]), int(new["step"])) == (int(old["step"]) + 1, 1)
        torch.testing.assert_close(state["exp_avg"], beta1 * old["exp_avg"] + new["exp_avg"],
                                   rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(state["exp_avg_sq"], beta2 * old["exp_avg_sq"] + new["exp_avg_sq"],
                                   rtol=1e-5, atol=1e-12)
    for index, state in saved["null"]["optimizer"]["state"].items():  # null: continued when it can be
        torch.testing.assert_close(state["exp_avg"], loaded[index]["exp_avg"], rtol=0, atol=0)
    # weights only from a Hugging Face checkpoint: required is an error, null a fresh optimizer
    from bertrecipes.interop import export_hf

    export_hf(phase1 / "checkpoints", tmp_path / "hf", architecture="pretraining")
    with pytest.raises(ConfigError, match="load_optimizer_states=true but .* is not a bertrecipes checkpoint "
                                          "with an optimizer state"):
        train(make_cfg(*TINY, "max_steps=1", f"init_from={tmp_path / 'hf'}", "ckpt_type=HF",
                       "load_optimizer_states=true", output_dir=tmp_path / "hf_true"))
    caplog.set_level(logging.INFO, logger="bertrecipes.engine")
    train(make_cfg(*TINY, "max_steps=1", f"init_from={tmp_path / 'hf'}", "ckpt_type=HF",
                   "load_optimizer_states=null", output_dir=tmp_path / "hf_null"))
    assert "init_from's optimizer state is not continued" in caplog.text
    # another optimizer's state: required is an error naming it, null a fresh optimizer
    with pytest.raises(CheckpointError, match="use the optimizer that run used, or "
                                              "load_optimizer_states=false"):
        train(make_cfg(*TINY, "max_steps=1", f"init_from={phase1 / 'checkpoints'}", "optimizer=adam",
                       "load_optimizer_states=true", output_dir=tmp_path / "adam_true"))
    train(make_cfg(*TINY, "max_steps=1", f"init_from={phase1 / 'checkpoints'}", "optimizer=adam",
                   "load_optimizer_states=null", output_dir=tmp_path / "adam_null"))


def test_an_optimizer_state_the_strategy_cannot_load_is_left_when_not_required(make_cfg, tmp_path,
                                                                                 monkeypatch, caplog):
    """load_optimizer_states=null falls back to a fresh optimizer when the run's strategy cannot load
    the state (phase 2 under FSDP from a DDP phase 1, say: the strategy's own error), true says it."""
    from bertrecipes import distributed

    phase1 = tmp_path / "p1"
    train(make_cfg(*TINY, "max_steps=1", output_dir=phase1))

    def cannot(model, optimizer, saved):
        raise ConfigError("strategy=fsdp loads only an optimizer state written with strategy=fsdp")

    monkeypatch.setattr(distributed, "load_optimizer_state", cannot)
    with pytest.raises(ConfigError, match="strategy=fsdp loads only"):
        train(make_cfg(*TINY, "max_steps=1", f"init_from={phase1 / 'checkpoints'}",
                       "load_optimizer_states=true", output_dir=tmp_path / "required"))
    caplog.set_level(logging.INFO, logger="bertrecipes.engine")
    train(make_cfg(*TINY, "max_steps=1", f"init_from={phase1 / 'checkpoints'}", "load_optimizer_states=null",
                   output_dir=tmp_path / "when_possible"))
    assert "optimizer state is not continued (strategy=fsdp loads only" in caplog.text
    state = torch.load(tmp_path / "when_possible" / "checkpoints" / "global_step1" / "state.pt",
                       weights_only=False)["optimizer"]["state"]
    assert {int(s["step"]) for s in state.values()} == {1}  # a fresh optimizer's first step


def test_the_samples_do_not_depend_on_the_micro_batch_across_epochs(make_cfg, tmp_path, monkeypatch):
    """Runs that differ only in micro-batch (60 samples a step as 1 x 60, 3 x 20 or 5 x 12) read the
    same samples, each with its own epoch, past the end of the first epoch (833 instances: step 14
    holds the last 53 of epoch 0 and the first 7 of epoch 1): the shuffles of epochs 0 and 1, one
    after the other."""
    read: list[tuple[int, int]] = []
    sizes: list[int] = []
    get_batch = PretrainingDataset.get_batch

    def recording(self, indices, epoch=0):
        sizes.append(len(self))
        if len(indices) in (60, 20, 12):  # the loader's micro-batches, not the data's identity check
            epochs = np.broadcast_to(np.asarray(epoch), np.shape(indices))
            read.extend(zip(epochs.tolist(), np.asarray(indices).tolist(), strict=True))
        return get_batch(self, indices, epoch)

    monkeypatch.setattr(PretrainingDataset, "get_batch", recording)
    runs = {}
    for micro in (60, 20, 12):
        read.clear()
        out = tmp_path / f"micro{micro}"
        cfg = make_cfg(*TINY, "max_steps=16", "train_batch_size=60",
                       f"train_micro_batch_size_per_gpu={micro}", output_dir=out)
        train(cfg)
        runs[micro] = list(read)
        assert read_metrics(out)[-1]["epoch"] == 1
    n = sizes[0]
    assert n == 833
    shuffles = [torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + e)).tolist()
                for e in (0, 1)]
    stream = [(0, i) for i in shuffles[0]] + [(1, i) for i in shuffles[1][:960 - n]]
    assert runs[60] == runs[20] == runs[12] == stream


def test_init_from_a_checkpoint_of_another_vocabulary_is_refused(make_cfg, tmp_path):
    first = tmp_path / "first"
    train(make_cfg(*TINY, "max_steps=1", output_dir=first))
    # the demo data has no vocab_file to give: the advice names data that does
    with pytest.raises(ConfigError, match="trained with the vocabulary .*, and this run's data uses another.*"
                                          r"give data from text with its vocabulary \(data=text_files "
                                          r"data.paths=\[...\] data.vocab_file=.*vocab.txt\)"):
        train(make_cfg(*TINY, "max_steps=1", "data.vocab_size=380", f"init_from={first / 'checkpoints'}",
                       output_dir=tmp_path / "second"))


def test_a_zero_stage_other_than_0_or_1_is_named_without_blaming_the_optimizer(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"^distributed.zero_stage must be 0 or 1, got 3 \(for ZeRO-3's "
                                          r"sharded parameters use distributed.strategy=fsdp\)$"):
        train(make_cfg(*TINY, "max_steps=1", "distributed.zero_stage=3", output_dir=tmp_path))


def test_data_smaller_than_one_micro_batch_is_named(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"instances, fewer than one micro-batch on every rank "
                                          r"\(train_micro_batch_size_per_gpu=100000 x 1 ranks\)"):
        train(make_cfg(*TINY, "max_steps=1", "train_batch_size=100000",
                       "train_micro_batch_size_per_gpu=100000", output_dir=tmp_path))


def test_truncated_checkpoint_on_resume_names_the_file_and_keeps_it(make_cfg, tmp_path):
    train(make_cfg(*TINY, "max_steps=1", output_dir=tmp_path))
    state = tmp_path / "checkpoints" / "global_step1" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{state}.*unreadable"):
        train(make_cfg(*TINY, "max_steps=2", "resume=true", output_dir=tmp_path))
    assert state.stat().st_size == 1000  # nothing overwrote or removed it


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; permissions cannot be tested")
def test_unwritable_output_dir_is_a_clear_error(make_cfg, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(UserError, match=f"output_dir {locked / 'run'} is not writable"):
        train(make_cfg(*TINY, "max_steps=1", output_dir=locked / "run"))


def test_output_dir_that_is_a_file_is_a_clear_error(make_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match=f"output_dir {blocker / 'run'} is not writable"):
        train(make_cfg(*TINY, "max_steps=1", output_dir=blocker / "run"))


def test_previous_checkpoint_survives_a_failed_later_save(make_cfg, tmp_path, monkeypatch):
    train(make_cfg(*TINY, "max_steps=2", output_dir=tmp_path))
    good = (tmp_path / "checkpoints" / "global_step2" / "state.pt").read_bytes()
    from bertrecipes import checkpoint as ckpt

    def failing_save(obj, f, *a, **k):
        f.write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*global_step3: No space left on "
                                              "device; the last complete one is .*global_step2"):
        train(make_cfg(*TINY, "max_steps=3", "resume=true", output_dir=tmp_path))
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "global_step2" / "state.pt").read_bytes() == good
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "global_step2"


def test_bad_batch_sizes_fail_before_any_work(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="train_batch_size=10.*train_micro_batch_size_per_gpu=4"):
        train(make_cfg(*TINY, "train_batch_size=10", output_dir=tmp_path))


@pytest.mark.parametrize("override, message", [
    ("steps_per_print=0", "steps_per_print must be >= 1, got 0"),
    ("checkpoint_steps=-5", "checkpoint_steps must be >= 0, got -5 (0 = off)"),
    ("keep_last_checkpoints=-1", "keep_last_checkpoints must be >= 0, got -1 (0 = keep all)"),
    ("max_grad_norm=-1", "max_grad_norm must be >= 0, got -1.0 (0 = off)"),
    ("max_predictions_per_seq=0", "max_predictions_per_seq must be >= 1, got 0"),
    ("max_seq_length=4", "max_seq_length must be >= 5, got 4 ([CLS] A [SEP] B [SEP] with one token each)"),
    ("total_training_steps=0", "total_training_steps must be a positive integer or null (null = max_steps), "
                               "got 0"),
    ("precision.dtype=fp8", "precision.dtype must be one of fp32, fp16, bf16, got 'fp8'"),
    ("optimizer.min_coeff=0.5", "optimizer: need 0 <= min_coeff <= max_coeff, got min_coeff=0.5"),
    ("scheduler.lr_offset=-1", "lr_offset must be a finite float >= 0"),
    ("precision=fp16 precision.loss_scale=-4",
     "precision.loss_scale must be 0 (dynamic) or > 0 (static), got -4"),
])
def test_bad_values_fail_before_any_work_naming_them(make_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(make_cfg(*TINY, "optimizer.max_coeff=0.3", *override.split(), output_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_key_added_with_plus_that_nothing_reads_is_refused(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="unknown top-level key.s. max_stpes .added with .key=...?."):
        train(make_cfg(*TINY, "+max_stpes=1", output_dir=tmp_path / "run"))
    # inside a group or block too, named with the block's valid keys
    for added, valid in (("+progressive_layer_drop.thta=0.5", "enabled, gamma, theta"),
                         ("+kernel.unpadd=true", "attn_dropout_checkpoint"),
                         ("+model.hidden_sise=64", "attention_probs_dropout_prob"),
                         ("+distributed.zero=1", "backend")):
        key = added[1:].split("=")[0]
        message = f"unknown key(s) {key} (added with +key=...?); nothing reads them. Valid keys of " \
                  f"{key.split('.')[0]}: {valid}"
        with pytest.raises(ConfigError, match=re.escape(message)):
            train(make_cfg(*TINY, added, output_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_phase_two_without_its_phase_one_checkpoint_is_refused(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="continues an earlier phase: give init_from="):
        train(make_cfg("+phase=seq512", "model=bert_tiny", "precision=fp32", "train_batch_size=4",
                       "train_micro_batch_size_per_gpu=2", "max_steps=1", output_dir=tmp_path / "run"))


def test_a_second_run_into_a_used_output_dir_is_refused_unless_it_resumes(make_cfg, tmp_path, caplog):
    out = tmp_path / "run"
    train(make_cfg(*TINY, "max_steps=2", output_dir=out))
    before = read_metrics(out)
    refused = "already holds a run (checkpoints, metrics.jsonl): continue it with resume=true (which"
    with pytest.raises(ConfigError, match=re.escape(refused)):
        train(make_cfg(*TINY, "max_steps=1", output_dir=out))
    assert read_metrics(out) == before and (out / "checkpoints" / "global_step2").is_dir()
    # resuming with a longer max_steps moves the schedule's horizon: said, with the fix
    caplog.set_level(logging.WARNING, logger="bertrecipes.engine")
    train(make_cfg(*TINY, "max_steps=3", "resume=true", output_dir=out))
    assert "horizon was 2 steps when the run was saved and is 3 now" in caplog.text
    assert "give total_training_steps=2 to keep the horizon" in caplog.text


def test_triton_bf16_in_the_interpreter_warns_that_its_gradients_are_wrong(make_cfg, monkeypatch, caplog):
    from bertrecipes.engine import check_triton_device

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_triton_device(make_cfg("kernel=triton", "precision=bf16"), torch.device("cpu"))
    assert "computes bf16 matrix products wrongly" in caplog.text
    caplog.clear()
    check_triton_device(make_cfg("kernel=triton", "precision=fp16"), torch.device("cpu"))
    check_triton_device(make_cfg("kernel=torch", "precision=bf16"), torch.device("cpu"))
    assert "wrongly" not in caplog.text


def test_triton_kernels_on_a_cpu_without_the_interpreter_are_refused_up_front(make_cfg, monkeypatch):
    from bertrecipes.engine import check_triton_device

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    check_triton_device(make_cfg(*TINY), cpu)  # kernel=torch: nothing to say
    with pytest.raises(ConfigError, match="kernel=triton and optimizer.fused=true run Triton kernels, which "
                                          "need a CUDA device .this run is on cpu."):
        check_triton_device(make_cfg(*TINY, "kernel=triton", "optimizer.fused=true"), cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_triton_device(make_cfg(*TINY, "kernel=triton"), cpu)


@pytest.mark.parametrize("kernel,mode", [
    ("kernel=torch", ""), ("kernel=triton", ""), ("kernel=torch", "compile_mode=reduce-overhead"),
    ("kernel=torch kernel.unpad=true kernel.unpad_bucket=64", "compile_mode=reduce-overhead")],
    ids=["torch", "triton", "torch-graphs", "torch-unpad-bucket-graphs"])
def test_compiled_run_follows_the_eager_run_and_resumes_eagerly(make_cfg, tmp_path, kernel, mode):
    """``compile=true`` (Inductor; with kernel=triton one graph around the Triton ops, unpadded;
    with reduce-overhead, a CUDA-graph step marked per micro-batch, graphs only on a GPU; and
    unpadded in token-count buckets, as CUDA graphs want): the eager run's losses, gradient norms and
    LAMB coefficients step by step within fp32 rounding (dropout off: Inductor's random numbers are
    its own), and a checkpoint that an eager run resumes."""
    kernel, mode = kernel.split(), mode.split()
    triton = "kernel=triton" in kernel
    if triton:
        pytest.importorskip("triton")
    # (the interpreted Triton kernels are slow: one micro-batch per step there)
    common = [*TINY, *kernel, "model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0",
              "total_training_steps=3", *(["train_batch_size=4"] if triton else [])]
    torch._dynamo.reset()
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train(make_cfg(*common, "max_steps=3", output_dir=eager))
    counters.clear()
    train(make_cfg(*common, "max_steps=2", "compile=true", *mode, output_dir=compiled))
    assert counters["stats"]["unique_graphs"] >= 1  # it did go through Dynamo
    train(make_cfg(*common, "max_steps=3", "resume=true", output_dir=compiled))  # eager, from its checkpoint
    a, b = read_metrics(eager), read_metrics(compiled)
    assert [r["step"] for r in b] == [1, 2, 3]
    for key, rel in (("loss", 1e-4), ("mlm_loss", 1e-4), ("grad_norm", 1e-3), ("lamb_coeff_mean", 1e-3)):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=rel), key


def test_unknown_compile_mode_fails_before_any_work_naming_the_modes(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="compile_mode must be one of default, reduce-overhead.*'fast'"):
        train(make_cfg(*TINY, "compile=true", "compile_mode=fast", output_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_wandb_logger_runs_offline_without_api_key(make_cfg, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(make_cfg(*TINY, "max_steps=2", "logger=wandb", "logger.project=bertrecipes-test",
                   output_dir=tmp_path))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(f"-{run_id}")
    # resumed: the same dashboard run continues (wandb names offline runs offline-run-<time>-<id>)
    train(make_cfg(*TINY, "max_steps=3", "logger=wandb", "logger.project=bertrecipes-test", "resume=true",
                   output_dir=tmp_path))
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))  # one per start (two, unless in one second)
    assert runs and all(r.name.endswith(f"-{run_id}") for r in runs), runs  # no second id
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id


def test_cli_run_writes_metrics_and_reports_user_errors(tmp_path, data_cache):
    env = {**os.environ, "BERTRECIPES_CACHE": str(data_cache)}
    out = tmp_path / "cli"
    ok = subprocess.run(
        [sys.executable, "-m", "bertrecipes.pretrain", *TINY, "max_steps=2", f"output_dir={out}",
         "progress_bar=false"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(read_metrics(out)) == 2 and (out / ".hydra" / "config.yaml").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "bertrecipes.pretrain", *TINY, f"output_dir={tmp_path / 'none'}",
         "resume=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2
    output = bad.stdout + bad.stderr
    assert "no checkpoint in" in output and "Traceback" not in output


def sweep(out: Path, data_cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m bertrecipes.pretrain -m`` on the tiny run, jobs in out/0, out/1, ..."""
    env = {**os.environ, "BERTRECIPES_CACHE": str(data_cache)}
    return subprocess.run(
        [sys.executable, "-m", "bertrecipes.pretrain", "-m", *TINY, f"output_dir={out}", "progress_bar=false",
         *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_multirun_gives_each_job_its_own_directory(tmp_path, data_cache):
    out = tmp_path / "sweep"
    result = sweep(out, data_cache, "max_steps=2", "optimizer.lr=1e-3,2e-3")
    assert result.returncode == 0, result.stderr
    # Step 2 is past the warmup: lr = base * 0.9^((1 - 0.4) / 2) for each job's own base.
    lrs = sorted(read_metrics(out / str(n))[-1]["lr"] for n in (0, 1))
    factor = 0.9 ** ((1 - 0.2 * 2) / 2)
    assert lrs == pytest.approx([1e-3 * factor, 2e-3 * factor], rel=1e-12)


def test_a_bad_job_in_a_sweep_fails_alone(tmp_path, data_cache):
    out = tmp_path / "sweep"
    result = sweep(out, data_cache, "max_steps=1", "train_batch_size=30,8")
    assert result.returncode == 1  # the sweep reports the failure...
    said = result.stdout + result.stderr
    assert "train_batch_size is not divisible" in said and "train_batch_size=30" in said
    assert "Traceback" not in said  # the bad job's error is one line, as outside a sweep
    assert not (out / "0" / "metrics.jsonl").exists()
    assert [r["step"] for r in read_metrics(out / "1")] == [1]  # ...after running the good job


@pytest.mark.parametrize("to_the_group", [False, True], ids=["process", "process-group-with-workers"])
def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, data_cache, to_the_group):
    """SIGTERM to the training process, or (as Slurm and systemd send it) to its whole process group,
    loader workers included: the step finishes, a checkpoint is saved, the exit status is 143."""
    import signal
    import time

    env = {**os.environ, "BERTRECIPES_CACHE": str(data_cache)}
    out = tmp_path / "sig"
    workers = ["data.num_workers=2"] if to_the_group else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "bertrecipes.pretrain", *TINY, "max_steps=100000", f"output_dir={out}",
         "progress_bar=false", *workers],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=to_the_group,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    if to_the_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]  # not "finished": a chain stops here
    saved = load_checkpoint(out / "checkpoints")
    step = saved["train_state"]["global_step"]
    assert len(read_metrics(out)) == step  # every completed step was logged and is in the checkpoint
    train(make_cfg_for(out, data_cache, f"max_steps={step + 2}", "resume=true"))
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 3))


def test_a_repeated_sigterm_still_saves_the_checkpoint(tmp_path, data_cache):
    """Under Slurm a worker gets SIGTERM twice (the scheduler's, and the one torchrun forwards), the
    second while the first is pending: the stop still saves its checkpoint and exits 143."""
    import signal

    env = {**os.environ, "BERTRECIPES_CACHE": str(data_cache), "STOP_AT_STEP": "3",
           "PYTHONPATH": str(ROOT / "tests")}
    out = tmp_path / "twice"
    done = subprocess.run(
        [sys.executable, "-m", "bertrecipes.pretrain", *TINY, "max_steps=50", f"output_dir={out}",
         "progress_bar=false", "logger._target_=stop_logger.StopTwiceAtStep"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "KeyboardInterrupt" not in done.stderr
    assert load_checkpoint(out / "checkpoints")["train_state"]["global_step"] == 3


def test_a_crash_with_loader_workers_exits_instead_of_waiting_for_them(tmp_path, data_cache):
    """The workers ignore SIGTERM (a stop signal is the trainer's), so the run stops them itself: a crash
    must not leave the interpreter's exit waiting on them (HYDRA_FULL_ERROR keeps the traceback, and
    with it the loader, alive to the end)."""
    env = {**os.environ, "BERTRECIPES_CACHE": str(data_cache), "HYDRA_FULL_ERROR": "1", "STOP_AT_STEP": "3",
           "PYTHONPATH": str(ROOT / "tests")}
    done = subprocess.run(
        [sys.executable, "-m", "bertrecipes.pretrain", *TINY, "max_steps=50",
         f"output_dir={tmp_path / 'run'}", "progress_bar=false", "data.num_workers=2",
         "logger._target_=stop_logger.CrashAtStep"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1 and "RuntimeError: crash at step 3" in done.stderr, done.stderr[-2000:]


def make_cfg_for(out: Path, data_cache: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("pretrain", overrides=[f"data.cache_dir={data_cache}", f"output_dir={out}",
                                              "progress_bar=false", *TINY, *overrides])


def test_init_from_a_hugging_face_checkpoint(make_cfg, tmp_path, data_cache):
    transformers = pytest.importorskip("transformers")
    from bertrecipes.data.build import build_pretraining_dataset

    vocab = build_pretraining_dataset(make_cfg(*TINY)).vocab_size
    hf = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "run"
    train(make_cfg(*TINY, "max_steps=1", "optimizer.lr=0.0", f"init_from={tmp_path / 'hf'}", "ckpt_type=HF",
                   output_dir=out))
    ours = load_checkpoint(out / "checkpoints")["model"]
    theirs = hf.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_init_from_with_the_wrong_ckpt_type_is_a_clear_error(make_cfg, tmp_path):
    train(make_cfg(*TINY, "max_steps=1", output_dir=tmp_path / "p1"))
    with pytest.raises(CheckpointError, match="ckpt_type=DS"):
        train(make_cfg(*TINY, "max_steps=1", f"init_from={tmp_path / 'p1' / 'checkpoints'}", "ckpt_type=HF",
                       output_dir=tmp_path / "p2"))


def test_unpadded_training_follows_the_padded_run(make_cfg, tmp_path):
    """kernel.unpad=true skips padding through the encoder, exactly or with the packed rows rounded
    up to a bucket (kernel.unpad_bucket); with dropout off, four optimizer steps log the same losses
    and gradient norms as the padded run (to float rounding)."""
    no_dropout = ["model.hidden_dropout_prob=0", "model.attention_probs_dropout_prob=0", "max_steps=4"]
    runs = {}
    for unpad, bucket in ((False, 0), (True, 0), (True, 96)):
        out = tmp_path / f"unpad_{unpad}_{bucket}"
        train(make_cfg(*TINY, *no_dropout, f"kernel.unpad={unpad}", f"kernel.unpad_bucket={bucket}",
                       output_dir=out))
        runs[unpad, bucket] = read_metrics(out)
    for key in ("loss", "mlm_loss", "nsp_loss", "grad_norm"):
        want = torch.tensor([r[key] for r in runs[False, 0]], dtype=torch.float64)
        for run in ((True, 0), (True, 96)):
            got = torch.tensor([r[key] for r in runs[run]], dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{key} {run}")
    # the batches did hold padding (else the comparison proves nothing): fewer tokens than slots
    tokens_per_sample = runs[True, 0][-1]["tokens_per_sec"] / runs[True, 0][-1]["samples_per_sec"]
    assert tokens_per_sample < 64 * 0.99


def test_cuda_graphs_with_unpadding_warn_of_a_graph_per_token_count(caplog):
    """reduce-overhead replays CUDA graphs of fixed shapes; unpadded batches change shape every
    micro-batch, so that pairing is named in a warning, with both ways out (and the others, a
    bucketed layout among them, are silent)."""
    from bertrecipes.engine import uses_cuda_graphs

    with caplog.at_level("WARNING", logger="bertrecipes.engine"):
        assert uses_cuda_graphs(True, "reduce-overhead", unpad=False)
        assert uses_cuda_graphs(True, "reduce-overhead", unpad=True, unpad_bucket=256)
        assert not uses_cuda_graphs(True, "default", unpad=True)
        assert not uses_cuda_graphs(False, "reduce-overhead", unpad=True)
        assert not caplog.records
        assert uses_cuda_graphs(True, "reduce-overhead", unpad=True)
    (record,) = caplog.records
    message = record.getMessage()
    assert "kernel.unpad=true" in message and "kernel.unpad=false" in message
    assert "kernel.unpad_bucket" in message


def test_a_bucket_without_unpadding_is_named_in_a_warning(caplog):
    from omegaconf import OmegaConf

    from bertrecipes.engine import unpad_options

    with caplog.at_level("WARNING", logger="bertrecipes.engine"):
        kernel = OmegaConf.create({"name": "torch", "unpad": True, "unpad_bucket": 64})
        assert unpad_options(kernel) == (True, 64)
        assert unpad_options(OmegaConf.create({"name": "torch"})) == (False, 0)
        assert not caplog.records
        unpad_options(OmegaConf.create({"name": "torch", "unpad": False, "unpad_bucket": 64}))
    (record,) = caplog.records
    assert "kernel.unpad_bucket=64" in record.getMessage() and "kernel.unpad=false" in record.getMessage()


@pytest.mark.parametrize("bad", ["-1", "2.5"])
def test_a_bad_unpad_bucket_is_a_clear_error(make_cfg, tmp_path, bad):
    """A negative bucket is the engine's error; a fraction is the schema's (an int field)."""
    errors = (ConfigError, ConfigCompositionException)
    with pytest.raises(errors, match=rf"unpad_bucket.*{bad}|{bad}.*unpad_bucket"):
        train(make_cfg(*TINY, "max_steps=1", f"kernel.unpad_bucket={bad}", output_dir=tmp_path))


def test_checkpoints_stand_alone_and_are_readable_by_others(make_cfg, tmp_path):
    """A checkpoint carries its vocabulary (the data cache may be gone), and what is renamed into
    place has the permissions the umask gives plain files (tempfile's are private)."""
    import shutil
    import stat

    from bertrecipes.interop import export_hf

    cache, out = tmp_path / "cache", tmp_path / "run"
    previous = os.umask(0o022)
    try:
        train(make_cfg(*TINY, "max_steps=1", f"data.cache_dir={cache}", output_dir=out))
    finally:
        os.umask(previous)
    tag = out / "checkpoints" / "global_step1"
    vocab_in_cache = Path(load_checkpoint(out / "checkpoints")["client_state"]["vocab_file"])
    assert (tag / "vocab.txt").read_bytes() == vocab_in_cache.read_bytes()
    for path, mode in ((tag, 0o755), (tag / "state.pt", 0o644), (tag / "vocab.txt", 0o644),
                       (out / "checkpoints" / "latest", 0o644)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    shutil.rmtree(cache)
    exported = export_hf(out / "checkpoints", tmp_path / "hf", architecture="pretraining")
    assert (exported / "vocab.txt").read_bytes() == (tag / "vocab.txt").read_bytes()


def test_a_padded_vocabulary_adds_rows_past_the_tokenizers(make_cfg, tmp_path):
    """model.pad_vocab_to_multiple_of (the phases: 8, as bing_bert's 30522 -> 30528): the embedding
    and the MLM decoder get the extra rows, and the run trains; the vocabulary file is unchanged."""
    train(make_cfg(*TINY, "max_steps=2", "model.pad_vocab_to_multiple_of=64", output_dir=tmp_path))
    saved = load_checkpoint(tmp_path / "checkpoints")
    tokens = len((tmp_path / "checkpoints" / "global_step2" / "vocab.txt").read_text().splitlines())
    rows = saved["model"]["bert.embeddings.word_embeddings.weight"].shape[0]
    assert rows == saved["model_config"]["vocab_size"] == -(-tokens // 64) * 64 and rows > tokens
    assert saved["model"]["cls.predictions.bias"].shape[0] == rows
    assert all(r["loss"] is not None for r in read_metrics(tmp_path))
