"""The data layer on real text: corpus building, tokenizers, token shards (ours and llm.c's), bad input."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from layerwise.data.build import build_corpus, open_token_data, split_document
from layerwise.data.corpus import shakespeare_text
from layerwise.data.shards import ConcatTokens, read_shard, write_llmc_shard, write_shard
from layerwise.data.sources import SOURCES, get_source, read_text_file
from layerwise.data.tokenizer import encode_documents, load_tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_corpus(["shakespeare"], tmp_path_factory.mktemp("c") / "shakespeare", vocab_size=400)


def test_built_corpus_has_shards_tokenizer_and_a_truthful_manifest(built):
    manifest = json.loads((built / "manifest.json").read_text())
    (source,) = manifest["sources"]
    documents = [text.encode() for _, text in get_source("shakespeare").documents()]
    assert source["documents"] == 42 and source["licence"].startswith("public domain")
    assert source["sha256"] == hashlib.sha256(b"".join(documents)).hexdigest()
    assert source["bytes"] == sum(map(len, documents)) > 5_000_000
    data = open_token_data(built)
    assert len(data.train) == manifest["tokens"]["train"] and len(data.val) == manifest["tokens"]["val"]
    assert data.vocab_size == 400 and data.train.dtype == np.uint16 and int(np.max(data.train)) < 400


def test_tokenizer_round_trips_text_and_separates_documents(built):
    tokenizer = load_tokenizer(built)
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    tokens = encode_documents(tokenizer, ["first doc", "second doc"])
    eot = tokenizer.token_to_id("<|endoftext|>")
    assert list(tokens).count(eot) == 2 and tokens[-1] == eot
    assert tokenizer.decode([int(t) for t in tokens if t != eot]) == "first docsecond doc"


def test_validation_text_is_held_out_from_each_document():
    text = "".join(f"line {i}\n" for i in range(100))
    head, tail = split_document(text, 0.1)
    assert head + tail == text and tail.startswith("line") and head.endswith("\n")
    assert 0.08 < len(tail) / len(text) < 0.12


def test_our_shard_round_trips_bit_identically_and_uses_uint32_for_large_vocabularies(tmp_path):
    small = np.random.default_rng(0).integers(0, 50_000, 1000)
    tokens, vocab = read_shard(write_shard(tmp_path / "a.bin", small, vocab_size=50_000))
    assert tokens.dtype == np.uint16 and vocab == 50_000 and np.array_equal(tokens, small)
    large = np.random.default_rng(1).integers(0, 151_936, 1000)
    tokens, vocab = read_shard(write_shard(tmp_path / "b.bin", large, vocab_size=151_936))
    assert tokens.dtype == np.uint32 and np.array_equal(tokens, large)
    with pytest.raises(ValueError, match="does not fit vocab_size"):
        write_shard(tmp_path / "c.bin", np.array([5, 70_000]), vocab_size=65_536)


def test_llmc_shards_are_read_unchanged(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 5000).astype(np.uint16)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, len(tokens))
    (tmp_path / "fineweb_train_000001.bin").write_bytes(header.tobytes() + tokens.tobytes())
    write_llmc_shard(tmp_path / "fineweb_train_000002.bin", tokens[::-1])
    write_llmc_shard(tmp_path / "fineweb_val_000000.bin", tokens[:1000])
    read, vocab = read_shard(tmp_path / "fineweb_train_000001.bin")
    assert vocab is None and np.array_equal(read, tokens)
    data = open_token_data(tmp_path)
    assert len(data.train) == 10_000 and data.vocab_size == 50257
    assert np.array_equal(data.train[4990:5010], np.concatenate([tokens[4990:], tokens[::-1][:10]]))
    assert np.array_equal(open_token_data(str(tmp_path / "fineweb_*.bin")).val[:], tokens[:1000])


@pytest.mark.parametrize("corrupt,message", [
    (lambda b: b[:-7], "truncated or corrupt"),
    (lambda b: b[:20], "truncated"),
    (lambda b: b"NOTASHARD" + b[9:], "not a token shard"),
])
def test_truncated_or_foreign_shards_are_rejected_naming_the_file(tmp_path, corrupt, message):
    good = write_shard(tmp_path / "good.bin", np.arange(100), vocab_size=256).read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(corrupt(good))
    with pytest.raises(ValueError, match=f"bad.bin.*{message}"):
        read_shard(bad)


def test_truncated_llmc_shard_is_rejected(tmp_path):
    path = write_llmc_shard(tmp_path / "x_train.bin", np.arange(100))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="x_train.bin.*llm.c header promises 100 tokens"):
        read_shard(path)


def test_empty_and_non_utf8_files_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="empty.txt: empty text file"):
        read_text_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        read_text_file(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        open_token_data(tmp_path / "latin1.txt")


def test_unknown_or_missing_sources_say_how_to_install(monkeypatch):
    with pytest.raises(ValueError, match="valid: shakespeare, austen, kjv, python-docs, kernel-docs"):
        get_source("wikipedia")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y bible-kjv"):
        list(SOURCES["kjv"].documents())
    with pytest.raises(FileNotFoundError):
        open_token_data("/nonexistent/corpus")


def test_text_files_and_folders_are_tokenized_once_and_cached(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    text = shakespeare_text()
    (folder / "a.txt").write_text(text[:200_000])
    (folder / "b.txt").write_text(text[200_000:400_000])
    data = open_token_data(folder, vocab_size=300)
    assert data.vocab_size == 300 and len(data.train) > 50_000 and len(data.val) > 0
    caches = list(folder.glob(".layerwise-*"))
    assert len(caches) == 1
    again = open_token_data(folder, vocab_size=300)
    assert np.array_equal(again.train[:], data.train[:])
    single = open_token_data(folder / "a.txt", vocab_size=300)
    assert len(single.train) < len(data.train)


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian bible-kjv not installed (scripts/install_corpus.sh)")
def test_kjv_source_strips_verse_references():
    (name, text), = SOURCES["kjv"].documents()
    assert text.startswith("In the beginning God created the heaven and the earth.")
    assert "Gen1:1" not in text[:1000] and len(text) > 4_000_000


def test_concat_tokens_slices_across_parts():
    parts = [np.arange(0, 5), np.arange(5, 8), np.arange(8, 20)]
    tokens = ConcatTokens(parts)
    assert len(tokens) == 20 and np.array_equal(tokens[3:15], np.arange(3, 15))


def test_a_datasets_save_to_disk_folder_is_read_from_its_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    folder = tmp_path / "ds"
    folder.mkdir()
    texts = [t for t in shakespeare_text()[:300_000].split("\n\n") if t.strip()]
    table = pa.table({"text": texts, "id": list(range(len(texts)))})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (folder / "dataset_info.json").write_text("{}")
    data = open_token_data(folder, vocab_size=300)
    assert len(data.train) > 10_000 and data.vocab_size == 300
    (folder / "data-00000-of-00001.arrow").unlink()
    bad = pa.table({"content": ["x"]})
    with pa.OSFile(str(folder / "b.arrow"), "wb") as sink, pa.ipc.new_stream(sink, bad.schema) as w:
        w.write_table(bad)
    with pytest.raises(ValueError, match="b.arrow: no `text` column"):
        open_token_data(folder, vocab_size=301)
