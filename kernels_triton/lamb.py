"""Fused multi-tensor LAMB step: every fp32 parameter tensor of a bucket in two kernel launches.

The rule is :class:`bertrecipes.optim.Lamb`'s (DeepSpeed FusedLamb semantics)::

    m = b1*m + (1 - b1)*g;  v = b2*v + (1 - b2)*g^2
    u = m / (sqrt(v) + eps) + weight_decay*p
    coeff = clamp(||p|| / ||u||, min_coeff, max_coeff)   (1 if either norm is 0)
    p -= step_size * coeff * u

* Pass 1 (one program per chunk of one tensor): read g, m, v, p; write m, v; each chunk's partial
  sums of p^2 and u^2 (fp32) go to a [chunks, 2] buffer.
* The per-tensor norms are the chunk partials summed in a fixed order (an fp64 running sum taken at
  tensor boundaries, so the result never depends on scheduling), then the trust ratios and the
  per-tensor scale ``-step_size * coeff`` are computed on the device: no host sync.
* Pass 2 (one program per chunk): read p, m, v; recompute u exactly as pass 1 did; write p.
* An overflowed step (``found_inf``, a flag on the device) writes nothing in either pass: the skip
  is decided on the GPU, so the host never waits to learn whether to step.

That is 4 reads + 2 writes, then 3 reads + 1 write of the parameter-sized tensors, where the
``torch._foreach_*`` version makes about 25 passes. The tensors are reached through a table of
their addresses, so any set of tensors (any shapes, not one flat buffer) goes through one launch.
The table also flags the tensors whose four pointers are 16-byte aligned and whose size is a
multiple of 4; their programs take a branch compiled with those facts, which moves 4 floats per
load and store (the pointers alone, read from the table, would tell the compiler nothing).

Run its tests on a CPU: ``TRITON_INTERPRET=1 pytest tests/test_lamb_fused.py``.
"""

from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from kernels_triton.utils import INTERPRET, cdiv

CHUNK = 4096  # elements per program
TABLE_CACHE_SIZE = 16  # address tables kept (one per bucket of an optimizer step is what training uses)
_TABLES: collections.OrderedDict[tuple, dict[str, torch.Tensor]] = collections.OrderedDict()
NUM_WARPS = 8  # 16 elements of each array per thread: keeps the pass-1 kernel's registers in check
VECTOR = 4  # fp32 elements per 16-byte load or store, where a tensor's table entry says it is aligned


@triton.jit
def _address(ADDR, t, ALIGNED: tl.constexpr):
    """Tensor t's fp32 pointer from an address table; ``ALIGNED``: known 16-byte aligned."""
    ptr = tl.load(ADDR + t).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _chunk(c, t, CHUNK_START, NUMEL, P_ADDR, G_ADDR, M_ADDR, V_ADDR, BLOCK: tl.constexpr,
           ALIGNED: tl.constexpr):
    """Program c's offsets into tensor t, their bounds mask and the tensor's four pointers.

    ``ALIGNED`` (the table's per-tensor flag: four 16-byte aligned pointers, a size that is a
    multiple of 4) tells the compiler so, and it then moves 4 floats per load and store instead of
    one: the address table hides the alignment that a pointer argument would show."""
    offs = tl.multiple_of(tl.load(CHUNK_START + c), BLOCK) + tl.arange(0, BLOCK).to(tl.int64)
    numel = tl.load(NUMEL + t)
    if ALIGNED:
        numel = tl.multiple_of(numel, 4)
    mask = offs < numel
    return (offs, mask, _address(P_ADDR, t, ALIGNED), _address(G_ADDR, t, ALIGNED),
            _address(M_ADDR, t, ALIGNED), _address(V_ADDR, t, ALIGNED))


@triton.jit
def _update(m, v, p, eps, weight_decay):
    return tl.div_rn(m, tl.sqrt_rn(v) + eps) + weight_decay * p


@triton.jit
def _store_mask(mask, SKIP, HAS_SKIP: tl.constexpr):
    """Where to write: nowhere when the step's overflow flag (a device scalar) is set."""
    if HAS_SKIP:
        return tl.where(tl.load(SKIP) == 0, mask, False)
    return mask


@triton.jit
def _load_grad(ptrs, mask, GRAD_SCALE, HAS_GRAD_SCALE: tl.constexpr):
    """The gradient, times the step's gradient scale (a device scalar: unscale and clip) if given."""
    g = tl.load(ptrs, mask=mask, other=0.0)
    if HAS_GRAD_SCALE:
        g = g * tl.load(GRAD_SCALE)
    return g


