"""TensorFlow checkpoint import: the pure-Python bundle reader against TensorFlow, and Google's names.

References, none produced by the code under test:

* ``tests/fixtures/tf_bert_tiny_reference.npz`` holds every variable of
  ``../shared/data/tf_bert_tiny/bert_model.ckpt`` (a TF 1.x BERT checkpoint with Adam slots and
  ``global_step``) as TensorFlow 2.21.0 (``tensorflow-cpu`` from PyPI, in a separate venv) read it with
  ``tf.train.load_checkpoint``; ``tests/fixtures/tf_dtypes/`` is a bundle written by TensorFlow 2.21.0's
  own ``SaveV2`` op (one tensor per dtype, an empty and a string tensor, an index of several SSTable
  blocks) with ``tf_dtypes_reference.npz`` read back the same way. Both come from
  ``scripts/make_tf_reference.py``, which says how to rerun it.
* :func:`write_bundle` below writes tensor bundles from the format's description (LevelDB table,
  protobuf wire format, CRC32C computed bit by bit), independently of the reader; it makes a tiny BERT
  checkpoint with Google's variable names so the import runs without ``../shared``, and damaged or
  unusual bundles (snappy flag, truncation) for the error paths.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bertrecipes.checkpoint import CheckpointError
from bertrecipes.interop import TFBundle, load_into_model, load_model_state
from bertrecipes.interop.tf_bundle import crc32c
from bertrecipes.model import BertConfig, BertForPreTraining

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_TF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tf_bert_tiny"

# ------------------------------------------------------------------ an independent bundle writer

TABLE_MAGIC = 0xDB4775248B80FB57
TF_DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.int32): 3, np.dtype(np.int64): 9,
                  np.dtype(np.float16): 19}


def crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    return (rotated + 0xA282EAD8) & 0xFFFFFFFF


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def pb_varint(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value) if value else b""  # proto3 omits defaults


def pb_bytes(field: int, value: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(value)) + value


def sstable_block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(out) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def write_bundle(prefix: Path, arrays: dict[str, np.ndarray], entries_per_block: int = 8,
                 restart_interval: int = 3, compression: int = 0) -> None:
    """``prefix.index`` + ``prefix.data-00000-of-00001`` holding ``arrays`` (little-endian)."""
    data, items = bytearray(), []
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes()  # C order
        shape = b"".join(pb_bytes(2, pb_varint(1, d)) for d in array.shape)  # TensorShapeProto.dim
        crc = varint(6 << 3 | 5) + struct.pack("<I", masked(crc32c_bitwise(raw)))  # fixed32 field
        entry = (pb_varint(1, TF_DTYPE_CODES[array.dtype]) + pb_bytes(2, shape) + pb_varint(4, len(data))
                 + pb_varint(5, len(raw)) + crc)
        items.append((name.encode(), entry))
        data += raw
    header = pb_varint(1, 1) + pb_bytes(3, pb_varint(1, 1))  # num_shards=1, version {producer: 1}
    items = [(b"", header)] + items

    table, index = bytearray(), []

    def add_block(block: bytes) -> bytes:
        handle = varint(len(table)) + varint(len(block))
        trailer = bytes([compression])
        table.extend(block + trailer + struct.pack("<I", masked(crc32c_bitwise(block + trailer))))
        return handle

    for start in range(0, len(items), entries_per_block):
        chunk = items[start:start + entries_per_block]
        index.append((chunk[-1][0], add_block(sstable_block(chunk, restart_interval))))
    metaindex = add_block(sstable_block([], 1))
    handles = metaindex + add_block(sstable_block(index, 1))
    footer = handles.ljust(40, b"\0") + struct.pack("<Q", TABLE_MAGIC)
    Path(f"{prefix}.index").write_bytes(bytes(table) + footer)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))


# ------------------------------------------------------------------------------- tiny Google BERT

TINY = dict(vocab_size=13, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=16, type_vocab_size=2)

# Google name -> our name, written out by hand for layer 0 (layer 1 follows the same pattern).
EXPECTED_NAMES = {
    "bert/embeddings/word_embeddings": "bert.embeddings.word_embeddings.weight",
    "bert/embeddings/position_embeddings": "bert.embeddings.position_embeddings.weight",
    "bert/embeddings/token_type_embeddings": "bert.embeddings.token_type_embeddings.weight",
    "bert/embeddings/LayerNorm/gamma": "bert.embeddings.LayerNorm.weight",
    "bert/embeddings/LayerNorm/beta": "bert.embeddings.LayerNorm.bias",
    "bert/encoder/layer_0/attention/self/query/kernel": "bert.encoder.layer.0.attention.self.query.weight",
    "bert/encoder/layer_0/attention/self/query/bias": "bert.encoder.layer.0.attention.self.query.bias",
    "bert/encoder/layer_0/attention/self/key/kernel": "bert.encoder.layer.0.attention.self.key.weight",
    "bert/encoder/layer_0/attention/self/key/bias": "bert.encoder.layer.0.attention.self.key.bias",
    "bert/encoder/layer_0/attention/self/value/kernel": "bert.encoder.layer.0.attention.self.value.weight",
    "bert/encoder/layer_0/attention/self/value/bias": "bert.encoder.layer.0.attention.self.value.bias",
    "bert/encoder/layer_0/attention/output/dense/kernel":
        "bert.encoder.layer.0.attention.output.dense.weight",
    "bert/encoder/layer_0/attention/output/dense/bias": "bert.encoder.layer.0.attention.output.dense.bias",
    "bert/encoder/layer_0/attention/output/LayerNorm/gamma":
        "bert.encoder.layer.0.attention.output.LayerNorm.weight",
    "bert/encoder/layer_0/attention/output/LayerNorm/beta":
        "bert.encoder.layer.0.attention.output.LayerNorm.bias",
    "bert/encoder/layer_0/intermediate/dense/kernel": "bert.encoder.layer.0.intermediate.dense.weight",
    "bert/encoder/layer_0/intermediate/dense/bias": "bert.encoder.layer.0.intermediate.dense.bias",
    "bert/encoder/layer_0/output/dense/kernel": "bert.encoder.layer.0.output.dense.weight",
    "bert/encoder/layer_0/output/dense/bias": "bert.encoder.layer.0.output.dense.bias",
    "bert/encoder/layer_0/output/LayerNorm/gamma": "bert.encoder.layer.0.output.LayerNorm.weight",
    "bert/encoder/layer_0/output/LayerNorm/beta": "bert.encoder.layer.0.output.LayerNorm.bias",
    "bert/pooler/dense/kernel": "bert.pooler.dense.weight",
    "bert/pooler/dense/bias": "bert.pooler.dense.bias",
    "cls/predictions/transform/dense/kernel": "cls.predictions.transform.dense.weight",
    "cls/predictions/transform/dense/bias": "cls.predictions.transform.dense.bias",
    "cls/predictions/transform/LayerNorm/gamma": "cls.predictions.transform.LayerNorm.weight",
    "cls/predictions/transform/LayerNorm/beta": "cls.predictions.transform.LayerNorm.bias",
    "cls/predictions/output_bias": "cls.predictions.bias",
    "cls/seq_relationship/output_weights": "cls.seq_relationship.weight",
    "cls/seq_relationship/output_bias": "cls.seq_relationship.bias",
}
EXPECTED_NAMES.update({k.replace("layer_0", "layer_1"): v.replace("layer.0", "layer.1")
                       for k, v in EXPECTED_NAMES.items() if "layer_0" in k})


def google_shape(name: str, c: dict) -> tuple[int, ...]:
    """Shapes as Google's modeling.py creates them (dense kernels [in, out])."""
    h, i = c["hidden_size"], c["intermediate_size"]
    if name.endswith("word_embeddings"):
        return (c["vocab_size"], h)
    if name == "cls/predictions/output_bias":
        return (c["vocab_size"],)
    if name.endswith("position_embeddings"):
        return (c["max_position_embeddings"], h)
    if name.endswith("token_type_embeddings"):
        return (c["type_vocab_size"], h)
    if name == "cls/seq_relationship/output_weights":
        return (2, h)
    if name == "cls/seq_relationship/output_bias":
        return (2,)
    if "intermediate/dense" in name:
        return (h, i) if name.endswith("kernel") else (i,)
    if "layer_" in name and "/output/dense" in name and "attention" not in name:
        return (i, h) if name.endswith("kernel") else (h,)
    return (h, h) if name.endswith("kernel") else (h,)


