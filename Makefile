# tmrl: two commands on a fresh machine — `make demo` and `make test`. Everything else is here for operators.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
CONFIG ?=
CONFIG_FLAG := $(if $(CONFIG),--config $(CONFIG),)
DEMO_ARGS ?=
PACKAGES := libs/common libs/stack services/relay services/worker services/trainer
STAMP  := $(VENV)/.installed
# benchmarks/: `make bench` runs the speed figures (minutes), `make bench-long` the learning runs and the reliability
# report (over an hour; sac_halfcheetah.py also needs `pip install "gymnasium[mujoco]"`). gpu_check.sh is for a GPU.
BENCH_SPEED := relay_throughput protocol_decode ingest_checks policy_latency sac_updates sim_speed spool_durability \
               worker_loop_overhead tm20_lidar tm20_emulated_render
BENCH_LONG  := reliability_report sac_pendulum sac_image sac_halfcheetah sim_laps tm20_pixel_lidar_learning \
               tm20_emulated_learning

.PHONY: install test test-fast lint demo run-relay run-trainer run-worker bench bench-long clean install-systemd help

help:
	@echo "make demo      set up, then run relay + trainer + 2 workers on the simulated track; writes a learning curve"
	@echo "               (DEMO_ARGS=\"--minutes 1\": scripts/demo.py's options, see its --help)"
	@echo "make test      set up, then run the whole test suite"
	@echo "make install   create $(VENV) and install every package (torch==2.13.0 first, CPU wheel)"
	@echo "make run-relay | run-trainer | run-worker   run one service in the foreground (CONFIG=path.toml)"
	@echo "make bench     run the speed benchmarks in benchmarks/ (minutes)"
	@echo "make bench-long   run the learning benchmarks and the reliability report (over an hour)"
	@echo "make test-fast the test suite without the tests marked slow"
	@echo "make lint      ruff over the packages, tests, benchmarks, scripts, tools and examples"
	@echo "make install-systemd   install the systemd units (sudo; deploy/systemd/install.sh)"
	@echo "make clean     remove $(VENV) and the test caches"

install: $(STAMP)

# Two `make demo` started together in a fresh clone built the venv at once, and the second failed: the install runs
# under a lock (flock, from util-linux; where there is none, as on macOS, unlocked), and a make that waited for it
# checks the stamp again and finds the venv made.
INSTALL_LOCK := $(if $(shell command -v flock 2>/dev/null),flock $(VENV).lock,)

# torch==2.13.0 goes in first and alone: any looser spec may pull a multi-GB CUDA build. A venv without a working pip
# (creation interrupted by Ctrl-C, or ensurepip missing: Debian's python3-venv) is made again, not used as it is.
$(STAMP): $(foreach p,$(PACKAGES),$(p)/pyproject.toml) requirements-dev.txt
ifeq ($(TMRL_INSTALL_LOCKED),)
	@$(INSTALL_LOCK) $(MAKE) --no-print-directory TMRL_INSTALL_LOCKED=1 $(STAMP)
else
	$(BIN)/python -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet hatchling editables
	$(PIP) install --quiet --no-build-isolation $(foreach p,$(PACKAGES),-e $(p))
	$(PIP) install --quiet -r requirements-dev.txt
	touch $(STAMP)
endif

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check libs services tests benchmarks scripts tools examples

demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(CONFIG_FLAG) $(DEMO_ARGS)

run-relay: $(STAMP)
	$(BIN)/tmrl-relay run $(CONFIG_FLAG)

run-trainer: $(STAMP)
	$(BIN)/tmrl-trainer run $(CONFIG_FLAG)

run-worker: $(STAMP)
	$(BIN)/tmrl-worker run $(CONFIG_FLAG)

bench: $(STAMP)
	for name in $(BENCH_SPEED); do echo "== benchmarks/$$name.py"; $(BIN)/python benchmarks/$$name.py || exit 1; done

bench-long: $(STAMP)
	for name in $(BENCH_LONG); do echo "== benchmarks/$$name.py"; $(BIN)/python benchmarks/$$name.py || exit 1; done

install-systemd:
	sudo bash deploy/systemd/install.sh

clean:
	rm -rf $(VENV) $(VENV).lock .pytest_cache .hypothesis