@triton.jit
def _lamb_moments_kernel(TENSOR_OF_CHUNK, CHUNK_START, NUMEL, ALIGNED, P_ADDR, G_ADDR, M_ADDR, V_ADDR,
                         PARTIAL, SKIP, GRAD_SCALE, beta1, beta2, eps, weight_decay, HAS_SKIP: tl.constexpr,
                         HAS_GRAD_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(TENSOR_OF_CHUNK + c)
    if tl.load(ALIGNED + t) != 0:  # the same branch for the whole program: no divergence
        _lamb_moments(c, t, CHUNK_START, NUMEL, P_ADDR, G_ADDR, M_ADDR, V_ADDR, PARTIAL, SKIP, GRAD_SCALE,
                      beta1, beta2, eps, weight_decay, HAS_SKIP, HAS_GRAD_SCALE, BLOCK, True)
    else:
        _lamb_moments(c, t, CHUNK_START, NUMEL, P_ADDR, G_ADDR, M_ADDR, V_ADDR, PARTIAL, SKIP, GRAD_SCALE,
                      beta1, beta2, eps, weight_decay, HAS_SKIP, HAS_GRAD_SCALE, BLOCK, False)


@triton.jit
def _lamb_moments(c, t, CHUNK_START, NUMEL, P_ADDR, G_ADDR, M_ADDR, V_ADDR, PARTIAL, SKIP, GRAD_SCALE, beta1,
                  beta2, eps, weight_decay, HAS_SKIP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                  BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    offs, mask, p_ptr, g_ptr, m_ptr, v_ptr = _chunk(c, t, CHUNK_START, NUMEL, P_ADDR, G_ADDR, M_ADDR, V_ADDR,
                                                    BLOCK, ALIGNED)
    g = _load_grad(g_ptr + offs, mask, GRAD_SCALE, HAS_GRAD_SCALE)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    m = beta1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + (1.0 - beta1) * g
    v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + (1.0 - beta2) * g * g
    store = _store_mask(mask, SKIP, HAS_SKIP)
    tl.store(m_ptr + offs, m, mask=store)
    tl.store(v_ptr + offs, v, mask=store)
    u = tl.where(mask, _update(m, v, p, eps, weight_decay), 0.0)
    tl.store(PARTIAL + 2 * c, tl.sum(p * p, 0))
    tl.store(PARTIAL + 2 * c + 1, tl.sum(u * u, 0))


@triton.jit
def _lamb_apply_kernel(TENSOR_OF_CHUNK, CHUNK_START, NUMEL, ALIGNED, P_ADDR, G_ADDR, M_ADDR, V_ADDR, SCALE,
                       SKIP, eps, weight_decay, HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(TENSOR_OF_CHUNK + c)
    if tl.load(ALIGNED + t) != 0:
        _lamb_apply(c, t, CHUNK_START, NUMEL, P_ADDR, G_ADDR, M_ADDR, V_ADDR, SCALE, SKIP, eps, weight_decay,
                    HAS_SKIP, BLOCK, True)
    else:
        _lamb_apply(c, t, CHUNK_START, NUMEL, P_ADDR, G_ADDR, M_ADDR, V_ADDR, SCALE, SKIP, eps, weight_decay,
                    HAS_SKIP, BLOCK, False)


@triton.jit
def _lamb_apply(c, t, CHUNK_START, NUMEL, P_ADDR, G_ADDR, M_ADDR, V_ADDR, SCALE, SKIP, eps, weight_decay,
                HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    offs, mask, p_ptr, g_ptr, m_ptr, v_ptr = _chunk(c, t, CHUNK_START, NUMEL, P_ADDR, G_ADDR, M_ADDR, V_ADDR,
                                                    BLOCK, ALIGNED)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    u = _update(m, v, p, eps, weight_decay)
    tl.store(p_ptr + offs, p + tl.load(SCALE + t) * u, mask=_store_mask(mask, SKIP, HAS_SKIP))


def _table(quads: list[tuple[torch.Tensor, ...]], device: torch.device) -> dict[str, torch.Tensor]:
    """The address, size and chunk tables of one call, built on the host and copied asynchronously
    (pinned memory on CUDA, so the copy does not wait for the GPU). ``quads``: (p, g, m, v) each.

    A table depends on nothing but the addresses and sizes, so it is kept for the next call with the
    same ones (training steps reuse the same memory: the weights and moments never move, and the
    caching allocator hands the gradients the same blocks): no host work and no copies then."""
    key = (device, tuple(t.data_ptr() for quad in quads for t in quad), tuple(p.numel() for p, *_ in quads))
    table = _TABLES.pop(key, None)
    if table is None:
        table = _build_table(quads, device)
    _TABLES[key] = table  # the most recently used last
    while len(_TABLES) > TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return table


def _build_table(quads: list[tuple[torch.Tensor, ...]], device: torch.device) -> dict[str, torch.Tensor]:
    numels = [p.numel() for p, *_ in quads]
    chunks = [max(1, cdiv(n, CHUNK)) for n in numels]
    host = {
        "tensor_of_chunk": torch.repeat_interleave(torch.arange(len(quads), dtype=torch.int32),
                                                   torch.tensor(chunks)),
        "chunk_start": torch.cat([torch.arange(c, dtype=torch.int64) * CHUNK for c in chunks]),
        "numel": torch.tensor(numels, dtype=torch.int64),
        "aligned": torch.tensor([n % VECTOR == 0 and all(t.data_ptr() % (VECTOR * 4) == 0 for t in quad)
                                 for n, quad in zip(numels, quads, strict=True)], dtype=torch.int32),
        "chunks": torch.tensor(chunks, dtype=torch.int64),
    }
    addresses = torch.tensor([[t.data_ptr() for t in quad] for quad in quads], dtype=torch.int64)
    for i, name in enumerate("pgmv"):
        host[name] = addresses[:, i].contiguous()
    if device.type != "cuda":
        return host
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in host.items()}


def _device_scalar(name: str, t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A one-element fp32 view of a device scalar argument (``found_inf``, ``grad_scale``)."""
    if t is None:
        return None
    if t.numel() != 1 or t.device != device:
        raise ValueError(f"{name} must be one element on {device}, got shape {tuple(t.shape)} "
                         f"on {t.device}")
    return t.reshape(1).to(torch.float32)


def _prepare(optimizer: str, params: list[torch.Tensor], grads: list[torch.Tensor],
             exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], found_inf: torch.Tensor | None,
             grad_scale: torch.Tensor | None, validate: bool):
    """What every fused optimizer launch starts with: the checks, the address table (and the
    per-tensor pointer arguments from it) and the device scalars. Returns (device, table, args,
    found_inf, grad_scale)."""
    device = params[0].device
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"fused {optimizer} runs on CUDA tensors (or under TRITON_INTERPRET=1), "
                         f"got {device}")
    if validate:
        for name, tensors in (("params", params), ("grads", grads), ("exp_avg", exp_avgs),
                              ("exp_avg_sq", exp_avg_sqs)):
            _check(name, tensors, device)
    table = _table(list(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)), device)
    args = tuple(table[k] for k in ("tensor_of_chunk", "chunk_start", "numel", "aligned", "p", "g", "m", "v"))
    return (device, table, args, _device_scalar("found_inf", found_inf, device),
            _device_scalar("grad_scale", grad_scale, device))


def _check(name: str, tensors: list[torch.Tensor], device: torch.device) -> None:
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device != device:
            raise ValueError(f"fused LAMB takes contiguous fp32 {name} on {device}; got {t.dtype}, "
                             f"shape {tuple(t.shape)}, contiguous={t.is_contiguous()}, on {t.device}")


def fused_lamb_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                    exp_avg_sqs: list[torch.Tensor], *, beta1: float, beta2: float, eps: float,
                    weight_decay: float, step_size: float, min_coeff: float, max_coeff: float,
                    found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
                    validate: bool = True) -> torch.Tensor:
    """One LAMB step of these tensors, in place (see the module docstring). Returns the trust ratios
    (fp32 [tensors], on the device).

    ``found_inf``: a one-element device tensor (the step's overflow flag); when it is non-zero the
    kernels write nothing, so parameters and moments are left bit for bit as they were. It is read by
    the kernels, never by the host. ``grad_scale``: a one-element device tensor every gradient is
    multiplied by as it is read (the loss-scale inverse times the clipping factor), so unscaling and
    clipping cost no pass over the gradients of their own; the gradients themselves are not written.
    ``validate=False`` skips the per-tensor dtype/layout checks, for a caller that has just made them
    (the optimizers do, to choose this step at all)."""
    device, table, args, skip, scale = _prepare("LAMB", params, grads, exp_avgs, exp_avg_sqs, found_inf,
                                                grad_scale, validate)
    n_chunks = table["tensor_of_chunk"].numel()
    partial = torch.empty(n_chunks, 2, device=device, dtype=torch.float32)
    _lamb_moments_kernel[(n_chunks,)](*args, partial, skip if skip is not None else partial,
                                      scale if scale is not None else partial, float(beta1), float(beta2),
                                      float(eps), float(weight_decay), HAS_SKIP=skip is not None,
                                      HAS_GRAD_SCALE=scale is not None, BLOCK=CHUNK, num_warps=NUM_WARPS)
    # per-tensor sums of the chunk partials, in chunk order: fp64 running sum read at boundaries
    running = torch.cat([partial.new_zeros(1, 2, dtype=torch.float64), partial.double().cumsum(0)])
    ends = table["chunks"].cumsum(0)
    sums = (running[ends] - running[ends - table["chunks"]]).clamp(min=0.0)
    param_norms, update_norms = sums.sqrt().float().unbind(1)
    ratio = (param_norms / update_norms).clamp(min=min_coeff, max=max_coeff)
    coeffs = torch.where((param_norms != 0) & (update_norms != 0), ratio, torch.ones_like(ratio))
    _lamb_apply_kernel[(n_chunks,)](*args, (coeffs * -step_size).contiguous(),
                                    skip if skip is not None else partial, float(eps), float(weight_decay),
                                    HAS_SKIP=skip is not None, BLOCK=CHUNK, num_warps=NUM_WARPS)
    return coeffs


__all__ = ["CHUNK", "fused_lamb_step"]
