"""Tests for the learning-rate schedules and build_param_groups in bertrecipes.optim."""

from __future__ import annotations

import math

import pytest
import torch

from bertrecipes.optim import (
    ConstantLR,
    WarmupExpDecayExp,
    WarmupLinear,
    WarmupPoly,
    build_param_groups,
    warmup_exp_decay_exp,
    warmup_linear,
)

# total 10_000 steps with warmup 0.01 -> warmup ends at step 100.
TOTAL, WARMUP = 10_000, 0.01


class TestWarmupExpDecayExp:
    def test_in_warmup_is_polynomial(self) -> None:
        # step 50 is half of warmup: (0.5)^2 = 0.25; with degree 3: 0.125.
        assert warmup_exp_decay_exp(50, 0.99, 1000, TOTAL, WARMUP) == pytest.approx(0.25, rel=1e-12)
        assert warmup_exp_decay_exp(50, 0.99, 1000, TOTAL, WARMUP, degree=3.0) == pytest.approx(0.125)
        assert warmup_exp_decay_exp(0, 0.99, 1000, TOTAL, WARMUP) == 0.0

    def test_at_warmup_boundary_is_one(self) -> None:
        # x == warmup is already in the decay branch: decay_rate ** 0.
        assert warmup_exp_decay_exp(100, 0.99, 1000, TOTAL, WARMUP) == pytest.approx(1.0, rel=1e-12)

    def test_in_decay_is_exponential(self) -> None:
        # 2100 steps = warmup end + 2 decay periods of 1000 -> 0.99 ** 2 = 0.9801.
        assert warmup_exp_decay_exp(2100, 0.99, 1000, TOTAL, WARMUP) == pytest.approx(0.9801, rel=1e-12)
        assert warmup_exp_decay_exp(600, 0.5, 1000, TOTAL, WARMUP) == pytest.approx(math.pow(0.5, 0.5))

    def test_zero_warmup_means_constant_one(self) -> None:
        # bing_bert's convention: without warmup the factor is 1.0, decay included.
        assert warmup_exp_decay_exp(0, 0.99, 1000, TOTAL, 0.0) == 1.0
        assert warmup_exp_decay_exp(5000, 0.99, 1000, TOTAL, 0.0) == 1.0

    def test_schedule_object_applies_base_lr_and_offset(self) -> None:
        schedule = WarmupExpDecayExp(
            base_lr=4e-3,
            total_steps=TOTAL,
            warmup_proportion=WARMUP,
            decay_rate=0.99,
            decay_step=1000,
            lr_offset=1e-5,
        )
        assert schedule(0) == pytest.approx(1e-5)  # factor 0 at step 0: only the offset
        assert schedule(50) == pytest.approx(4e-3 * 0.25 + 1e-5)
        assert schedule(100) == pytest.approx(4e-3 + 1e-5)
        assert schedule(2100) == pytest.approx(4e-3 * 0.9801 + 1e-5)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"total_steps": 0}, "total_steps must be > 0, got 0"),
            ({"warmup_proportion": 1.0}, r"warmup_proportion must be in \[0, 1\), got 1.0"),
            ({"warmup_proportion": -0.1}, r"warmup_proportion must be in \[0, 1\), got -0.1"),
            ({"decay_rate": 0.0}, "decay_rate must be > 0, got 0.0"),
            ({"decay_step": 0}, "decay_step must be > 0, got 0"),
            ({"base_lr": -1.0}, "base_lr must be >= 0, got -1.0"),
        ],
    )
    def test_validation(self, kwargs: dict, message: str) -> None:
        arguments = {"base_lr": 1e-3, "total_steps": TOTAL, **kwargs}
        with pytest.raises(ValueError, match=message):
            WarmupExpDecayExp(**arguments)

    def test_function_validation(self) -> None:
        with pytest.raises(ValueError, match="decay_steps must be > 0, got 0"):
            warmup_exp_decay_exp(10, 0.99, 0, TOTAL, WARMUP)


