# ingestd: two commands for a newcomer on a fresh Debian machine:
#   make run    set everything up and run the daemon on a working local default
#   make test   set everything up and run the test suite against real servers

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Servers the tests (and `make run`) start themselves; apt may also start system copies,
# which do not get in the way: every test server listens on its own free port.
# openssl: the throwaway CAs of tests/test_broker_config.py's TLS tests.
# systemd: systemd-analyze and systemctl for tests/test_deploy.py (absent from minimal
# Debian 12 images such as containers; a no-op on a regular install, which has it).
DEB_PACKAGES := mosquitto mosquitto-clients redis-server postgresql victoria-metrics influxdb \
                python3-venv systemd openssl
PYTEST_ARGS ?=

.PHONY: setup system-packages test lint run bench bench-quick bench-cluster fuzz soak clean

setup: system-packages $(VENV)/.installed

system-packages:
	@missing=$$(for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "make setup: installing Debian packages:" $$missing; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "make setup: run as root (or install sudo) to install:" $$missing >&2; exit 1; fi; \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "make setup: ingestd needs Python >= 3.11 (PYTHON=$(PYTHON))" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check ingestd tests
	$(BIN)/ruff format --check ingestd tests
	$(BIN)/mypy

run: setup
	deploy/run-local.sh

# The benchmark suite, every figure next to a reference measured in the same run
# (bench/README.md); results in bench/results/. QUICK=1 (or bench-quick): about two minutes.
# More options with BENCH_ARGS, e.g. BENCH_ARGS='--profile --rates 8000,12000'.
bench: setup
	$(BIN)/python bench/run.py $(if $(QUICK),--quick) $(BENCH_ARGS)

bench-quick: setup
	$(BIN)/python bench/run.py --quick $(BENCH_ARGS)

# 1, 2 and 3 instances of one cluster draining the same backlog (bench/cluster.py).
bench-cluster: setup
	$(BIN)/python bench/cluster.py $(if $(QUICK),--quick)

# The fuzzing properties of tests/test_fuzz.py with FUZZ_SCALE times the suite's examples,
# drawn at random (make test draws the same ones every run),
# (50: about half an hour), and hypothesis' statistics: inputs tried per target, outcomes.
# Memory is capped (8 GiB), so an input that blows it up fails the run, not the machine.
FUZZ_SCALE ?= 50
fuzz: setup
	ulimit -v 8388608 && HYPOTHESIS_PROFILE=explore FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/pytest tests/test_fuzz.py \
	  -o timeout=0 --hypothesis-show-statistics $(PYTEST_ARGS)

# The soak (soak/run.py): the simulator against ingestd for DURATION while VictoriaMetrics and
# the broker restart and a notification channel fails; then nothing lost, RSS and fds flat.
# JSON result in soak/results/. More options with SOAK_ARGS, e.g. SOAK_ARGS='--devices 1000'.
DURATION ?= 10m
soak: setup
	$(BIN)/python soak/run.py --duration $(DURATION) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
