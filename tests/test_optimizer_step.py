"""The engine's accumulation boundary (``OptimizerStep``) against a plain synchronous loop written
here: read the overflow flag on the host, skip or step, move the scale by DeepSpeed's rules.

``OptimizerStep`` learns each step's flag one step late (the skip itself happens on the device), so
these tests check that it still computes every step with exactly the values the synchronous loop
uses: the same weights and optimizer state bit for bit, the same LR per step, the same counters and
loss scale, over runs with overflows at the start, in a row and at the end. They also check which
host reads of tensors the step makes at all."""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

import pytest
import torch
from test_precision import HostScaler, fp16_cfg
from torch.overrides import TorchFunctionMode

from bertrecipes.engine import OptimizerStep, TrainState
from bertrecipes.optim import Adam, Lamb
from bertrecipes.precision import LossScaler

SHAPES = [(6, 5), (5,), (3, 4, 2), (1,)]
MAX_GRAD_NORM = 1.0


def schedule(step: int) -> float:
    return 1e-2 / (1 + step)  # a different LR at every schedule step: a wrong step count shows


def make_optimizer(kind: str, params):
    name, implementation = kind.split("_")
    fused = implementation == "fused"
    if fused:
        kt = pytest.importorskip("triton_kernels").load_kernels()[0]
        assert kt is not None
    return {"lamb": Lamb, "adam": Adam}[name](params, lr=1.0, weight_decay=0.01, fused=fused)