def test_warmup_degree_must_be_positive() -> None:
    for degree in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="degree must be a finite float > 0"):
            WarmupExpDecayExp(base_lr=1e-3, total_steps=TOTAL, degree=degree)
        with pytest.raises(ValueError, match="degree must be a finite float > 0"):
            warmup_exp_decay_exp(5, 0.99, 1000, TOTAL, WARMUP, degree=degree)


class TestWarmupLinear:
    def test_endpoints_and_boundary(self) -> None:
        assert warmup_linear(0, TOTAL, WARMUP) == 0.0
        assert warmup_linear(50, TOTAL, WARMUP) == pytest.approx(0.5)
        # After warmup, Google BERT's polynomial decay (power 1, from step 0) and BingBertSquad's
        # warmup_linear: 1 - x, so 1 - 0.01 at the end of warmup and 0.495 at step 5050.
        assert warmup_linear(100, TOTAL, WARMUP) == pytest.approx(0.99)
        assert warmup_linear(99, TOTAL, WARMUP) == pytest.approx(0.99)  # the last warmup step: 99/100
        assert warmup_linear(5050, TOTAL, WARMUP) == pytest.approx(1 - 5050 / TOTAL, rel=1e-12)
        assert warmup_linear(TOTAL, TOTAL, WARMUP) == 0.0
        assert warmup_linear(TOTAL + 500, TOTAL, WARMUP) == 0.0

    def test_rescaled_decay_is_hugging_faces(self) -> None:
        # Halfway through the decay span [100, 10000]: (1 - 0.505) / 0.99 = 0.5.
        assert warmup_linear(100, TOTAL, WARMUP, rescale_after_warmup=True) == pytest.approx(1.0)
        assert warmup_linear(5050, TOTAL, WARMUP, rescale_after_warmup=True) == pytest.approx(0.5)
        assert warmup_linear(TOTAL + 500, TOTAL, WARMUP, rescale_after_warmup=True) == 0.0
        # transformers' get_linear_schedule_with_warmup on the same steps
        transformers = pytest.importorskip("transformers")
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=1.0)
        hf = transformers.get_linear_schedule_with_warmup(optimizer, int(WARMUP * TOTAL), TOTAL)
        for step in (0, 1, 50, 99, 100, 101, 5050, 9999, TOTAL):
            assert warmup_linear(step, TOTAL, WARMUP, rescale_after_warmup=True) == pytest.approx(
                hf.lr_lambdas[0](step), rel=1e-12, abs=1e-15), step

    def test_zero_warmup_decays_from_one(self) -> None:
        assert warmup_linear(0, TOTAL, 0.0) == 1.0
        assert warmup_linear(2500, TOTAL, 0.0) == pytest.approx(0.75)

    def test_schedule_object(self) -> None:
        schedule = WarmupLinear(base_lr=1e-4, total_steps=TOTAL, warmup_proportion=WARMUP, lr_offset=2e-6)
        assert schedule(0) == pytest.approx(2e-6)
        assert schedule(50) == pytest.approx(5e-5 + 2e-6)
        assert schedule(100) == pytest.approx(1e-4 * 0.99 + 2e-6)
        assert schedule(TOTAL) == pytest.approx(2e-6)
        rescaled = WarmupLinear(base_lr=1e-4, total_steps=TOTAL, warmup_proportion=WARMUP,
                                rescale_after_warmup=True)
        assert rescaled(100) == pytest.approx(1e-4)

    def test_validation(self) -> None:
        with pytest.raises(ValueError, match="total_steps must be > 0, got -5"):
            WarmupLinear(base_lr=1e-4, total_steps=-5)
        with pytest.raises(ValueError, match=r"warmup must be in \[0, 1\), got 1.5"):
            warmup_linear(3, TOTAL, 1.5)
        with pytest.raises(ValueError, match="step must be >= 0"):
            WarmupLinear(base_lr=1e-4, total_steps=10)(-1)


