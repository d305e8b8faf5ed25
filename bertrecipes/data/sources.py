"""Documents from text corpora: local files in four formats and Hugging Face hub datasets, mixed by weight.

A document is a list of lines (paragraphs or sentences, stripped, none empty); sentence splitting
happens later, per line. Formats (``format: auto`` picks by extension, then by the first line):

* ``text``: one sentence or paragraph per line, a blank line between documents (Google BERT's input).
* ``wikiextractor``: WikiExtractor output, ``<doc id=... title="...">`` ... ``</doc>``; the first
  line, which repeats the title, is dropped.
* ``wikitext``: WikiText-103/-2 (``wiki.{train,valid,test}.{tokens,raw}``): an article per `` = Title = ``
  heading, section headings dropped, the ``@-@``, ``@,@`` and ``@.@`` splits joined again, and the
  ``<unk>`` placeholders left out (the file no longer has the rare words they replaced).
* ``jsonl``: one JSON object per line, the document in ``text_column``.
* ``parquet``: a table with a string column ``text_column`` (needs pyarrow, which `datasets` brings).
* ``hub``: any `datasets` hub dataset by ``name``/``config``/``split``, the text in ``text_column``
  (needs the network, or the dataset in the local `datasets` cache).

Files may be ``.gz``, ``.bz2`` or ``.xz`` compressed; a path may be a file, a directory (all files
under it, recursively, sorted) or a glob. Invalid UTF-8 is replaced with U+FFFD, counted per file and
warned about. Several sources are mixed document by document (round-robin); a source's ``weight`` is
how many times each of its documents is used, in expectation: 2 = twice, 0.5 = a fixed half of them
(chosen by a hash of the seed and the document's index, so the choice never depends on timing).

Usage::

    from bertrecipes.data.sources import SourceSpec, mix_documents, ReadStats
    stats = ReadStats()
    for lines, origin in mix_documents([SourceSpec(paths=("wiki/",), format="wikiextractor")], 0, stats):
        ...
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import html
import io
import json
import logging
import lzma
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bertrecipes.errors import UserError

__all__ = [
    "FORMATS",
    "DataSourceError",
    "ReadStats",
    "SourceSpec",
    "detect_format",
    "iter_source_documents",
    "mix_documents",
    "resolve_paths",
    "source_fingerprint",
]

logger = logging.getLogger("bertrecipes.data")

FORMATS = ("auto", "text", "wikiextractor", "wikitext", "jsonl", "parquet", "hub")
_LOCAL_FORMATS = ("text", "wikiextractor", "wikitext", "jsonl", "parquet")

Document = list[str]


class DataSourceError(UserError, ValueError):
    """A corpus source is missing, empty or malformed; the message names the file and what is expected."""


@dataclass(frozen=True)
class SourceSpec:
    """One corpus source: local files (``paths`` + ``format``) or a hub dataset (``format: hub``)."""

    paths: tuple[str, ...] = ()
    format: str = "auto"
    text_column: str = "text"
    name: str | None = None  # hub dataset, e.g. "wikimedia/wikipedia"
    config: str | None = None  # hub config, e.g. "20231101.en"
    split: str = "train"
    revision: str | None = None
    streaming: bool = False
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataSourceError(f"unknown source format {self.format!r}; valid: {', '.join(FORMATS)}")
        if self.format == "hub":
            if not self.name:
                raise DataSourceError(
                    "a format: hub source needs name (a hub dataset such as 'wikimedia/wikipedia')"
                )
        elif not self.paths:
            raise DataSourceError(
                f"a format: {self.format} source needs paths (files, directories or globs), "
                "e.g. data.paths=[corpus/*.txt]"
            )
        if not self.weight >= 0:
            raise DataSourceError(
                f"source weight must be >= 0, got {self.weight} (for {self.name or list(self.paths)})"
            )

    @property
    def label(self) -> str:
        if self.format == "hub":
            return f"hub:{self.name}" + (f"/{self.config}" if self.config else "") + f"[{self.split}]"
        return ", ".join(self.paths)


@dataclass
class ReadStats:
    """What reading the sources found: counts for the manifest and the final report."""

    files: int = 0
    input_bytes: int = 0
    documents_read: int = 0
    documents_used: int = 0  # after weights (copies and drops)
    empty_documents: int = 0
    invalid_utf8: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "input_bytes": self.input_bytes,
            "documents_read": self.documents_read,
            "documents_used": self.documents_used,
            "empty_documents": self.empty_documents,
            "invalid_utf8_sequences": sum(self.invalid_utf8.values()),
            "files_with_invalid_utf8": dict(sorted(self.invalid_utf8.items())),
        }


# --------------------------------------------------------------------------- files

_INVALID_UTF8 = [0]  # invalid sequences replaced so far in this process


def _count_and_replace(err: UnicodeError) -> tuple[str, int]:
    _INVALID_UTF8[0] += 1
    return "\ufffd", err.end  # type: ignore[attr-defined]


_ERRORS = "bertrecipes_count_replace"
codecs.register_error(_ERRORS, _count_and_replace)


def resolve_paths(patterns: tuple[str, ...] | list[str]) -> list[Path]:
    """Files named by `patterns` (files, directories searched recursively, globs), in a stable order."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(os.path.expanduser(str(pattern)))
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataSourceError(f"directory {str(path)!r} contains no files")
            files.extend(found)
        elif glob.has_magic(str(path)):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise DataSourceError(f"no file matches {str(pattern)!r}")
            files.extend(found)
        else:
            raise DataSourceError(
                f"corpus file {str(pattern)!r} does not exist (give files, directories or glob patterns)"
            )
    return files


