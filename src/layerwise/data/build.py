"""`layerwise data build` and the one entry point the trainer uses to open any supported data.

A built corpus is a folder with train.bin / val.bin (token shards), tokenizer.json and manifest.json
(per source: package, licence, documents, bytes, sha256; token counts; tokenizer; timings).
"""

from __future__ import annotations

import glob
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path


from .shards import ConcatTokens, read_shard, write_shard
from .sources import Document, get_source, read_text_file
from .tokenizer import encode_documents, eot_id, load_tokenizer, train_bpe

MANIFEST = "manifest.json"


def split_document(text: str, val_fraction: float) -> tuple[str, str]:
    """Hold out the last `val_fraction` of a document (cut at a line break) so every source is represented
    in validation and no validation text is seen in training."""
    cut = int(len(text) * (1 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def build_from_documents(named_docs: dict[str, list[Document]], out_dir: str | Path, vocab_size: int = 8192,
                         tokenizer_path: str | Path | None = None, val_fraction: float = 0.01,
                         provenance: dict[str, dict] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_docs, val_docs, sources = [], [], []
    for name, docs in named_docs.items():
        digest, n_bytes = hashlib.sha256(), 0
        for _, text in docs:
            encoded = text.encode("utf-8")
            digest.update(encoded)
            n_bytes += len(encoded)
            head, tail = split_document(text, val_fraction)
            train_docs.append(head)
            if tail.strip():
                val_docs.append(tail)
        sources.append({"name": name, "documents": len(docs), "bytes": n_bytes, "sha256": digest.hexdigest(),
                        **(provenance or {}).get(name, {})})
    t_read = time.perf_counter()
    if tokenizer_path is None:
        tokenizer = train_bpe(train_docs, vocab_size)  # trained on the training split only
        tokenizer_info = {"kind": "byte-level BPE trained here", "vocab_size": tokenizer.get_vocab_size()}
    else:
        tokenizer = load_tokenizer(tokenizer_path)
        tokenizer_info = {"kind": "loaded", "path": str(tokenizer_path), "vocab_size": tokenizer.get_vocab_size()}
    tokenizer.save(str(out / "tokenizer.json"))
    t_tok = time.perf_counter()
    vocab = tokenizer.get_vocab_size()
    counts = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        tokens = encode_documents(tokenizer, docs)
        write_shard(out / f"{split}.bin", tokens, vocab)
        counts[split] = int(tokens.size)
    t_end = time.perf_counter()
    manifest = {"sources": sources, "tokenizer": tokenizer_info, "vocab_size": vocab, "eot_id": eot_id(tokenizer),
                "tokens": counts, "val_fraction": val_fraction,
                "seconds": {"read": round(t_read - t0, 2), "train_tokenizer": round(t_tok - t_read, 2),
                            "encode": round(t_end - t_tok, 2)}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def build_corpus(sources: list[str], out_dir: str | Path, vocab_size: int = 8192,
                 tokenizer_path: str | Path | None = None, val_fraction: float = 0.01) -> Path:
    """Assemble named sources (see `layerwise.data.sources.SOURCES`) into a tokenized corpus folder."""
    named, provenance = {}, {}
    for name in sources:
        source = get_source(name)
        named[name] = list(source.documents())
        provenance[name] = {"package": source.package, "licence": source.licence}
    return build_from_documents(named, out_dir, vocab_size, tokenizer_path, val_fraction, provenance)


@dataclass
class TokenData:
    train: object  # 1-D tokens supporting len() and contiguous slicing (np.memmap or ConcatTokens)
    val: object
    vocab_size: int
    eot_id: int | None = None
    tokenizer_path: Path | None = None


def _open_built(folder: Path) -> TokenData:
    manifest = json.loads((folder / MANIFEST).read_text())
    train, _ = read_shard(folder / "train.bin")
    val, _ = read_shard(folder / "val.bin")
    return TokenData(train, val, manifest["vocab_size"], manifest.get("eot_id"), folder / "tokenizer.json")


def _open_shards(paths: list[Path], where: str) -> TokenData:
    train = [p for p in paths if "train" in p.name]
    val = [p for p in paths if "val" in p.name]
    if not train or not val:
        raise ValueError(f"{where}: need shards named *train*.bin and *val*.bin; found {[p.name for p in paths]}")
    shards = {p: read_shard(p) for p in train + val}
    vocabs = {v for _, v in shards.values() if v is not None}
    # llm.c shards do not record their vocabulary; they hold GPT-2 tokens.
    vocab = max(vocabs) if vocabs else 50257
    return TokenData(ConcatTokens([shards[p][0] for p in train]), ConcatTokens([shards[p][0] for p in val]), vocab)


def _documents_from_text(path: Path) -> list[Document]:
    files = [path] if path.is_file() else sorted(path.rglob("*.txt"))
    if not files:
        raise ValueError(f"{path}: no .txt files")
    return [(str(f), read_text_file(f)) for f in files]


def _documents_from_datasets_folder(path: Path) -> list[Document]:
    try:
        import pyarrow as pa
    except ImportError:
        raise ValueError(f"{path} is a datasets folder; reading it needs `pip install pyarrow`") from None
    docs = []
    for arrow in sorted(path.rglob("*.arrow")):
        with pa.memory_map(str(arrow)) as source:
            table = pa.ipc.open_stream(source).read_all()
        if "text" not in table.column_names:
            raise ValueError(f"{arrow}: no `text` column (columns: {table.column_names})")
        docs += [(f"{arrow.name}:{i}", t) for i, t in enumerate(table.column("text").to_pylist()) if t]
    if not docs:
        raise ValueError(f"{path}: no arrow files with text")
    return docs


def open_token_data(path: str | Path, vocab_size: int = 8192, tokenizer_path: str | Path | None = None) -> TokenData:
    """Open a built corpus folder, llm.c/layerwise shards (a folder or a glob), a text file or folder, or a
    datasets `save_to_disk` folder. Text is tokenized once and cached in a `.layerwise-<hash>` folder beside it."""
    text = str(path)
    if any(c in text for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(text))
        if not paths:
            raise FileNotFoundError(f"{text}: no files match")
        return _open_shards(paths, text)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file or folder")
    if path.is_dir() and (path / MANIFEST).exists():
        return _open_built(path)
    if path.is_dir() and sorted(path.glob("*.bin")):
        return _open_shards(sorted(path.glob("*.bin")), str(path))
    is_datasets_folder = path.is_dir() and ((path / "dataset_info.json").exists() or any(path.glob("*.arrow")))
    docs = _documents_from_datasets_folder(path) if is_datasets_folder else _documents_from_text(path)
    stamp = hashlib.sha256(json.dumps([str(path.resolve()), vocab_size, str(tokenizer_path),
                                       [len(t) for _, t in docs]]).encode()).hexdigest()[:12]
    cache = (path.parent if path.is_file() else path) / f".layerwise-{path.name}-{stamp}"
    if not (cache / MANIFEST).exists():
        build_from_documents({path.name: docs}, cache, vocab_size, tokenizer_path)
    return _open_built(cache)