@pytest.fixture
def tiny_tf(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """A Google-style BERT checkpoint (weights, Adam slots, global_step, one unknown variable)."""
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal(google_shape(name, TINY)).astype(np.float32)
              for name in EXPECTED_NAMES}
    slots = {f"{name}/{slot}": np.abs(a) for name, a in arrays.items() for slot in ("adam_m", "adam_v")}
    extras = {"global_step": np.array(321, dtype=np.int64),
              "bert/encoder/layer_0/attention/self/relative_bias": np.ones(3, np.float32)}
    folder = tmp_path / "tiny_tf"
    folder.mkdir()
    write_bundle(folder / "bert_model.ckpt", {**arrays, **slots, **extras})
    google_config = {**TINY, "hidden_act": "gelu", "directionality": "bidi"}  # extra keys: ignored
    (folder / "bert_config.json").write_text(json.dumps(google_config))
    (folder / "vocab.txt").write_text("".join(f"tok{i}\n" for i in range(13)))
    return folder, arrays


def assert_matches_google(state: dict[str, torch.Tensor], reference: dict[str, np.ndarray]) -> None:
    for tf_name, ours in EXPECTED_NAMES.items():
        expected = reference[tf_name]
        if tf_name.endswith("/kernel"):
            expected = expected.T  # [in, out] -> torch's [out, in]
        assert torch.equal(state[ours], torch.from_numpy(np.ascontiguousarray(expected))), tf_name


