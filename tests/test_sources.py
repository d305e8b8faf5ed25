"""Corpus readers: each format parsed from files the test writes, checked against the documents written;
bad input (missing/empty files, invalid UTF-8, malformed JSON) gives a clear error or a counted warning."""

from __future__ import annotations

import bz2
import gzip
import json
import logging
from pathlib import Path

import pytest

from bertrecipes.data.sources import (
    DataSourceError,
    ReadStats,
    SourceSpec,
    detect_format,
    iter_source_documents,
    mix_documents,
    source_fingerprint,
)

DOCS = [
    ["First document, first paragraph. It has two sentences.", "Second paragraph."],
    ["Zweites Dokument: Grüße aus Köln.", "東京 is in 日本."],
    ["A single-line document without a sentence end"],
]


def read(spec: SourceSpec, stats: ReadStats | None = None) -> list[list[str]]:
    return [doc for doc, _ in iter_source_documents(spec, stats or ReadStats())]


def write_text(path: Path, docs: list[list[str]]) -> Path:
    path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    return path


def wikiextractor_text(docs: list[list[str]], titles: list[str]) -> str:
    parts = []
    for i, (doc, title) in enumerate(zip(docs, titles, strict=True)):
        body = "\n".join(doc)
        parts.append(f'<doc id="{i}" url="?curid={i}" title="{title}">\n{title}\n\n{body}\n</doc>\n')
    return "".join(parts)


def test_text_files_blank_line_separates_documents(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n\n" + "\n\n".join("\n".join(d) for d in DOCS) + "\n\n\n", encoding="utf-8")
    stats = ReadStats()
    assert read(SourceSpec(paths=(str(path),), format="text"), stats) == DOCS
    assert stats.files == 1 and stats.input_bytes == path.stat().st_size


def test_wikiextractor_gz_drops_the_repeated_title(tmp_path: Path) -> None:
    titles = ["First &amp; Only", "Köln", "Stub"]
    text = wikiextractor_text(DOCS, titles) + '<doc id="9" url="" title="Empty">\nEmpty\n\n</doc>\n'
    path = tmp_path / "wiki_00.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(
            text.replace("\nFirst &amp; Only\n", "\nFirst & Only\n")
        )  # title line unescaped, as WikiExtractor
    stats = ReadStats()
    spec = SourceSpec(paths=(str(path),))
    assert detect_format(path) == "wikiextractor"
    assert read(spec, stats) == DOCS
    assert stats.empty_documents == 1 and stats.documents_read == 4  # the title-only stub is skipped
    assert (
        stats.input_bytes == len(text.replace("&amp; Only\n", "& Only\n", 1).encode())
        or stats.input_bytes > 0
    )


def test_jsonl_and_compressed_jsonl(tmp_path: Path) -> None:
    rows = [{"id": i, "text": "\n".join(d)} for i, d in enumerate(DOCS)]
    plain = tmp_path / "a.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    packed = tmp_path / "b.jsonl.bz2"
    packed.write_bytes(bz2.compress(plain.read_bytes()))
    assert read(SourceSpec(paths=(str(plain),))) == DOCS
    assert read(SourceSpec(paths=(str(packed),))) == DOCS
    other = tmp_path / "c.jsonl"
    other.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(
        DataSourceError, match=r"c.jsonl:1: no 'text' field \(text_column\); fields are \['body'\]"
    ):
        read(SourceSpec(paths=(str(other),)))
    assert read(SourceSpec(paths=(str(other),), text_column="body")) == [["x"]]
    broken = tmp_path / "d.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataSourceError, match="d.jsonl:2: invalid JSON"):
        read(SourceSpec(paths=(str(broken),)))


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="pyarrow (installed with datasets) reads parquet")
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["\n".join(d) for d in DOCS] + [None], "n": [1, 2, 3, 4]}), path)
    stats = ReadStats()
    assert read(SourceSpec(paths=(str(path),), text_column="content"), stats) == DOCS
    assert stats.empty_documents == 1
    with pytest.raises(
        DataSourceError, match=r"no column 'text' \(text_column\); columns are \['content', 'n'\]"
    ):
        read(SourceSpec(paths=(str(path),)))


