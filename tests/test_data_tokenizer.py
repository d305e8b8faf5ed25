"""Token ids of the data pipeline equal transformers' BERT tokenizers on the same vocab file.

Two references: `transformers.BertTokenizer` and `BertTokenizerLegacy` (the original pure-Python BERT
tokenizer, sharing no code with the `tokenizers` library). Checked: `load_tokenizer` and the pipeline's
`CachedWordEncoder` (word cache + ASCII fast path), on text chosen to break tokenizers: accents,
punctuation of every kind, CJK, unknown and over-long words, control characters, case. The real
bert-base vocabularies come from ../shared when it is present (skipped otherwise); a WordPiece vocab
trained on the demo corpus is always tested.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bertrecipes.data import generate_demo_corpus, load_tokenizer, train_wordpiece
from bertrecipes.data.tokenizer import CachedWordEncoder

SHARED_VOCAB_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vocab"

# Where transformers' two tokenizers disagree with each other, we follow BertTokenizer (the `tokenizers`
# library): the legacy class NFC-composes decomposed accents first (visible with a cased vocab) and
# lower-cases with Python's context-sensitive str.lower (word-final Σ -> ς, not σ).
FAST_ONLY_TEXTS = [
    "ΟΔΥΣΣΕΥΣ: Greek final sigma ΟΔΟΣ ΑΒ.",
    "Cafe\u0301 (decomposed é) and \u0301leading combining mark.",
]

TEXTS = [
    # accents, composed and decomposed, and case
    "Héllo, Wörld! Crème brûlée, naïve façade, résumé; Ångström — São Paulo, Škoda, Łódź.",
    "ÉCOLE NORMALE SUPÉRIEURE, Ünïcödé ÀÉÎÕÜ and ß, İstanbul.",
    "Σίσυφος and Ελληνικά κείμενα; ΑΒΓ.",
    # punctuation of every kind
    "Quotes “curly” ‘single’ «guillemets» „low“ 'plain' \"double\"; dashes – — ‒ ―; ellipsis…",
    "ASCII: !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ and a_b, c-d, e.f, g/h, 3.14, $1,000.50, 50%, #tag @user",
    "Math ≤ ≥ ≠ ± × ÷ √ ∞ ∑; currency € £ ¥ ₹ ₿; symbols © ® ™ § ¶ † ‡ • °C.",
    # CJK and other scripts
    "東京 is in 日本; 北京 too. 한국어 텍스트 and ひらがな・カタカナ。中文标点，还有“引号”！",
    "Русский текст, עברית, العربية, हिन्दी, ไทย and emoji 😀👍🏽 in one line.",
    # unknown and very long words
    "xyzzyplughfrobnicate zzzqqqxxx qwxzvbnm Grüße " + "A" * 120 + " " + "é" * 101 + " ok",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    # control characters and unusual whitespace
    "Tabs\tand\nnewlines\r\nand\u00a0nbsp\u200bzero-width\u2028line-sep and \x07 bell \x00 nul a\x1fb \x7f.",
    "  leading and trailing spaces   and    runs  ",
    "",
    # mixed
    "SHOUTING Astronauts REPAIRED the Satellites!!! In 1990, U.S. G.D.P. grew 3.5% (approx.).",
]


def _demo_sentences() -> list[str]:
    return [s for d in generate_demo_corpus(num_documents=30, seed=0) for s in d]


@pytest.fixture(scope="module")
def demo_vocab(tmp_path_factory) -> dict[bool, Path]:
    out = tmp_path_factory.mktemp("vocab")
    docs = generate_demo_corpus(num_documents=200, seed=0)
    return {lower: train_wordpiece(docs, 1200, lower, out / f"vocab-{lower}.txt") for lower in (True, False)}


def _references(vocab_file: Path, lower_case: bool) -> list:
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    return [
        BertTokenizer(str(vocab_file), do_lower_case=lower_case),
        BertTokenizerLegacy(str(vocab_file), do_lower_case=lower_case),
    ]


def _assert_pipeline_ids_match(vocab_file: Path, lower_case: bool) -> None:
    texts = TEXTS + FAST_ONLY_TEXTS + _demo_sentences()
    ours = load_tokenizer(vocab_file, lower_case=lower_case)
    encoder = CachedWordEncoder(ours)
    # Twice: the second pass is served from the word cache, the first fills it.
    for _ in range(2):
        flat, lengths = encoder.encode_flat(texts)
        assert lengths.sum() == len(flat)
        per_text = np.split(flat, np.cumsum(lengths)[:-1])
        for reference in _references(vocab_file, lower_case):
            for text, got in zip(texts, per_text, strict=True):
                if text in FAST_ONLY_TEXTS and type(reference).__name__ == "BertTokenizerLegacy":
                    continue
                want = reference(text, add_special_tokens=False)["input_ids"]
                assert ours.encode(text, add_special_tokens=False).ids == want, (
                    type(reference).__name__,
                    text,
                )
                assert got.tolist() == want, (type(reference).__name__, text)


@pytest.mark.parametrize("lower_case", [True, False])
def test_pipeline_ids_equal_transformers_on_a_trained_vocab(
    demo_vocab: dict[bool, Path], lower_case: bool
) -> None:
    _assert_pipeline_ids_match(demo_vocab[lower_case], lower_case)


@pytest.mark.parametrize(("name", "lower_case"), [("uncased", True), ("cased", False)])
def test_pipeline_ids_equal_transformers_on_bert_vocab(name: str, lower_case: bool) -> None:
    vocab_file = SHARED_VOCAB_DIR / f"bert-base-{name}-vocab.txt"
    if not vocab_file.is_file():
        pytest.skip(f"{vocab_file} is absent (../shared is a developer/CI folder, not part of the project)")
    _assert_pipeline_ids_match(vocab_file, lower_case)


def test_cached_encoder_equals_the_tokenizer_on_many_random_strings(demo_vocab: dict[bool, Path]) -> None:
    """Random strings over an alphabet of troublemakers, against the `tokenizers` library directly."""
    tokenizer = load_tokenizer(demo_vocab[True], lower_case=True)
    alphabet = list("abcXYZ019 .,;-'\"()\t\n") + [
        "é",
        "\u0301",
        "東",
        "\x00",
        "\x1f",
        "\u00a0",
        "Σ",
        "ß",
        "İ",
    ]
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 40))) for _ in range(500)]
    flat, lengths = CachedWordEncoder(tokenizer).encode_flat(texts)
    want = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    assert lengths.tolist() == [len(w) for w in want]
    assert flat.tolist() == [i for w in want for i in w]


def test_trainer_follows_the_merge_rule_worked_by_hand(tmp_path: Path) -> None:
    """Sennrich et al.'s example corpus (low x5, lower x2, newest x6, widest x3), worked by hand:
    pieces start as first character + ##continuations; the alphabet is ordered by count (ties by
    text); each step merges the most frequent adjacent pair, ties going to the smaller text."""
    words = ["low"] * 5 + ["lower"] * 2 + ["newest"] * 6 + ["widest"] * 3
    alphabet = ["##e", "##w", "##s", "##t", "##o", "l", "n", "##d", "##i", "w", "##r"]
    # (##e,##s)=9 ties (##s,##t)=9 -> "##es"; (##es,##t)=9 -> "##est"; (##o,##w)=7 ties (l,##o)=7
    # -> "##ow"; (l,##ow)=7 -> "low".
    merges = ["##es", "##est", "##ow", "low"]
    vocab = train_wordpiece([[" ".join(words)]], 5 + len(alphabet) + len(merges), True, tmp_path / "v.txt")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert vocab.read_text().splitlines() == [*specials, *alphabet, *merges]
    # min_frequency: with a large budget, merging stops once no pair occurs twice
    big = train_wordpiece([[" ".join(words)]], 1000, True, tmp_path / "big.txt").read_text().splitlines()
    assert {"newest", "widest", "low", "lower"} <= set(big) and len(big) < 1000


def test_trained_vocabulary_is_the_same_file_in_every_process(tmp_path: Path) -> None:
    """The `tokenizers` trainer breaks ties in hash order (a different file per process); ours must not."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from bertrecipes.data import generate_demo_corpus, "
            "train_wordpiece; train_wordpiece(generate_demo_corpus(300, 0), 700, True, Path(sys.argv[1]))")
    files = []
    for i in range(2):
        out = tmp_path / f"vocab{i}.txt"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=120)
        files.append(out.read_bytes())
    assert files[0] == files[1] and len(files[0].splitlines()) == 700
