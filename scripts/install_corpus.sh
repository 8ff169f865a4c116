#!/usr/bin/env bash
# Installs the opt-in sources of the ~50 MB corpus, so that
#   layerwise data build --sources large --out data/large --vocab-size 16384
# can assemble shakespeare + austen + kjv + python-docs + kernel-docs (see src/layerwise/data/sources.py).
# Debian packages (needs root: CI runs as root) plus the PyPI reader for R data files; nothing else is
# downloaded. Debian versions are not pinned (point releases replace them); the PyPI reader is.
# Usage: scripts/install_corpus.sh            (PIP=/path/to/venv/bin/pip to install into a given venv)
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
    echo "install_corpus.sh: apt-get needs root; run it as root (or with sudo)" >&2
    exit 1
fi
apt-get update
# r-cran-janeaustenr: Jane Austen's 6 novels (R data, 4.0 MB of text); bible-kjv: King James Bible (4.1 MB);
# python3.11-doc: Python's .rst sources (11 MB); linux-doc-6.1: kernel Documentation/ (21 MB without translations).
# --no-install-recommends skips the R packages janeaustenr recommends (dplyr, testthat); r-base-core comes as a
# dependency but is never run: layerwise reads the R data files with the Python package rdata.
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    r-cran-janeaustenr bible-kjv python3.11-doc linux-doc-6.1
"${PIP:-pip}" install rdata==1.1.0
echo "corpus sources installed; build with: layerwise data build --sources large --out data/large"
