"""Token shards on disk, read through np.memmap so a corpus never has to fit in RAM.

`read_shard` detects the format from the magic number:
  layerwise  64-byte little-endian header: magic b"LWTOKENS", format version (u32), token width in bytes
             (u32: 2 = uint16, 4 = uint32), token count (u64), vocab size (u64), zero padding; then the
             tokens. uint16 whenever the vocabulary fits (<= 65,536 ids), so shards are half the size.
  llm.c      256 x int32 header: magic, version, token count; then the tokens. Magic 20240520 / version 1
             holds uint16 GPT-2 tokens (llm.c and modded-nanogpt FineWeb shards, read unchanged);
             magic 20240801 / version 7 holds uint32 Llama 3 tokens (llm.c's llama-3 variant).
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

LLMC_HEADER_INTS = 256
LLMC_MAGIC, LLMC_VERSION = 20240520, 1  # GPT-2 tokens, uint16
LLMC_LLAMA3_MAGIC, LLMC_LLAMA3_VERSION = 20240801, 7  # Llama 3 tokens, uint32
# magic -> (version, token dtype, vocabulary, document separator that llm.c's data scripts insert)
LLMC_FORMATS = {
    LLMC_MAGIC: (LLMC_VERSION, np.uint16, 50257, 50256),  # <|endoftext|>
    LLMC_LLAMA3_MAGIC: (LLMC_LLAMA3_VERSION, np.uint32, 128256, None),
}


def token_dtype(vocab_size: int):
    """uint16 when every id fits, else uint32."""
    if not 0 < vocab_size <= 1 << 32:
        raise ValueError(f"vocab_size={vocab_size} cannot be stored; use 1..{1 << 32}")
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> Path:
    """Write tokens in the layerwise format (atomically: a temporary file, then a rename, so a crash never
    leaves a shard whose header promises tokens it does not hold)."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"{path}: token ids span {int(tokens.min())}..{int(tokens.max())}, which does not fit "
                         f"vocab_size={vocab_size} (valid ids 0..{vocab_size - 1})")
    header = _HEADER.pack(MAGIC, VERSION, np.dtype(dtype).itemsize, tokens.size, vocab_size)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        f.write(tokens.astype(dtype, copy=False).tobytes())
    tmp.replace(path)
    return path


def write_llmc_shard(path: str | Path, tokens: np.ndarray, magic: int = LLMC_MAGIC) -> Path:
    """Write the llm.c format (uint16 GPT-2 layout by default; magic=LLMC_LLAMA3_MAGIC for uint32)."""
    version, dtype, _, _ = LLMC_FORMATS[magic]
    tokens = np.asarray(tokens)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(dtype).max):
        raise ValueError(f"{path}: token ids {int(tokens.min())}..{int(tokens.max())} do not fit {dtype.__name__}")
    header = np.zeros(LLMC_HEADER_INTS, dtype=np.int32)
    header[:3] = (magic, version, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype).tobytes())
    return Path(path)


def _tokens(path: Path, dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:  # mmap cannot map zero bytes
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _check_size(path: Path, size: int, expected: int, count: int, fmt: str) -> None:
    if size != expected:
        raise ValueError(f"{path}: {size} bytes, but its {fmt} header promises {count} tokens ({expected} bytes); "
                         "the file is truncated or corrupt")


def read_shard(path: str | Path) -> tuple[np.ndarray, int | None]:
    """(tokens as a read-only memmap, vocab size if the format records it, else None).

    ValueError naming the file for a foreign, truncated or inconsistent shard, or an unknown version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such token shard")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(LLMC_HEADER_INTS * 4)
    if head[:8] == MAGIC:
        if len(head) < HEADER_BYTES:
            raise ValueError(f"{path}: truncated header ({size} bytes; a layerwise shard header is "
                             f"{HEADER_BYTES} bytes)")
        _, version, itemsize, count, vocab = _HEADER.unpack(head[:_HEADER.size])
        if version != VERSION:
            raise ValueError(f"{path}: layerwise shard format version {version}; this layerwise reads version "
                             f"{VERSION} (rebuild the corpus with `layerwise data build`)")
        if itemsize not in _DTYPES:
            raise ValueError(f"{path}: unknown token width code {itemsize}; expected 2 (uint16) or 4 (uint32)")
        _check_size(path, size, HEADER_BYTES + count * itemsize, count, "layerwise")
        return _tokens(path, _DTYPES[itemsize], HEADER_BYTES, count), int(vocab)
    if len(head) >= 12:
        magic, version, count = (int(x) for x in np.frombuffer(head[:12], dtype="<i4"))
        if magic in LLMC_FORMATS:
            expected_version, dtype, _, _ = LLMC_FORMATS[magic]
            if version != expected_version:
                raise ValueError(f"{path}: llm.c shard (magic {magic}) of version {version}; expected version "
                                 f"{expected_version} ({np.dtype(dtype).name} tokens)")
            if len(head) < LLMC_HEADER_INTS * 4:
                raise ValueError(f"{path}: truncated header ({size} bytes; an llm.c header is "
                                 f"{LLMC_HEADER_INTS * 4} bytes)")
            offset = LLMC_HEADER_INTS * 4
            _check_size(path, size, offset + count * np.dtype(dtype).itemsize, count, "llm.c")
            return _tokens(path, dtype, offset, count), None
    raise ValueError(f"{path}: not a token shard (expected magic {MAGIC.decode()!r} of a layerwise shard, or "
                     f"{LLMC_MAGIC} / {LLMC_LLAMA3_MAGIC} of an llm.c shard)")


def llmc_vocabulary(path: str | Path) -> tuple[int, int | None] | None:
    """(vocab size, document separator id) that an llm.c shard's magic implies, or None for other formats."""
    with open(path, "rb") as f:
        head = f.read(4)
    magic = int(np.frombuffer(head, dtype="<i4")[0]) if len(head) == 4 else None
    if magic not in LLMC_FORMATS:
        return None
    _, _, vocab, separator = LLMC_FORMATS[magic]
    return vocab, separator


class ConcatTokens:
    """Several shards read as one 1-D token sequence without loading them: `len()` and contiguous slices
    (which may cross shard boundaries) are all a trainer needs to cut windows."""

    def __init__(self, parts: list[np.ndarray]):
        if not parts:
            raise ValueError("no token shards to concatenate")
        dtypes = {p.dtype for p in parts}
        if len(dtypes) > 1:
            raise ValueError(f"shards mix token types {sorted(str(d) for d in dtypes)}; use one tokenizer's shards")
        self.parts = parts
        self.dtype = parts[0].dtype
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("ConcatTokens supports contiguous slices only (tokens[i:j])")
        start, stop, _ = item.indices(len(self))
        out = []
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while start < stop:
            local = start - self.offsets[i]
            take = min(stop - start, len(self.parts[i]) - local)
            out.append(np.asarray(self.parts[i][local: local + take]))
            start += take
            i += 1
        return np.concatenate(out) if out else np.empty(0, dtype=self.dtype)
