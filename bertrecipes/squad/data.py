"""SQuAD v1.1 examples and the model's input windows ("features").

    examples = read_squad_examples("dev-v1.1.json")
    features = build_features(examples, load_tokenizer(vocab, lower_case=True), max_seq_length=384,
                              doc_stride=128, max_query_length=64, is_training=False)

A feature is one window over an example's context: ``[CLS] question [SEP] context[s:s+L] [SEP]``,
token types 0 for the question part and 1 for the context part, [PAD]-padded to max_seq_length. The
question keeps its first ``max_query_length`` tokens; windows start every ``doc_stride`` context
tokens until one reaches the end, so consecutive windows overlap by ``L - doc_stride`` tokens
(Google BERT's ``run_squad.py`` windowing, which BingBertSquad uses).

Tokens are mapped back to the original context through the fast tokenizer's character offsets, so
an answer span becomes token positions (training) and predicted token spans become text
(prediction) without detokenising WordPieces. In training, a window that does not contain the whole
answer is left out (``windows_without_answer="drop"``, as BingBertSquad does) or labelled start = end
= 0, the [CLS] token (``"cls"``, as Google BERT does). A training answer that cannot be
found in its context at ``answer_start`` (whitespace differences aside) is skipped and counted.

Each context token also records whether this window gives it its *maximum context*: the window in
which min(tokens to its left, tokens to its right), plus 0.01 x window length, is largest (the first
such window on ties). Prediction only lets a span start on such tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from bertrecipes.data.tokenizer import special_token_ids
from bertrecipes.errors import ConfigError
from bertrecipes.squad.evaluate import SquadFileError, check_version, json_field, read_json

log = logging.getLogger(__name__)

# a training window without the whole answer: left out (BingBertSquad) or labelled [CLS] (Google BERT)
WINDOWS_WITHOUT_ANSWER = ("drop", "cls")


@dataclass(frozen=True)
class SquadExample:
    """One question about one context. ``answers``: the gold texts; ``answer_starts``: their
    character offsets in ``context`` (None for a source without offsets)."""

    qid: str
    question: str
    context: str
    answers: tuple[str, ...] = ()
    answer_starts: tuple[int | None, ...] = ()
    title: str = ""


# --------------------------------------------------------------------------- reading


def read_squad_examples(source: str | Path, split: str = "train") -> list[SquadExample]:
    """Examples of a SQuAD v1.1 JSON file, or of a `datasets` hub dataset when ``source`` is not a
    local path (``name`` or ``name:split``; ``split`` is the default split)."""
    path = Path(source)
    if path.exists() or path.suffix == ".json" or str(source).startswith((".", "/", "~")):
        return _read_json_examples(path.expanduser())
    return _read_hub_examples(str(source), split)


def _read_json_examples(path: Path) -> list[SquadExample]:
    dataset = read_json(path, "SQuAD data file")
    check_version(dataset, path)
    examples: list[SquadExample] = []
    seen: dict[str, str] = {}
    for a, article in enumerate(json_field(dataset, "data", list, "the top level", path)):
        title = article.get("title", "") if isinstance(article, dict) else ""
        for p, paragraph in enumerate(json_field(article, "paragraphs", list, f"data[{a}]", path)):
            where_p = f"data[{a}].paragraphs[{p}]"
            context = json_field(paragraph, "context", str, where_p, path)
            for q, qa in enumerate(json_field(paragraph, "qas", list, where_p, path)):
                where = f"{where_p}.qas[{q}]"
                qid = json_field(qa, "id", str, where, path)
                if qid in seen:
                    raise SquadFileError(f"{path}: {where} repeats question id {qid!r} "
                                         f"(first at {seen[qid]})")
                seen[qid] = where
                question = json_field(qa, "question", str, where, path)
                answers = qa.get("answers", []) if isinstance(qa, dict) else []
                if not isinstance(answers, list):
                    raise SquadFileError(f"{path}: {where}.answers should be list, got "
                                         f"{type(answers).__name__}")
                texts, starts = [], []
                for i, answer in enumerate(answers):
                    texts.append(json_field(answer, "text", str, f"{where}.answers[{i}]", path))
                    starts.append(json_field(answer, "answer_start", int, f"{where}.answers[{i}]", path))
                examples.append(SquadExample(qid, question, context, tuple(texts), tuple(starts), title))
    if not examples:
        raise SquadFileError(f"SQuAD data file {path} holds no questions")
    return examples


def _read_hub_examples(name: str, split: str) -> list[SquadExample]:
    """The `datasets` library's SQuAD layout: id, title, context, question, answers{text, answer_start}."""
    name, _, split = name.partition(":") if ":" in name else (name, "", split)
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{name!r} is not a local file, and loading it from the Hugging Face hub needs "
                          f"the datasets package (pip install datasets); or give a SQuAD JSON path") from None
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (connection, missing dataset, bad split)
        raise ConfigError(f"cannot load {name!r} (split {split!r}) from the hub: {type(e).__name__}: {e}; "
                          f"give a local SQuAD v1.1 JSON file instead") from None
    examples = []
    for row in rows:
        answers = row["answers"]
        examples.append(SquadExample(str(row["id"]), row["question"], row["context"],
                                     tuple(answers["text"]), tuple(int(s) for s in answers["answer_start"]),
                                     row.get("title", "")))
    return examples