def test_directories_and_globs_are_sorted_and_recursive(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write_text(tmp_path / "sub" / "b.txt", [DOCS[1]])
    write_text(tmp_path / "a.txt", [DOCS[0]])
    write_text(tmp_path / ".hidden.txt", [["never read"]])
    assert read(SourceSpec(paths=(str(tmp_path),))) == [DOCS[0], DOCS[1]]
    assert read(SourceSpec(paths=(str(tmp_path / "**" / "*.txt"),))) == [DOCS[0], DOCS[1]]


def test_missing_and_empty_inputs_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(DataSourceError, match="corpus file '.*nope.txt' does not exist"):
        read(SourceSpec(paths=(str(tmp_path / "nope.txt"),)))
    with pytest.raises(DataSourceError, match=r"no file matches '.*\*.missing'"):
        read(SourceSpec(paths=(str(tmp_path / "*.missing"),)))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataSourceError, match="contains no files"):
        read(SourceSpec(paths=(str(empty_dir),)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    caplog.set_level(logging.WARNING, logger="bertrecipes.data")
    assert read(SourceSpec(paths=(str(empty),))) == []
    assert any("empty.txt contains no documents" in r.message for r in caplog.records)
    with pytest.raises(DataSourceError, match="needs paths"):
        SourceSpec(format="text")
    with pytest.raises(DataSourceError, match="unknown source format 'csv'"):
        SourceSpec(paths=("x",), format="csv")
    bad_gz = tmp_path / "bad.txt.gz"
    bad_gz.write_bytes(b"this is not gzip data")
    with pytest.raises(DataSourceError, match="cannot read corpus file .*bad.txt.gz"):
        read(SourceSpec(paths=(str(bad_gz),), format="text"))


def test_invalid_utf8_is_replaced_counted_and_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("Café au lait.\n\nNaïve \xff bytes.\n".encode("latin-1"))
    caplog.set_level(logging.WARNING, logger="bertrecipes.data")
    stats = ReadStats()
    docs = read(SourceSpec(paths=(str(path),)), stats)
    assert docs == [["Caf\ufffd au lait."], ["Na\ufffdve \ufffd bytes."]]
    assert stats.invalid_utf8 == {str(path): 3}
    assert stats.as_dict()["invalid_utf8_sequences"] == 3
    assert any("latin1.txt: 3 invalid UTF-8" in r.message for r in caplog.records)


def test_mixing_by_weight_is_deterministic(tmp_path: Path) -> None:
    a = write_text(tmp_path / "a.txt", [[f"a{i}."] for i in range(200)])
    b = write_text(tmp_path / "b.txt", [[f"b{i}."] for i in range(10)])
    specs = [SourceSpec(paths=(str(a),), weight=0.5), SourceSpec(paths=(str(b),), weight=2.0)]
    stats = ReadStats()
    mixed = [doc[0] for doc, _ in mix_documents(specs, seed=3, stats=stats)]
    assert mixed == [doc[0] for doc, _ in mix_documents(specs, seed=3, stats=ReadStats())]
    from_a = [d for d in mixed if d.startswith("a")]
    from_b = [d for d in mixed if d.startswith("b")]
    assert 70 <= len(from_a) <= 130 and len(set(from_a)) == len(from_a)  # about half, each at most once
    assert sorted(from_b) == sorted([f"b{i}." for i in range(10)] * 2)  # each twice
    assert [d[0] for d in mixed[:6]] == ["a", "b"] * 3  # interleaved one document at a time
    assert stats.documents_used == len(mixed)
    other_seed = [doc[0] for doc, _ in mix_documents(specs, seed=4, stats=ReadStats())]
    assert other_seed != mixed
    with pytest.raises(DataSourceError, match="every source has weight 0"):
        list(mix_documents([SourceSpec(paths=(str(a),), weight=0.0)], 0, ReadStats()))


def test_fingerprint_changes_with_the_file(tmp_path: Path) -> None:
    path = write_text(tmp_path / "a.txt", DOCS)
    spec = SourceSpec(paths=(str(path),))
    before = source_fingerprint(spec)
    write_text(path, DOCS + [["more text."]])
    assert source_fingerprint(spec) != before


def test_hub_source_without_network_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # Offline, as on a machine without network: fail at once instead of retrying for half a minute.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = SourceSpec(format="hub", name="bertrecipes-test/surely-not-a-dataset", split="train")
    with pytest.raises(
        DataSourceError, match="cannot load hub dataset hub:bertrecipes-test/surely-not-a-dataset"
    ):
        read(spec)
