"""A pure-Python reader of TensorFlow's checkpoint format (the "tensor bundle"), without TensorFlow.

A checkpoint ``PREFIX`` is ``PREFIX.index`` plus data shards ``PREFIX.data-0000K-of-0000N``:

* ``.index`` is a LevelDB-format SSTable: data blocks of prefix-compressed ``(key, value)`` entries
  with restart points, an index block whose values are handles of the data blocks, and a 48-byte
  footer (metaindex handle, index handle, padding, magic number). Each block is followed by a
  compression byte and a masked CRC32C. Keys are tensor names; the value of key ``""`` is a
  ``BundleHeaderProto`` (shard count, endianness), every other value a ``BundleEntryProto``
  (dtype, shape, shard, offset, size, masked CRC32C of the bytes).
* A data shard holds each tensor's raw little-endian bytes at ``offset`` for ``size`` bytes.

The protobuf wire format is decoded here too (varints and length-delimited fields), so nothing
beyond numpy and torch is needed. Try it::

    python -c "from bertrecipes.interop import TFBundle; print(TFBundle('bert_model.ckpt').entries)"
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bertrecipes.checkpoint import CheckpointError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1

# TensorFlow's DataType enum values -> torch dtypes (tensorflow/core/framework/types.proto).
TF_DTYPES: dict[int, tuple[str, torch.dtype | None]] = {
    1: ("float32", torch.float32),
    2: ("float64", torch.float64),
    3: ("int32", torch.int32),
    4: ("uint8", torch.uint8),
    5: ("int16", torch.int16),
    6: ("int8", torch.int8),
    7: ("string", None),
    9: ("int64", torch.int64),
    10: ("bool", torch.bool),
    14: ("bfloat16", torch.bfloat16),
    17: ("uint16", torch.uint16),
    19: ("float16", torch.float16),
    22: ("uint32", torch.uint32),
    23: ("uint64", torch.uint64),
}


# ----------------------------------------------------------------------------------------- CRC32C


def _crc_table() -> np.ndarray:
    poly = 0x82F63B78  # Castagnoli polynomial, bit-reflected
    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table[i] = c
    return table


_CRC_TABLE = _crc_table()
_CRC_TABLE_LIST = [int(x) for x in _CRC_TABLE]
# Slicing-by-4 tables: _CRC_SLICES[k][b] is the register after byte b followed by k zero bytes.
_CRC_SLICES = [_CRC_TABLE]
for _ in range(3):
    _CRC_SLICES.append(_CRC_TABLE[_CRC_SLICES[-1] & 0xFF] ^ (_CRC_SLICES[-1] >> 8))
_LANE_MIN_BYTES = 4096


def _crc_register(register: int, data: bytes) -> int:
    table = _CRC_TABLE_LIST
    for byte in data:
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


def _crc_register_lanes(register: int, data: np.ndarray) -> tuple[int, int]:
    """Advance the CRC register over a multiple-of-4 prefix of ``data`` (uint8) with numpy.

    The register update is linear over GF(2), so R(s, chunk) = R(0, chunk) ^ R(s, zeros): the data
    is cut into equal chunks that each run from 0 in their own lane (vectorised, four bytes a step),
    and 32 extra lanes push the unit vectors through a chunk's length of zero bytes, which gives
    the "skip one chunk" operator that chains the chunks in order. Pure Python would need minutes
    for a BERT-large checkpoint; this takes seconds. Returns (register, bytes consumed).
    """
    words = data[: data.size // 4 * 4].view("<u4")
    lanes = min(4096, words.size // 64)
    length = words.size // lanes
    grid = words[: lanes * length].reshape(lanes, length)
    state = np.zeros(lanes + 32, dtype=np.uint32)
    state[lanes:] = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))
    t0, t1, t2, t3 = _CRC_SLICES
    block = np.zeros((64, lanes + 32), dtype=np.uint32)  # the 32 extra lanes read zeros
    for start in range(0, length, 64):  # transpose 64 steps at a time: cache-friendly
        steps = min(64, length - start)
        block[:steps, :lanes] = grid[:, start:start + steps].T
        for row in block[:steps]:
            x = state ^ row
            state = t3[x & 0xFF] ^ t2[(x >> 8) & 0xFF] ^ t1[(x >> 16) & 0xFF] ^ t0[x >> 24]
    skip = state[lanes:]
    bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)
    s0, s1, s2, s3 = (np.bitwise_xor.reduce(np.where(bits, skip[8 * b: 8 * b + 8], 0), axis=1).tolist()
                      for b in range(4))
    for chunk in state[:lanes].tolist():
        register = (s0[register & 0xFF] ^ s1[(register >> 8) & 0xFF] ^ s2[(register >> 16) & 0xFF]
                    ^ s3[register >> 24] ^ chunk)
    return register, lanes * length * 4


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``, as TensorFlow and LevelDB compute it."""
    register, done = 0xFFFFFFFF, 0
    if len(data) >= _LANE_MIN_BYTES:
        register, done = _crc_register_lanes(register, np.frombuffer(data, dtype=np.uint8))
    return _crc_register(register, bytes(memoryview(data)[done:])) ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """LevelDB's CRC masking (stored CRCs are masked so CRCs of CRCs stay well distributed)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------- protobuf wire


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; returns (value, next position)."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or over-long varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """``(field number, value)`` pairs of a serialized message: ints for varint/fixed fields,
    bytes for length-delimited ones."""
    pos = 0
    while pos < len(buf):
        tag, pos = read_varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = read_varint(buf, pos)
        elif wire_type == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire_type == 2:
            length, pos = read_varint(buf, pos)
            value, pos = bytes(buf[pos:pos + length]), pos + length
        elif wire_type == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} (field {field})")
        if pos > len(buf):
            raise ValueError(f"truncated protobuf field {field}")
        yield field, value


@dataclass(frozen=True)
class BundleEntry:
    """One tensor's ``BundleEntryProto``."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked, as stored
    sliced: bool  # a partitioned variable: its data lives in slice entries

    @property
    def dtype_name(self) -> str:
        return TF_DTYPES.get(self.dtype, (f"DataType {self.dtype}", None))[0]


