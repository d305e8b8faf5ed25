"""kernels_triton for the test modules that run its kernels.

``kt, DEVICE = load_kernels()`` at a module's top skips the whole module, with the reason, when the
kernels cannot run here. Without a GPU they run in Triton's interpreter, which conftest.py selects
before anything imports triton.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


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
