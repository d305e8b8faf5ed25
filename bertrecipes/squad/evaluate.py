"""SQuAD v1.1 scoring: exact match and F1 with the official ``evaluate-v1.1.py`` semantics.

    python -m bertrecipes.squad.evaluate dev-v1.1.json predictions.json
    # {"exact_match": 81.2, "f1": 88.5}

The numbers equal the official script's on any predictions file, because every step is the same:

* an answer is normalised by lower-casing (``str.lower``), deleting every character of
  ``string.punctuation`` (ASCII only: "—" or "’" stay), replacing the articles a/an/the, as whole
  words (regex word boundaries, Unicode-aware), by a space, then joining the whitespace-split words
  with single spaces;
* EM is 1 if the normalised prediction equals a normalised gold answer; F1 is the harmonic mean
  of precision and recall over the two bags of words (multiset intersection), and 0 when they
  share no word (even when both are empty);
* both take the maximum over the question's gold answers and are averaged over *all* questions of
  the data file, in percent; a question without a prediction scores 0 and is reported on stderr
  as ``Unanswered question <id> will receive score 0.``. Sums run in file order, so the floats are
  bit-identical to the official script's.

Beyond the official script: bad input is an error that names the file and the JSON key
(exit status 2, no traceback), and prediction ids that are not in the data are counted on stderr
(they do not change the scores, as in the official script).
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from bertrecipes.errors import UserError

EXPECTED_VERSION = "1.1"

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class SquadFileError(UserError):
    """A SQuAD data or predictions file is missing, not JSON, or lacks a key; the message names both."""


# --------------------------------------------------------------------------- the metric


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, blank out the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def f1_score(prediction: str, gold: str) -> float:
    predicted_words = normalize_answer(prediction).split()
    gold_words = normalize_answer(gold).split()
    shared = sum((Counter(predicted_words) & Counter(gold_words)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(predicted_words)
    recall = shared / len(gold_words)
    return 2 * precision * recall / (precision + recall)


def score_prediction(prediction: str, gold_answers: list[str]) -> tuple[bool, float]:
    """(EM, F1) of one prediction: the best over the gold answers."""
    return (max(exact_match_score(prediction, g) for g in gold_answers),
            max(f1_score(prediction, g) for g in gold_answers))


def evaluate(gold: Iterable[tuple[str, list[str]]], predictions: dict[str, str],
             stderr: TextIO | None = None) -> dict[str, float]:
    """``{"exact_match", "f1"}`` in percent over every ``(question id, gold answer texts)`` of ``gold``.

    Questions without a prediction score 0 and are reported on ``stderr`` (default: sys.stderr),
    as the official script does.
    """
    stderr = stderr or sys.stderr
    exact = 0
    f1 = 0.0
    total = 0
    for qid, answers in gold:
        total += 1
        if qid not in predictions:
            print(f"Unanswered question {qid} will receive score 0.", file=stderr)
            continue
        em_q, f1_q = score_prediction(predictions[qid], answers)
        exact += em_q
        f1 += f1_q
    if total == 0:
        raise ValueError("no questions to evaluate")
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


# --------------------------------------------------------------------------- files


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file, or raise SquadFileError naming it and the position of a syntax error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SquadFileError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SquadFileError(f"{what} {path} cannot be read: {e}") from None
    if not text.strip():
        raise SquadFileError(f"{what} {path} is empty (expected a JSON object)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SquadFileError(f"{what} {path} is not valid JSON: line {e.lineno} column {e.colno}: "
                             f"{e.msg}") from None


def json_field(node: Any, key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    """``node[key]``, checked to be of ``kind``; otherwise a SquadFileError naming ``path`` and
    ``where`` (the JSON location of ``node``, e.g. ``data[3].paragraphs[0]``)."""
    if not isinstance(node, dict):
        raise SquadFileError(f"{path}: {where} should be a JSON object, got {type(node).__name__}")
    if key not in node:
        raise SquadFileError(f"{path}: {where} has no key {key!r}")
    value = node[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SquadFileError(f"{path}: {where}.{key} should be {names}, got {type(value).__name__}")
    return value


def iter_gold_answers(dataset: Any, path: str | Path) -> Iterator[tuple[str, list[str]]]:
    """``(question id, gold answer texts)`` for each question of a parsed SQuAD v1.1 file, in file
    order; a missing or mistyped key is a SquadFileError naming ``path`` and the key's location."""
    path = Path(path)
    articles = json_field(dataset, "data", list, "the top level", path)
    for a, article in enumerate(articles):
        paragraphs = json_field(article, "paragraphs", list, f"data[{a}]", path)
        for p, paragraph in enumerate(paragraphs):
            qas = json_field(paragraph, "qas", list, f"data[{a}].paragraphs[{p}]", path)
            for q, qa in enumerate(qas):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                qid = json_field(qa, "id", str, where, path)
                answers = json_field(qa, "answers", list, where, path)
                if not answers:
                    raise SquadFileError(f"{path}: {where} (id {qid}) has no gold answers "
                                         f"(SQuAD v1.1 questions all have at least one)")
                yield qid, [json_field(ans, "text", str, f"{where}.answers[{i}]", path)
                            for i, ans in enumerate(answers)]


