"""Config composition, the typed schema (typos are errors), the recipe numbers, batch arithmetic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from bertrecipes.config import BatchSizes, resolve_batch_sizes
from bertrecipes.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_default_is_the_cpu_demo(make_cfg):
    cfg = make_cfg()
    assert cfg.model.num_hidden_layers == 2 and cfg.model.hidden_size == 128
    assert cfg.model.num_attention_heads == 2 and cfg.model.intermediate_size == 512
    assert cfg.data.name == "demo" and cfg.precision.dtype == "fp32" and cfg.kernel.name == "torch"
    assert cfg.optimizer._target_ == "bertrecipes.optim.Lamb"


def test_seq128_phase_is_deepspeeds_recipe(make_cfg):
    cfg = make_cfg("+phase=seq128")
    assert cfg.model.num_hidden_layers == 24 and cfg.model.hidden_size == 1024
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu) == (65536, 64)
    assert cfg.optimizer.lr == pytest.approx(11e-3)
    assert cfg.scheduler.lr_offset == pytest.approx(1e-3)
    assert cfg.scheduler.warmup_proportion == pytest.approx(0.02)
    assert (cfg.scheduler.decay_rate, cfg.scheduler.decay_step) == (0.90, 250)
    assert cfg.total_training_steps == 7500 and cfg.max_predictions_per_seq == 20
    assert (cfg.optimizer.max_coeff, cfg.optimizer.min_coeff) == (0.3, 0.01)
    assert cfg.optimizer.bias_correction is False and cfg.precision.dtype == "fp16"
    assert cfg.precision.loss_scale == 0 and cfg.max_grad_norm == 1.0
    assert cfg.model.pre_layer_norm is True  # bing_bert trains nvidia/modelingpreln.py's model
    assert cfg.model.pad_vocab_to_multiple_of == 8  # and pads the vocabulary: 30522 -> 30528


def test_seq512_phase_is_deepspeeds_recipe(make_cfg):
    cfg = make_cfg("+phase=seq512", "init_from=/some/ckpt")
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu) == (32768, 8)
    assert cfg.optimizer.lr == pytest.approx(2e-3) and cfg.scheduler.lr_offset == 0.0
    assert cfg.scheduler.decay_step == 150 and cfg.max_predictions_per_seq == 80
    assert cfg.max_seq_length == 512 and cfg.rewarmup is True and cfg.model.pre_layer_norm is True


def test_command_line_group_choice_beats_phase(make_cfg):
    cfg = make_cfg("+phase=seq128", "model=bert_tiny", "precision=bf16")
    assert cfg.model.num_hidden_layers == 2 and cfg.precision.dtype == "bf16"
    assert cfg.train_batch_size == 65536


@pytest.mark.parametrize("override", ["optimizer.lrr=1e-3", "max_stepz=3", "model.hiden_size=64"])
def test_misspelled_override_is_an_error_naming_it(make_cfg, override):
    with pytest.raises(ConfigCompositionException) as info:
        make_cfg(override)
    assert override.split("=")[0].split(".")[-1] in str(info.value)


def test_wrong_type_is_an_error(make_cfg):
    with pytest.raises(Exception, match="max_steps"):
        make_cfg("max_steps=many")


@pytest.mark.parametrize(
    "module, override, expected",
    [
        ("bertrecipes.pretrain", "optimizer.lrr=1e-3",
         "error: optimizer.lrr=1e-3: no key optimizer.lrr; did you mean optimizer.lr?"),
        ("bertrecipes.squad", "max_seq_len=128", "error: max_seq_len=128: no key max_seq_len; did you mean "
                                                 "max_seq_length, max_answer_length, max_query_length?"),
        ("bertrecipes.prepare_data", "optimizer=lambb",
         "error: optimizer=lambb: config group optimizer has no option 'lambb'; did you mean lamb? "
         "options: adam, lamb"),
    ],
)
def test_misspelled_override_on_the_command_line(module, override, expected):
    """Each Hydra entry point reports a misspelled key or group option in one line, with the closest
    valid names, and exits 2: no traceback, no Hydra advice to add the key with +key=..."""
    result = subprocess.run([sys.executable, "-m", module, override], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == expected


@pytest.mark.parametrize(
    "config, argv, expected",
    [
        ("pretrain", ["max_setps=1"], "max_setps=1: no key max_setps; did you mean max_steps, eval_steps, "
                                      "max_seq_length?"),
        ("pretrain", ["-m", "optimizer.lrr=1e-3,2e-3"], "optimizer.lrr=1e-3,2e-3: no key optimizer.lrr; "
                                                        "did you mean optimizer.lr?"),
        ("pretrain", ["optimzer.lr=1"], "optimzer.lr=1: no key optimzer; did you mean optimizer?"),
        ("pretrain", ["optimizer=adam", "optimizer.max_coeff=1"],
         "optimizer.max_coeff=1: no key optimizer.max_coeff; valid keys of optimizer: _target_, adam_w_mode, "
         "betas, bias_correction, eps, fused, lr, weight_decay"),
        ("pretrain", ["progressive_layer_drop.thta=0.5"], "progressive_layer_drop.thta=0.5: no key "
                                                          "progressive_layer_drop.thta; did you mean "
                                                          "progressive_layer_drop.theta?"),
        ("pretrain", ["max_steps.x=1"], "max_steps.x=1: max_steps is a value, not a group of keys"),
        ("pretrain", ["-m", "optimizer=lamb,adamm"],
         "optimizer=lamb,adamm: config group optimizer has no option 'adamm'; did you mean adam? options: "
         "adam, lamb"),
        ("pretrain", ["+phase=seq12"], "+phase=seq12: config group phase has no option 'seq12'; did you mean "
                                       "seq512, seq128? options: seq128, seq512"),
        ("pretrain", ["phase=seq128"], "phase=seq128: config group phase is not in the defaults list of "
                                       "pretrain.yaml; select it with +phase=seq128"),
        ("squad", ["doc_strid=64"], "doc_strid=64: no key doc_strid; did you mean doc_stride, do_train, "
                                    "distributed?"),
        # a key of another group, and the names DeepSpeed, bing_bert, NVIDIA and Hugging Face users type
        ("pretrain", ["warmup_proportion=0.1"], "warmup_proportion=0.1: no key warmup_proportion; did you "
                                                "mean scheduler.warmup_proportion?"),
        ("pretrain", ["optimizer.lr_offset=0"], "optimizer.lr_offset=0: no key optimizer.lr_offset; did you "
                                                "mean scheduler.lr_offset?"),
        ("pretrain", ["loss_scale=0"], "loss_scale=0: no key loss_scale; did you mean precision.loss_scale?"),
        ("pretrain", ["gradient_clipping=1"], "gradient_clipping=1: no key gradient_clipping; did you mean "
                                              "max_grad_norm?"),
        ("pretrain", ["fp16=true"], "fp16=true: no key fp16; did you mean precision=fp16?"),
        ("pretrain", ["init_checkpoint=x"], "init_checkpoint=x: no key init_checkpoint; did you mean "
                                            "init_from, keep_last_checkpoints, checkpoint_steps, "
                                            "checkpoint_at_end?"),
        ("squad", ["init_checkpoint=x"], "init_checkpoint=x: no key init_checkpoint; did you mean "
                                         "model_file, keep_last_checkpoints, checkpoint_steps?"),
        ("squad", ["learning_rate=3e-5"], "learning_rate=3e-5: no key learning_rate; did you mean "
                                          "optimizer.lr?"),
    ],
)
def test_override_problem_names_the_key_and_its_closest_valid_names(config, argv, expected):
    from bertrecipes.config import find_override_problem
    from bertrecipes.squad.config import register_squad_configs

    register_squad_configs()
    assert find_override_problem(config, argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "optimizer.lr=3e-3,5e-3", "seed=1,2"],
        ["--cfg", "job", "model=bert_large", "model.hidden_size=64"],
        ["+phase=seq128", "optimizer.max_coeff=0.5", "init_from=x"],
        ["hydra.run.dir=/tmp/x", "hydra/launcher=basic", "data=text_files", "data.paths=[a]"],
        ["optimizer=adam", "optimizer.adam_w_mode=false", "optimizer.betas.0=0.8",
         "distributed.backend=gloo"],
        ["-m", "optimizer=lamb,adam", "optimizer.max_coeff=0.5"],  # a key of one option of the sweep
        ["+max_setps=1", "~seed", "++foo=1"],  # refuse_unknown_keys and Hydra judge these
        ["--help"], ["--version"], ["--config-name", "other", "foo=1"],
    ],
)
def test_valid_overrides_and_flags_pass_the_check(argv):
    from bertrecipes.config import find_override_problem

    assert find_override_problem("pretrain", argv) is None


@pytest.mark.parametrize(
    "given, expected",
    [
        ((65536, 64, None, 16), BatchSizes(65536, 64, 64, 16)),
        ((None, 8, 4, 2), BatchSizes(64, 8, 4, 2)),
        ((32, None, 4, 1), BatchSizes(32, 8, 4, 1)),
        ((32, 32, 1, 1), BatchSizes(32, 32, 1, 1)),
    ],
)
def test_batch_arithmetic_completes_the_third(given, expected):
    assert resolve_batch_sizes(*given) == expected


@pytest.mark.parametrize(
    "given, message",
    [
        ((100, 64, None, 1), "not divisible"),
        ((64, None, 3, 1), "not divisible"),
        ((64, 8, 4, 1), "inconsistent"),
        ((64, None, None, 1), "at least two"),
        ((64, 0, None, 1), "positive"),
    ],
)
def test_batch_arithmetic_errors_print_all_numbers(given, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_batch_sizes(*given)
    text = str(info.value)
    for name in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "world_size"):
        assert name in text


LAUNCHER = """
import os, subprocess, sys, time
env = {**os.environ, **dict(arg.split("=") for arg in sys.argv[1:])}
child = "from bertrecipes.config import launch_time; print(launch_time().timestamp())"
first = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True)
time.sleep(1.2)  # the second worker starts well over a second later
second = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True)
print(first.stdout.strip(), second.stdout.strip())
"""


@pytest.mark.parametrize("torchrun", [True, False])
def test_launch_time_is_the_launchers_for_every_worker(torchrun):
    """Under torchrun (its environment variables set), workers started 1.2 s apart by the same
    launcher get its start time, so the default output_dir (runs/<job>/<launch time>) is one
    directory for all the ranks of a node; outside torchrun each process takes its own time."""
    import time

    env = ["LOCAL_RANK=0", "TORCHELASTIC_RUN_ID=test"] if torchrun else []
    started = time.time()
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *env], capture_output=True, text=True, check=True,
                         timeout=120)
    first, second = map(float, out.stdout.split())
    if torchrun:
        assert first == second
        assert started - 1.5 < first < started + 1.5  # /proc/stat's boot time has 1 s resolution
    else:
        assert second - first >= 1.2


def test_launch_time_is_one_per_config_and_new_for_the_next_one():
    """Within one composed config, output_dir resolves to one time (cached, as Hydra's ${now:});
    a config composed a second later gets its own, so two runs in one process never share one."""
    import time

    from hydra import compose, initialize_config_dir

    def default_cfg():
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"),
                                   version_base="1.3"):
            return compose("pretrain")

    first = default_cfg()
    stamp = first.output_dir
    assert stamp.startswith("runs/bert_demo/20")
    time.sleep(1.1)
    assert first.output_dir == stamp and default_cfg().output_dir != stamp


def test_the_vocabulary_is_padded_to_the_multiple_asked_for(make_cfg):
    from bertrecipes.engine import build_model_config

    cfg = make_cfg("+phase=seq128")
    assert build_model_config(cfg.model, 30522, 128).vocab_size == 30528  # bing_bert's, NVIDIA's size
    assert build_model_config(cfg.model, 30528, 128).vocab_size == 30528
    assert build_model_config(cfg.model, 28996, 128).vocab_size == 29000  # bert-base-cased
    assert build_model_config(make_cfg().model, 30522, 128).vocab_size == 30522  # default: no padding
    explicit = make_cfg("+phase=seq128", "model.vocab_size=30600")
    assert build_model_config(explicit.model, 30522, 128).vocab_size == 30600  # a given size wins
    with pytest.raises(ConfigError, match="model.pad_vocab_to_multiple_of must be a positive integer, got 0"):
        build_model_config(make_cfg("model.pad_vocab_to_multiple_of=0").model, 30522, 128)
