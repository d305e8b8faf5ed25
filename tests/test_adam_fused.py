"""The fused Triton Adam step (``Adam(fused=True)``, kernels_triton.adam) against the same float64
reference and torch.optim.AdamW as the foreach implementation: the tests of tests/test_adam.py run
again with the fused step, including tensors spanning several chunks and the overflow skip read on
the device. Without a GPU the kernel runs in Triton's interpreter."""

from __future__ import annotations

import pytest
import test_adam
from triton_kernels import (
    assert_same_optimizer_state,
    cpu_case,
    force_fused_optimizer,
    fused_and_foreach,
    load_kernels,
)

from bertrecipes.optim import Adam

kt, DEVICE = load_kernels()

from test_adam import (  # noqa: E402  (collected here again, with the fused step patched in)
    test_l2_mode_leaves_caller_gradient_untouched,
    test_matches_float64_reference,
    test_matches_torch_adamw,
    test_overflow_flag_skips_the_step_exactly,
    test_per_group_settings_and_state_round_trip,
    test_tensors_larger_than_a_chunk_match_the_reference,
)

__all__ = [
    "test_l2_mode_leaves_caller_gradient_untouched",
    "test_matches_float64_reference",
    "test_matches_torch_adamw",
    "test_overflow_flag_skips_the_step_exactly",
    "test_per_group_settings_and_state_round_trip",
    "test_tensors_larger_than_a_chunk_match_the_reference",
]


@pytest.fixture(autouse=True)
def fused_step(monkeypatch, request):
    if not cpu_case(request):
        yield
        return
    calls = force_fused_optimizer(monkeypatch, test_adam, Adam)
    yield
    assert calls, "no step went through the Triton kernel"


@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_on_device_fused_step_matches_foreach_on_aligned_and_unaligned_tensors(adam_w_mode):
    """The kernel (on a GPU compiled, and vectorised where a tensor is aligned) against the foreach
    step (itself held to the float64 reference and torch.optim.AdamW) on the same tensors."""
    settings = dict(lr=1e-3, weight_decay=0.01, adam_w_mode=adam_w_mode)
    assert_same_optimizer_state(*fused_and_foreach(Adam, settings, DEVICE))
