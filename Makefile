# The two commands a newcomer needs: `make run` and `make test`. Everything else is installed by them.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run test browsers test-browser test-stitching test-faults soak test-unit test-pythons test-integration lint bench bench-micro bench-batch kafka-jars kafka-up kafka-down topics clean venv

# The other Pythons `make test-pythons` runs the unit tests on (3.11 is the main .venv's), each in .venv-X.Y.
PYTHONS ?= 3.12 3.13
# pythonX.Y on PATH, else pyenv's X.Y.* (installed there but not selected by `pyenv global`)
find_python = $(or $(shell python$(1) -c 'import sys; print(sys.executable)' 2>/dev/null),$(lastword $(sort \
	$(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/$(1).*/bin/python$(1)))))

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need Python 3.11 ($(PY))"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)

kafka-jars: venv
	$(BIN)/python -m pipeline.local.broker fetch

kafka-up: kafka-jars
	$(BIN)/python -m pipeline.local.broker up

kafka-down: venv
	$(BIN)/python -m pipeline.local.broker down

# (on the single local broker of `make kafka-up`: one replica)
topics: venv
	PIPELINE_REPLICATION_FACTOR=1 PIPELINE_MIN_INSYNC_REPLICAS=1 $(BIN)/pipeline topics apply

run: kafka-jars
	$(BIN)/python -m pipeline.local.demo

# The pytest session fixture starts its own broker on free ports (or reuses $$KAFKA_BOOTSTRAP).
test: kafka-jars browsers
	$(BIN)/pytest -q -p no:cacheprovider --durations=15

# Debian's chromium for the console's browser tests (Playwright drives it; no browser download). As root.
# Debian's chromium for the console's browser tests (Playwright for Python drives it; no browser download).
# Without it (no root, no package mirror) the browser tests are skipped and say so.
browsers:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the console's browser tests will be skipped"

# The console in headless chromium against a real worker (tests/console/; also in `make test` when chromium is
# installed); screenshots in tests/console/results/.
test-browser: kafka-jars browsers
	$(BIN)/pytest -q -p no:cacheprovider -s -m browser tests/console

# Generated customers stitched through the broker while workers join, leave and are SIGKILLed mid-stream
# (STITCH_PEOPLE=2000 for the large run). Not in `make test`: a SIGKILL can still tear a handling's output.
test-stitching: kafka-jars
	$(BIN)/pytest -q -p no:cacheprovider -s -m faults tests/integration/test_stitching_rebalance.py

# Faults against a real broker and real worker processes (tests/faults/): SIGKILLs with restarts, broker
# outages of 20 s and 120 s (stop and SIGKILL), rebalances 1 -> 2 -> 3 -> 1, an HTTP destination down for 60 s,
# a 10,000-record hostile corpus and a 10-minute soak at 1,000 events/s; each prints a `FAULTS <name>:` line.
# About 50 minutes on 2 shared cores; FAULTS_SEED picks the input, FAULTS_SOAK_S the soak's length. Its fast subset (three
# SIGKILLs, a 1 -> 2 -> 1 rebalance) is in `make test`. Then the 75 s and 2-minute broker outages of
# tests/integration/test_broker_outage.py (readiness, log lines).
test-faults: kafka-jars
	$(BIN)/pytest -q -p no:cacheprovider -s -m integration tests/faults
	$(BIN)/pytest -q -p no:cacheprovider -s -m faults tests/integration/test_broker_outage.py

# The soak alone (FAULTS_SOAK_S=600 by default): memory and lag every 10 s, PNG + JSON in tests/faults/results/.
soak: kafka-jars
	$(BIN)/pytest -q -p no:cacheprovider -s -m faults tests/faults/test_soak.py

test-unit: venv
	$(BIN)/pytest -q -p no:cacheprovider -m "not integration"

.venv-%/.installed: pyproject.toml
	@test -n "$(call find_python,$*)" || { echo "need Python $* (python$* on PATH, or pyenv install $*)"; exit 1; }
	@test -x .venv-$*/bin/python || $(call find_python,$*) -m venv .venv-$*
	.venv-$*/bin/pip install -q --upgrade pip
	.venv-$*/bin/pip install -q -e ".[dev]"
	@touch $@

# The unit tests on every supported Python, one after the other (2 cores): 3.11 (.venv), then $(PYTHONS).
test-pythons: venv $(foreach v,$(PYTHONS),.venv-$(v)/.installed)
	@failed=""; for bin in $(BIN) $(foreach v,$(PYTHONS),.venv-$(v)/bin); do \
		echo "== $$($$bin/python -V)"; \
		$$bin/pytest -q -p no:cacheprovider -m "not integration" || failed="$$failed $$($$bin/python -V)"; \
	done; test -z "$$failed" || { echo "unit tests failed on:$$failed"; exit 1; }

# ruff, mypy and the import-linter contracts of pyproject.toml (the architecture's layering); CI runs it.
lint: venv
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/mypy pipeline
	$(BIN)/lint-imports

bench: kafka-jars
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/python -m bench.run

# The speed floors kept out of `make test` (segment evaluations, HTTP deliveries, file exports, the destination
# runner on a broker of its own): about a minute; exit status 1 when one is below its floor.
bench-micro: kafka-jars
	$(BIN)/python -m bench.micro

# Batch evaluation alone (no broker): 50 audiences over 1,000,000 stored profiles with the worker's walk.
bench-batch: venv
	$(BIN)/python -m bench.batch

clean:
	rm -rf data .pytest_cache .mypy_cache .ruff_cache