def _open_binary(path: Path) -> BinaryIO:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix in (".xz", ".lzma"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    for compressed in (".gz", ".bz2", ".xz", ".lzma"):
        if name.endswith(compressed):
            name = name[: -len(compressed)]
    return Path(name).suffix


def detect_format(path: Path) -> str:
    """The format of one file: by extension (.jsonl/.json, .parquet, .tokens), else by its first
    non-blank line (WikiText: a `` = Title = `` line, and WikiText's ``@-@`` splits or ``<unk>`` in the
    first 64 KiB)."""
    suffix = _base_suffix(path)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".tokens":
        return "wikitext"
    try:
        with _open_binary(path) as raw:
            head = raw.read(1 << 16)
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise DataSourceError(f"cannot read corpus file {str(path)!r}: {err}") from err
    first = next((line.strip() for line in head.split(b"\n") if line.strip()), b"")
    if first.startswith(b"<doc "):
        return "wikiextractor"
    if _WIKITEXT_ARTICLE.match(first.decode("utf-8", "replace")) and any(
            mark in head for mark in (b" @-@ ", b" @,@ ", b" @.@ ", b" <unk> ")):
        return "wikitext"
    if first.startswith(b"{"):
        return "jsonl"
    return "text"


class _TextFile:
    """A text file opened for line reading with counted replacement of invalid UTF-8."""

    def __init__(self, path: Path, stats: ReadStats) -> None:
        self.path, self.stats = path, stats

    def __enter__(self) -> io.TextIOWrapper:
        self.before = _INVALID_UTF8[0]
        self.raw = _open_binary(self.path)
        self.text = io.TextIOWrapper(self.raw, encoding="utf-8", errors=_ERRORS)
        return self.text

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.stats.input_bytes += self.raw.tell()  # uncompressed bytes, at the end of the file
        finally:
            self.text.close()
        replaced = _INVALID_UTF8[0] - self.before
        if replaced:
            self.stats.invalid_utf8[str(self.path)] = (
                self.stats.invalid_utf8.get(str(self.path), 0) + replaced
            )
            logger.warning("%s: %d invalid UTF-8 byte sequence(s) replaced with U+FFFD", self.path, replaced)


def _lines_of(text: str) -> Document:
    return [s for s in (line.strip() for line in text.split("\n")) if s]


def _read_text(path: Path, stats: ReadStats) -> Iterator[Document]:
    with _TextFile(path, stats) as f:
        doc: Document = []
        for line in f:
            line = line.strip()
            if line:
                doc.append(line)
            elif doc:
                yield doc
                doc = []
        if doc:
            yield doc


_DOC_START = re.compile(r'<doc\b[^>]*?\btitle="([^"]*)"')


def _read_wikiextractor(path: Path, stats: ReadStats) -> Iterator[Document]:
    with _TextFile(path, stats) as f:
        doc: Document | None = None
        title = ""
        for number, line in enumerate(f, 1):
            if line.startswith("<doc"):
                if doc is not None:
                    logger.warning(
                        "%s:%d: <doc> inside an open <doc> (no </doc> before it); closing the previous one",
                        path,
                        number,
                    )
                    yield doc
                match = _DOC_START.match(line)
                title = html.unescape(match.group(1)).strip() if match else ""
                doc = []
            elif line.startswith("</doc>"):
                if doc is not None:
                    yield doc
                doc = None
            elif doc is not None:
                line = line.strip()
                if not line or (not doc and line == title):
                    continue  # WikiExtractor repeats the title as the document's first line
                doc.append(line)
        if doc is not None:
            logger.warning("%s: the last <doc> has no </doc>; keeping it", path)
            yield doc


_WIKITEXT_ARTICLE = re.compile(r"= [^=].* =$")  # " = Title = "; sections are " = = Section = = "
_WIKITEXT_SPLIT = re.compile(r" @([-,.])@(?: |$)")  # "0 @.@ 7" was "0.7", "well @-@ known" "well-known"


def _read_wikitext(path: Path, stats: ReadStats) -> Iterator[Document]:
    with _TextFile(path, stats) as f:
        doc: Document = []
        for line in f:
            line = line.strip()
            if _WIKITEXT_ARTICLE.match(line):
                if doc:
                    yield doc
                doc = []
            elif line and not (line.startswith("= ") and line.endswith(" =")):  # not a section heading
                line = " ".join(_WIKITEXT_SPLIT.sub(r"\1", line).replace("<unk>", "").split())
                if line:
                    doc.append(line)
        if doc:
            yield doc


def _document_text(row: Any, column: str, where: str) -> str:
    if not isinstance(row, dict):
        raise DataSourceError(
            f"{where}: expected a JSON object with a {column!r} field, got {type(row).__name__}"
        )
    if column not in row:
        raise DataSourceError(f"{where}: no {column!r} field (text_column); fields are {sorted(row)[:20]}")
    text = row[column]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataSourceError(f"{where}: field {column!r} must be a string, got {type(text).__name__}")
    return text


def _read_jsonl(path: Path, column: str, stats: ReadStats) -> Iterator[Document]:
    with _TextFile(path, stats) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataSourceError(
                    f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno}); "
                    "expected one JSON object per line"
                ) from err
            yield _lines_of(_document_text(row, column, f"{path}:{number}"))