def parse_entry(name: str, buf: bytes) -> BundleEntry:
    fields = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc32c": None, "sliced": False}
    for field, value in proto_fields(buf):
        if field == 1:
            fields["dtype"] = value
        elif field == 2:
            dims = []
            for shape_field, dim in proto_fields(value):
                if shape_field == 2:  # TensorShapeProto.dim
                    dims.append(next((_signed64(v) for f, v in proto_fields(dim) if f == 1), 0))
                elif shape_field == 3 and dim:
                    raise ValueError("tensor of unknown rank")
            fields["shape"] = tuple(dims)
        elif field == 3:
            fields["shard_id"] = value
        elif field == 4:
            fields["offset"] = _signed64(value)
        elif field == 5:
            fields["size"] = _signed64(value)
        elif field == 6:
            fields["crc32c"] = value
        elif field == 7:
            fields["sliced"] = True
    return BundleEntry(name=name, **fields)


# ------------------------------------------------------------------------------ SSTable (.index)


def _block_handle(buf: bytes, pos: int) -> tuple[tuple[int, int], int]:
    offset, pos = read_varint(buf, pos)
    size, pos = read_varint(buf, pos)
    return (offset, size), pos


def _read_block(table: bytes, handle: tuple[int, int], path: Path) -> bytes:
    offset, size = handle
    end = offset + size + BLOCK_TRAILER_SIZE
    if end > len(table):
        raise CheckpointError(
            f"{path}: truncated index, a block needs bytes {offset}..{end} but the file has {len(table)}"
        )
    contents = table[offset:offset + size]
    compression = table[offset + size]
    if compression == SNAPPY_COMPRESSION:
        raise CheckpointError(
            f"{path}: index block at offset {offset} is snappy-compressed; this reader handles only "
            f"uncompressed tables, which is what TensorFlow writes for checkpoints"
        )
    if compression != NO_COMPRESSION:
        raise CheckpointError(
            f"{path}: index block at offset {offset} has unknown compression type {compression} "
            f"(expected 0, none)"
        )
    stored = int.from_bytes(table[offset + size + 1:end], "little")
    if mask_crc(crc32c(table[offset:offset + size + 1])) != stored:
        raise CheckpointError(f"{path}: index block at offset {offset} fails its CRC32C check (corrupt file)")
    return contents


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise ValueError(f"block of {len(block)} bytes cannot hold {num_restarts} restart points")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        value_length, pos = read_varint(block, pos)
        if shared > len(key) or pos + unshared + value_length > limit:
            raise ValueError(f"corrupt block entry at byte {pos}")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_length]
        pos += value_length


