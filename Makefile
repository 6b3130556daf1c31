# The two set-up commands are `make demo` and `make test`; CI runs `make test` (.ci/run).
# Both work from a fresh clone on a machine with only python3 (>= 3.11): the virtualenv and every
# dependency are created here. `make PY=python3.12 test` picks another interpreter.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the project's metadata changes (the install is editable: code changes
# need none). Deleting .venv starts over.
INSTALLED := $(VENV)/.installed
BENCH_ARGS ?=
# pytest-xdist processes for the fast and fault tiers: the tests mostly wait (on worker
# processes, servers, leases), so two at a time on 2 cores about halve the wall time
# (tests/README.md); TEST_WORKERS=0 runs them in this process, one at a time
TEST_WORKERS ?= 2
# the folders that exist (a fresh clone has no empty ones, and ruff fails on a missing path)
PY_PATHS := $(wildcard src tests bench examples)

.PHONY: demo test test-fast test-faults test-slow test-deps lint typecheck unit checks install bench \
	bench-redis bench-postgres soak

$(BIN)/python:
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "taskmill needs Python >= 3.11; '$(PY)' is $$($(PY) -V 2>/dev/null || echo 'not found')." \
	       "Run e.g. 'make PY=python3.11 $(MAKECMDGOALS)'." >&2; exit 1; }
	@$(PY) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "'$(PY) -m venv' failed; on Debian/Ubuntu install python3-venv first." >&2; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

install: $(INSTALLED)

demo: install
	$(BIN)/python -m examples.demo

lint: install
	$(BIN)/ruff check $(PY_PATHS)
	$(BIN)/ruff format --check $(PY_PATHS)
	$(BIN)/lint-imports  # the dependency rule of docs/architecture.md (pyproject.toml)

typecheck: install
	$(BIN)/mypy

# the test tiers (tests/README.md): unit (in-process, no server, seconds), checks (mypy on
# typed user code, the docs' examples and claims), conformance (every case on every broker),
# integration (worker processes, the CLI, server restarts), faults (the fault suite at CI
# size); `slow` marks real-time runs of minutes, which `make test-slow` and `make soak` run
unit: install
	$(BIN)/pytest -q tests/unit

checks: install
	$(BIN)/pytest -q tests/checks

# system packages the tests need (redis-server, PostgreSQL's server); a no-op once installed
test-deps:
	bash scripts/install-test-deps.sh

# what CI runs: the fast tier, then the fault suite at CI size (docs/reliability.md)
test: test-fast test-faults

test-fast: install lint typecheck test-deps
	$(BIN)/pytest -q -n $(TEST_WORKERS) -m "not slow" --ignore=tests/faults

test-faults: install test-deps
	$(BIN)/pytest -q -n $(TEST_WORKERS) -m "not slow" tests/faults

# real-time runs of a minute or more; T16 (test-faults) covers their property at CI size
test-slow: install test-deps
	$(BIN)/pytest -q -m slow

# the fault suite at full size and the slow tier (docs/reliability.md): hours; publish the
# figures it prints
soak: install test-deps
	FAULTS_SIZE=full $(BIN)/pytest -rA tests/faults
	$(BIN)/pytest -q -m slow

bench: install
	$(BIN)/python -m bench.throughput $(BENCH_ARGS)

# taskmill against Celery, Dramatiq, RQ and arq on one Redis (~10 min; the peers are installed
# into bench/.peers/, not into the project's virtualenv)
bench-redis: install test-deps
	$(BIN)/python -m bench.compare_redis $(BENCH_ARGS)

# taskmill against Procrastinate on one PostgreSQL server that it starts (initdb in a temporary
# directory); Procrastinate is installed into bench/.peers/, not into the project's virtualenv
bench-postgres: install test-deps
	$(BIN)/python -m bench.compare_postgres $(BENCH_ARGS)

# taskmill against Huey's SqliteHuey, each on a fresh SQLite file in a temporary directory; Huey
# is installed into bench/.peers/, not into the project's virtualenv
.PHONY: bench-sqlite
bench-sqlite: install test-deps
	$(BIN)/python -m bench.compare_sqlite $(BENCH_ARGS)

# taskmill against TaskIQ with taskiq-nats (the Task Tracker seed's stack) on one nats-server that
# it starts (JetStream, sync_interval: always; the binary of the test extra, in .venv/bin);
# TaskIQ is installed into bench/.peers/, not into the project's virtualenv
.PHONY: bench-nats
bench-nats: install test-deps
	$(BIN)/python -m bench.compare_nats $(BENCH_ARGS)