def _read_parquet(path: Path, column: str, stats: ReadStats) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataSourceError("reading parquet needs pyarrow: pip install pyarrow (or datasets)") from err
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid/OSError types
        raise DataSourceError(f"cannot read parquet file {str(path)!r}: {err}") from err
    names = table.schema_arrow.names
    if column not in names:
        raise DataSourceError(
            f"parquet file {str(path)!r} has no column {column!r} (text_column); columns are {names}"
        )
    # input_bytes counts the text itself: a parquet file's size is its compressed size.
    for batch in table.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is None:
                text = ""
            elif not isinstance(text, str):
                raise DataSourceError(
                    f"parquet file {str(path)!r}: column {column!r} must hold strings, "
                    f"got {type(text).__name__}"
                )
            stats.input_bytes += len(text.encode("utf-8"))
            yield _lines_of(text)


def _read_hub(spec: SourceSpec, stats: ReadStats) -> Iterator[Document]:
    try:
        import datasets
    except ImportError as err:
        raise DataSourceError("format: hub needs the datasets library: pip install datasets") from err
    try:
        dataset = datasets.load_dataset(
            spec.name, spec.config, split=spec.split, revision=spec.revision, streaming=spec.streaming
        )
    except Exception as err:  # network, auth, unknown name: all reported the same way
        raise DataSourceError(f"cannot load hub dataset {spec.label}: {type(err).__name__}: {err}") from err
    columns = dataset.column_names
    if columns is not None and spec.text_column not in columns:
        raise DataSourceError(
            f"hub dataset {spec.label} has no column {spec.text_column!r} (text_column); "
            f"columns are {columns}"
        )
    for index, row in enumerate(dataset):
        text = _document_text(row, spec.text_column, f"{spec.label} row {index}")
        stats.input_bytes += len(text.encode("utf-8"))
        yield _lines_of(text)


