"""scripts/tune_attention.py and the tuned-blocks table the attention kernels read.

In Triton's interpreter (fp16, tiny shapes): every candidate tile runs and agrees with the default
tiles, a tile whose output is off is rejected (not timed, not chosen), and only a tile that beats
the default by the margin is written. The table's entries replace exactly the kernels they name,
for the shape key they name, and a broken table file is an error naming the variable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from triton_kernels import load_kernels

kt, DEVICE = load_kernels()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
tuner = pytest.importorskip("tune_attention")

from kernels_triton import attention  # noqa: E402


def smoke_args(tmp_path, *extra):
    return ["--device", DEVICE, "--smoke", "--dtype", "fp16", "--iters", "1",
            "--out", str(tmp_path / "blocks.json"), "--json", str(tmp_path / "report.json"), *extra]


def test_smoke_run_times_every_tile_and_writes_the_winners(tmp_path):
    assert tuner.main(smoke_args(tmp_path, "--min-gain", "-100")) == 0  # any tile "wins": a full table
    report = json.loads((tmp_path / "report.json").read_text())
    rows = report["results"]
    assert {r["kernel"] for r in rows} == {"fwd", "dkdv", "dq"}
    assert all(r["status"] == "ok" and r["error"] <= 0.02 and r["ms"] > 0 for r in rows), rows
    table = json.loads((tmp_path / "blocks.json").read_text())
    key = attention.blocks_key(16, torch.float16, 24)
    assert set(table) == {key} and set(table[key]) == {"fwd", "dkdv", "dq"}
    for kind, blocks in table[key].items():  # the fastest ok tile of each kernel
        ok = [r for r in rows if r["kernel"] == kind]
        assert blocks == min(ok, key=lambda r: r["ms"])["blocks"]


def test_a_tile_that_changes_the_result_is_rejected(tmp_path, monkeypatch):
    real_run = tuner.run

    def run(att, qkv, cu, seq, dropout, do):
        out, grad = real_run(att, qkv, cu, seq, dropout, do)
        if att._blocks(16, torch.float16, 24)["dq"] == (16, 16, 1, 1):  # a "buggy" dq tile
            grad = grad * 1.5
        return out, grad

    monkeypatch.setattr(tuner, "run", run)
    assert tuner.main(smoke_args(tmp_path, "--min-gain", "-100")) == 0
    rows = json.loads((tmp_path / "report.json").read_text())["results"]
    (bad,) = [r for r in rows if r["kernel"] == "dq" and r["blocks"] == [16, 16, 1, 1]]
    assert bad["status"] == "wrong" and bad["error"] > 0.3 and "ms" not in bad
    table = json.loads((tmp_path / "blocks.json").read_text())
    assert all(blocks != [16, 16, 1, 1] for blocks in (t["dq"] for t in table.values()))


def test_nothing_is_written_unless_a_tile_beats_the_default(tmp_path):
    assert tuner.main(smoke_args(tmp_path, "--min-gain", "1.0")) == 0  # would have to take no time
    assert json.loads((tmp_path / "blocks.json").read_text()) == {}


def test_the_table_overlays_the_defaults_for_its_key(tmp_path, monkeypatch):
    monkeypatch.setattr(attention, "interpreter_tiles", lambda: False)  # the GPU's blocks
    defaults = attention.default_blocks(64, torch.bfloat16)
    table = {attention.blocks_key(64, torch.bfloat16, 128): {"dq": [64, 64, 4, 3]}}
    (tmp_path / "t.json").write_text(json.dumps(table))
    monkeypatch.setenv(attention.BLOCKS_ENV, str(tmp_path / "t.json"))
    assert attention._blocks(64, torch.bfloat16, 100) == defaults | {"dq": (64, 64, 4, 3)}  # 100 -> 128
    assert attention._blocks(64, torch.bfloat16, 512) == defaults  # another length: defaults
    assert attention._blocks(64, torch.float16, 128) == attention.default_blocks(64, torch.float16)
    (tmp_path / "bad.json").write_text("{not json")
    monkeypatch.setenv(attention.BLOCKS_ENV, str(tmp_path / "bad.json"))
    with pytest.raises(RuntimeError, match=attention.BLOCKS_ENV):
        attention._blocks(64, torch.bfloat16, 128)


def test_a_spent_budget_skips_the_rest_and_writes_nothing(tmp_path):
    assert tuner.main(smoke_args(tmp_path, "--time-budget", "0")) == 0
    rows = json.loads((tmp_path / "report.json").read_text())["results"]
    assert rows and all(r["status"] == "budget" for r in rows)
    assert {r["kernel"] for r in rows} == {"fwd", "dkdv", "dq"}
    assert json.loads((tmp_path / "blocks.json").read_text()) == {}


def test_a_run_killed_midway_keeps_what_it_measured(tmp_path, monkeypatch):
    """The table and the report are rewritten after every trial: a stage timeout that kills the
    tuner still leaves the tiles it timed (and a usable table) behind."""
    real_time_kind, calls = tuner.time_kind, []

    def time_kind(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the stage's timeout, mid-trial
        return real_time_kind(*args)

    monkeypatch.setattr(tuner, "time_kind", time_kind)
    with pytest.raises(KeyboardInterrupt):
        tuner.main(smoke_args(tmp_path, "--min-gain", "-100"))
    rows = json.loads((tmp_path / "report.json").read_text())["results"]
    assert [(r["kernel"], r["status"]) for r in rows] == [("fwd", "ok"), ("dkdv", "ok")]
    key = attention.blocks_key(16, torch.float16, 24)
    assert json.loads((tmp_path / "blocks.json").read_text()) == {
        key: {r["kernel"]: r["blocks"] for r in rows}}
