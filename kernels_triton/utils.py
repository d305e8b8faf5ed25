"""Launch helpers shared by the fused ops: interpreter detection, device checks, seeds, grid sizes.

Triton decides at *decoration* time whether a ``@triton.jit`` function is compiled for a GPU or
run by its CPU interpreter (``TRITON_INTERPRET=1``), triton's own library functions (``tl.sum``,
``tl.rand``) included, which it decorates when it is imported: so that variable must be set before
``triton`` is first imported by anything. :data:`INTERPRET` records what was decided.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_kernel(x):
    pass


# True when the kernels of this package run in Triton's CPU interpreter (slow; for tests).
INTERPRET = type(_probe_kernel).__name__ == "InterpretedFunction"

# Under the interpreter the launchers pick small tiles (so short test sequences cross tile borders)
# unless this is set: scripts/compile_kernels.py sets it to record the launches a GPU would get.
FORCE_GPU_TILES = False


def interpreter_tiles() -> bool:
    """True when launchers should use the interpreter's small tiles rather than the GPU's."""
    return INTERPRET and not FORCE_GPU_TILES


def _major_minor(package: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version(package).split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return (0, 0)


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, or None. (Tests skip with this reason.)"""
    if INTERPRET:
        if _major_minor("triton") < (3, 7) and _major_minor("numpy") >= (2, 3):
            return ("triton < 3.7's interpreter fails with numpy >= 2.3 (runtime loop bounds): "
                    "pip install 'triton>=3.7' or 'numpy<2.3'")
        return None
    if not torch.cuda.is_available():
        return "no CUDA device, and TRITON_INTERPRET=1 was not set before triton was first imported"
    return None


def check_tensors(*tensors: torch.Tensor | None) -> None:
    """Raise a clear error for tensors the kernels cannot take (instead of a Triton crash)."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                f"kernels_triton got a {t.device.type} tensor: the kernels need CUDA tensors, or "
                "TRITON_INTERPRET=1 set before triton is first imported to run (slowly) on the CPU"
            )
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"kernels_triton needs a unit stride in the last dimension, got {t.stride()}")


def dropout_seed(dropout_p: float, seed: int | torch.Tensor | None,
                 device: torch.device | str) -> torch.Tensor | None:
    """The dropout seed of one call as an int64 tensor [1] on ``device`` (the kernels load it from
    there), or None without dropout: ``seed`` when given, else one drawn by ``torch.randint`` from
    torch's generator of that device (reproducible under ``torch.manual_seed``, saved and restored
    with the other RNG states).

    The host never reads it: no synchronisation in eager runs, no constant baked into a
    ``torch.compile`` graph (the draw is an op of the graph, a new seed every call), and a CUDA-graph
    capture records the draw itself, so every replay draws a new seed (torch's CUDA generator is
    graph-safe) instead of replaying the first call's dropout mask."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return None
    if seed is None:
        return torch.randint(0, 2**31 - 1, (1,), device=device)
    return seed_tensor(seed, device)


def require_seed(dropout_p: float, seed: torch.Tensor | None) -> None:
    """A launch with dropout must have its seed tensor (the kernel loads it)."""
    if dropout_p > 0.0 and seed is None:
        raise ValueError(f"dropout_p={dropout_p} needs a seed tensor (kernels_triton.utils.dropout_seed)")


def seed_tensor(seed: int | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A given seed (an int in [0, 2**32), or a one-integer tensor, used as it is: its value is not
    read to check it) as the kernels take it: a copy, so the backward replays the forward's mask
    even if the caller changes its tensor in between."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype == torch.bool:
            raise ValueError(f"a dropout seed tensor must hold one integer, got {seed.dtype} "
                             f"{tuple(seed.shape)}")
        return seed.reshape(1).to(device=device, dtype=torch.int64, copy=True)
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"a dropout seed must be in [0, 2**32), got {seed}")
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints: launch grids. (``triton.cdiv`` is a constexpr function, several
    microseconds a call, and a training step's launches make hundreds of these calls.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1), on the host: as ``triton.next_power_of_2``, without
    its constexpr-function call cost."""
    return 1 << (n - 1).bit_length()


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def reduction_programs(rows: int, rows_per_tile: int, device: torch.device, column_programs: int = 1) -> int:
    """How many row chunks share a column reduction (dbias, dgamma, dbeta): about two waves of
    programs on a GPU (``column_programs`` already run side by side), two under the interpreter
    (enough to exercise the cross-program sum)."""
    tiles = cdiv(rows, rows_per_tile)
    if INTERPRET or device.type != "cuda":
        return max(1, min(tiles, 2))
    return max(1, min(tiles, 2 * _multiprocessor_count(device.index or 0) // column_programs))


def row_tile(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for a row-wise kernel over ``n_cols`` columns: the whole row in
    one block, several rows per tile while the tile stays small."""
    block_n = next_power_of_2(n_cols)
    if interpreter_tiles():
        return block_n, 16, 1
    rows = max(1, min(16, 2048 // block_n))
    num_warps = 4 if block_n * rows <= 2048 else 8
    return block_n, rows, num_warps


def finish_column_sum(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum the per-program fp32 partials [programs, N] (or an atomically accumulated [N]) and cast
    once to the parameter's dtype."""
    total = partial.sum(0) if partial.dim() == 2 else partial
    return total.to(dtype)


@triton.jit
def row_dropout_keep(seed, rows, cols, n_cols, dropout_p):
    """Keep-mask (True = kept, probability 1 - dropout_p) of element (row, col) of a [M, n_cols]
    tensor: Philox keyed by seed, 64-bit counter row * n_cols + col. Shared by forward, backward and the debug
    materialisation so the three see the same mask."""
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    return tl.rand(seed, offsets) > dropout_p
