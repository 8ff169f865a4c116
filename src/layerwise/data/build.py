"""`layerwise data build` and the one entry point the trainer uses to open any supported data.

A built corpus is a folder with train.bin / val.bin (token shards, see `shards.py`), tokenizer.json and
manifest.json. The manifest records, per source: package, licence, origin, documents, bytes and the sha256 of
its documents' UTF-8 text concatenated in order, and its train/val token counts; then the tokenizer (kind,
vocabulary, sha256 of tokenizer.json), the split rule, the build date and how long each stage took.
manifest.json is written last, so its presence marks a complete build.

Validation text is held out per document: the last `val_fraction` of every document (cut at a line break)
goes to val.bin, the rest to train.bin, and the tokenizer is trained on the training part only. So every
source and document is represented in validation, no validation text is ever trained on, and the split is
a pure function of the texts (no randomness, hence no seed).
"""

from __future__ import annotations

import glob
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import UserError
from .shards import MAGIC as SHARD_MAGIC
from .shards import ConcatTokens, llmc_vocabulary, read_shard, write_shard
from .sources import Document, get_source, read_text_file
from .tokenizer import EOT, encode_documents, eot_id, load_tokenizer, train_bpe

MANIFEST = "manifest.json"
CORPUS_FORMAT = 1  # bump when the folder layout or split rule changes, so cached text builds are redone