def gold_answers(examples: list[SquadExample]) -> list[tuple[str, list[str]]]:
    """``(id, gold texts)`` of the examples that have gold answers, for :func:`evaluate.evaluate`."""
    return [(ex.qid, list(ex.answers)) for ex in examples if ex.answers]


# --------------------------------------------------------------------------- answers


def locate_answer(context: str, text: str, answer_start: int | None) -> tuple[int, int] | None:
    """Character span ``[start, end)`` of ``text`` in ``context`` at ``answer_start``, ignoring
    differences in whitespace and trimming surrounding whitespace; None if it is not there."""
    if answer_start is None or not 0 <= answer_start <= len(context):
        return None
    wanted = [ch for ch in text if not ch.isspace()]
    if not wanted:
        return None
    i = answer_start
    start = end = None
    for ch in wanted:
        while i < len(context) and context[i].isspace():
            i += 1
        if i >= len(context) or context[i] != ch:
            return None
        if start is None:
            start = i
        i += 1
        end = i
    return start, end


def char_span_to_tokens(offsets: np.ndarray, start: int, end: int) -> tuple[int, int] | None:
    """First and last token (inclusive) whose characters overlap ``[start, end)``; ``offsets``
    [T, 2] are the tokens' character spans in order. None if no token does."""
    first = int(np.searchsorted(offsets[:, 1], start, side="right"))  # first token ending after start
    last = int(np.searchsorted(offsets[:, 0], end, side="left")) - 1  # last token starting before end
    if first >= len(offsets) or last < first:
        return None
    return first, last


# --------------------------------------------------------------------------- features


@dataclass
class SquadFeatures:
    """Model inputs for every window, plus what prediction needs to map tokens back to text.

    ``token_offsets[f, i]`` is the character span in the example's context of token ``i`` of
    window ``f``, or (-1, -1) for question, special and padding tokens; ``max_context[f, i]`` says
    whether window ``f`` is the token's maximum-context window.
    """

    input_ids: np.ndarray  # int32 [N, S]
    token_type_ids: np.ndarray  # int8 [N, S]
    attention_mask: np.ndarray  # int8 [N, S]
    start_positions: np.ndarray  # int64 [N] (0 = [CLS]: answer not in this window, or not training)
    end_positions: np.ndarray  # int64 [N]
    example_index: np.ndarray  # int32 [N]: the example each window belongs to
    token_offsets: np.ndarray  # int32 [N, S, 2]
    max_context: np.ndarray  # bool [N, S]
    skipped_ids: list[str] = field(default_factory=list)  # training: answers not locatable

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_ids)


