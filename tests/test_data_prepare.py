"""The corpus pipeline end to end on small corpora written by the test: raw text -> shards -> loader.

Checked against independent facts: the shards hold runs of the corpus as the `tokenizers` library
tokenizes it; two builds with different process counts are byte-identical; resumed and multi-rank
loaders see exactly the samples an uninterrupted single loader defines; mismatched settings and bad
input give one clear error naming the file or both sides.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bertrecipes.data import PretrainingLoader, generate_demo_corpus, load_tokenizer, train_wordpiece
from bertrecipes.data.build import build_pretraining_dataset, open_prepared_dataset
from bertrecipes.data.prepare import CorpusSettings, DataPreparationError, InstanceSettings, prepare_corpus
from bertrecipes.data.shards import PreparedDataMismatch
from bertrecipes.data.sources import DataSourceError, SourceSpec
from bertrecipes.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SEQ, PRED = 64, 10


def write_corpus(directory: Path, num_documents: int = 240, seed: int = 0) -> Path:
    """Demo documents as three text files and one WikiExtractor .gz (two or three sentences per line)."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = generate_demo_corpus(num_documents=num_documents, seed=seed)
    groups = [docs[i::4] for i in range(4)]
    for i, group in enumerate(groups[:3]):
        text = "\n\n".join("\n".join(" ".join(d[j : j + 3]) for j in range(0, len(d), 3)) for d in group)
        (directory / f"part{i}.txt").write_text(text + "\n", encoding="utf-8")
    with gzip.open(directory / "wiki_00.gz", "wt", encoding="utf-8") as f:
        for k, d in enumerate(groups[3]):
            f.write(f'<doc id="{k}" url="" title="Doc {k}">\nDoc {k}\n\n' + "\n".join(d) + "\n</doc>\n")
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    docs = generate_demo_corpus(num_documents=300, seed=0)
    return train_wordpiece(docs, 1000, True, tmp_path_factory.mktemp("vocab") / "vocab.txt")


def settings(corpus: Path, vocab: Path, **changes) -> CorpusSettings:
    fields = dict(sources=(SourceSpec(paths=(str(corpus),)),), vocab_file=vocab, documents_per_shard=50)
    return CorpusSettings(**(fields | changes))


def phase(**changes) -> InstanceSettings:
    return InstanceSettings(
        **(dict(max_seq_length=SEQ, max_predictions_per_seq=PRED, dupe_factor=2) | changes)
    )


@pytest.fixture(scope="module")
def built(corpus: Path, vocab: Path, tmp_path_factory) -> dict:
    """The same corpus prepared with 1 and with 2 processes, static masks; and once with dynamic masks."""
    out = {}
    for procs in (1, 2):
        cache = tmp_path_factory.mktemp(f"cache{procs}")
        out[procs] = prepare_corpus(settings(corpus, vocab), phase(), cache, num_proc=procs, progress=False)
        out[f"cache{procs}"] = cache
    out["dynamic"] = prepare_corpus(
        settings(corpus, vocab), phase(masking="dynamic"), out["cache1"], num_proc=1, progress=False
    )
    return out


def test_output_is_identical_for_any_number_of_processes(built: dict) -> None:
    one, two = built[1].directory, built[2].directory
    assert one.name == two.name and built[1].manifest["num_instances"] == built[2].manifest["num_instances"]
    files = sorted(p.relative_to(one) for p in one.rglob("*.npy"))
    assert len(files) >= 5 * 4  # several shards, all arrays
    assert files == sorted(p.relative_to(two) for p in two.rglob("*.npy"))
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    manifest = built[1].manifest
    assert len(manifest["shards"]) == 5  # 240 documents, 50 per shard
    assert manifest["max_seq_length"] == SEQ and len(manifest["vocab_sha256"]) == 64
    assert manifest["stats"]["documents"] == 240 and manifest["stats"]["read"]["files"] == 4


