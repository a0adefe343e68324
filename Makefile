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
# seconds from pip's wheel cache) brings a real third-party server into the suite;
# if it cannot be installed, its test is skipped and says why.
test-llamacpp: install
	$(PY) -m pip install -q --disable-pip-version-check -e '.[llamacpp]' \
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