def test_constant_lr_ignores_total_steps() -> None:
    assert ConstantLR(base_lr=3e-4)(0) == pytest.approx(3e-4)
    assert ConstantLR(base_lr=3e-4, total_steps=1000, lr_offset=1e-6)(999_999) == pytest.approx(3e-4 + 1e-6)
    with pytest.raises(ValueError, match="base_lr must be >= 0, got -3.0"):
        ConstantLR(base_lr=-3.0)


class _TinyBert(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = torch.nn.Embedding(11, 6)
        self.norm = torch.nn.LayerNorm(6)  # weight name does not contain "LayerNorm": caught by module type
        self.dense = torch.nn.Linear(6, 6)
        self.frozen = torch.nn.Linear(6, 6, bias=False)
        self.frozen.weight.requires_grad_(False)
        self.decoder = torch.nn.Linear(6, 11)
        self.decoder.weight = self.embeddings.weight  # tied, as BERT's MLM head


def test_build_param_groups_splits_decay_and_no_decay() -> None:
    model = _TinyBert()
    groups = build_param_groups(model, weight_decay=0.01)
    by_name = {group["name"]: group for group in groups}
    assert set(by_name) == {"decay", "no_decay"}
    assert by_name["decay"]["weight_decay"] == 0.01
    assert by_name["no_decay"]["weight_decay"] == 0.0

    ids = lambda group: {id(p) for p in group["params"]}
    assert ids(by_name["decay"]) == {id(model.embeddings.weight), id(model.dense.weight)}
    assert ids(by_name["no_decay"]) == {
        id(model.norm.weight),
        id(model.norm.bias),
        id(model.dense.bias),
        id(model.decoder.bias),
    }
    all_params = [p for group in groups for p in group["params"]]
    assert sum(p is model.embeddings.weight for p in all_params) == 1  # tied weight once only
    assert len(all_params) == len({id(p) for p in all_params})
    assert all(p is not model.frozen.weight for p in all_params)


def test_build_param_groups_drops_empty_groups_and_validates() -> None:
    groups = build_param_groups(torch.nn.Linear(3, 3, bias=False), weight_decay=0.1)
    assert [group["name"] for group in groups] == ["decay"]
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -0.1"):
        build_param_groups(torch.nn.Linear(3, 3), weight_decay=-0.1)


class TestWarmupPoly:
    """NVIDIA's PolyWarmUpScheduler, from its definition: before optimizer step k (1 for the first) it
    sets lr = base * p / warmup while p = k / total < warmup, else base * (1 - p) ** degree."""

    @staticmethod
    def nvidia(k: int, base: float, total: int, warmup: float, degree: float) -> float:
        progress = torch.tensor(k, dtype=torch.float64) / total
        rate = torch.where(progress < warmup, base * progress / warmup, base * (1.0 - progress) ** degree)
        return float(rate)

    @pytest.mark.parametrize(("total", "warmup"), [(7038, 0.2843), (1563, 0.128), (10, 0.5)])
    def test_every_step_equals_nvidias_schedule(self, total: int, warmup: float) -> None:
        schedule = WarmupPoly(base_lr=6e-3, total_steps=total, warmup_proportion=warmup)
        for step in range(total):  # our step: optimizer steps completed; NVIDIA's k = step + 1
            assert schedule(step) == pytest.approx(self.nvidia(step + 1, 6e-3, total, warmup, 0.5),
                                                   rel=1e-12, abs=1e-15), step
        assert schedule(total) == 0.0 and schedule(total + 5) == 0.0  # past the horizon: 0, not NaN

    def test_degree_and_offset(self) -> None:
        schedule = WarmupPoly(base_lr=1e-3, total_steps=100, warmup_proportion=0.1, degree=2.0,
                              lr_offset=1e-6)
        assert schedule(49) == pytest.approx(1e-3 * 0.5 ** 2 + 1e-6)
        with pytest.raises(ValueError, match="degree must be a finite float > 0"):
            WarmupPoly(base_lr=1e-3, total_steps=100, degree=0.0)
