"""The SQuAD v1.1 evaluator: hand-computed EM/F1 (the official script's numbers worked out by hand
from its algorithm), an independent re-implementation on random answers, the CLI, and bad input."""

from __future__ import annotations

import io
import json
import random
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bertrecipes.squad.evaluate import (
    SquadFileError,
    evaluate,
    evaluate_files,
    exact_match_score,
    f1_score,
    main,
    normalize_answer,
)

ROOT = Path(__file__).resolve().parent.parent


def squad_file(path: Path, questions: list[tuple[str, list[str]]], version: str = "1.1") -> Path:
    """A SQuAD v1.1 file with one paragraph per question (the evaluator reads ids and answer texts)."""
    paragraphs = [{"context": " ".join(answers), "qas": [{"id": qid, "question": "?",
                                                          "answers": [{"text": a, "answer_start": 0}
                                                                      for a in answers]}]}
                  for qid, answers in questions]
    path.write_text(json.dumps({"version": version, "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


@pytest.mark.parametrize("raw, normalised", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("an apple a day", "apple day"),
    ("  Several   spaces\tand\nlines ", "several spaces and lines"),
    ("theory and anthem", "theory and anthem"),  # articles only as whole words
    ("a.b", "ab"),  # punctuation goes first, so "a.b" is one word, not the article "a"
    ("The-end", "theend"),  # a hyphen joins, so "the" is not a whole word any more
    ("Café—the place", "café— place"),  # "—" is not ASCII punctuation, but it is a word boundary
    ("Straße ÉCOLE", "straße école"),  # str.lower, no accent stripping or case folding
    ("“Quoted”", "“quoted”"),  # curly quotes are not in string.punctuation
    ("the", ""),
])
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


# Nine questions whose official scores are worked out by hand.
HAND_CASES = [
    # id, gold answers, prediction (None = unanswered), EM, F1
    ("q1", ["The Eiffel Tower", "Eiffel Tower"], "eiffel tower!", 1, 1.0),
    ("q2", ["an apple a day"], "Apple day", 1, 1.0),
    # 2 shared words: precision 2/2, recall 2/3 -> F1 = 2PR/(P+R) = 0.8
    ("q3", ["New York City"], "new york", 0, 0.8),
    # "1,000 people" -> "1000 people": P 1, R 1/2 -> 2/3; "about 1000" also 2/3
    ("q4", ["1,000 people", "about 1000"], "1000", 0, 2 / 3),
    ("q5", ["Café—the place"], "café— place", 1, 1.0),
    ("q6", ["anything"], None, 0, 0.0),
    # both normalise to "": equal strings (EM 1) but no shared word (F1 0), as the official script
    ("q7", ["the the"], "", 1, 0.0),
    ("q8", ["Theory"], "the ory", 0, 0.0),
    # bags {y:3} and {x, y:2, z}: intersection 2 -> P 2/3, R 1/2 -> F1 4/7
    ("q9", ["x y y z"], "y y y", 0, 4 / 7),
]


def test_hand_computed_scores_per_question():
    for _, gold, prediction, em, f1 in HAND_CASES:
        if prediction is None:
            continue
        assert max(exact_match_score(prediction, g) for g in gold) == em
        assert max(f1_score(prediction, g) for g in gold) == pytest.approx(f1, abs=1e-15)


def test_hand_computed_totals_and_unanswered_message(tmp_path, capsys):
    data = squad_file(tmp_path / "data.json", [(qid, gold) for qid, gold, *_ in HAND_CASES])
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps({qid: p for qid, _, p, *_ in HAND_CASES if p is not None}))
    assert main([str(data), str(preds)]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert list(result) == ["exact_match", "f1"]
    assert result["exact_match"] == pytest.approx(100 * 4 / 9, rel=1e-14)
    assert result["f1"] == pytest.approx(100 * (1 + 1 + 0.8 + 2 / 3 + 1 + 0 + 0 + 0 + 4 / 7) / 9, rel=1e-14)
    assert err.strip().splitlines() == ["Unanswered question q6 will receive score 0."]


def _reference_normalise(text: str) -> list[str]:
    """Written from the official description for ASCII text, by a different route: per word."""
    text = text.lower()
    kept = "".join(" " if c.isspace() else c for c in text if c not in string.punctuation)
    return [w for w in kept.split(" ") if w and w not in ("a", "an", "the")]


def _reference_scores(gold: list[str], prediction: str) -> tuple[int, float]:
    em = int(any(_reference_normalise(prediction) == _reference_normalise(g) for g in gold))
    best = 0.0
    for g in gold:
        p, r = Counter(_reference_normalise(prediction)), Counter(_reference_normalise(g))
        same = sum(min(p[w], r[w]) for w in p)
        if same:
            precision, recall = same / sum(p.values()), same / sum(r.values())
            best = max(best, 2 * precision * recall / (precision + recall))
    return em, best


def test_matches_an_independent_reimplementation_on_random_answers():
    rng = random.Random(0)
    words = ["a", "an", "the", "The", "cat", "Cat.", "dog", "(dog)", "x-ray", "x", "ray", "1,000", "1000",
             "don't", "dont", "AN", "thE", "an-a", "", " "]
    gold_sets, predictions = [], {}
    for i in range(400):
        gold = [" ".join(rng.choices(words, k=rng.randint(0, 5))) for _ in range(rng.randint(1, 3))]
        gold_sets.append((f"q{i}", gold))
        if rng.random() < 0.9:
            predictions[f"q{i}"] = " ".join(rng.choices(words, k=rng.randint(0, 5)))
    expected_em = expected_f1 = 0.0
    for qid, gold in gold_sets:
        if qid in predictions:
            em, f1 = _reference_scores(gold, predictions[qid])
            expected_em += em
            expected_f1 += f1
    result = evaluate(gold_sets, predictions, stderr=io.StringIO())
    assert result["exact_match"] == pytest.approx(100 * expected_em / len(gold_sets), rel=1e-12)
    assert result["f1"] == pytest.approx(100 * expected_f1 / len(gold_sets), rel=1e-12)


def test_command_line_module(tmp_path):
    data = squad_file(tmp_path / "data.json", [("a", ["Paris"]), ("b", ["in 1990", "1990"])])
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps({"a": "paris", "b": "1990s"}))
    done = subprocess.run([sys.executable, "-m", "bertrecipes.squad.evaluate", str(data), str(preds)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"exact_match": 50.0, "f1": 50.0}


# --------------------------------------------------------------------------- bad input


def test_version_mismatch_is_reported_but_scored(tmp_path):
    data = squad_file(tmp_path / "d.json", [("a", ["x"])], version="2.0")
    preds = tmp_path / "p.json"
    preds.write_text('{"a": "x"}')
    err = io.StringIO()
    assert evaluate_files(data, preds, stderr=err) == {"exact_match": 100.0, "f1": 100.0}
    assert "expects v-1.1, but got dataset with v-2.0" in err.getvalue()


def test_prediction_ids_not_in_the_data_are_counted_and_ignored(tmp_path):
    data = squad_file(tmp_path / "d.json", [("a", ["x"]), ("b", ["y"])])
    preds = tmp_path / "p.json"
    preds.write_text('{"a": "x", "b": "y", "zz1": "x", "zz2": "y"}')
    err = io.StringIO()
    assert evaluate_files(data, preds, stderr=err) == {"exact_match": 100.0, "f1": 100.0}
    assert "2 of 4 predictions" in err.getvalue() and "zz1, zz2" in err.getvalue()


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("   \n", "is empty"),
    ('{"a": ', "is not valid JSON: line 1"),
    ('["x"]', "should hold a JSON object"),
    ('{"a": 3}', "the prediction for 'a' should be a string"),
])
def test_bad_predictions_file(tmp_path, capsys, content, message):
    data = squad_file(tmp_path / "d.json", [("a", ["x"])])
    preds = tmp_path / "p.json"
    preds.write_text(content)
    assert main([str(data), str(preds)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and str(preds) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("document, message", [
    ("not json at all", "is not valid JSON"),
    ({"version": "1.1"}, "the top level has no key 'data'"),
    ({"data": [{"title": "t"}]}, "data[0] has no key 'paragraphs'"),
    ({"data": [{"paragraphs": [{"qas": [{"answers": [{"text": "x"}]}]}]}]},
     "data[0].paragraphs[0].qas[0] has no key 'id'"),
    ({"data": [{"paragraphs": [{"qas": [{"id": "a"}]}]}]},
     "data[0].paragraphs[0].qas[0] has no key 'answers'"),
    ({"data": [{"paragraphs": [{"qas": [{"id": "a", "answers": [{"answer_start": 0}]}]}]}]},
     "qas[0].answers[0] has no key 'text'"),
    ({"data": [{"paragraphs": [{"qas": [{"id": "a", "answers": []}]}]}]}, "(id a) has no gold answers"),
    ({"data": [{"paragraphs": [{"qas": [{"id": 7, "answers": [{"text": "x"}]}]}]}]},
     "qas[0].id should be str, got int"),
    ({"data": []}, "holds no questions"),
])
def test_malformed_data_file(tmp_path, capsys, document, message):
    data = tmp_path / "d.json"
    data.write_text(document if isinstance(document, str) else json.dumps(document))
    preds = tmp_path / "p.json"
    preds.write_text('{"a": "x"}')
    assert main([str(data), str(preds)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(data) in err and "Traceback" not in err


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SquadFileError, match="nope.json does not exist"):
        evaluate_files(tmp_path / "nope.json", tmp_path / "p.json")
