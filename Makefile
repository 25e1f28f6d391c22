# imgfarm: the two README commands are `make demo` and `make test`.
# Both set themselves up: Debian packages when root, a virtualenv, and the
# services the tests need (Redis, PostgreSQL) when they are not running.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup system-packages venv services demo demo-vm test test-fast test-vm lint bench bench-vm docs clean

setup: system-packages venv

system-packages:
	@scripts/system-packages.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

services:
	@scripts/ensure-services.sh

demo: setup
	$(PY) -m imgfarm.demo

# The same main job on 3 QEMU machines that PXE-boot the farm's own boot image.
demo-vm: setup services
	$(PY) tests/vm/demo.py

# pytest-xdist: TEST_WORKERS processes (most tests wait on agents and timeouts, so one more
# than the cores, at most 4; `make test TEST_WORKERS=0` runs in this process). Tests of one
# xdist_group share a process. Tests marked `serial` run afterwards, alone (exit status 5 is
# "none collected": there may be none). `make test-vm` runs only the VM tests.
TEST_WORKERS ?= $(shell n=$$(( $$(nproc 2>/dev/null || echo 2) + 1 )); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST_ARGS  ?= -q -ra --durations=15

test: setup services
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS) -n $(TEST_WORKERS) --dist loadgroup -m "not serial"
	$(PY) -m pytest $(PYTEST_ARGS) -m serial || [ $$? -eq 5 ]

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

test-vm: setup services
	$(PY) -m pytest -q -ra -m vm --durations=10

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The drivers' key tables in docs/drivers.md, from the drivers' own properties.
docs: venv
	$(PY) -m imgfarm.drivers.docs docs/drivers.md

bench: setup services
	$(PY) bench/inflight.py
	$(PY) bench/convert.py --grow
	$(PY) bench/pxe_files.py
	$(PY) bench/cli_start.py

bench-vm: setup services
	$(PY) bench/vm.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .imgfarm-demo .imgfarm-demo-vm .cache/vm-bootimage