def read_sstable(path: str | Path) -> list[tuple[bytes, bytes]]:
    """Every ``(key, value)`` of a LevelDB-format table file, in key order."""
    path = Path(path)
    table = path.read_bytes()
    if len(table) < FOOTER_SIZE:
        raise CheckpointError(
            f"{path} is {len(table)} bytes, too short for a TensorFlow checkpoint index "
            f"(at least a {FOOTER_SIZE}-byte footer)"
        )
    footer = table[-FOOTER_SIZE:]
    magic = int.from_bytes(footer[-8:], "little")
    if magic != TABLE_MAGIC:
        raise CheckpointError(
            f"{path} is not a TensorFlow checkpoint index: its footer magic is {magic:#018x}, "
            f"expected {TABLE_MAGIC:#018x} (truncated, or not a .index file)"
        )
    try:
        _, pos = _block_handle(footer, 0)  # metaindex: unused by tensor bundles
        index_handle, _ = _block_handle(footer, pos)
        entries = []
        for _, handle_bytes in _block_entries(_read_block(table, index_handle, path)):
            handle, _ = _block_handle(handle_bytes, 0)
            entries.extend(_block_entries(_read_block(table, handle, path)))
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt TensorFlow checkpoint index: {e}") from e
    return entries


# ------------------------------------------------------------------------------------- bundle


class TFBundle:
    """A TensorFlow checkpoint: ``TFBundle(prefix).entries`` (name -> BundleEntry), ``.read(name)``.

    ``verify_crc`` checks each tensor's CRC32C as it is read (about 1 s per 100 MB on one core)."""

    def __init__(self, prefix: str | Path, verify_crc: bool = True):
        self.prefix = Path(prefix)
        self.index_file = Path(f"{self.prefix}.index")
        self.verify_crc = verify_crc
        if not self.index_file.is_file():
            raise CheckpointError(f"TensorFlow checkpoint index {self.index_file} does not exist")
        self.num_shards = 1
        self.entries: dict[str, BundleEntry] = {}
        for key, value in read_sstable(self.index_file):
            try:
                if key == b"":
                    self._read_header(value)
                else:
                    name = key.decode("utf-8")
                    self.entries[name] = parse_entry(name, value)
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.index_file}: bad entry {key!r}: {e}") from e

    def _read_header(self, value: bytes) -> None:
        for field, v in proto_fields(value):
            if field == 1:
                self.num_shards = v
            elif field == 2 and v != 0:
                raise CheckpointError(f"{self.index_file}: big-endian checkpoints are not supported")

    def data_file(self, shard_id: int) -> Path:
        return Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (raises CheckpointError naming the file if it cannot be read)."""
        if name not in self.entries:
            raise CheckpointError(f"{self.index_file} has no tensor {name!r}")
        entry = self.entries[name]
        dtype_name, dtype = TF_DTYPES.get(entry.dtype, (entry.dtype_name, None))
        if dtype is None:
            raise CheckpointError(f"{self.index_file}: tensor {name!r} has dtype {dtype_name}, which this "
                                  f"reader does not load (numeric and bool tensors only)")
        if entry.sliced:
            raise CheckpointError(f"{self.index_file}: {name!r} is a partitioned variable (saved in slices), "
                                  f"which this reader does not support")
        numel = int(np.prod(entry.shape, dtype=np.int64))
        expected = numel * dtype.itemsize
        if entry.size != expected:
            raise CheckpointError(f"{self.index_file}: tensor {name!r} of shape {list(entry.shape)} "
                                  f"{dtype_name} should have {expected} bytes, its entry says {entry.size}")
        path = self.data_file(entry.shard_id)
        if not path.is_file():
            raise CheckpointError(f"TensorFlow checkpoint data file {path} (holding {name!r}) does not exist")
        with open(path, "rb") as f:
            f.seek(entry.offset)
            raw = f.read(entry.size)
        if len(raw) != entry.size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} needs bytes {entry.offset}.."
                f"{entry.offset + entry.size} but the file has {path.stat().st_size}"
            )
        if self.verify_crc and entry.crc32c is not None and mask_crc(crc32c(raw)) != entry.crc32c:
            raise CheckpointError(f"{path}: tensor {name!r} fails its CRC32C check (corrupt data file)")
        if numel == 0:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(entry.shape)