# ------------------------------------------------------------------------------------ reader


def test_crc32c_against_bitwise_reference():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    rng = np.random.default_rng(1)
    for size in (0, 1, 7, 4095, 4096, 4099, 20_011):  # both sides of the vectorised path's threshold
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert crc32c(data) == crc32c_bitwise(data), size


def test_reader_matches_tensorflow_on_a_bundle_tensorflow_wrote():
    bundle = TFBundle(FIXTURES / "tf_dtypes" / "model.ckpt")
    reference = np.load(FIXTURES / "tf_dtypes_reference.npz")
    names = set(reference.files) - {"__tf_version__"}
    assert set(bundle.entries) == names
    for name in sorted(names - {"strings/names"}):
        tensor = bundle.read(name)
        value = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        assert value.dtype == reference[name].dtype and np.array_equal(value, reference[name]), name
    assert bundle.entries["dtypes/bfloat16"].dtype_name == "bfloat16"
    with pytest.raises(CheckpointError, match="dtype string"):
        bundle.read("strings/names")


def test_reader_handles_independently_written_bundle(tmp_path):
    arrays = {f"scope/variable_{i:02d}": np.arange(i + 1, dtype=np.float32) * i for i in range(30)}
    arrays.update({"half": np.float16([1.5, -2.0]), "ints": np.int32([[1, -2], [3, 4]]), "step": np.int64(9)})
    write_bundle(tmp_path / "ckpt", arrays, entries_per_block=4, restart_interval=2)
    bundle = TFBundle(tmp_path / "ckpt")
    assert sorted(bundle.entries) == sorted(arrays)
    for name, array in arrays.items():
        value = bundle.read(name).numpy()
        assert np.array_equal(value, array) and value.dtype == array.dtype, name


# ------------------------------------------------------------------------------------ import