def split_document(text: str, val_fraction: float) -> tuple[str, str]:
    """(train head, held-out tail): the tail is the last `val_fraction` of the text, moved back to the start
    of its line when the line break is near (within the tail's own length), else cut mid-line."""
    cut = int(len(text) * (1 - val_fraction))
    newline = text.rfind("\n", max(0, 2 * cut - len(text)), cut)
    cut = newline + 1 if newline >= 0 else cut
    return text[:cut], text[cut:]


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_from_documents(named_docs: dict[str, list[Document]], out_dir: str | Path, vocab_size: int = 8192,
                         tokenizer_path: str | Path | None = None, val_fraction: float = 0.01,
                         provenance: dict[str, dict] | None = None,
                         held_out: dict[str, list[Document]] | None = None, read_seconds: float = 0.0) -> Path:
    """Tokenize named groups of documents into a corpus folder (see the module docstring).

    `held_out[name]`, when given, is that group's own validation documents (e.g. a dataset's validation
    split); the group is then not split by `val_fraction`."""
    if not 0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction={val_fraction}; use a fraction in (0, 0.5), e.g. 0.01")
    if not named_docs or not any(named_docs.values()):
        raise ValueError(f"{out_dir}: no documents to build a corpus from")
    held_out = held_out or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    t0 = time.perf_counter()
    splits, sources = {}, []
    for name, docs in named_docs.items():
        digest, n_bytes, train, val = hashlib.sha256(), 0, [], []
        for _, text in docs:
            encoded = text.encode("utf-8")
            digest.update(encoded)
            n_bytes += len(encoded)
            if name in held_out:
                train.append(text)
                continue
            head, tail = split_document(text, val_fraction)
            train.append(head)
            if tail.strip():
                val.append(tail)
        if name in held_out:
            val = [text for _, text in held_out[name]]
        splits[name] = (train, val)
        sources.append({"name": name, "documents": len(docs), "bytes": n_bytes, "sha256": digest.hexdigest(),
                        **(provenance or {}).get(name, {})})
    if not any(val for _, val in splits.values()):
        raise ValueError(f"{out_dir}: no validation text; the documents are too short for val_fraction="
                         f"{val_fraction} (use a larger fraction or more text)")
    t_split = time.perf_counter()
    if tokenizer_path is None:
        # Trained on the training split only, so validation text never shapes the vocabulary.
        tokenizer = train_bpe((text for train, _ in splits.values() for text in train), vocab_size)
        tokenizer_info = {"kind": "byte-level BPE trained here (HF tokenizers)", "eot_token": EOT}
    else:
        tokenizer = load_tokenizer(tokenizer_path)
        tokenizer_info = {"kind": "loaded", "path": str(Path(tokenizer_path).resolve())}
    tokenizer.save(str(out / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    tokenizer_info.update(vocab_size=vocab, sha256=_sha256_file(out / "tokenizer.json"))
    t_tokenizer = time.perf_counter()
    tokens = {"train": [], "val": []}
    for source, (train, val) in zip(sources, splits.values()):
        source["tokens"] = {}
        for split, docs in (("train", train), ("val", val)):
            ids = encode_documents(tokenizer, docs)
            tokens[split].append(ids)
            source["tokens"][split] = int(ids.size)
    counts = {}
    for split, parts in tokens.items():
        write_shard(out / f"{split}.bin", np.concatenate(parts), vocab)
        counts[split] = sum(int(p.size) for p in parts)
    t_end = time.perf_counter()
    manifest = {
        "format": CORPUS_FORMAT,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": sources,
        "tokenizer": tokenizer_info,
        "vocab_size": vocab,
        "eot_id": eot_id(tokenizer),
        "tokens": counts,
        "val_fraction": val_fraction,
        "split": ("last val_fraction of every document, cut at a line break" if not held_out else
                  f"the given validation documents of {', '.join(held_out)}; elsewhere the last val_fraction of "
                  "every document"),
        "seconds": {"read": round(read_seconds + t_split - t0, 2), "train_tokenizer": round(t_tokenizer - t_split, 2),
                    "encode": round(t_end - t_tokenizer, 2), "total": round(read_seconds + t_end - t0, 2)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def build_corpus(sources: list[str], out_dir: str | Path, vocab_size: int = 8192,
                 tokenizer_path: str | Path | None = None, val_fraction: float = 0.01) -> Path:
    """Assemble named sources (see `layerwise.data.sources.SOURCES`) into a tokenized corpus folder:
    out_dir/{train.bin, val.bin, tokenizer.json, manifest.json}. Returns out_dir."""
    if not sources:
        raise ValueError("no corpus sources given; valid: see layerwise.data.sources.SOURCES")
    if len(set(sources)) != len(sources):
        raise ValueError(f"corpus sources {sources} name a source twice")
    t0 = time.perf_counter()
    named, provenance = {}, {}
    for name in sources:
        source = get_source(name)
        named[name] = list(source.documents())
        provenance[name] = {"package": source.package, "licence": source.licence, "origin": source.origin}
    return build_from_documents(named, out_dir, vocab_size, tokenizer_path, val_fraction, provenance,
                                read_seconds=time.perf_counter() - t0)


@dataclass
class TokenData:
    """Tokens ready for training. `train` / `val` are 1-D integer sequences supporting len() and
    contiguous slicing (`tokens[i:j]`): np.memmap, or ConcatTokens over several shards."""
    train: object
    val: object
    vocab_size: int
    eot_id: int | None = None
    tokenizer_path: Path | None = None


def _check_token_ids(path: Path, tokens, vocab_size: int) -> None:
    """An id outside the vocabulary would fail as an IndexError deep in the embedding, mid-run: check at open."""
    highest = int(np.max(tokens)) if len(tokens) else -1
    if highest >= vocab_size:
        raise UserError(f"{path}: token id {highest} >= the vocabulary of {vocab_size}; the shard was written with "
                        "another tokenizer: rebuild it, or fix the vocabulary the corpus records")


def _open_built(folder: Path) -> TokenData:
    manifest_file = folder / MANIFEST
    rebuild = f"rebuild it with `layerwise data build --out {folder}`"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{manifest_file}: not valid JSON ({err}); the corpus build did not finish cleanly; "
                        f"{rebuild}") from None
    vocab = manifest.get("vocab_size") if isinstance(manifest, dict) else None
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise UserError(f"{manifest_file}: no positive integer vocab_size (got {vocab!r}); the manifest is not "
                        f"one `layerwise data build` wrote; {rebuild}")
    for shard in ("train.bin", "val.bin"):
        if not (folder / shard).is_file():
            raise UserError(f"{folder / shard}: missing from the corpus folder (its manifest.json is there); {rebuild}")
    train, _ = read_shard(folder / "train.bin")
    val, _ = read_shard(folder / "val.bin")
    for name, tokens in (("train.bin", train), ("val.bin", val)):
        _check_token_ids(folder / name, tokens, manifest["vocab_size"])
    tokenizer = folder / "tokenizer.json"
    return TokenData(train, val, vocab, manifest.get("eot_id"), tokenizer if tokenizer.exists() else None)


def _is_layerwise_shard(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(SHARD_MAGIC)) == SHARD_MAGIC


def _open_shards(paths: list[Path], where: str) -> TokenData:
    train = [p for p in paths if "train" in p.name]
    val = [p for p in paths if "val" in p.name]
    if not train or not val:
        raise ValueError(f"{where}: need shards named *train*.bin and *val*.bin; found "
                         f"{[p.name for p in paths] or 'none'}")
    shards = {p: read_shard(p) for p in train + val}
    recorded = {v for _, v in shards.values() if v is not None}
    implied = {llmc_vocabulary(p) for p, (_, v) in shards.items() if v is None}
    if len(implied) > 1 or (recorded and implied):
        raise ValueError(f"{where}: shards of different formats or tokenizers mixed; keep one kind per folder")
    # llm.c shards record no vocabulary: their magic implies GPT-2's (or Llama 3's) tokenizer.
    vocab, separator = implied.pop() if implied else (max(recorded), None)
    for path, (tokens, _) in shards.items():
        _check_token_ids(path, tokens, vocab)
    return TokenData(ConcatTokens([shards[p][0] for p in train]), ConcatTokens([shards[p][0] for p in val]),
                     vocab, separator)


def _documents_from_text(path: Path) -> list[Document]:
    files = [path] if path.is_file() else sorted(path.rglob("*.txt"))
    if not files:
        raise ValueError(f"{path}: no .txt files (a text folder is read as every **/*.txt in it)")
    return [(str(f.relative_to(path) if path.is_dir() else f.name), read_text_file(f)) for f in files]


def _arrow_texts(folder: Path) -> list[Document]:
    """The `text` column of an HF `save_to_disk` folder's arrow files (arrow IPC streams, as datasets writes)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise ValueError(f"{folder} is a datasets folder; reading it needs pyarrow: `pip install pyarrow==26.0.1`"
                         ) from None
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise ValueError(f"{folder}: no .arrow files (expected an HF datasets save_to_disk folder)")
    docs = []
    for arrow in files:
        with pa.memory_map(str(arrow)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:  # the random-access IPC file format, as other writers use
                source.seek(0)
                try:
                    table = pa.ipc.open_file(source).read_all()
                except pa.ArrowInvalid as err:
                    raise ValueError(f"{arrow}: not an Arrow IPC stream or file ({err})") from None
        if "text" not in table.column_names:
            raise ValueError(f"{arrow}: no `text` column (columns: {table.column_names}); "
                             "open_token_data reads the `text` column")
        texts = table.column("text").to_pylist()
        kept = [(f"{arrow.name}:{i}", t) for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        if len(kept) < len(texts):
            warnings.warn(f"{arrow}: skipping {len(texts) - len(kept)} of {len(texts)} rows with empty or null text",
                          stacklevel=3)
        docs += kept
    if not docs:
        raise ValueError(f"{folder}: no rows with text")
    return docs


def _documents_from_datasets_folder(path: Path) -> tuple[list[Document], list[Document] | None]:
    """(training documents, validation documents or None). A DatasetDict folder contributes its `train`
    split, and its `validation` (else `test`) split as held-out text."""
    splits_file = path / "dataset_dict.json"
    if not splits_file.exists():
        return _arrow_texts(path), None
    splits = json.loads(splits_file.read_text()).get("splits", [])
    if "train" not in splits:
        raise ValueError(f"{splits_file}: no `train` split (splits: {splits})")
    held = next((s for s in ("validation", "valid", "test") if s in splits), None)
    return _arrow_texts(path / "train"), (_arrow_texts(path / held) if held else None)


def _is_datasets_folder(path: Path) -> bool:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    return path.is_dir() and (any((path / m).exists() for m in markers) or any(path.glob("*.arrow")))


def open_token_data(path: str | Path, vocab_size: int = 8192, tokenizer_path: str | Path | None = None,
                    val_fraction: float = 0.01) -> TokenData:
    """Open training data from any of:
      - a folder written by `build_corpus` (it has manifest.json);
      - llm.c / modded-nanogpt token shards: a folder of *train*.bin and *val*.bin, or a glob
        such as "fineweb10B/fineweb_*.bin"; several shards read as one stream without loading them;
      - a text file, or a folder of .txt files;
      - an HF datasets `save_to_disk` folder with a `text` column.
    Text is tokenized once (with `tokenizer_path`, else a BPE of `vocab_size` trained on it) and cached in a
    `.layerwise-<name>-<hash>` folder beside the file (inside the folder), keyed by the text and settings."""
    text = str(path)
    if any(c in text for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(text))
        if not paths:
            raise FileNotFoundError(f"{text}: no files match")
        return _open_shards(paths, text)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file or folder (expected a built corpus folder, token "
                                "shards, a .txt file or folder, or a datasets save_to_disk folder)")
    if path.is_dir() and (path / MANIFEST).exists():
        return _open_built(path)
    if path.is_dir() and any(path.glob("*.bin")):
        shards = sorted(path.glob("*.bin"))
        # Our shards come only from a build, which writes manifest.json last: without it the build was cut
        # short (or the file deleted), and the tokenizer and counts the folder should carry are unknown.
        # llm.c shards have no manifest by design and are read as they are.
        if any(_is_layerwise_shard(p) for p in shards):
            raise UserError(f"{path / MANIFEST}: missing, so this corpus folder is incomplete (a build writes the "
                            f"manifest last); rebuild it with `layerwise data build --out {path}`")
        return _open_shards(shards, str(path))
    if path.is_file() and path.suffix == ".bin":
        raise ValueError(f"{path}: a single shard; pass its folder or a glob matching *train*.bin and *val*.bin")
    held_out = None
    if _is_datasets_folder(path):
        docs, held_out = _documents_from_datasets_folder(path)
    else:
        docs = _documents_from_text(path)
    key = hashlib.sha256()
    tokenizer_key = _sha256_file(_tokenizer_file(tokenizer_path)) if tokenizer_path else f"bpe{vocab_size}"
    key.update(json.dumps([CORPUS_FORMAT, tokenizer_key, val_fraction, held_out is not None]).encode())
    for name, body in docs + (held_out or []):
        key.update(name.encode() + b"\0" + body.encode() + b"\0")
    cache = (path.parent if path.is_file() else path) / f".layerwise-{path.name}-{key.hexdigest()[:12]}"
    if not (cache / MANIFEST).exists():
        build_from_documents({path.name: docs}, cache, vocab_size, tokenizer_path, val_fraction,
                             provenance={path.name: {"origin": str(path.resolve())}},
                             held_out={path.name: held_out} if held_out else None)
    return _open_built(cache)


def _tokenizer_file(tokenizer_path: str | Path) -> Path:
    path = Path(tokenizer_path)
    for candidate in (path, path / "tokenizer.json", path / "vocab.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no tokenizer here; pass a tokenizer.json, a folder holding one, or a "
                            "folder with vocab.json and merges.txt")
