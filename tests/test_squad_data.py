"""SQuAD examples and windows: the answer's token span decodes back to the answer through the
offsets, windows overlap as doc_stride says (and equal transformers' overflowing windows), the
maximum-context rule, unlocatable answers skipped and counted, malformed files named."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from bertrecipes.data.tokenizer import load_tokenizer, train_wordpiece
from bertrecipes.errors import ConfigError
from bertrecipes.squad.data import (
    SquadExample,
    build_features,
    char_span_to_tokens,
    locate_answer,
    max_context_windows,
    read_squad_examples,
    window_starts,
)
from bertrecipes.squad.evaluate import SquadFileError

WORDS = ("river mountain city harbour bridge tower castle forest meadow valley station market "
         "painter sailor baker farmer teacher doctor").split()


def long_context(num_sentences: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    sentences = []
    for i in range(num_sentences):
        words = rng.choice(WORDS, size=6)
        sentences.append(f"In {1900 + i}, the {words[0]} near the {words[1]} met a {words[2]} "
                         f"({words[3]}, {words[4]}) by the {words[5]}.")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    docs = [[long_context(40, seed)] for seed in range(5)] + [["Who met whom, and when? What is near?"]]
    vocab = train_wordpiece(docs, vocab_size=300, lower_case=True,
                            out_path=tmp_path_factory.mktemp("vocab") / "vocab.txt")
    return load_tokenizer(vocab, lower_case=True)


def test_locate_answer_tolerates_whitespace_only():
    context = "The  New York\nTimes, founded in 1851."
    assert locate_answer(context, "New York Times", 5) == (5, 19)  # newline vs space
    assert locate_answer(context, " New  York ", 4) == (5, 13)  # surrounding whitespace trimmed
    assert locate_answer(context, "1851", context.index("1851")) == (32, 36)
    assert locate_answer(context, "New York", 0) is None  # not at answer_start
    assert locate_answer(context, "Times", 10 ** 6) is None and locate_answer(context, "The", -1) is None
    assert locate_answer(context, "   ", 0) is None


def test_char_span_to_tokens_covers_partial_words():
    offsets = np.array([[0, 3], [4, 8], [8, 9], [10, 14]])  # "the 1990 s good": "1990" + "s" pieces
    assert char_span_to_tokens(offsets, 4, 8) == (1, 1)
    assert char_span_to_tokens(offsets, 5, 9) == (1, 2)  # part of a token: the whole token
    assert char_span_to_tokens(offsets, 3, 4) is None  # only the space between tokens


def test_window_starts_step_by_doc_stride():
    assert window_starts(10, 4, 3) == [(0, 4), (3, 4), (6, 4)]
    assert window_starts(4, 4, 3) == [(0, 4)]
    assert window_starts(0, 4, 3) == [(0, 0)]
    assert window_starts(9, 4, 8) == [(0, 4), (4, 4), (8, 1)]  # stride > window: min(length, stride)


def test_max_context_matches_the_definition():
    spans = window_starts(30, 10, 4)
    best = max_context_windows(spans, 30)
    for token in range(30):
        scores = [min(token - s, s + n - 1 - token) + 0.01 * n if s <= token < s + n else -1
                  for s, n in spans]
        assert best[token] == int(np.argmax(scores))


def _example(context: str, answer: str, qid: str = "q", question: str = "Who met whom near the river?",
             nth: int = 0) -> SquadExample:
    start = -1
    for _ in range(nth + 1):
        start = context.index(answer, start + 1)
    return SquadExample(qid, question, context, (answer,), (start,))


def test_windows_over_a_long_context_contain_the_answer(tokenizer):
    context = long_context(30)
    answers = ["In 1900", "1915", "(" + context.split("(")[12].split(")")[0] + ")", context[-20:].strip(),
               context.split(", the ")[20].split(" near")[0]]
    examples = [_example(context, a, f"q{i}") for i, a in enumerate(answers)]
    seq, stride, query_len = 64, 16, 8
    features = build_features(examples, tokenizer, seq, stride, query_len, is_training=True)
    assert features.num_skipped == 0
    for i, answer in enumerate(answers):
        windows = np.flatnonzero(features.example_index == i)
        assert len(windows) > 5  # a long context
        labelled = [f for f in windows if features.start_positions[f] > 0]
        assert labelled, answer
        for f in windows:
            s, e = features.start_positions[f], features.end_positions[f]
            if s == 0:
                assert e == 0
                continue
            offsets = features.token_offsets[f]
            assert context[offsets[s, 0]:offsets[e, 1]] == answer
            assert features.token_type_ids[f, s] == 1 and features.token_type_ids[f, e] == 1

        # Consecutive windows start doc_stride context tokens apart and overlap by the rest.
        first_context = [int(np.flatnonzero(features.token_type_ids[f])[0]) for f in windows]
        starts = [features.token_offsets[f, p, 0] for f, p in zip(windows, first_context, strict=True)]
        for a, b, p in zip(windows[:-1], windows[1:], first_context[:-1], strict=True):
            assert features.token_offsets[a, p + stride, 0] == features.token_offsets[b, p, 0]
            n_a = int(features.attention_mask[a].sum())
            overlap = features.token_offsets[a, p + stride:n_a - 1]
            assert np.array_equal(overlap, features.token_offsets[b, p:p + len(overlap)])
        assert starts == sorted(starts)
        # Each context token is the maximum-context token of exactly one window.
        owners: dict[int, int] = {}
        for f in windows:
            for pos in np.flatnonzero(features.max_context[f]):
                char = int(features.token_offsets[f, pos, 0])
                assert char not in owners
                owners[char] = f
        every_token = {int(c) for f in windows for c in features.token_offsets[f, :, 0] if c >= 0}
        assert len(owners) == len(every_token)


def test_dropping_windows_without_the_answer_keeps_exactly_the_labelled_ones(tokenizer):
    """BingBertSquad's training windows: those of Google BERT's whose label is not [CLS], unchanged."""
    context = long_context(30)
    answers = ["In 1900", "1915", context[-20:].strip()]
    examples = [_example(context, a, f"q{i}") for i, a in enumerate(answers)]
    every = build_features(examples, tokenizer, 64, 16, 8, is_training=True, windows_without_answer="cls")
    kept = build_features(examples, tokenizer, 64, 16, 8, is_training=True, windows_without_answer="drop")
    labelled = np.flatnonzero(every.start_positions > 0)
    assert 0 < len(labelled) < len(every) and len(kept) == len(labelled)
    for field in ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions",
                  "example_index", "token_offsets", "max_context"):
        assert np.array_equal(getattr(kept, field), getattr(every, field)[labelled]), field
    # prediction keeps every window whatever the setting
    predict = build_features(examples, tokenizer, 64, 16, 8, is_training=False, windows_without_answer="drop")
    assert len(predict) == len(every)
    with pytest.raises(ConfigError, match="windows_without_answer must be one of drop, cls, got 'keep'"):
        build_features(examples, tokenizer, 64, 16, 8, is_training=True, windows_without_answer="keep")


def test_layout_of_a_window(tokenizer):
    context = long_context(2)
    question = "Who met whom near the river and the mountain and the city and the harbour?"
    ex = _example(context, "1901", question=question)
    features = build_features([ex], tokenizer, 48, 8, 6, is_training=True)
    cls, sep, pad = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    question_ids = tokenizer.encode(question, add_special_tokens=False).ids[:6]
    ids = features.input_ids[0]
    assert ids[0] == cls and list(ids[1:7]) == question_ids and ids[7] == sep
    n = int(features.attention_mask[0].sum())
    assert ids[n - 1] == sep and (ids[n:] == pad).all() and features.attention_mask[0, :n].all()
    assert (features.token_type_ids[0, :8] == 0).all() and (features.token_type_ids[0, 8:n] == 1).all()
    assert (features.token_type_ids[0, n:] == 0).all()
    assert (features.token_offsets[0, :8] == -1).all() and (features.token_offsets[0, n - 1:] == -1).all()
    assert not features.max_context[0, :8].any()


def test_windows_equal_transformers_overflowing_windows(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(t + "\n" for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda x: x[1])))
    hf = transformers.BertTokenizer(str(vocab), do_lower_case=True)
    context, question = long_context(12, seed=3), "Who met whom?"
    seq, stride = 64, 20
    ours = build_features([SquadExample("q", question, context)], tokenizer, seq, stride, 16,
                          is_training=False)
    query_len = len(tokenizer.encode(question, add_special_tokens=False).ids)
    window = seq - query_len - 3
    # transformers' `stride` is the overlap between windows; ours (BERT's doc_stride) is the step.
    theirs = hf(question, context, truncation="only_second", max_length=seq, stride=window - stride,
                return_overflowing_tokens=True, padding="max_length", return_offsets_mapping=True)
    assert np.array_equal(ours.input_ids, np.array(theirs["input_ids"]))
    assert np.array_equal(ours.token_type_ids, np.array(theirs["token_type_ids"]))
    assert np.array_equal(ours.attention_mask, np.array(theirs["attention_mask"]))
    in_context = ours.token_offsets[..., 0] >= 0
    assert np.array_equal(ours.token_offsets[in_context], np.array(theirs["offset_mapping"])[in_context])
    assert in_context.sum() == ours.token_type_ids.sum() - len(ours)  # every context token but the last [SEP]


def test_answer_outside_a_window_is_labelled_cls(tokenizer):
    context = long_context(20)
    features = build_features([_example(context, "1919")], tokenizer, 48, 12, 8, is_training=True)
    labels = features.start_positions
    assert (labels == 0).sum() >= 1 and (labels > 0).sum() >= 1
    assert (features.end_positions[labels == 0] == 0).all()


def test_unlocatable_answers_are_skipped_and_counted(tokenizer, caplog):
    context = long_context(3)
    good = _example(context, "1901", "good")
    wrong_place = SquadExample("wrong", "?", context, ("1901",), (0,))
    out_of_range = SquadExample("far", "?", context, ("1901",), (len(context) + 5,))
    negative = SquadExample("neg", "?", context, ("In",), (-1,))
    no_answer = SquadExample("none", "?", context)
    spaced = SquadExample("spaced", "?", context, ("In   1901",), (context.index("In 1901"),))
    features = build_features([good, wrong_place, out_of_range, negative, no_answer, spaced], tokenizer,
                              64, 16, 8, is_training=True)
    assert sorted(features.skipped_ids) == ["far", "neg", "none", "wrong"]
    assert set(features.example_index.tolist()) == {0, 5}
    assert "skipped 4 of 6 training examples" in caplog.text
    # At prediction time nothing is skipped: answers are not needed.
    predict = build_features([wrong_place, out_of_range], tokenizer, 64, 16, 8, is_training=False)
    assert predict.num_skipped == 0 and set(predict.example_index.tolist()) == {0, 1}


def test_question_is_truncated_to_max_query_length(tokenizer):
    ex = SquadExample("q", " ".join(["river"] * 50), long_context(1))
    features = build_features([ex], tokenizer, 64, 16, 5, is_training=False)
    assert (features.token_type_ids[0, :7] == 0).all() and features.token_type_ids[0, 7] == 1


# --------------------------------------------------------------------------- reading files


def _write(path: Path, document) -> Path:
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def test_read_squad_examples(tmp_path):
    doc = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": "Paris is in France.", "qas": [
            {"id": "a", "question": "Where?", "answers": [{"text": "France", "answer_start": 12},
                                                           {"text": "in France", "answer_start": 9}]},
            {"id": "b", "question": "What?", "answers": [{"text": "Paris", "answer_start": 0}]}]}]}]}
    examples = read_squad_examples(_write(tmp_path / "d.json", doc))
    assert [e.qid for e in examples] == ["a", "b"]
    assert examples[0].answers == ("France", "in France") and examples[0].answer_starts == (12, 9)
    assert examples[0].title == "T" and examples[1].context == "Paris is in France."


@pytest.mark.parametrize("document, message", [
    ("{oops", "is not valid JSON"),
    ("", "is empty"),
    ({"data": [{"paragraphs": [{"qas": []}]}]}, "data[0].paragraphs[0] has no key 'context'"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "a", "answers": []}]}]}]},
     "qas[0] has no key 'question'"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [
        {"id": "a", "question": "q", "answers": [{"text": "c", "answer_start": "0"}]}]}]}]},
     "answers[0].answer_start should be int, got str"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [
        {"id": "a", "question": "q", "answers": [{"text": "c"}]}]}]}]},
     "answers[0] has no key 'answer_start'"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "a", "question": "q", "answers": []},
                                                          {"id": "a", "question": "q", "answers": []}]}]}]},
     "repeats question id 'a'"),
    ({"data": "nope"}, "data should be list, got str"),
])
def test_malformed_squad_file_names_the_file_and_key(tmp_path, document, message):
    path = _write(tmp_path / "bad.json", document)
    with pytest.raises(SquadFileError) as info:
        read_squad_examples(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SquadFileError, match="missing.json does not exist"):
        read_squad_examples(tmp_path / "missing.json")


def test_hub_dataset_rows_become_examples(monkeypatch):
    """A name that is not a local path goes to `datasets` (a stand-in here: nothing is downloaded)."""
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"id": "x1", "title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
                 "answers": {"text": ["France"], "answer_start": [12]}}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    (example,) = read_squad_examples("rajpurkar/squad", split="train")
    assert example == SquadExample("x1", "Where is Paris?", "Paris is in France.", ("France",), (12,), "T")
    read_squad_examples("rajpurkar/squad:validation")
    assert calls == [("rajpurkar/squad", "train"), ("rajpurkar/squad", "validation")]


def test_hub_name_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ConfigError, match="needs the datasets package"):
        read_squad_examples("rajpurkar/squad")
