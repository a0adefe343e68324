# smsd — two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo drill bench evaluate lint-unit clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[embedded,test]'
	touch $(STAMP)

# Debian packages some tests need (systemd-nspawn for the real-systemd test).
test-deps:
	bash scripts/install-test-deps.sh

test: install test-deps
	$(PY) -m pytest -q -rs

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
