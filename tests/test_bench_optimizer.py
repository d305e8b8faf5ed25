"""scripts/bench_optimizer.py on the CPU: every foreach row (and the HF user's AdamW) runs the step it
names on BERT-tiny's real parameter shapes; the rows that go through the engine's OptimizerStep
really update the weights (a row that timed nothing would not), and the JSON carries the table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
bench = pytest.importorskip("bench_optimizer")


@pytest.mark.parametrize("row", ["lamb_foreach", "adam_foreach", "torch_adamw"])
def test_each_row_steps_the_weights(row):
    model = bench.BertForPreTraining(bench.model_config("tiny"))
    before = [p.detach().clone() for p in model.parameters()]
    result = bench.time_row(row, model, torch.device("cpu"), steps=1, warmup=0)
    assert result["row"] == row and result["ms"] > 0
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(), strict=True)]
    assert all(moved), f"{row} left {moved.count(False)} tensors unchanged"


def test_table_and_json(tmp_path, capsys):
    out = tmp_path / "optim.json"
    assert bench.main(["--model", "tiny", "--device", "cpu", "--rows", "lamb_foreach,torch_adamw",
                       "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["kind"] == "optimizer" and [r["row"] for r in record["results"]] == ["lamb_foreach",
                                                                                        "torch_adamw"]
    assert record["parameters"] == sum(p.numel() for p in bench.BertForPreTraining(
        bench.model_config("tiny")).parameters())
    assert "lamb_foreach" in capsys.readouterr().out


def test_unknown_row_is_named():
    with pytest.raises(SystemExit):
        bench.main(["--rows", "lamb_turbo", "--device", "cpu"])
