"""scripts/compare_squad_hf.py on CPU: ours and transformers' BertForQuestionAnswering fine-tuned
from the same Hugging Face checkpoint on the same split, scored by the same evaluator. The test
checkpoint is a small random ``transformers.BertModel`` saved here; each side's EM/F1 must equal
what the official-rules evaluator gives for the predictions it wrote, and both must have trained."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
compare = pytest.importorskip("compare_squad_hf")

from test_squad_engine import squad_files  # noqa: E402, F401  (the fixture)

from bertrecipes.squad.evaluate import evaluate_files  # noqa: E402


@pytest.fixture()
def hf_checkpoint(tmp_path, squad_files):  # noqa: F811
    _, vocab = squad_files
    vocab_size = len(Path(vocab).read_text().splitlines())
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    folder = tmp_path / "hf"
    transformers.BertModel(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text(Path(vocab).read_text())
    return folder


def test_both_sides_train_and_score_by_the_official_rules(squad_files, hf_checkpoint, tmp_path):  # noqa: F811
    data, _ = squad_files
    out = tmp_path / "cmp.json"
    code = compare.main([
        "--squad-file", str(data), "--model-dir", str(hf_checkpoint), "--train-articles", "2",
        "--eval-articles", "1", "--seq", "64", "--doc-stride", "24", "--max-query-length", "12",
        "--batch", "8", "--micro", "4",
        "--max-steps", "3", "--steps-per-print", "1", "--device", "cpu", "--precision", "fp32",
        "--kernel", "torch", "--lr", "1e-3", "--json", str(out),
    ])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["bertrecipes", "transformers"]
    eval_part = tmp_path / "eval.json"
    articles = json.loads(Path(data).read_text())
    eval_part.write_text(json.dumps({"version": "1.1", "data": articles["data"][-1:]}))
    questions = sum(len(p["qas"]) for p in articles["data"][-1]["paragraphs"])
    for row in rows:
        assert row["steps"] == 3 and row["train_samples_per_sec"] > 0
        assert len(row["predictions"]) == questions
        written = tmp_path / f"{row['impl']}.json"
        written.write_text(json.dumps(row["predictions"]))
        assert evaluate_files(eval_part, written) == {"exact_match": row["exact_match"], "f1": row["f1"]}


def test_one_side_with_an_override_for_ours(squad_files, hf_checkpoint, tmp_path):  # noqa: F811
    data, _ = squad_files
    common = ["--squad-file", str(data), "--model-dir", str(hf_checkpoint), "--train-articles", "2",
              "--eval-articles", "1", "--seq", "64", "--doc-stride", "24", "--max-query-length", "12",
              "--batch", "4", "--micro", "4", "--max-steps", "2", "--device", "cpu", "--precision", "fp32",
              "--kernel", "torch"]
    out = tmp_path / "ours.json"
    assert compare.main([*common, "--impls", "ours", "--ours-override", "optimizer.bias_correction=true",
                         "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["bertrecipes"] and rows[0]["steps"] == 2
    with pytest.raises(Exception, match="optimizer.no_such_knob"):  # the override reaches our config
        compare.main([*common, "--impls", "ours", "--ours-override", "optimizer.no_such_knob=1"])
    with pytest.raises(SystemExit):
        compare.main([*common, "--impls", "theirs"])
