"""Tests for the demo corpus, the WordPiece tokenizer (against transformers) and the cached demo dataset."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from bertrecipes.data import (
    SPECIAL_TOKENS,
    build_demo_dataset,
    continuation_mask,
    generate_demo_corpus,
    load_tokenizer,
    special_token_ids,
    train_wordpiece,
)

SHARED_VOCAB_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vocab"

# Accents, punctuation, CJK, control/odd whitespace, unknown and very long words, mixed case.
TRICKY_TEXTS = [
    "The farmer fed the hungry goats.",
    "Héllo, Wörld! Crème brûlée costs 3.50€ — «quoted» “curly” 'single'.",
    "東京 is in 日本; 北京 too. 한국어 텍스트 and ひらがな.",
    "xyzzyplughfrobnicate zzzqqqxxx Grüße naïve façade résumé",
    "Tabs\tand\nnewlines\r\nand\u00a0nbsp\u200bzero-width and \x07 bell",
    "A" * 120 + " ok",
    "SHOUTING Astronauts REPAIRED the Satellites!!!",
    "",
]


def _demo_docs(n: int = 200) -> list[list[str]]:
    return generate_demo_corpus(num_documents=n, seed=0)


@pytest.fixture(scope="module")
def demo_vocab(tmp_path_factory) -> dict[bool, Path]:
    out = tmp_path_factory.mktemp("vocab")
    return {lower: train_wordpiece(_demo_docs(), 1200, lower, out / f"vocab-{lower}.txt")
            for lower in (True, False)}


def test_corpus_is_deterministic_per_seed() -> None:
    first = generate_demo_corpus(num_documents=50, seed=3)
    assert first == generate_demo_corpus(num_documents=50, seed=3)
    assert first != generate_demo_corpus(num_documents=50, seed=4)
    assert generate_demo_corpus(num_documents=80, seed=3)[:50] == first  # a longer corpus extends it


def test_corpus_shape_and_vocabulary() -> None:
    docs = _demo_docs(400)
    assert len(docs) == 400
    lengths = [len(d) for d in docs]
    assert min(lengths) >= 4 and max(lengths) <= 12 and np.mean(lengths) > 6
    for doc in docs:
        for sentence in doc:
            assert sentence[0].isupper() and sentence[-1] in ".!?", sentence
    words = {w for d in docs for s in d for w in re.findall(r"[a-z]+", s.lower())}
    assert 300 <= len(words) <= 1500, len(words)


def test_consecutive_sentences_are_more_related_than_random_ones() -> None:
    """The NSP signal: a sentence shares more content words with its successor than with one elsewhere."""
    docs = _demo_docs(300)
    common = {"the", "a", "an", "and", "to", "in", "was", "were", "so", "that", "her", "his", "he", "she",
              "of", "at", "with", "near", "every", "day", "too", "but", "only", "once"}

    def words(sentence: str) -> set[str]:
        return set(re.findall(r"[a-z]+", sentence.lower())) - common

    def overlap(x: str, y: str) -> float:
        wx, wy = words(x), words(y)
        return len(wx & wy) / max(1, len(wx | wy))

    rng = np.random.default_rng(0)
    consecutive, random_pairs = [], []
    for d, doc in enumerate(docs):
        for s in range(len(doc) - 1):
            consecutive.append(overlap(doc[s], doc[s + 1]))
            other = docs[(d + 1 + rng.integers(len(docs) - 1)) % len(docs)]
            random_pairs.append(overlap(doc[s], other[rng.integers(len(other))]))
    assert np.mean(consecutive) > 3 * np.mean(random_pairs), (np.mean(consecutive), np.mean(random_pairs))


def test_trained_vocab_layout(demo_vocab: dict[bool, Path]) -> None:
    lines = demo_vocab[True].read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # one token per line, newline-terminated
    tokens = lines[:-1]
    assert tuple(tokens[:5]) == SPECIAL_TOKENS
    assert len(tokens) == len(set(tokens)) and 100 < len(tokens) <= 1200
    assert "the" in tokens and all(t == t.lower() for t in tokens[5:])
    assert any(t != t.lower() for t in demo_vocab[False].read_text(encoding="utf-8").split("\n"))

    tokenizer = load_tokenizer(demo_vocab[True])
    special = special_token_ids(tokenizer)
    assert special.ids == (0, 1, 2, 3, 4)  # pad, unk, cls, sep, mask
    expected = np.array([t.startswith("##") for t in tokens])
    np.testing.assert_array_equal(continuation_mask(tokenizer), expected)


def _assert_matches_transformers(vocab_file: Path, lower_case: bool) -> None:
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    ours = load_tokenizer(vocab_file, lower_case=lower_case)
    # BertTokenizer in transformers 5 sits on the tokenizers library; the legacy class is the original
    # pure-Python BERT tokenizer, an implementation that shares no code with ours.
    references = [BertTokenizer(str(vocab_file), do_lower_case=lower_case),
                  BertTokenizerLegacy(str(vocab_file), do_lower_case=lower_case)]
    texts = TRICKY_TEXTS + [s for d in _demo_docs(20) for s in d]
    for reference in references:
        for text in texts:
            want = reference(text, add_special_tokens=False)["input_ids"]
            assert ours.encode(text, add_special_tokens=False).ids == want, (type(reference).__name__, text)
        pair = ours.encode(texts[0], texts[1])
        want_pair = reference(texts[0], texts[1], return_token_type_ids=True)
        assert pair.ids == want_pair["input_ids"] and pair.type_ids == want_pair["token_type_ids"]


@pytest.mark.parametrize("lower_case", [True, False])
def test_tokenizer_matches_transformers_on_demo_vocab(demo_vocab: dict[bool, Path], lower_case: bool) -> None:
    _assert_matches_transformers(demo_vocab[lower_case], lower_case)


@pytest.mark.parametrize(("name", "lower_case"), [("uncased", True), ("cased", False)])
def test_tokenizer_matches_transformers_on_bert_vocab(name: str, lower_case: bool) -> None:
    vocab_file = SHARED_VOCAB_DIR / f"bert-base-{name}-vocab.txt"
    if not vocab_file.is_file():
        pytest.skip(f"{vocab_file} is absent (../shared is a developer/CI folder, not part of the project)")
    _assert_matches_transformers(vocab_file, lower_case)


def test_load_tokenizer_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_tokenizer(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        load_tokenizer(empty)
    no_specials = tmp_path / "plain.txt"
    no_specials.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"lacks special tokens \['\[PAD\]'"):
        load_tokenizer(no_specials)


BUILD_SETTINGS = dict(num_documents=200, corpus_seed=0, vocab_size=1000, lower_case=True, max_seq_length=64,
                      max_predictions_per_seq=10, masked_lm_prob=0.15, short_seq_prob=0.1, dupe_factor=2,
                      whole_word_mask=False, seed=7)


def test_build_demo_dataset_caches(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bertrecipes.data")
    first = build_demo_dataset(tmp_path, **BUILD_SETTINGS)
    assert any("trained WordPiece vocab" in r.message for r in caplog.records)
    vocab_mtime = first.vocab_file.stat().st_mtime_ns
    manifest_file = next(tmp_path.glob("*/manifest.json"))
    manifest = json.loads(manifest_file.read_text())
    assert manifest["num_instances"] == len(first) > 200
    assert manifest["max_seq_length"] == 64 and manifest["max_predictions_per_seq"] == 10
    assert manifest["vocab_size"] == first.vocab_size == len(first.vocab_file.read_text().splitlines())
    assert manifest["settings"]["dupe_factor"] == 2 and len(manifest["vocab_sha256"]) == 64
    assert not list(tmp_path.rglob(".*tmp*")), "no temp files may be left behind"

    caplog.clear()
    again = build_demo_dataset(tmp_path, **BUILD_SETTINGS)
    assert any("reusing cached dataset" in r.message for r in caplog.records)
    assert not any("trained WordPiece vocab" in r.message for r in caplog.records)
    np.testing.assert_array_equal(again.instances.input_ids, first.instances.input_ids)

    # Other instance settings: new instances, same vocab file untouched.
    caplog.clear()
    other = build_demo_dataset(tmp_path, **(BUILD_SETTINGS | {"dupe_factor": 1, "whole_word_mask": True}))
    assert any("reusing cached vocab" in r.message for r in caplog.records)
    assert other.vocab_file == first.vocab_file and other.vocab_file.stat().st_mtime_ns == vocab_mtime
    assert len(list(tmp_path.glob("*/manifest.json"))) == 2

    item = first[0]
    tokenizer = load_tokenizer(first.vocab_file)
    assert item["input_ids"][0] == tokenizer.token_to_id("[CLS]")
    assert 0.3 < first.instances.next_sentence_labels.mean() < 0.7


def test_build_demo_dataset_rebuilds_a_changed_cache(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    first = build_demo_dataset(tmp_path, **BUILD_SETTINGS)
    manifest_file = next(tmp_path.glob("*/manifest.json"))
    manifest = json.loads(manifest_file.read_text())
    manifest["vocab_sha256"] = "0" * 64
    manifest_file.write_text(json.dumps(manifest))
    caplog.set_level(logging.INFO, logger="bertrecipes.data")
    rebuilt = build_demo_dataset(tmp_path, **BUILD_SETTINGS)
    assert any("rebuilding" in r.message for r in caplog.records)
    np.testing.assert_array_equal(rebuilt.instances.input_ids, first.instances.input_ids)