def _read_file(path: Path, fmt: str, column: str, stats: ReadStats) -> Iterator[Document]:
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "text":
        yield from _read_text(path, stats)
    elif fmt == "wikiextractor":
        yield from _read_wikiextractor(path, stats)
    elif fmt == "wikitext":
        yield from _read_wikitext(path, stats)
    elif fmt == "jsonl":
        yield from _read_jsonl(path, column, stats)
    elif fmt == "parquet":
        yield from _read_parquet(path, column, stats)
    else:
        raise DataSourceError(f"format {fmt!r} is not a file format; valid: {', '.join(_LOCAL_FORMATS)}")


def iter_source_documents(spec: SourceSpec, stats: ReadStats) -> Iterator[tuple[Document, str]]:
    """(document, origin) pairs of one source, in file order; empty documents are counted and skipped."""
    if spec.format == "hub":
        readers = [(f"{spec.label}", _read_hub(spec, stats))]
    else:
        readers = [
            (str(path), _read_file(path, spec.format, spec.text_column, stats))
            for path in resolve_paths(spec.paths)
        ]
    for origin, documents in readers:
        stats.files += 1
        count = 0
        try:
            for doc in documents:
                stats.documents_read += 1
                if not doc:
                    stats.empty_documents += 1
                    continue
                count += 1
                yield doc, origin
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:
            raise DataSourceError(f"cannot read corpus file {origin!r}: {type(err).__name__}: {err}") from err
        if count == 0:
            logger.warning("%s contains no documents with text", origin)


def _mix64(*values: int) -> int:
    """A 64-bit hash of integers (SplitMix64 steps): a fixed, platform-independent pseudo-random draw."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h


def _weighted(
    spec: SourceSpec, source_index: int, seed: int, documents: Iterator[tuple[Document, str]]
) -> Iterator[tuple[Document, str]]:
    whole, fraction = int(spec.weight), spec.weight - int(spec.weight)
    threshold = int(fraction * 2**64)
    for index, item in enumerate(documents):
        copies = whole + (1 if fraction and _mix64(seed, source_index, index) < threshold else 0)
        for _ in range(copies):
            yield item


def mix_documents(specs: list[SourceSpec], seed: int, stats: ReadStats) -> Iterator[tuple[Document, str]]:
    """All sources' documents, weighted and interleaved one document at a time (deterministic)."""
    if not specs:
        raise DataSourceError("no corpus sources configured (set data.paths=[...] or data.sources)")
    if all(s.weight == 0 for s in specs):
        raise DataSourceError(f"every source has weight 0: {[s.label for s in specs]}")
    streams = [
        _weighted(s, i, seed, iter_source_documents(s, stats)) for i, s in enumerate(specs) if s.weight > 0
    ]
    while streams:
        alive = []
        for stream in streams:
            item = next(stream, None)
            if item is not None:
                stats.documents_used += 1
                yield item
                alive.append(stream)
        streams = alive


def source_fingerprint(spec: SourceSpec) -> dict[str, Any]:
    """What identifies a source's content for caching: its settings plus each file's path, size, mtime."""
    entry: dict[str, Any] = {"format": spec.format, "text_column": spec.text_column, "weight": spec.weight}
    if spec.format == "hub":
        entry.update(name=spec.name, config=spec.config, split=spec.split, revision=spec.revision)
        return entry
    files = []
    for path in resolve_paths(spec.paths):
        st = path.stat()
        files.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        if spec.format == "auto" and detect_format(path) == "wikitext":
            files[-1].append("wikitext")  # read as WikiText since format auto knew it: a new key
    entry["files"] = files
    return entry
