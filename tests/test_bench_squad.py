"""scripts/bench_squad.py on CPU: every kernel path (ours padded and unpadded, the Triton layer in the
interpreter, transformers' BertForQuestionAnswering) trains on the same real-SQuAD window padding,
the JSON names what was measured, and a spent time budget skips cells instead of running them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
bench = pytest.importorskip("bench_squad")

from test_squad_engine import squad_files  # noqa: E402, F401  (the fixture)


@pytest.mark.slow
def test_cpu_cells_with_real_window_padding(squad_files, tmp_path):  # noqa: F811
    data, vocab = squad_files
    out = tmp_path / "bench.json"
    code = bench.main(["--device", "cpu", "--models", "tiny", "--kernels", "torch,torch_unpad,triton,hf",
                       "--micro-batches", "2", "--seq", "128", "--steps", "1", "--warmup", "1",
                       "--squad-file", str(data), "--vocab-file", str(vocab), "--json", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    meta = record["meta"]
    assert meta["device"] == "cpu" and meta["seq_len"] == 128
    # the fixture's contexts are shorter than a 128-token window: the masks carry real padding
    assert 0.3 < meta["real_token_fraction"] < 1.0
    cells = {c["kernel"]: c for c in record["results"]}
    assert set(cells) == {"torch", "torch_unpad", "triton", "hf"}
    for cell in cells.values():
        assert cell["status"] == "ok", cell
        assert cell["samples_per_sec"] > 0 and cell["tflops"] > 0
        assert cell["mfu"] is None and cell["peak_memory_gb"] is None  # no matmul peak or allocator on CPU


def test_spent_time_budget_skips_cells(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--models", "tiny", "--kernels", "torch,hf",
                       "--micro-batches", "2,4", "--time-budget", "0", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert len(results) == 4 and all(c["status"] == "skipped" for c in results)


@pytest.mark.parametrize("option,value", [("--kernels", "torch,flash"), ("--models", "huge")])
def test_unknown_choices_are_refused_by_name(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", option, value])
    assert exit_info.value.code == 2
    assert value.split(",")[-1] in capsys.readouterr().err
