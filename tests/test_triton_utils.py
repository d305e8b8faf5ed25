"""kernels_triton.utils' host-side launch arithmetic against Triton's own functions."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
utils = pytest.importorskip("kernels_triton.utils")


def test_cdiv_and_next_power_of_2_match_triton():
    for a in range(0, 3000):
        for b in (1, 2, 3, 16, 64, 128, 4096):
            assert utils.cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in range(1, 70000):
        assert utils.next_power_of_2(n) == triton.next_power_of_2(n), n
