#!/usr/bin/env bash
# Installs the opt-in sources of the ~50 MB corpus (layerwise data build --sources large).
# Debian packages (run as root) plus the PyPI reader for R data files; nothing else is downloaded.
set -euo pipefail
apt-get update
apt-get install -y bible-kjv r-cran-janeaustenr python3.11-doc linux-doc-6.1
"${PIP:-pip}" install rdata==1.1.0
