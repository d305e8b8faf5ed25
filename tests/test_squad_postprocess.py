"""The n-best span search picks the known best span from constructed logits: the maximum-context
rule across two overlapping windows, max_answer_length, end before start, tokens outside the
context, n-best probabilities, text taken from the original context."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bertrecipes.atomic import write_json_atomic
from bertrecipes.squad.data import SquadExample, SquadFeatures, max_context_windows
from bertrecipes.squad.postprocess import best_spans

PREFIX = 3  # [CLS] question [SEP]
LOW = -20.0


def make_windows(words: list[str], spans: list[tuple[int, int]], separator: str = " "):
    """An example whose context is ``words`` (one token each) and hand-made windows ``spans``."""
    context = separator.join(words)
    starts = np.cumsum([0] + [len(w) + len(separator) for w in words[:-1]])
    token_chars = np.stack([starts, starts + [len(w) for w in words]], axis=1)
    seq = PREFIX + max(n for _, n in spans) + 1
    best = max_context_windows(spans, len(words))
    offsets = np.full((len(spans), seq, 2), -1, dtype=np.int32)
    max_ctx = np.zeros((len(spans), seq), dtype=bool)
    types = np.zeros((len(spans), seq), dtype=np.int8)
    for f, (s, n) in enumerate(spans):
        offsets[f, PREFIX:PREFIX + n] = token_chars[s:s + n]
        max_ctx[f, PREFIX:PREFIX + n] = best[s:s + n] == f
        types[f, PREFIX:PREFIX + n + 1] = 1
    zeros = np.zeros((len(spans), seq), dtype=np.int32)
    features = SquadFeatures(zeros, types, np.ones_like(types), np.zeros(len(spans), np.int64),
                             np.zeros(len(spans), np.int64), np.zeros(len(spans), np.int32), offsets, max_ctx)
    example = SquadExample("q", "question?", context)
    start, end = (np.full((len(spans), seq), LOW, dtype=np.float32) for _ in range(2))
    return example, features, (start, end)


WORDS = [f"w{i}" for i in range(18)]
SPANS = [(0, 12), (6, 12)]  # tokens 6..11 are in both windows


def pos(window: int, token: int) -> int:
    return PREFIX + token - SPANS[window][0]


def test_two_windows_have_the_expected_maximum_context():
    _, features, _ = make_windows(WORDS, SPANS)
    # token 8: window 0 -> min(8, 3) + 0.12; window 1 -> min(2, 9) + 0.12: window 0 wins.
    assert features.max_context[0, pos(0, 8)] and not features.max_context[1, pos(1, 8)]
    # token 10: window 0 -> min(10, 1); window 1 -> min(4, 7): window 1 wins.
    assert features.max_context[1, pos(1, 10)] and not features.max_context[0, pos(0, 10)]


def test_best_span_text_comes_from_the_context():
    example, features, (start, end) = make_windows(["Hello,", "Wörld", "of", "SQuAD"] + WORDS[4:], SPANS,
                                                    separator="   ")
    start[0, pos(0, 1)] = 5.0
    end[0, pos(0, 3)] = 4.0
    predictions, nbest = best_spans([example], features, start, end, n_best_size=5, max_answer_length=30)
    assert predictions == {"q": "Wörld   of   SQuAD"}
    best = nbest["q"][0]
    assert (best["text"], best["start_logit"], best["end_logit"]) == ("Wörld   of   SQuAD", 5.0, 4.0)


def test_a_span_only_starts_in_its_maximum_context_window():
    example, features, (start, end) = make_windows(WORDS, SPANS)
    # Token 10 scores very high in window 0, where it has little context: ignored there.
    start[0, pos(0, 10)] = 9.0
    end[0, pos(0, 11)] = 9.0
    # In window 1 (token 10's maximum-context window) it scores less, but that is the one that counts.
    start[1, pos(1, 10)] = 2.0
    end[1, pos(1, 11)] = 1.5
    predictions, nbest = best_spans([example], features, start, end, n_best_size=3, max_answer_length=30)
    assert predictions["q"] == "w10 w11"
    assert (nbest["q"][0]["start_logit"], nbest["q"][0]["end_logit"]) == (2.0, 1.5)

    # A token whose maximum context is window 0 is taken from window 0 (and not from window 1).
    example, features, (start, end) = make_windows(WORDS, SPANS)
    start[0, pos(0, 8)] = 6.0
    end[0, pos(0, 9)] = 6.0
    start[1, pos(1, 8)] = 50.0
    end[1, pos(1, 9)] = 50.0
    predictions, nbest = best_spans([example], features, start, end, n_best_size=3, max_answer_length=30)
    assert predictions["q"] == "w8 w9" and nbest["q"][0]["start_logit"] == 6.0


def test_max_answer_length_and_end_before_start():
    example, features, (start, end) = make_windows(WORDS, SPANS)
    start[0, pos(0, 1)] = 10.0
    end[0, pos(0, 5)] = 10.0  # 5 tokens: too long for max_answer_length=4
    end[0, pos(0, 0)] = 9.0  # ends before the start
    end[0, pos(0, 4)] = 3.0  # 4 tokens: the best valid end
    predictions, _ = best_spans([example], features, start, end, n_best_size=20, max_answer_length=4)
    assert predictions["q"] == "w1 w2 w3 w4"
    predictions, _ = best_spans([example], features, start, end, n_best_size=20, max_answer_length=5)
    assert predictions["q"] == "w1 w2 w3 w4 w5"


def test_positions_outside_the_context_are_never_chosen():
    example, features, (start, end) = make_windows(WORDS, SPANS)
    start[:, :PREFIX] = 100.0  # [CLS], the question, [SEP]
    end[:, :PREFIX] = 100.0
    start[:, -1] = 100.0  # the final [SEP]
    end[:, -1] = 100.0
    start[0, pos(0, 2)] = 1.0
    end[0, pos(0, 3)] = 1.0
    predictions, _ = best_spans([example], features, start, end, n_best_size=20, max_answer_length=30)
    assert predictions["q"] == "w2 w3"


def test_nbest_probabilities_are_a_softmax_over_distinct_texts():
    example, features, (start, end) = make_windows(WORDS, SPANS)
    start[0, pos(0, 2)], start[0, pos(0, 3)] = 3.0, 1.0
    end[0, pos(0, 3)], end[0, pos(0, 4)] = 2.0, 0.5
    _, nbest = best_spans([example], features, start, end, n_best_size=3, max_answer_length=30)
    entries = nbest["q"]
    # Top-3 starts/ends per window; best pairs: (2,3)=5.0, (2,4)=3.5, (3,3)=3.0.
    assert [e["text"] for e in entries] == ["w2 w3", "w2 w3 w4", "w3"]
    scores = [5.0, 3.5, 3.0]
    z = sum(math.exp(s) for s in scores)
    assert [e["probability"] for e in entries] == pytest.approx([math.exp(s) / z for s in scores], rel=1e-12)
    assert len({e["text"] for e in entries}) == len(entries)


def test_duplicate_texts_from_two_windows_are_listed_once():
    example, features, (start, end) = make_windows(WORDS, SPANS)
    start[0, pos(0, 7)], end[0, pos(0, 8)] = 4.0, 4.0  # token 7: max context in window 0
    start[1, pos(1, 7)], end[1, pos(1, 8)] = 3.0, 3.0  # same text, not its max-context window
    start[1, pos(1, 12)], end[1, pos(1, 12)] = 2.0, 2.0
    _, nbest = best_spans([example], features, start, end, n_best_size=20, max_answer_length=30)
    texts = [e["text"] for e in nbest["q"]]
    assert texts[0] == "w7 w8" and texts.count("w7 w8") == 1 and "w12" in texts


def test_no_valid_span_predicts_the_empty_string():
    example, features, (start, end) = make_windows(WORDS, SPANS)
    start[0, pos(0, 5)] = 5.0
    end[0, pos(0, 2)] = 5.0
    start[1] = end[1] = LOW
    # Only end-before-start pairs among the top-1 indexes of each window.
    predictions, nbest = best_spans([example], features, start, end, n_best_size=1, max_answer_length=30)
    assert predictions["q"] == "" and nbest["q"] == [{"text": "", "probability": 1.0, "start_logit": 0.0,
                                                       "end_logit": 0.0}]


def test_logits_must_match_the_features():
    example, features, (start, end) = make_windows(WORDS, SPANS)
    with pytest.raises(ValueError, match="do not match"):
        best_spans([example], features, start[:1], end[:1])


def test_write_json_atomic(tmp_path):
    path = write_json_atomic(tmp_path / "predictions.json", {"q": "Wörld"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"q": "Wörld"}
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.json"]
