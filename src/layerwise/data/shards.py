"""Token shards on disk, read through np.memmap so a corpus never has to fit in RAM.

Two formats are read, detected by their magic number:
  layerwise  64-byte header: magic "LWTOKENS", version (u32), dtype code (u32: 2 = uint16, 4 = uint32),
             token count (u64), vocab size (u64), zero padding; then the tokens.
  llm.c      256 x int32 header: magic 20240520, version 1, token count; then uint16 tokens (the format of
             llm.c and modded-nanogpt, so existing FineWeb shards work unchanged).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MAGIC = b"LWTOKENS"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQ")
_DTYPES = {2: np.uint16, 4: np.uint32}
LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256


def token_dtype(vocab_size: int):
    """uint16 when every id fits, else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> Path:
    """Write tokens in the layerwise format (atomically: temp file, then rename)."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{path}: token id {int(tokens.max())} does not fit vocab_size={vocab_size}")
    header = _HEADER.pack(MAGIC, VERSION, np.dtype(dtype).itemsize, tokens.size, vocab_size)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        f.write(tokens.astype(dtype, copy=False).tobytes())
    tmp.replace(path)
    return path


def write_llmc_shard(path: str | Path, tokens: np.ndarray) -> Path:
    """Write the llm.c / modded-nanogpt format (uint16 tokens)."""
    header = np.zeros(LLMC_HEADER_INTS, dtype=np.int32)
    header[:3] = (LLMC_MAGIC, LLMC_VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
    return Path(path)


def read_shard(path: str | Path) -> tuple[np.ndarray, int | None]:
    """(tokens as a read-only memmap, vocab size if the format records it). ValueError naming the file
    for a foreign, truncated or inconsistent shard."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such token shard")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(max(HEADER_BYTES, LLMC_HEADER_INTS * 4))
    if head[:8] == MAGIC:
        if len(head) < HEADER_BYTES:
            raise ValueError(f"{path}: truncated header ({size} bytes; a layerwise shard header is {HEADER_BYTES})")
        _, version, itemsize, count, vocab = _HEADER.unpack(head[:_HEADER.size])
        if version != VERSION:
            raise ValueError(f"{path}: layerwise shard version {version}; this layerwise reads version {VERSION}")
        if itemsize not in _DTYPES:
            raise ValueError(f"{path}: unknown token width {itemsize} bytes (expected 2 or 4)")
        expected = HEADER_BYTES + count * itemsize
        if size != expected:
            raise ValueError(f"{path}: {size} bytes but the header promises {count} tokens ({expected} bytes); "
                             "the file is truncated or corrupt")
        return np.memmap(path, dtype=_DTYPES[itemsize], mode="r", offset=HEADER_BYTES, shape=(count,)), vocab
    if len(head) >= 12:
        magic, version, count = np.frombuffer(head[:12], dtype=np.int32)
        if magic == LLMC_MAGIC:
            if version != LLMC_VERSION:
                raise ValueError(f"{path}: llm.c shard version {version}; expected {LLMC_VERSION} (uint16 tokens)")
            expected = LLMC_HEADER_INTS * 4 + int(count) * 2
            if size != expected:
                raise ValueError(f"{path}: {size} bytes but the llm.c header promises {count} tokens "
                                 f"({expected} bytes); the file is truncated or corrupt")
            return np.memmap(path, dtype=np.uint16, mode="r", offset=LLMC_HEADER_INTS * 4, shape=(int(count),)), None
    raise ValueError(f"{path}: not a token shard (expected magic {MAGIC.decode()!r} or llm.c {LLMC_MAGIC})")


class ConcatTokens:
    """Several shards read as one 1-D token sequence (slicing may cross shard boundaries)."""

    def __init__(self, parts: list[np.ndarray]):
        if not parts:
            raise ValueError("no token shards to concatenate")
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("ConcatTokens supports contiguous slices only")
        start, stop, _ = item.indices(len(self))
        out = []
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while start < stop:
            local = start - self.offsets[i]
            take = min(stop - start, len(self.parts[i]) - local)
            out.append(np.asarray(self.parts[i][local: local + take]))
            start += take
            i += 1
        return np.concatenate(out) if out else np.empty(0, dtype=self.parts[0].dtype)
