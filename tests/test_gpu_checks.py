"""scripts/gpu_checks.sh, the one-shot GPU run, proved on the CPU with ``--smoke`` (toy sizes, the
interpreter for Triton): the stages run in order under the budget, each bench writes its JSON, the
results are packed, and a spent budget skips stages instead of overrunning."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_checks.sh"


def run_checks(tmp_path: Path, stages: str, budget: int, *args: str):
    """(the finished process, the folder it packed into); its python3 is this interpreter."""
    out = tmp_path / "out"
    env = os.environ | {"OUT": str(out), "RESULTS": str(tmp_path / "results"), "GPU_BUDGET": str(budget),
                        "STAGES": stages, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                            timeout=600)
    return result, out


def packed_json(out: Path, name: str) -> dict:
    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        return json.load(tar.extractfile(f"./{name}"))


@pytest.mark.slow
def test_smoke_run_measures_packs_and_logs(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    result, out = run_checks(tmp_path, "check pretrain128 squad", 400, "all", "--smoke")
    assert result.returncode == 0, result.stderr[-2000:]
    log = (out / "gpu_checks.log").read_text()
    for stage in ("check", "pretrain128", "squad"):
        assert f"=== {stage}: exit 0" in log, log[-3000:]
    assert all(row["ok"] for row in packed_json(out, "layer_check.json")["rows"])
    rows = packed_json(out, "pretrain_large_seq128_bf16.json")["rows"]
    assert [r["impl"] for r in rows] == ["triton", "hf", "torch"]  # the targets' pair first
    assert all(r["samples_per_sec"] > 0 for r in rows), rows
    cells = packed_json(out, "squad_large_bf16.json")["results"]
    assert [c["status"] for c in cells] == ["ok", "ok", "ok"], cells
    if importlib.util.find_spec("matplotlib"):  # the chart of the pretraining rows
        assert (out / "bench_pretrain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spent_budget_skips_stages_and_still_packs(tmp_path):
    result, out = run_checks(tmp_path, "pretrain128 squad", 5, "all", "--smoke")
    assert result.returncode == 0, result.stderr[-2000:]
    log = (out / "gpu_checks.log").read_text()
    assert "=== pretrain128: skipped" in log and "=== squad: skipped" in log
    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        assert "./device.txt" in tar.getnames()


def test_unknown_stage_is_refused_by_name(tmp_path):
    result, _ = run_checks(tmp_path, "", 5, "pretrain1024")
    assert result.returncode == 2 and "pretrain1024" in result.stderr and "pretrain128" in result.stderr