def check_version(dataset: Any, path: str | Path, stderr: TextIO | None = None) -> None:
    """Warn (as the official script does) when the file says it is not SQuAD v1.1."""
    version = dataset.get("version") if isinstance(dataset, dict) else None
    if version is not None and version != EXPECTED_VERSION:
        print(f"Evaluation expects v-{EXPECTED_VERSION}, but got dataset with v-{version} ({path})",
              file=stderr or sys.stderr)


def read_predictions(path: str | Path) -> dict[str, str]:
    """``{question id: answer text}`` from a predictions.json, validated."""
    predictions = read_json(path, "predictions file")
    if not isinstance(predictions, dict):
        raise SquadFileError(f"predictions file {path} should hold a JSON object "
                             f"{{question id: answer text}}, got {type(predictions).__name__}")
    for qid, text in predictions.items():
        if not isinstance(text, str):
            raise SquadFileError(f"predictions file {path}: the prediction for {qid!r} should be a "
                                 f"string, got {type(text).__name__}")
    return predictions


def evaluate_files(data_file: str | Path, predictions_file: str | Path,
                   stderr: TextIO | None = None) -> dict[str, float]:
    """Score ``predictions_file`` against ``data_file``, as ``python -m bertrecipes.squad.evaluate``."""
    stderr = stderr or sys.stderr
    dataset = read_json(data_file, "SQuAD data file")
    check_version(dataset, data_file, stderr)
    gold = list(iter_gold_answers(dataset, data_file))
    if not gold:
        raise SquadFileError(f"SQuAD data file {data_file} holds no questions")
    predictions = read_predictions(predictions_file)
    report_unknown_ids(predictions, {qid for qid, _ in gold}, predictions_file, stderr)
    return evaluate(gold, predictions, stderr)


def report_unknown_ids(predictions: dict[str, str], known_ids: set[str], predictions_file: Any,
                       stderr: TextIO | None = None) -> int:
    """Count prediction ids that are not questions of the data (ignored, as officially) on stderr."""
    unknown = [qid for qid in predictions if qid not in known_ids]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        print(f"warning: {len(unknown)} of {len(predictions)} predictions in {predictions_file} are "
              f"for ids not in the data ({shown}); they are ignored", file=stderr or sys.stderr)
    return len(unknown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bertrecipes.squad.evaluate",
        description=f"Evaluation for SQuAD {EXPECTED_VERSION}: exact match and F1 in percent, equal "
                    "to the official evaluate-v1.1.py.",
    )
    parser.add_argument("dataset_file", help="SQuAD v1.1 data file (e.g. dev-v1.1.json)")
    parser.add_argument("prediction_file", help="predictions.json: {question id: answer text}")
    args = parser.parse_args(argv)
    try:
        result = evaluate_files(args.dataset_file, args.prediction_file)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
