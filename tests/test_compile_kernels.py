"""Every Triton launch of a bf16 BERT-large training step (unpadded pre-LN layer, forward and
backward, dropout on, and the fused LAMB step) compiles for an H100 (sm_90) down to a cubin with
the ptxas Triton ships, and fits the H100's shared memory (227 KiB per block, CUDA programming
guide): ``scripts/compile_kernels.py --smoke``. No GPU needed; this catches what the interpreter
cannot (a construct the GPU compiler rejects, tiles that do not fit)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Found without importing triton: this process may run the kernels in the interpreter, the script's
# compiling process must not.
SPEC = importlib.util.find_spec("triton")
if SPEC is None:
    pytest.skip("needs triton (pip install -e '.[dev]')", allow_module_level=True)
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compile_kernels.py"
PTXAS = Path(SPEC.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason=f"this triton build has no NVIDIA backend ({PTXAS})")
def test_a_bf16_bert_large_step_compiles_for_h100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--arch", "90", "--json", str(out)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if "error" in r]
    kernels = {r["kernel"] for r in rows}
    assert {"_attn_fwd_kernel", "_attn_bwd_kernel", "_attn_bwd_preprocess_kernel", "_fwd_kernel",
            "_bwd_kernel", "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel", "_lamb_moments_kernel",
            "_lamb_apply_kernel"} <= kernels
    assert all(0 <= r["shared_bytes"] <= 227 * 1024 and 0 < r["registers"] <= 255 for r in rows)
    # the fused optimizers move 16 bytes per load and store on aligned tensors (their pointers come
    # from an address table, so only the kernels' hints tell the compiler): with 8 warps over
    # 4096-element chunks, each thread's 16 elements of an array are 4 vector loads; LAMB's pass 1
    # reads g, p, m, v and writes m, v; its pass 2 reads p, m, v and writes p; Adam reads 4, writes 3
    want = {"_lamb_moments_kernel": (16, 8), "_lamb_apply_kernel": (12, 4), "_adam_kernel": (16, 12)}
    for r in rows:
        if r["kernel"] in want:
            loads, stores = want[r["kernel"]]
            assert r["vector_loads"] >= loads and r["vector_stores"] >= stores, r
