"""``python -m bertrecipes.from_deepspeed``: a DeepSpeed config (and bing_bert's training config) in,
a bertrecipes command out. The configs here have the shape and the values of DeepSpeedExamples'
own (``deepspeed_bsz64k_lamb_config_seq128.json``, ``bert_large_lamb.json``,
BingBertSquad's ``deepspeed_bsz24_config.json``, as the README's recipe tables cite them); the
command's overrides must compose into a config that holds those values, which for the recipe are
the ``+phase=seq128`` and SQuAD defaults bertrecipes ships."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bertrecipes.errors import UserError
from bertrecipes.from_deepspeed import CHECKPOINT_STEPS, command
from bertrecipes.squad.config import register_squad_configs

ROOT = Path(__file__).resolve().parent.parent
register_squad_configs()

DS_SEQ128 = {
    "train_batch_size": 65536, "train_micro_batch_size_per_gpu": 64, "steps_per_print": 100,
    "prescale_gradients": False,
    "optimizer": {"type": "Lamb", "params": {"lr": 11e-3, "weight_decay": 0.01, "bias_correction": False,
                                             "max_coeff": 0.3, "min_coeff": 0.01}},
    "gradient_clipping": 1.0, "wall_clock_breakdown": False, "fp16": {"enabled": True, "loss_scale": 0},
    "sparse_attention": {"mode": "fixed", "block": 16},
}
BING_BERT = {
    "name": "bing_bert_large_lamb_seq", "bert_token_file": "bert-large-uncased",
    "bert_model_config": {"vocab_size_or_config_json_file": 119547, "hidden_size": 1024,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                          "hidden_act": "gelu",
                          "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                          "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02},
    "mixed_seq_training": {
        "128": {"num_epochs": 150, "warmup_proportion": 0.06, "learning_rate": 11e-3, "decay_rate": 0.90,
                "decay_step": 250, "total_training_steps": 7500},
        "512": {"num_epochs": 160, "warmup_proportion": 0.02, "learning_rate": 2e-3, "decay_rate": 0.90,
                "decay_step": 150, "total_training_steps": 7500},
    },
}
DS_SQUAD = {"train_batch_size": 24, "train_micro_batch_size_per_gpu": 3, "steps_per_print": 10,
            "optimizer": {"type": "Adam",
                          "params": {"lr": 3e-5, "weight_decay": 0.0, "bias_correction": False}},
            "gradient_clipping": 1.0, "fp16": {"enabled": True}}
# DeepSpeedExamples/BingBertSquad/deepspeed_bsz24_config.json as published: the clipping is the
# optimizer's max_grad_norm, and there is no gradient_clipping
DS_SQUAD_PUBLISHED = {
    "train_batch_size": 24, "train_micro_batch_size_per_gpu": 6, "steps_per_print": 10,
    "optimizer": {"type": "Adam", "params": {"lr": 3e-5, "max_grad_norm": 1.0, "weight_decay": 0.0,
                                             "bias_correction": False}},
    "fp16": {"enabled": True},
}

RECIPE_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "steps_per_print", "max_grad_norm",
               "max_seq_length", "max_predictions_per_seq", "total_training_steps", "checkpoint_steps")


def write(tmp_path: Path, name: str, data: dict) -> Path:
    (tmp_path / name).write_text(json.dumps(data))
    return tmp_path / name


def composed(words: list[str], *extra: str):
    config = "squad" if words[2] == "bertrecipes.squad" else "pretrain"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config, overrides=[*words[3:], *extra])


def test_bing_bert_seq128_gives_the_recipe_of_phase_seq128(tmp_path):
    words, notes = command(write(tmp_path, "ds.json", DS_SEQ128), write(tmp_path, "bert.json", BING_BERT),
                           seq=128, lr_offset=1e-3, max_predictions_per_seq=20)
    assert words[:3] == ["python", "-m", "bertrecipes.pretrain"]
    ours = composed(words)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        phase = compose("pretrain", overrides=["+phase=seq128"])
    for key in RECIPE_KEYS:
        assert ours[key] == phase[key], key
    assert ours.model == phase.model and ours.precision == phase.precision
    for key in ("lr", "weight_decay", "bias_correction", "max_coeff", "min_coeff"):
        assert ours.optimizer[key] == pytest.approx(phase.optimizer[key]), key
    assert ours.optimizer._target_ == phase.optimizer._target_
    assert ours.scheduler._target_ == phase.scheduler._target_
    for key in ("decay_rate", "decay_step", "lr_offset"):
        assert ours.scheduler[key] == pytest.approx(phase.scheduler[key]), key
    # the one documented difference: bert_large_lamb.json's warmup (the phase uses the tutorial's 0.02)
    assert ours.scheduler.warmup_proportion == 0.06 and phase.scheduler.warmup_proportion == 0.02
    assert any("sparse_attention" in n for n in notes) and any("max_steps" in n for n in notes)
    assert any("prescale_gradients, wall_clock_breakdown" in n for n in notes)


def test_seq512_takes_its_own_training_entry(tmp_path):
    ds = {**DS_SEQ128, "train_batch_size": 32768, "train_micro_batch_size_per_gpu": 8,
          "optimizer": {"type": "Lamb", "params": {"lr": 2e-3}}}
    words, _ = command(write(tmp_path, "ds.json", ds), write(tmp_path, "bert.json", BING_BERT), seq=512)
    cfg = composed(words)
    got = (cfg.max_seq_length, cfg.optimizer.lr, cfg.scheduler.warmup_proportion, cfg.scheduler.decay_step)
    assert got == (512, 2e-3, 0.02, 150)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        phase = compose("pretrain", overrides=["+phase=seq512"])
    assert cfg.checkpoint_steps == phase.checkpoint_steps > 0 and cfg.job_name == "bing_bert_seq512"
    with pytest.raises(UserError, match="trains at several lengths .128, 512.: give --seq"):
        command(write(tmp_path, "ds.json", ds), write(tmp_path, "bert.json", BING_BERT))


def test_bingbertsquad_config_gives_the_squad_defaults_in_fp16(tmp_path):
    words, notes = command(write(tmp_path, "ds.json", DS_SQUAD), task="squad")
    assert words[:3] == ["python", "-m", "bertrecipes.squad"] and notes == []
    ours = composed(words, "output_dir=/tmp/x")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        default = compose("squad", overrides=["output_dir=/tmp/x"])
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "steps_per_print", "max_grad_norm"):
        assert ours[key] == default[key], key
    assert ours.optimizer == default.optimizer
    assert ours.precision.dtype == "fp16" and default.precision.dtype == "fp32"


def test_optimizer_max_grad_norm_is_the_clipping_unless_gradient_clipping_is_given(tmp_path):
    words, notes = command(write(tmp_path, "ds.json", DS_SQUAD_PUBLISHED), task="squad")
    assert "max_grad_norm=1.0" in words and notes == []
    assert composed(words, "output_dir=/tmp/x").train_micro_batch_size_per_gpu == 6

    params = {**DS_SQUAD_PUBLISHED["optimizer"]["params"], "max_grad_norm": 0.5}
    only_params = {**DS_SQUAD_PUBLISHED, "optimizer": {"type": "Adam", "params": params}}
    words, notes = command(write(tmp_path, "params.json", only_params), task="squad")
    assert composed(words, "output_dir=/tmp/x").max_grad_norm == 0.5 and notes == []

    both = {**only_params, "gradient_clipping": 2.0}
    words, notes = command(write(tmp_path, "both.json", both), task="squad")
    assert [w for w in words if w.startswith("max_grad_norm=")] == ["max_grad_norm=2.0"]
    assert notes == ["optimizer.params.max_grad_norm=0.5 differs from gradient_clipping=2.0; DeepSpeed "
                     "clips with gradient_clipping, as here"]
    agreeing = {**only_params, "gradient_clipping": 0.5}
    words, notes = command(write(tmp_path, "agree.json", agreeing), task="squad")
    assert [w for w in words if w.startswith("max_grad_norm=")] == ["max_grad_norm=0.5"] and notes == []
    with pytest.raises(UserError, match="optimizer.params.max_grad_norm must be a number"):
        bad = {"optimizer": {"type": "Lamb", "params": {"max_grad_norm": "1"}}}
        command(write(tmp_path, "bad.json", bad))


def test_seq512_says_that_phase_two_starts_from_the_phase_one_checkpoint(tmp_path):
    """bing_bert's seq512 script loads the seq128 checkpoint (--load_training_checkpoint); the command
    has no such path to give, so a note asks for init_from, as +phase=seq512 requires."""
    ds, bing = write(tmp_path, "ds.json", DS_SEQ128), write(tmp_path, "bert.json", BING_BERT)
    wanted = ("phase 2 (seq512) continues the seq128 phase: add init_from=<phase-1 run>/checkpoints "
              "(bing_bert's --load_training_checkpoint), or it pre-trains from random weights")
    assert wanted in command(ds, bing, seq=512)[1]
    assert not any("init_from" in n for n in command(ds, bing, seq=128)[1])
    assert any("add init_from=" in n for n in command(ds, seq=512)[1])  # without bing_bert's config
    assert not any("init_from" in n for n in command(ds, seq=128)[1])


def test_the_rest_of_deepspeeds_settings(tmp_path):
    ds = {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.98],
                                                                          "eps": 1e-6, "torch_adam": True}},
          "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}, "activation_checkpointing": {}}
    words, notes = command(write(tmp_path, "ds.json", ds))
    cfg = composed(words)
    assert cfg.precision.dtype == "bf16" and cfg.distributed.zero_stage == 1
    assert cfg.optimizer._target_ == "bertrecipes.optim.Adam" and cfg.optimizer.adam_w_mode is True
    assert list(cfg.optimizer.betas) == [0.9, 0.98] and cfg.optimizer.eps == 1e-6
    said = " | ".join(notes)
    assert "torch_adam" in said and "ZeRO stage 2" in said and "activation_checkpointing" in said
    assert "no --bing-bert-config" in said

    fp16 = {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
                     "hysteresis": 4, "min_loss_scale": 2, "consecutive_hysteresis": False},
            "zero_optimization": {"stage": 3}}
    words, notes = command(write(tmp_path, "fp16.json", fp16))
    cfg = composed(words)
    assert (cfg.precision.initial_scale_power, cfg.precision.loss_scale_window, cfg.precision.hysteresis,
            cfg.precision.min_loss_scale) == (12, 500, 4, 2)
    assert cfg.distributed.strategy == "fsdp" and any("consecutive_hysteresis" in n for n in notes)

    with pytest.raises(UserError, match="optimizer type 'OneBitAdam' has no bertrecipes counterpart"):
        command(write(tmp_path, "onebit.json", {"optimizer": {"type": "OneBitAdam"}}))
    with pytest.raises(UserError, match="is not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        command(tmp_path / "bad.json")


def test_command_line_prints_notes_then_a_command_that_runs(tmp_path):
    """The printed command, made tiny, is run as printed: one step on the demo corpus."""
    ds = write(tmp_path, "ds.json", {**DS_SEQ128, "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4,
                                     "fp16": {"enabled": False}})
    out = subprocess.run([sys.executable, "-m", "bertrecipes.from_deepspeed", str(ds), "--seq", "64"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert all(line.startswith("# ") for line in lines[:-1])
    words = shlex.split(lines[-1])
    run = subprocess.run([sys.executable, *words[1:], "max_steps=1", "device=cpu", "progress_bar=false",
                          "max_predictions_per_seq=8", f"output_dir={tmp_path / 'run'}",
                          f"data.cache_dir={tmp_path / 'cache'}", "data.num_documents=40"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    bad = subprocess.run([sys.executable, "-m", "bertrecipes.from_deepspeed", str(tmp_path / "missing.json")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "cannot read DeepSpeed config" in bad.stderr


def test_progressive_layer_drop_maps_to_its_block_on_the_pre_ln_model(tmp_path):
    """The block of bing_bert's ``deepspeed_bsz4k_progressive_layer_drop_config_seq128.json``."""
    ds = {**DS_SEQ128, "train_batch_size": 4096, "progressive_layer_drop": {"enabled": True, "theta": 0.5,
                                                                            "gamma": 0.001}}
    words, notes = command(write(tmp_path, "pld.json", ds), write(tmp_path, "bing.json", BING_BERT), seq=128)
    cfg = composed(words)
    pld = cfg.progressive_layer_drop
    assert (pld.enabled, pld.theta, pld.gamma) == (True, 0.5, 0.001)
    assert cfg.model.pre_layer_norm is True and cfg.model.num_hidden_layers == 24
    assert any("modelingpreln_layerdrop" in n for n in notes)
    assert not any("progressive_layer_drop" in n and "not mapped" in n for n in notes)

    words, _ = command(write(tmp_path, "off.json", {**ds, "progressive_layer_drop": {"enabled": False}}))
    assert composed(words).progressive_layer_drop.enabled is False
    squad = {**DS_SQUAD, "progressive_layer_drop": {"enabled": True}}
    words, notes = command(write(tmp_path, "squad.json", squad), task="squad")
    assert not any("progressive_layer_drop" in w for w in words)
    assert any("fine-tuning runs every layer" in n for n in notes)

    zero3 = {"zero_optimization": {"stage": 3}, "progressive_layer_drop": {"enabled": True}}
    words, notes = command(write(tmp_path, "zero3.json", zero3))
    cfg = composed(words)
    assert cfg.distributed.strategy == "ddp" and cfg.distributed.zero_stage == 1
    said = " | ".join(notes)
    assert "ZeRO stage 3 with progressive_layer_drop" in said and "without theta and gamma" in said
    with pytest.raises(UserError, match="progressive_layer_drop must be a JSON object"):
        command(write(tmp_path, "bad_pld.json", {"progressive_layer_drop": True}))


