"""scripts/bench_pretrain.py: the micro-batch bracket against a memory model whose answer is known
in closed form, and a CPU run of the script (ours and transformers on the same batches; JSON on
disk after every row; a spent time budget skips rows instead of running them)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
bench = pytest.importorskip("bench_pretrain")


def memory_model(fixed: float, per_sample: float, capacity: float, curve: float = 0.0):
    """peak(m) = fixed + per_sample * m + curve * m^2 GB; None (out of memory) above ``capacity``."""
    calls = []

    def peak_at(m: int) -> float | None:
        calls.append(m)
        peak = fixed + per_sample * m + curve * m * m
        return None if peak > capacity else peak

    return peak_at, calls


@pytest.mark.parametrize("fixed,per_sample,capacity,start", [
    (6.0, 0.37, 80.0, 8),      # linear: the fit lands on the answer
    (6.0, 0.37, 80.0, 512),    # the first probe already runs out of memory
    (1.5, 2.9, 139.0, 64),
    (0.5, 0.013, 40.0, 1),     # a long way up from the start
])
def test_exact_bracket_with_unit_resolution(fixed, per_sample, capacity, start):
    peak_at, calls = memory_model(fixed, per_sample, capacity)
    found = bench.largest_micro(peak_at, start, capacity, resolution=0.0, max_probes=40)
    expected = max(m for m in range(1, 10000) if fixed + per_sample * m <= capacity)
    assert found["closed"]
    assert (found["max_micro"], found["oom_micro"]) == (expected, expected + 1)
    assert [m for m, _ in found["probes"]] == calls
    assert all((peak is None) == (m > expected) for m, peak in found["probes"])


def test_linear_memory_needs_few_probes():
    peak_at, calls = memory_model(6.0, 0.37, 80.0)
    found = bench.largest_micro(peak_at, 8, 80.0, resolution=0.05)
    expected = max(m for m in range(1, 1000) if 6.0 + 0.37 * m <= 80.0)
    assert found["closed"] and found["max_micro"] <= expected < found["oom_micro"]
    assert found["oom_micro"] - found["max_micro"] <= max(1, int(0.05 * found["max_micro"]))
    assert len(calls) <= 5


def test_curved_memory_still_brackets():
    # the linear fit over-predicts here: the bracket must still hold a run and an OOM next to it
    peak_at, _ = memory_model(2.0, 0.1, 60.0, curve=0.002)
    found = bench.largest_micro(peak_at, 8, 60.0, resolution=0.0, max_probes=40)
    expected = max(m for m in range(1, 1000) if 2.0 + 0.1 * m + 0.002 * m * m <= 60.0)
    assert (found["max_micro"], found["oom_micro"]) == (expected, expected + 1)


def test_nothing_fits_and_out_of_time():
    peak_at, _ = memory_model(90.0, 1.0, 80.0)
    found = bench.largest_micro(peak_at, 8, 80.0)
    assert found["max_micro"] == 0 and found["oom_micro"] == 1 and not found["closed"]
    peak_at, calls = memory_model(6.0, 0.37, 80.0)
    found = bench.largest_micro(peak_at, 8, 80.0, out_of_time=lambda: len(calls) >= 2)
    assert len(calls) == 2 and not found["closed"] and found["max_micro"] == 16


@pytest.mark.slow
def test_cpu_run_writes_every_row(tmp_path, data_cache, monkeypatch):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code = bench.main(["--device", "cpu", "--models", "tiny", "--seqs", "64", "--dtypes", "fp32",
                       "--micro", "4", "--steps", "1", "--impls", "torch,hf", "--cache-dir", str(data_cache),
                       "--json", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["meta"]["device"] == "cpu" and "training_flops_per_sample" in record["meta"]["flops"]
    rows = {r["impl"]: r for r in record["rows"]}
    assert set(rows) == {"torch", "hf"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["samples_per_sec"] > 0 and 0 < row["real_token_fraction"] <= 1
    # the same loader, seed and micro-batch: both sides see the same batches
    assert rows["torch"]["real_token_fraction"] == pytest.approx(rows["hf"]["real_token_fraction"])
    assert not list(scratch.glob("bench_pretrain_*"))  # the runs' working directory is gone


def test_spent_time_budget_skips_rows_and_still_writes(tmp_path):
    out = tmp_path / "bench.json"
    code = bench.main(["--device", "cpu", "--models", "tiny", "--seqs", "64", "--dtypes", "fp32",
                       "--impls", "torch,hf", "--time-budget", "0", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["torch", "hf"]
    assert all("time budget" in r["skipped"] and "samples_per_sec" not in r for r in rows)


@pytest.mark.parametrize("option,value", [("--impls", "torch,flash"), ("--models", "huge")])
def test_unknown_choices_are_refused_by_name(option, value, capsys):
    assert bench.main(["--device", "cpu", option, value]) == 2
    assert value.split(",")[-1] in capsys.readouterr().err


def test_known_peaks_are_not_run_again():
    peak_at, calls = memory_model(6.0, 0.37, 80.0)
    found = bench.largest_micro(peak_at, 8, 80.0, resolution=0.0, max_probes=40, known={8: 6.0 + 0.37 * 8})
    assert 8 not in calls and found["probes"][0] == (8, 6.0 + 0.37 * 8)
    expected = max(m for m in range(1, 1000) if 6.0 + 0.37 * m <= 80.0)
    assert (found["max_micro"], found["oom_micro"]) == (expected, expected + 1)


def test_measured_steps_that_overflow_are_counted(tmp_path, data_cache, capsys):
    """A row whose timed steps overflowed in fp16 (and so skipped their update, which costs less)
    says how many: here a static loss scale of 1e30 overflows every step, so all of them."""
    out = tmp_path / "bench.json"
    code = bench.main(["--device", "cpu", "--models", "tiny", "--seqs", "64", "--dtypes", "fp16",
                       "--micro", "2", "--steps", "3", "--impls", "torch", "--cache-dir", str(data_cache),
                       "--data", "precision.loss_scale=1e30", "--json", str(out)])
    assert code == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["skipped_steps"] == 3
    assert "3 measured steps overflowed" in capsys.readouterr().out
