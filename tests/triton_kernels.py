"""kernels_triton for the test modules that run its kernels.

``kt, DEVICE = load_kernels()`` at a module's top skips the whole module, with the reason, when the
kernels cannot run here. Without a GPU they run in Triton's interpreter, which conftest.py selects
before anything imports triton.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch


def load_kernels() -> tuple[ModuleType, str]:
    """(the kernels_triton module, the device its kernels run on: "cuda", or "cpu" interpreted)."""
    pytest.importorskip("triton", reason="kernels_triton needs triton (pip install -e '.[dev]')")
    kt = importlib.import_module("kernels_triton")
    reason = kt.utils.unavailable_reason()
    if reason:
        pytest.skip(reason, allow_module_level=True)
    return kt, "cpu" if kt.INTERPRET else "cuda"


def force_fused_optimizer(monkeypatch, test_module: ModuleType, optimizer_cls: type) -> list[int]:
    """Make ``test_module``'s ``optimizer_cls`` always take its fused Triton step, and count the
    parameter tensors each fused call stepped (so a test can check the kernels really ran)."""
    calls: list[int] = []
    original = optimizer_cls._fused_step_bucket

    class Fused(optimizer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, fused=True)

    def counting(group, bucket, *scalars):
        calls.append(len(bucket.params))
        return original(group, bucket, *scalars)

    monkeypatch.setattr(test_module, optimizer_cls.__name__, Fused)
    monkeypatch.setattr(optimizer_cls, "_fused_step_bucket", staticmethod(counting))
    return calls


def cpu_case(request) -> bool:
    """Whether this fused-optimizer test is one written for CPU tensors, which run the kernels in
    the interpreter; on a GPU machine such a test is skipped (the module's ``test_on_device_*`` cases
    run the compiled kernels there instead)."""
    if request.function.__name__.startswith("test_on_device_"):
        return False
    if not importlib.import_module("kernels_triton").INTERPRET:
        pytest.skip("a case for CPU tensors in the interpreter; this module's test_on_device_* run here")
    return True


def fused_and_foreach(optimizer_cls: type, settings: dict, device: str, steps: int = 3):
    """The same ``steps`` steps of ``optimizer_cls`` with ``fused=True`` and ``fused=False`` on two
    copies of tensors on ``device`` (the kernels' device: the GPU, or the CPU under the
    interpreter) of every kind the fused step's address table meets: aligned ones (one
    spanning several chunks), a view 4 bytes past an aligned address (so not aligned), sizes that
    are not a multiple of 4, and one element; each step with a gradient scale and a clear overflow
    flag, as the engine gives them. Returns the two optimizers (their params, state and, for LAMB,
    ``last_coeffs`` compare)."""
    gen = torch.Generator(device=device).manual_seed(0)
    storage = torch.randn(4101, device=device, generator=gen) * 0.1
    base = [torch.randn(3 * 4096 + 8, device=device, generator=gen) * 0.1, storage[1:],
            torch.randn(1023, device=device, generator=gen) * 0.1,
            torch.randn(1, device=device, generator=gen),
            torch.randn(64, 1024, device=device, generator=gen) * 0.02]
    assert base[1].data_ptr() % 16 == 4
    optimizers = []
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in base]
        params[1] = torch.nn.Parameter(torch.empty_like(storage)[1:])  # a fresh view, as unaligned
        with torch.no_grad():
            params[1].copy_(base[1])
        optimizers.append(optimizer_cls(params, **settings, fused=fused))
    step_gen = torch.Generator(device=device).manual_seed(1)
    for _ in range(steps):
        grads = [torch.randn(t.shape, device=device, generator=step_gen) for t in base]
        for opt in optimizers:
            for p, g in zip(opt.param_groups[0]["params"], grads, strict=True):
                p.grad = g.clone()
            opt.step(found_inf=torch.zeros(1, device=device), grad_scale=torch.full((), 0.5, device=device))
    return optimizers


def assert_same_optimizer_state(fused, foreach) -> None:
    for p, q in zip(fused.param_groups[0]["params"], foreach.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused.state[p][key], foreach.state[q][key], rtol=1e-5, atol=1e-7)
