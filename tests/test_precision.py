"""DeepSpeed's loss-scaling rules, written out by hand, against LossScaler."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from bertrecipes.precision import LossScaler, autocast_context, autocast_dtype


def fp16_cfg(**kw):
    base = dict(dtype="fp16", loss_scale=0.0, initial_scale_power=16, loss_scale_window=1000,
                hysteresis=2, min_loss_scale=1.0)
    base.update(kw)
    return OmegaConf.create(base)


def test_dynamic_scale_starts_at_two_to_the_initial_power():
    assert LossScaler.from_config(fp16_cfg(initial_scale_power=12)).scale == 4096.0


def test_doubles_after_a_window_without_overflow():
    s = LossScaler.from_config(fp16_cfg(initial_scale_power=4, loss_scale_window=3))
    scales = []
    for _ in range(7):
        s.update(overflow=False)
        scales.append(s.scale)
    # doubling at the 3rd and 6th clean step
    assert scales == [16, 16, 32, 32, 32, 64, 64]


def test_hysteresis_delays_backoff_and_window_counts_from_last_overflow():
    s = LossScaler.from_config(fp16_cfg(initial_scale_power=10, loss_scale_window=2, hysteresis=2))
    trace = []
    for overflow in [True, True, True, False, False, True, False, False]:
        s.update(overflow)
        trace.append(s.scale)
    # 1st overflow: hysteresis 2 -> 1, scale kept; 2nd and 3rd: halve. Two clean steps: double and
    # restore hysteresis, so the next overflow is tolerated again; two more clean steps: double.
    assert trace == [1024, 512, 256, 256, 512, 512, 512, 1024]
    assert s.overflows == 4


def test_scale_never_below_min():
    s = LossScaler.from_config(fp16_cfg(initial_scale_power=2, hysteresis=1, min_loss_scale=2))
    for _ in range(5):
        s.update(overflow=True)
    assert s.scale == 2.0


def test_static_scale_never_changes():
    s = LossScaler.from_config(fp16_cfg(loss_scale=128.0))
    for overflow in [True, False, True] + [False] * 2000:
        s.update(overflow)
    assert s.scale == 128.0 and not s.dynamic and s.overflows == 2
    assert s.state_dict()["steps_since_overflow"] == 0  # counted only for a dynamic scale


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_no_scaling_outside_fp16(dtype):
    s = LossScaler.from_config(fp16_cfg(dtype=dtype))
    assert s.scale == 1.0 and not s.enabled


def test_state_dict_round_trip_continues_identically():
    a = LossScaler.from_config(fp16_cfg(initial_scale_power=8, loss_scale_window=3))
    for overflow in [True, False, False]:
        a.update(overflow)
    b = LossScaler.from_config(fp16_cfg(initial_scale_power=8, loss_scale_window=3))
    b.load_state_dict(a.state_dict())
    for overflow in [False, True, True, False, False, False]:
        a.update(overflow)
        b.update(overflow)
        assert a.state_dict() == b.state_dict()


def test_a_saved_scaler_of_another_kind_leaves_the_configured_scale():
    dynamic = LossScaler.from_config(fp16_cfg(initial_scale_power=8))
    for overflow in [True, True, False]:
        dynamic.update(overflow)
    saved = dynamic.state_dict()
    assert saved["scale"] == 2.0**7 and saved["overflows"] == 2
    static = LossScaler.from_config(fp16_cfg(loss_scale=128.0 * 3))  # a static scale given on resume
    assert static.load_state_dict(saved) is False
    assert static.scale == 384.0 and static.overflows == 2
    fresh = LossScaler.from_config(fp16_cfg(initial_scale_power=12))  # fp32 (no scaling) -> fp16
    assert fresh.load_state_dict(LossScaler.from_config(fp16_cfg(dtype="fp32")).state_dict()) is False
    assert fresh.scale == 2.0**12
    other_power = LossScaler.from_config(fp16_cfg(initial_scale_power=20))  # dynamic -> dynamic
    assert other_power.load_state_dict(saved) is True and other_power.state_dict() == saved


def test_an_overflow_at_the_minimum_scale_is_flagged():
    s = LossScaler.from_config(fp16_cfg(initial_scale_power=2, hysteresis=2, min_loss_scale=2.0))
    flags = []
    for overflow in [True, True, True, False, True, True]:
        s.update(overflow)
        flags.append((s.scale, bool(s.at_min_scale)))
    # 4: hysteresis spent; 4 -> 2 (the minimum); at 2 with no hysteresis left: flagged; a clean step
    # resets nothing but the flag; then hysteresis is still spent, so the next overflow is flagged
    assert flags == [(4.0, False), (2.0, False), (2.0, True), (2.0, False), (2.0, True), (2.0, True)]
    with pytest.raises(ValueError, match=r"initial_scale_power must be in \[0, 127\]"):
        LossScaler.from_config(fp16_cfg(initial_scale_power=128))


def test_bad_precision_values_are_named():
    with pytest.raises(ValueError, match="fp8"):
        autocast_dtype("fp8")
    with pytest.raises(ValueError, match="loss_scale"):
        LossScaler.from_config(fp16_cfg(loss_scale=-1.0))
    with pytest.raises(ValueError, match="hysteresis"):
        LossScaler.from_config(fp16_cfg(hysteresis=0))


def test_bf16_autocast_runs_matmuls_in_bf16_on_cpu():
    x = torch.randn(4, 4)
    with autocast_context("bf16", torch.device("cpu")):
        assert (x @ x).dtype == torch.bfloat16
    with autocast_context("fp32", torch.device("cpu")):
        assert (x @ x).dtype == torch.float32


class HostScaler:
    """The scaler's rules as plain Python on the host (DeepSpeed's DynamicLossScaler, written out)."""

    def __init__(self, scale, dynamic, window, hysteresis, min_scale):
        self.scale, self.dynamic, self.window, self.hysteresis = scale, dynamic, window, hysteresis
        self.min_scale, self.left, self.since, self.overflows = min_scale, hysteresis, 0, 0

    def update(self, overflow):
        if overflow:
            self.overflows += 1
            self.since = 0
            if self.dynamic:
                if self.left > 1:
                    self.left -= 1
                else:
                    self.scale = max(self.scale / 2, self.min_scale)
            return
        if self.dynamic:
            self.since += 1
            if self.since % self.window == 0:
                self.scale *= 2
                self.left = self.hysteresis


@pytest.mark.parametrize("hysteresis,window,min_scale", [(1, 2, 1.0), (2, 3, 4.0), (3, 5, 0.5)])
def test_device_state_updates_from_flag_tensors_follow_the_host_rules(hysteresis, window, min_scale):
    """The update takes the overflow flag as a tensor (as the engine passes it, never read on the host)
    and must track the host rules over a long random run of overflows and clean steps."""
    cfg = fp16_cfg(initial_scale_power=6, loss_scale_window=window, hysteresis=hysteresis,
                   min_loss_scale=min_scale)
    device_scaler = LossScaler.from_config(cfg)
    host = HostScaler(2.0**6, True, window, hysteresis, min_scale)
    generator = torch.Generator().manual_seed(hysteresis * 100 + window)
    flags = torch.rand(300, generator=generator) < 0.3
    for flag in flags:
        device_scaler.update(torch.where(flag, torch.tensor(float("inf")), torch.tensor(1.0)).isinf())
        host.update(bool(flag))
        assert device_scaler.state_dict() == {
            "scale": host.scale, "dynamic": True, "hysteresis_left": host.left,
            "steps_since_overflow": host.since, "overflows": host.overflows}
    assert host.scale != 2.0**6  # the run did move the scale
