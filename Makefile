# smsd — two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast test-llamacpp demo drill bench evaluate lint-unit clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[embedded,test]'
	touch $(STAMP)

# Debian packages some tests need (systemd-nspawn for the real-systemd test).
test-deps:
	bash scripts/install-test-deps.sh

# The llamacpp extra (llama-cpp-python built from source: minutes the first time,
# seconds from the wheel kept in LLAMA_WHEELS) brings a real third-party server into
# the suite; if it cannot be installed, its test is skipped and says why.  Built
# without -march=native (GGML_NATIVE=OFF): a native build segfaulted (general
# protection fault in libggml-cpu) on every completion on an AVX-512 Xeon VM, and
# pip's own wheel cache does not tell builds of other flags or CPUs apart.
LLAMA_VERSION = 0.3.36
LLAMA_WHEELS ?= $(HOME)/.cache/smsd/llama-cpp-python-$(LLAMA_VERSION)-generic
test-llamacpp: install
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 \
	  || CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip wheel -q --disable-pip-version-check --no-deps \
	       --no-cache-dir -w $(LLAMA_WHEELS) "llama-cpp-python==$(LLAMA_VERSION)" \
	  || echo "make: llama-cpp-python could not be built"
	$(PY) -m pip install -q --disable-pip-version-check --find-links $(LLAMA_WHEELS) -e '.[llamacpp]' \
	  || echo "make: llama-cpp-python could not be installed: tests/daemon/test_llamacpp.py will be skipped"

# In parallel (TEST_JOBS processes, pytest-xdist): tests that use host-wide systemd or
# network-namespace state share one process (xdist_group "host"); the longest start first.
TEST_JOBS ?= 3
test: install test-deps test-llamacpp
	$(PY) -m pytest -q -rs --durations=25 -n $(TEST_JOBS) --dist loadgroup

test-fast: install
	$(PY) -m pytest -q -rs -m "not slow"

demo: install
	$(VENV)/bin/smsd demo

drill: install
	$(VENV)/bin/smsd drill

bench: install
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(VENV)/bin/smsd bench

evaluate: install
	$(VENV)/bin/smsd evaluate

clean:
	rm -rf $(VENV) var build *.egg-info