def test_rerun_reuses_the_cache_and_a_new_phase_reuses_the_tokens(
    built: dict, corpus: Path, vocab: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bertrecipes.data")
    again = prepare_corpus(settings(corpus, vocab), phase(), built["cache1"], num_proc=2, progress=False)
    assert again.reused and again.directory == built[1].directory
    longer = prepare_corpus(
        settings(corpus, vocab),
        phase(max_seq_length=128, max_predictions_per_seq=20),
        built["cache1"],
        num_proc=1,
        progress=False,
    )
    assert not longer.reused and longer.directory.parent == built[1].directory.parent
    assert any("reusing tokenized corpus" in r.message for r in caplog.records)
    assert longer.manifest["stats"]["tokens"] == built[1].manifest["stats"]["tokens"]


def test_shards_hold_runs_of_the_corpus_as_tokenized(built: dict, corpus: Path, vocab: Path) -> None:
    """Unmasked (dynamic) rows: A and B are each a contiguous run of one document's tokens, [CLS] A [SEP]
    B [SEP], segment ids 0 then 1; is-next B continues A's document."""
    tokenizer = load_tokenizer(vocab)
    docs = [
        d for part in sorted(corpus.glob("part*.txt")) for d in part.read_text(encoding="utf-8").split("\n\n")
    ]
    doc_tokens = [
        np.array(tokenizer.encode(d.replace("\n", " "), add_special_tokens=False).ids, np.int32)
        for d in docs
        if d.strip()
    ]
    haystack = [t.tobytes() for t in doc_tokens]

    def documents_containing(run: np.ndarray) -> set[int]:
        needle = run.astype(np.int32).tobytes()
        return {i for i, h in enumerate(haystack) if needle in h and (h.find(needle) % 4 == 0)}

    dataset = open_prepared_dataset(built["dynamic"].directory)
    store = dataset.instances
    rows = store.gather(np.arange(len(store)))
    special = {tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]")}
    checked = 0
    for r in range(len(store)):
        ids, length, b = (
            rows["input_ids"][r].astype(np.int64),
            int(rows["lengths"][r]),
            int(rows["segment_b_start"][r]),
        )
        assert ids[0] == tokenizer.token_to_id("[CLS]") and ids[b - 1] == ids[
            length - 1
        ] == tokenizer.token_to_id("[SEP]")
        assert (
            not ids[length:].any()
            and not set(ids[1 : b - 1]) & special
            and not set(ids[b : length - 1]) & special
        )
        np.testing.assert_array_equal(
            rows["token_type_ids"][r], (np.arange(SEQ) >= b) & (np.arange(SEQ) < length)
        )
        a_docs, b_docs = documents_containing(ids[1 : b - 1]), documents_containing(ids[b : length - 1])
        # Text-file documents only (the .gz ones were not tokenized here): check those found.
        if a_docs and b_docs and rows["next_sentence_labels"][r] == 0:
            assert a_docs & b_docs, "an is-next pair must come from one document"
            checked += 1
    assert checked > 50


def test_mismatched_shards_are_refused_naming_both(built: dict, tmp_path: Path) -> None:
    directory = built[1].directory
    with pytest.raises(PreparedDataMismatch, match="max_seq_length: the data has 64, this run has 128"):
        open_prepared_dataset(directory, max_seq_length=128, max_predictions_per_seq=PRED)
    with pytest.raises(
        PreparedDataMismatch, match="max_predictions_per_seq: the data has 10, this run has 20"
    ):
        open_prepared_dataset(directory, max_seq_length=SEQ, max_predictions_per_seq=20)
    other = tmp_path / "other-vocab.txt"
    other.write_text(directory.joinpath("vocab.txt").read_text() + "extra\n")
    with pytest.raises(
        PreparedDataMismatch, match=r"tokenized with '.*vocab.txt' .* this run uses '.*other-vocab.txt'"
    ):
        open_prepared_dataset(directory, vocab_file=other)
    with pytest.raises(PreparedDataMismatch, match="not complete prepared pre-training data"):
        open_prepared_dataset(tmp_path)
    dataset = open_prepared_dataset(
        directory, max_seq_length=SEQ, max_predictions_per_seq=PRED, vocab_file=directory / "vocab.txt"
    )
    assert len(dataset) == built[1].manifest["num_instances"]


def test_prepared_shards_used_with_other_data_settings_say_so(built: dict, make_cfg, caplog) -> None:
    manifest = built[1].manifest
    assert manifest["masking"] == "static" and manifest["masked_lm_prob"] == pytest.approx(0.15)
    cfg = make_cfg("data=text_files", f"data.prepared_dir={built[1].directory}", "data.masking=dynamic",
                   "data.masked_lm_prob=0.4", f"max_seq_length={SEQ}", f"max_predictions_per_seq={PRED}")
    caplog.set_level(logging.WARNING, logger="bertrecipes.data")
    dataset = build_pretraining_dataset(cfg)
    assert dataset.dynamic_masking is None  # the shards' static masks, as they are
    assert "masking='static' (this run's data.masking='dynamic')" in caplog.text
    assert "masked_lm_prob=0.15 (this run's data.masked_lm_prob=0.4)" in caplog.text


def test_a_run_resumes_on_its_corpus_staged_at_another_path(make_cfg, corpus: Path, vocab: Path,
                                                             tmp_path: Path) -> None:
    """The resume check compares the instances, not the files' paths and times: a corpus copied to
    node-local scratch before a preempted job resumes is the same data."""
    from bertrecipes.engine import train

    common = ["data=text_files", f"data.vocab_file={vocab}", "data.num_proc=1", "data.dupe_factor=1",
              f"max_seq_length={SEQ}", f"max_predictions_per_seq={PRED}", "model=bert_tiny",
              "model.hidden_size=32", "model.intermediate_size=64", "train_batch_size=8",
              "train_micro_batch_size_per_gpu=4", "steps_per_print=1"]
    out = tmp_path / "run"
    train(make_cfg(*common, f"data.paths=[{corpus}]", "max_steps=2", output_dir=out))
    staged = tmp_path / "scratch" / corpus.name  # a directory of text files
    shutil.copytree(corpus, staged)
    summary = train(make_cfg(*common, f"data.paths=[{staged}]", "max_steps=3", "resume=true", output_dir=out))
    assert summary["global_step"] == 3


def _row_ids(batch: dict[str, torch.Tensor]) -> list[bytes]:
    return [bytes(row.numpy().tobytes()) for row in batch["input_ids"]]


@pytest.mark.parametrize("which", [1, "dynamic"])
def test_resume_with_shards_and_workers_equals_an_uninterrupted_run(built: dict, which) -> None:
    dataset = open_prepared_dataset(built[which].directory)
    micro, world, rank = 8, 2, 1
    per_epoch = len(dataset) // (micro * world)
    total = per_epoch + 5  # crosses an epoch boundary: new permutation (and new dynamic masks)
    full = list(
        itertools.islice(PretrainingLoader(dataset, micro, seed=3, rank=rank, world_size=world), total)
    )
    cut = per_epoch - 2
    resumed_loader = PretrainingLoader(
        dataset, micro, seed=3, rank=rank, world_size=world, start_sample=cut * micro * world, num_workers=2
    )
    resumed = list(itertools.islice(resumed_loader, total - cut))
    assert resumed_loader.epoch == 1
    for a, b in zip(full[cut:], resumed, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_two_ranks_get_disjoint_equal_streams_when_data_does_not_divide(built: dict) -> None:
    dataset = open_prepared_dataset(built[1].directory)
    micro, world = 7, 2
    assert len(dataset) % (micro * world) != 0
    loaders = [PretrainingLoader(dataset, micro, seed=0, rank=r, world_size=world) for r in range(world)]
    per_epoch = len(dataset) // (micro * world)  # whole steps within the first epoch
    streams = [[_row_ids(b) for b in itertools.islice(iter(ld), per_epoch)] for ld in loaders]
    seen = [set(itertools.chain.from_iterable(s)) for s in streams]
    assert [len(s) for s in streams] == [per_epoch, per_epoch]
    assert all(len(batch) == micro for s in streams for batch in s)
    assert not seen[0] & seen[1]
    assert len(seen[0]) + len(seen[1]) == per_epoch * micro * world


@pytest.mark.parametrize("which", [1, "dynamic"])
def test_batches_are_well_formed(built: dict, which) -> None:
    dataset = open_prepared_dataset(built[which].directory)
    batch = dataset.get_batch(np.arange(len(dataset)))
    assert all(v.dtype == torch.long for v in batch.values())
    assert torch.equal(batch["length"], batch["attention_mask"].sum(dim=1))  # the true length
    assert torch.equal(batch["length"], (batch["input_ids"] != 0).sum(dim=1))
    labels, positions = batch["masked_lm_labels"], batch["masked_lm_positions"]
    used = labels != -100
    assert used.any(dim=1).all() and (labels[used] >= 0).all() and (labels[used] < dataset.vocab_size).all()
    assert (positions[used] > 0).all() and (
        positions[used] < batch["length"][:, None].expand_as(positions)[used]
    ).all()
    assert (positions[~used] == 0).all()


def test_bad_input_is_handled_or_named(
    corpus: Path, vocab: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DataSourceError, match="missing.txt' does not exist"):
        prepare_corpus(settings(tmp_path / "missing.txt", vocab), phase(), cache, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataPreparationError, match="yielded no documents with text"):
        prepare_corpus(settings(empty, vocab), phase(), cache, progress=False)
    with pytest.raises(Exception, match="vocab file .*nope.txt' does not exist"):
        prepare_corpus(settings(corpus, tmp_path / "nope.txt"), phase(), cache, progress=False)

    # No sentence end anywhere, a 10 MB single-line document, invalid UTF-8: all handled.
    odd = tmp_path / "odd"
    odd.mkdir()
    words = " ".join(s.rstrip(".!?").lower() for d in generate_demo_corpus(20, seed=1) for s in d)
    (odd / "no_periods.txt").write_text(f"{words}\n\n{words[:500]}\n", encoding="utf-8")
    (odd / "huge_line.txt").write_text(
        (words + " ") * (10_000_000 // (len(words) + 1)) + "\n", encoding="utf-8"
    )
    (odd / "latin1.txt").write_bytes(
        "Caf\xe9 au lait. Na\xefve text here.\n\nAnother document.\n".encode("latin-1")
    )
    caplog.set_level(logging.WARNING, logger="bertrecipes.data")
    prepared = prepare_corpus(
        settings(odd, vocab, documents_per_shard=2), phase(dupe_factor=1), cache, num_proc=2, progress=False
    )
    stats = prepared.manifest["stats"]
    assert stats["documents"] == 5 and stats["read"]["invalid_utf8_sequences"] == 2
    assert stats["tokens"] > 1_500_000 and prepared.manifest["num_instances"] > 1000
    assert any("latin1.txt: 2 invalid UTF-8" in r.message for r in caplog.records)


def test_a_failing_worker_is_one_error_naming_the_chunk(corpus: Path, vocab: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = prepare_corpus(settings(corpus, vocab), phase(), cache, num_proc=1, progress=False)
    chunk = first.directory.parent / "chunk-00003"
    (chunk / "tokens.npy").write_bytes(b"\x93NUMPY damaged")  # a damaged cache file, read by a worker
    with pytest.raises(DataPreparationError, match=r"preparing chunk 3 \(.*chunk-00003\) failed: ValueError"):
        prepare_corpus(settings(corpus, vocab), phase(max_seq_length=96), cache, num_proc=2, progress=False)


def test_an_error_inside_a_worker_names_the_source_file(
    corpus: Path, vocab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import multiprocessing

    import bertrecipes.data.prepare as prepare_module

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the injected fault reaches worker processes only when they are forked")
    real_split = prepare_module.split_sentences

    def split_or_fail(line: str, max_chars: int) -> list[str]:
        if "BOOM" in line:
            raise ValueError("injected fault")
        return real_split(line, max_chars)

    monkeypatch.setattr(prepare_module, "split_sentences", split_or_fail)
    files = tmp_path / "files"
    shutil.copytree(corpus, files)
    (files / "zz_bad.txt").write_text("A fine document. It has text.\n\nThis one says BOOM. Then more.\n")
    with pytest.raises(
        DataPreparationError,
        match=r"preparing chunk 4 \(documents from .*zz_bad.txt\) failed: "
        r"ValueError: injected fault",
    ):
        prepare_corpus(settings(files, vocab), phase(), tmp_path / "cache", num_proc=2, progress=False)


def test_hydra_config_builds_the_dataset_the_engine_gets(make_cfg, corpus: Path, vocab: Path) -> None:
    cfg = make_cfg(
        "data=text_files",
        f"data.paths=[{corpus}]",
        f"data.vocab_file={vocab}",
        "data.documents_per_shard=60",
        "data.num_proc=1",
        "data.dupe_factor=1",
        f"max_seq_length={SEQ}",
        f"max_predictions_per_seq={PRED}",
    )
    dataset = build_pretraining_dataset(cfg)
    assert dataset.max_seq_length == SEQ and dataset.vocab_size == len(vocab.read_text().splitlines())
    assert len(dataset) > 100 and dataset.vocab_file.read_bytes() == vocab.read_bytes()
    with pytest.raises(ConfigError, match="data=text_files has no corpus"):
        build_pretraining_dataset(make_cfg("data=text_files"))
    # The hub config composes (its schema validates); it is not run here: no network.
    hub = make_cfg("data=wikipedia_bookcorpus", "+phase=seq128")
    assert [s.name for s in hub.data.sources] == ["wikimedia/wikipedia", "lucadiliello/bookcorpusopen"]
    assert hub.max_seq_length == 128 and hub.data.num_workers >= 0 and "pin_memory" in hub.data


def test_cli_prepares_then_training_finds_it(
    make_cfg, data_cache: Path, corpus: Path, vocab: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bertrecipes.engine import train

    args = [
        "data=text_files",
        f"data.paths=[{corpus}]",
        f"data.vocab_file={vocab}",
        "data.num_proc=2",
        "data.dupe_factor=1",
        f"max_seq_length={SEQ}",
        f"max_predictions_per_seq={PRED}",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bertrecipes.prepare_data",
            *args,
            f"data.cache_dir={data_cache}",
            "progress_bar=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prepared data:" in result.stdout and "instances" in result.stdout
    assert list(data_cache.glob("logs/prepare_data/*/.hydra/config.yaml"))  # Hydra's files: not in runs/
    # a bad setting: one line naming it, exit status 2, before any worker starts (no traceback)
    bad = subprocess.run([sys.executable, "-m", "bertrecipes.prepare_data", *args, "data.dupe_factor=-1",
                          f"data.cache_dir={data_cache}", "progress_bar=false"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr[-3000:]
    said = bad.stdout + bad.stderr  # Hydra's log handler writes to stdout
    assert "dupe_factor must be >= 1, got -1" in said and "Traceback" not in said

    caplog.set_level(logging.INFO, logger="bertrecipes.data")
    cfg = make_cfg(
        *args,
        "model=bert_tiny",
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "train_batch_size=8",
        "train_micro_batch_size_per_gpu=4",
        "max_steps=2",
        "steps_per_print=1",
        "device=cpu",
        "data.num_workers=1",
        output_dir=tmp_path / "run",
    )
    train(cfg)
    assert any("reusing prepared data" in r.message for r in caplog.records)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and metrics[-1]["loss"] > 0