def test_lr_schedule_le_is_bing_berts_linear_warmup_with_exponential_decay(tmp_path):
    """bing_bert's LE (``warmup_linear_decay_exp``, its progressive-layer-drop scripts): linear warmup,
    then ``decay_rate ** ((step - warmup_end) / decay_step)``, the formula of its ``utils.py``."""
    from hydra.utils import instantiate

    words, _ = command(write(tmp_path, "ds.json", DS_SEQ128), write(tmp_path, "bert.json", BING_BERT),
                       seq=128, lr_schedule="LE")
    scheduler = composed(words).scheduler
    assert (scheduler.decay_rate, scheduler.decay_step, scheduler.warmup_proportion) == (0.9, 250, 0.06)
    schedule = instantiate(scheduler, base_lr=1.0, total_steps=7500)
    warmup_end = 0.06 * 7500
    for step in (0, 1, 200, 449, 450, 451, 1000, 7499):
        x = step / 7500
        want = x / 0.06 if x < 0.06 else 0.9 ** ((step - warmup_end) / 250)
        assert schedule(step) == pytest.approx(want, rel=1e-12), step


PLD_ON = {"enabled": True}


@pytest.mark.parametrize("ds,message", [
    ({"progressive_layer_drop": {**PLD_ON, "theta": None}}, "progressive_layer_drop.theta must be a number"),
    ({"progressive_layer_drop": {**PLD_ON, "theta": 1.5}}, r"theta must be in \(0, 1\]"),
    ({"progressive_layer_drop": {**PLD_ON, "gamma": -1}}, "progressive_layer_drop.gamma must be a finite"),
    ({"zero_optimization": {"stage": "x"}}, "zero_optimization.stage must be an integer, got 'x'"),
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage must be 0, 1, 2 or 3, got 5"),
    ({"optimizer": "Lamb"}, "optimizer must be a JSON object, got 'Lamb'"),
    ({"fp16": True}, "fp16 must be a JSON object"),
    ({"train_batch_size": "64"}, "train_batch_size must be an integer, got '64'"),
    ({"gradient_clipping": "1.0"}, "gradient_clipping must be a number"),
])
def test_bad_values_are_one_line_errors_naming_them(tmp_path, ds, message):
    with pytest.raises(UserError, match=message):
        command(write(tmp_path, "bad.json", ds))


def test_deepspeeds_old_boolean_zero_optimization_is_stage_one(tmp_path):
    words, _ = command(write(tmp_path, "zero.json", {"zero_optimization": True}))
    assert composed(words).distributed.zero_stage == 1
    words, _ = command(write(tmp_path, "off.json", {"zero_optimization": False}))
    assert composed(words).distributed.zero_stage == 0


def test_a_seq_the_bing_bert_config_lacks_is_named(tmp_path):
    with pytest.raises(UserError, match=r"--seq 256 is not one of the bing_bert config's lengths \(128, 512"):
        command(write(tmp_path, "ds.json", DS_SEQ128), write(tmp_path, "bert.json", BING_BERT), seq=256)


def test_the_checkpoint_intervals_are_the_phases():
    for seq, steps in CHECKPOINT_STEPS.items():
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            assert compose("pretrain", overrides=[f"+phase=seq{seq}"]).checkpoint_steps == steps