def window_starts(num_tokens: int, max_tokens: int, doc_stride: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each window over ``num_tokens`` context tokens (at least one window)."""
    spans = []
    start = 0
    while True:
        length = min(num_tokens - start, max_tokens)
        spans.append((start, length))
        if start + length >= num_tokens:
            return spans
        start += min(length, doc_stride)


def max_context_windows(spans: list[tuple[int, int]], num_tokens: int) -> np.ndarray:
    """int [num_tokens]: for each context token, the index of its maximum-context window."""
    score = np.full((len(spans), num_tokens), -np.inf)
    positions = np.arange(num_tokens)
    for w, (start, length) in enumerate(spans):
        inside = positions[start:start + length]
        context_left, context_right = inside - start, start + length - 1 - inside
        score[w, start:start + length] = np.minimum(context_left, context_right) + 0.01 * length
    return score.argmax(axis=0)  # first window on ties


def build_features(
    examples: list[SquadExample],
    tokenizer: Tokenizer,
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int,
    is_training: bool,
    windows_without_answer: str = "cls",
) -> SquadFeatures:
    """Tokenise every example and cut its context into windows; see the module docstring."""
    if windows_without_answer not in WINDOWS_WITHOUT_ANSWER:
        raise ConfigError(f"windows_without_answer must be one of {', '.join(WINDOWS_WITHOUT_ANSWER)}, "
                          f"got {windows_without_answer!r}")
    if max_seq_length - max_query_length - 3 <= 0:
        raise ConfigError(f"max_seq_length={max_seq_length} leaves no room for context after "
                          f"max_query_length={max_query_length}")
    if doc_stride <= 0:
        raise ConfigError(f"doc_stride must be positive, got {doc_stride}")
    special = special_token_ids(tokenizer)
    # Paragraphs are shared by several questions: tokenise each distinct context once.
    context_ids: dict[str, int] = {}
    for ex in examples:
        context_ids.setdefault(ex.context, len(context_ids))
    contexts = tokenizer.encode_batch(list(context_ids), add_special_tokens=False)
    questions = tokenizer.encode_batch([ex.question for ex in examples], add_special_tokens=False)

    rows: dict[str, list[Any]] = {k: [] for k in ("ids", "types", "start", "end", "example", "offsets",
                                                  "max_ctx", "length")}
    skipped: list[str] = []
    for index, (ex, question) in enumerate(zip(examples, questions, strict=True)):
        query = question.ids[:max_query_length]
        encoding = contexts[context_ids[ex.context]]
        doc_ids = np.asarray(encoding.ids, dtype=np.int32)
        doc_offsets = np.asarray(encoding.offsets, dtype=np.int32).reshape(-1, 2)
        answer_tokens = None
        if is_training:
            span = None
            if ex.answers:
                chars = locate_answer(ex.context, ex.answers[0], ex.answer_starts[0])
                span = chars and char_span_to_tokens(doc_offsets, *chars)
            if span is None:
                skipped.append(ex.qid)
                continue
            answer_tokens = span

        max_doc_tokens = max_seq_length - len(query) - 3
        spans = window_starts(len(doc_ids), max_doc_tokens, doc_stride)
        best_window = max_context_windows(spans, len(doc_ids))
        prefix = [special.cls_id, *query, special.sep_id]
        for w, (start, length) in enumerate(spans):
            n = len(prefix) + length + 1
            ids = np.full(max_seq_length, special.pad_id, dtype=np.int32)
            ids[:n] = [*prefix, *doc_ids[start:start + length], special.sep_id]
            types = np.zeros(max_seq_length, dtype=np.int8)
            types[len(prefix):n] = 1
            offsets = np.full((max_seq_length, 2), -1, dtype=np.int32)
            offsets[len(prefix):n - 1] = doc_offsets[start:start + length]
            max_ctx = np.zeros(max_seq_length, dtype=bool)
            max_ctx[len(prefix):n - 1] = best_window[start:start + length] == w
            start_pos = end_pos = 0
            if answer_tokens is not None:
                first, last = answer_tokens
                if start <= first and last < start + length:
                    start_pos = len(prefix) + first - start
                    end_pos = len(prefix) + last - start
                elif windows_without_answer == "drop":
                    continue
            for key, value in (("ids", ids), ("types", types), ("start", start_pos), ("end", end_pos),
                               ("example", index), ("offsets", offsets), ("max_ctx", max_ctx),
                               ("length", n)):
                rows[key].append(value)

    if skipped:
        log.warning("skipped %d of %d training examples whose answer is not in the context at "
                    "answer_start (e.g. %s)", len(skipped), len(examples), ", ".join(skipped[:5]))
    seq = max_seq_length
    if not rows["ids"]:
        empty = np.zeros((0, seq), dtype=np.int32)
        return SquadFeatures(empty, empty.astype(np.int8), empty.astype(np.int8), np.zeros(0, np.int64),
                             np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((0, seq, 2), np.int32),
                             np.zeros((0, seq), bool), skipped)
    ids = np.stack(rows["ids"])
    return SquadFeatures(
        input_ids=ids,
        token_type_ids=np.stack(rows["types"]),
        attention_mask=(np.arange(seq)[None, :] < np.asarray(rows["length"])[:, None]).astype(np.int8),
        start_positions=np.asarray(rows["start"], dtype=np.int64),
        end_positions=np.asarray(rows["end"], dtype=np.int64),
        example_index=np.asarray(rows["example"], dtype=np.int32),
        token_offsets=np.stack(rows["offsets"]),
        max_context=np.stack(rows["max_ctx"]),
        skipped_ids=skipped,
    )
