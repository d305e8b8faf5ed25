"""The rule-based sentence splitter on hand-written cases: each expected split was written by a person
reading the text, not produced by the splitter."""

from __future__ import annotations

import pytest

from bertrecipes.data.sentences import split_sentences

CASES = [
    # plain ends, ! and ?
    ("The cat sat. The dog ran! Did it? Yes.", ["The cat sat.", "The dog ran!", "Did it?", "Yes."]),
    # titles and abbreviations followed by a name never end a sentence
    (
        "Dr. Smith met Mr. Jones and Mrs. Brown at St. Mary's. They talked.",
        ["Dr. Smith met Mr. Jones and Mrs. Brown at St. Mary's.", "They talked."],
    ),
    (
        "Gen. Patton and Prof. Lee arrived. Nobody else did.",
        ["Gen. Patton and Prof. Lee arrived.", "Nobody else did."],
    ),
    # e.g. / i.e. / approx. / vs. before lower or upper case
    (
        "Use a fruit, e.g. an apple, i.e. Malus domestica. Then eat it.",
        ["Use a fruit, e.g. an apple, i.e. Malus domestica.", "Then eat it."],
    ),
    (
        "It weighs approx. five kilos. Roe v. Wade was decided in 1973.",
        ["It weighs approx. five kilos.", "Roe v. Wade was decided in 1973."],
    ),
    # initials
    (
        "J. R. R. Tolkien wrote it. George W. Bush read it.",
        ["J. R. R. Tolkien wrote it.", "George W. Bush read it."],
    ),
    # dotted acronyms: a break only before a typical sentence opener
    ("He moved to the U.S. The war had ended.", ["He moved to the U.S.", "The war had ended."]),
    ("She joined the U.S. Army in 1942. It was cold.", ["She joined the U.S. Army in 1942.", "It was cold."]),
    (
        "They met at 3 p.m. on Friday. He left at 5 p.m. The room was empty.",
        ["They met at 3 p.m. on Friday.", "He left at 5 p.m.", "The room was empty."],
    ),
    # decimals, versions, URLs: no whitespace after the period
    (
        "Pi is 3.14159 and the price was $1.5 million. Version 2.0.1 of example.com shipped.",
        ["Pi is 3.14159 and the price was $1.5 million.", "Version 2.0.1 of example.com shipped."],
    ),
    # abbreviations before numbers
    ("See Fig. 2 and No. 5 on pp. 10-12. Then stop.", ["See Fig. 2 and No. 5 on pp. 10-12.", "Then stop."]),
    ("It happened on Sept. 11, 2001. Nobody forgot.", ["It happened on Sept. 11, 2001.", "Nobody forgot."]),
    # ... but "no." at the end of a sentence is a word
    ("He said no. The meeting ended.", ["He said no.", "The meeting ended."]),
    # quotes and brackets after the period
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("(See the notes below.) The next part follows.", ["(See the notes below.)", "The next part follows."]),
    ("She asked 'why?' and left. He stayed.", ["She asked 'why?' and left.", "He stayed."]),
    ("“It is over,” she said. “Go home.” He went.", ["“It is over,” she said.", "“Go home.”", "He went."]),
    # ellipses
    (
        "Wait... what happened? I do not know… Maybe later.",
        ["Wait... what happened?", "I do not know…", "Maybe later."],
    ),
    ("And so on... The end.", ["And so on...", "The end."]),
    # companies
    (
        "He works at Apple Inc. The company grew. Acme Corp. Chairman Lee spoke.",
        ["He works at Apple Inc.", "The company grew.", "Acme Corp. Chairman Lee spoke."],
    ),
    # numbers can start a sentence
    (
        "The war ended in 1945. 25 million people had died.",
        ["The war ended in 1945.", "25 million people had died."],
    ),
    # CJK full stops need no space
    (
        "東京は日本の首都です。北京は中国の首都です。Then English.",
        ["東京は日本の首都です。", "北京は中国の首都です。", "Then English."],
    ),
    # no sentence end at all: the line is the sentence
    ("a heading without a period", ["a heading without a period"]),
    # lines are always sentence ends; blank lines vanish
    ("First line\n\nSecond line. Third one.\n", ["First line", "Second line.", "Third one."]),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0][:30] for c in CASES])
def test_hand_written_cases(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_long_sentences_are_cut_at_whitespace_without_losing_text() -> None:
    words = [f"w{i}" for i in range(3000)]
    text = " ".join(words)  # ~15,000 characters, no sentence end
    pieces = split_sentences(text, max_chars=1000)
    assert all(len(p) <= 1000 for p in pieces) and len(pieces) >= 15
    assert " ".join(pieces).split() == words  # every word kept, none split


def test_ten_megabyte_line_is_linear_time() -> None:
    import time

    line = "x" * 10_000_000  # no space, no period: cut hard every max_chars
    start = time.perf_counter()
    pieces = split_sentences(line)
    assert time.perf_counter() - start < 10
    assert "".join(pieces) == line and max(map(len, pieces)) == 2000


def test_bad_max_chars_is_named() -> None:
    with pytest.raises(ValueError, match="max_chars must be >= 1, got 0"):
        split_sentences("text", max_chars=0)