def test_tiny_google_checkpoint_maps_names_and_transposes(tiny_tf):
    folder, arrays = tiny_tf
    for path in (folder, folder / "bert_model.ckpt", folder / "bert_model.ckpt.index"):
        with pytest.warns(UserWarning, match="relative_bias"):
            imported = load_model_state(path, ckpt_type="TF")
    assert imported.global_step == 321
    assert imported.vocab_file == folder / "vocab.txt"
    assert imported.config == BertConfig(**TINY)
    assert not any("adam" in k or "relative" in k for k in imported.state_dict)
    model = BertForPreTraining(imported.config)
    assert load_into_model(model, imported, strict_heads=True).missing_keys == []
    assert_matches_google(model.state_dict(), arrays)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


@pytest.mark.skipif(not SHARED_TF.is_dir(), reason=f"{SHARED_TF} absent (the shared data folder)")
def test_real_tf1_checkpoint_matches_what_tensorflow_reads():
    reference = np.load(FIXTURES / "tf_bert_tiny_reference.npz")
    assert str(reference["__tf_version__"]) == "2.21.0"
    bundle = TFBundle(SHARED_TF / "bert_model.ckpt")
    names = set(reference.files) - {"__tf_version__"}
    assert set(bundle.entries) == names  # weights, Adam slots and global_step: 139 variables
    for name in names:
        assert np.array_equal(bundle.read(name).numpy(), reference[name]), name

    imported = load_model_state(SHARED_TF, ckpt_type="tf")
    assert imported.global_step == int(reference["global_step"]) == 20
    config = imported.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (15, 4, 2)
    model = BertForPreTraining(config)
    assert load_into_model(model, imported, strict_heads=True).missing_keys == []
    assert_matches_google(model.state_dict(), {k: reference[k] for k in reference.files})


# ------------------------------------------------------------------------------------ bad input


def test_truncated_data_file(tiny_tf):
    folder, _ = tiny_tf
    data = folder / "bert_model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="is truncated: tensor .* needs bytes") as err:
        load_model_state(folder, ckpt_type="TF")
    assert str(data) in str(err.value)


def test_corrupt_data_fails_crc(tiny_tf):
    folder, _ = tiny_tf
    data = folder / "bert_model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="CRC32C") as err:
        load_model_state(folder, ckpt_type="TF")
    assert str(data) in str(err.value)


def test_snappy_compressed_and_truncated_index(tmp_path):
    write_bundle(tmp_path / "snappy", {"x": np.zeros(2, np.float32)}, compression=1)
    with pytest.raises(CheckpointError, match="snappy-compressed") as err:
        TFBundle(tmp_path / "snappy")
    assert "snappy.index" in str(err.value)
    write_bundle(tmp_path / "cut", {"x": np.zeros(2, np.float32)})
    index = tmp_path / "cut.index"
    index.write_bytes(index.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="footer magic") as err:
        TFBundle(tmp_path / "cut")
    assert str(index) in str(err.value)


@pytest.mark.filterwarnings("ignore:.*TensorFlow variables not imported")
def test_wrong_ckpt_type_and_config_mismatch(tiny_tf, tmp_path):
    folder, _ = tiny_tf
    with pytest.raises(CheckpointError, match=r"looks like a TensorFlow \(TF\) checkpoint.*use ckpt_type=TF"):
        load_model_state(folder, ckpt_type="HF")
    with pytest.raises(CheckpointError, match="use ckpt_type=TF"):
        load_model_state(folder / "bert_model.ckpt", ckpt_type="DS")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"expected one TensorFlow checkpoint \(a \*\.index file"):
        load_model_state(empty, ckpt_type="TF")

    bad_config = tmp_path / "bert_config.json"
    bad_config.write_text(json.dumps({**TINY, "intermediate_size": 12}))
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.bias has shape \[16\] but config") as e:
        load_model_state(folder, ckpt_type="TF", origin_bert_config_file=bad_config)
    assert str(bad_config) in str(e.value) and "bert_model.ckpt.index" in str(e.value)


def test_fixture_files_stay_small():
    assert sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file()) < 200_000
