"""A fast rule-based sentence splitter for pre-training text (no model, nothing downloaded).

BERT's next-sentence task needs documents cut into sentences. Corpora arrive one paragraph per line
(WikiExtractor, most JSONL dumps), so each line is split here; a line is always a sentence end.
The rules, in the order they are tried at each candidate end (``.``, ``!``, ``?``, ``...``, ``…``
followed by optional closing quotes or brackets and then whitespace):

* the next word must start like a sentence: an upper-case letter, a digit, or an opening quote or
  bracket; otherwise no break ("approx. five", "U.S. army", "Wait... what");
* ``!`` and ``?`` and anything followed by a closing quote/bracket always break (``He said "Stop." Then``);
* no break after a title or a similar abbreviation that is followed by a name (Mr., Dr., St., Gen.,
  e.g., i.e., cf., vs.), after a single upper-case initial (``J. R. R. Tolkien``), or after an
  abbreviation that is followed by a number when the next word is one (``No. 5``, ``Fig. 2``,
  ``Sept. 11``);
* after dotted acronyms (U.S., U.K., Ph.D., a.m.) and company suffixes (Inc., Ltd., Co., Corp.,
  Jr.) break only when the next word is a common sentence opener (The, He, In, ...), so
  "the U.S. The war" breaks but "the U.S. Army" does not;
* decimals ("3.14", "$1.5 million") and dotted names ("v1.2", "example.com") never break: no
  whitespace follows the period.

CJK full stops (``。！？``) always end a sentence, spaces or not. A "sentence" longer than
`max_chars` (a table or list flattened onto one line, a 10 MB line without a period) is cut at the
last whitespace before the limit, so its text is not lost to truncation later.

Usage::

    from bertrecipes.data.sentences import split_sentences
    split_sentences("Dr. Smith arrived at 3.15 p.m. on Jan. 5. He left.")
    # ['Dr. Smith arrived at 3.15 p.m. on Jan. 5.', 'He left.']
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_MAX_SENTENCE_CHARS", "SPLITTER_VERSION", "split_sentences"]

# Bump when a rule changes: prepared data caches record it, so a rule change rebuilds them.
SPLITTER_VERSION = 1
# About 400-500 WordPiece tokens of English: a piece still fits one seq512 instance.
DEFAULT_MAX_SENTENCE_CHARS = 2000

# A candidate end: terminal punctuation, optional closers, then whitespace (or a CJK full stop,
# which needs no space after it).
_CANDIDATE = re.compile(r"""([.!?…]+)(["'”’»)\]]*)\s+|([。！？]+[」』"'”’）)]*)\s*""")
_OPENERS = "\"'“‘«([¿¡"
_CLOSERS_STRIP = "\"'“‘«(["

# Followed by a name or a noun phrase: never a sentence end (compared in lower case, without the dot).
_NO_BREAK = frozenset(
    """
mr mrs ms mx dr prof rev hon fr sr st mt ft gen col lt sgt capt cmdr adm maj gov sen rep pres supt
det insp messrs mme mlle msgr brig cpl pvt vs v cf e.g i.e viz approx ca c esp incl dept univ assn
ave blvd rd
""".split()
)
# Followed by a number they do not end a sentence ("No. 5", "pp. 12", "Sept. 11").
_BEFORE_NUMBER = frozenset(
    """
no nos vol vols pp p fig figs eq eqs ch chap sec art op ed nr tab ref jan feb mar apr jun jul aug
sep sept oct nov dec
""".split()
)
# These do end sentences, but often do not: break only before a typical sentence opener.
_MAYBE_END = frozenset("inc ltd co corp bros jr esq plc llc al".split())
_SENTENCE_OPENERS = frozenset(
    """
The This That These Those There Then It Its He His She Her They Their We Our I In On At By For From
A An As After Before But However When While Since Although Though If During Many Most Some Other
Also Both Each In Today Later
""".split()
)
_DOTTED_ACRONYM = re.compile(r"(?:[^\W\d_]{1,3}\.)+[^\W\d_]{1,3}")  # U.S, Ph.D, a.m, e.g (dot removed)


def _is_break(line: str, punct_start: int, punct: str, closers: str, next_start: int) -> bool:
    """Whether the candidate end `punct` + `closers` at `punct_start`, followed by whitespace up to
    `next_start`, ends a sentence."""
    next_char = line[next_start]
    if next_char in _OPENERS:
        following = line[next_start + 1 : next_start + 2]
        starts_sentence = following == "" or following.isupper() or following.isdigit()
    else:
        starts_sentence = next_char.isupper() or next_char.isdigit()
    if not starts_sentence:
        return False
    if closers or "!" in punct or "?" in punct or punct != ".":
        return True  # a quote/bracket after the period, ! or ?, or an ellipsis before a capital
    word_start = max(line.rfind(" ", 0, punct_start), line.rfind("\t", 0, punct_start)) + 1
    word = line[word_start:punct_start].lstrip(_CLOSERS_STRIP)
    lower = word.lower()
    if lower in _NO_BREAK:
        return False
    if lower in _BEFORE_NUMBER and next_char.isdigit():
        return False
    if len(word) == 1 and word.isupper():
        return False  # an initial
    if lower in _MAYBE_END or _DOTTED_ACRONYM.fullmatch(word):
        next_end = line.find(" ", next_start)
        next_word = line[next_start : next_end if next_end >= 0 else len(line)]
        return next_word.strip(_OPENERS + ",;:") in _SENTENCE_OPENERS
    return True


def _cut_long(sentence: str, max_chars: int, out: list[str]) -> None:
    # Offsets, not re-slicing the remainder: a 10 MB line must cost O(n), not O(n^2 / max_chars).
    start, n = 0, len(sentence)
    while n - start > max_chars:
        cut = sentence.rfind(" ", start + 1, start + max_chars + 1)
        if cut < 0:
            cut = start + max_chars  # no space at all (a very long "word"): cut anyway
        piece = sentence[start:cut].strip()
        if piece:
            out.append(piece)
        start = cut
        while start < n and sentence[start].isspace():
            start += 1
    rest = sentence[start:].strip()
    if rest:
        out.append(rest)


def split_sentences(text: str, max_chars: int = DEFAULT_MAX_SENTENCE_CHARS) -> list[str]:
    """Sentences of `text` (one or more lines), stripped, empty ones dropped; see the module docstring."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    out: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        start = 0
        for match in _CANDIDATE.finditer(line):
            end = match.end()
            if end >= len(line):
                break  # the line's end is a sentence end anyway
            if match.group(3) is not None:
                is_break = True
            else:
                is_break = _is_break(line, match.start(1), match.group(1), match.group(2), end)
            if is_break:
                sentence = line[start:end].rstrip()
                if len(sentence) > max_chars:
                    _cut_long(sentence, max_chars, out)
                elif sentence:
                    out.append(sentence)
                start = end
        rest = line[start:].rstrip()
        if len(rest) > max_chars:
            _cut_long(rest, max_chars, out)
        elif rest:
            out.append(rest)
    return out