def scaled_grads(steps: int, overflow_at: set[int], seed: int = 0) -> list[list[torch.Tensor]]:
    """Unscaled gradients per step; an overflowed step has an inf and a NaN in one tensor."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        grads = [torch.randn(shape, generator=gen) for shape in SHAPES]
        if step in overflow_at:
            grads[0].view(-1)[0] = float("inf")
            grads[0].view(-1)[1] = float("nan")
        out.append(grads)
    return out


def reference_run(kind: str, grads_per_step, initial: list[torch.Tensor], window: int):
    """The synchronous loop: unscale, global norm, read the flag, skip or (clip, LR, step)."""
    params = [torch.nn.Parameter(p.clone()) for p in initial]
    optimizer = make_optimizer(kind, params)
    scaler = HostScaler(2.0**8, True, window, 2, 1.0)
    schedule_step, skipped, lrs = 0, 0, []
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g * scaler.scale
        torch._foreach_mul_([p.grad for p in params], 1.0 / scaler.scale)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
        overflow = not bool(torch.isfinite(norm))
        scaler.update(overflow)
        if overflow:
            skipped += 1
        else:
            torch._foreach_mul_([p.grad for p in params],
                                torch.clamp(MAX_GRAD_NORM / (norm + 1e-6), max=1.0))
            for group in optimizer.param_groups:
                group["lr"] = schedule(schedule_step)
            lrs.append(schedule(schedule_step))
            optimizer.step()
            schedule_step += 1
        optimizer.zero_grad(set_to_none=True)
    return params, optimizer, scaler, schedule_step, skipped, lrs


def stepper_run(kind: str, grads_per_step, initial: list[torch.Tensor], window: int):
    params = [torch.nn.Parameter(p.clone()) for p in initial]
    optimizer = make_optimizer(kind, params)
    scaler = LossScaler.from_config(fp16_cfg(initial_scale_power=8, loss_scale_window=window))
    state = TrainState()
    step = OptimizerStep(params, optimizer, scaler, schedule, state, MAX_GRAD_NORM)
    lrs = []
    for grads in grads_per_step:
        state.global_step += 1
        for p, g in zip(params, grads, strict=True):
            p.grad = g * step.loss_scale  # the engine's scaled backward, by the device scale
        step()
        lrs.append(optimizer.param_groups[0]["lr"])
    step.resolve()
    return params, optimizer, scaler, state, lrs


@pytest.mark.parametrize("kind", ["lamb_foreach", "lamb_fused", "adam_foreach", "adam_fused"])
@pytest.mark.parametrize("overflow_at", [{0}, {2, 3}, {1, 5}, {6}], ids=str)
def test_lagged_step_equals_the_synchronous_loop(kind, overflow_at):
    steps, window = 7, 3
    initial = [torch.randn(shape, generator=torch.Generator().manual_seed(9)) for shape in SHAPES]
    grads = scaled_grads(steps, overflow_at)
    ref_params, ref_opt, ref_scaler, ref_schedule_step, ref_skipped, ref_lrs = reference_run(
        kind, grads, initial, window)
    params, optimizer, scaler, state, lrs = stepper_run(kind, grads, initial, window)

    for p, q in zip(params, ref_params, strict=True):
        assert torch.equal(p.detach(), q.detach())
        assert set(optimizer.state[p]) == set(ref_opt.state[q])
        for key, value in ref_opt.state[q].items():
            mine = optimizer.state[p][key]
            assert torch.equal(mine, value) if isinstance(value, torch.Tensor) else mine == value, key
    assert state.schedule_step == ref_schedule_step == steps - len(overflow_at)
    assert state.skipped_steps == ref_skipped == len(overflow_at)
    # the LR each attempted step was given: the reference's sequence, repeated over skipped steps
    assert [lr for i, lr in enumerate(lrs) if i not in overflow_at] == ref_lrs
    assert scaler.state_dict() == {
        "scale": ref_scaler.scale, "dynamic": True, "hysteresis_left": ref_scaler.left,
        "steps_since_overflow": ref_scaler.since, "overflows": ref_scaler.overflows}
    if isinstance(optimizer, Lamb) and steps - 1 not in overflow_at:
        assert torch.equal(optimizer.last_coeffs, ref_opt.last_coeffs)


class HostReads(TorchFunctionMode):
    """Records every read of a tensor's value by the host, with the innermost frame of this package
    that made it: the calls that, on a GPU, would make the host wait for the device."""

    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy}

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "/bertrecipes/" in f.filename or "/kernels_triton/" in f.filename]
            self.sites.append(f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "outside")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind,expected", [
    ("lamb_fused", []),  # skip on the device: no read but of the host copy, one step late
    ("adam_fused", []),
    ("lamb_foreach", ["lamb.py:_skip_on_host"]),  # foreach cannot skip on the device: it reads the flag
    ("adam_foreach", ["lamb.py:_skip_on_host"]),
])
def test_host_reads_of_a_step(kind, expected):
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    optimizer = make_optimizer(kind, params)
    scaler = LossScaler.from_config(fp16_cfg(initial_scale_power=4))
    step = OptimizerStep(params, optimizer, scaler, schedule, TrainState(), MAX_GRAD_NORM)
    per_step = []
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p) * step.loss_scale
        with contextlib.ExitStack() as stack:
            reads = stack.enter_context(HostReads())
            step()
        per_step.append(reads.sites)
    # the first call has no previous step to account for; later ones read its host copy once
    assert per_step[0] == expected
    assert per_step[1] == per_step[2] == ["engine.py:resolve", *expected]


@pytest.mark.parametrize("kind", ["lamb_foreach", "lamb_fused"])
def test_kept_gradients_take_accumulation_in_place_and_step_alike(kind):
    """``keep_grads`` (CUDA graphs): the gradients exist before the first backward and are zeroed
    in place after each step, so a backward adds its outputs to the same tensors (autograd never
    keeps an output, which a graph replay would overwrite, as the gradient itself); the steps equal
    the ones with gradients set to None in between."""
    initial = [torch.randn(shape, generator=torch.Generator().manual_seed(3)) for shape in SHAPES]
    weights = [torch.randn(shape, generator=torch.Generator().manual_seed(4)) for shape in SHAPES]
    results = []
    for keep in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in initial]
        step = OptimizerStep(params, make_optimizer(kind, params),
                             LossScaler.from_config(fp16_cfg(initial_scale_power=4)), schedule, TrainState(),
                             MAX_GRAD_NORM, keep_grads=keep)
        grads = [p.grad for p in params]
        assert all(g is not None and not g.any() for g in grads) if keep else all(g is None for g in grads)
        for _ in range(3):
            for micro in range(2):  # two micro-batches of accumulation
                loss = sum(((p * w) * (micro + 1)).sum() for p, w in zip(params, weights, strict=True))
                (loss * step.loss_scale).backward()
            step()
        step.resolve()
        if keep:
            assert all(p.grad is g and not g.any() for p, g in zip(params, grads, strict=True))
        else:
            assert all(p.grad is None for p in params)
        results.append([p.detach() for p in params])
    for kept, dropped in zip(*results, strict=True):
        assert torch.equal(kept, dropped)
