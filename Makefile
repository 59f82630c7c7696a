# The two commands of the README:  make demo  |  make test   (and make bench: docs/performance.md)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_ROOT ?= data
ANIMAL ?= DEMO
PYTEST_ARGS ?=
# e.g. make bench BENCH_ARGS='--width 2048 --height 2048 --depths 16,32 --full-section'
BENCH_ARGS ?=

.PHONY: demo test install clean-demo bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	@bash scripts/system-deps.sh apache
	$(PY) -m pipeline sample --animal $(ANIMAL) --data-root $(DATA_ROOT)
	bash scripts/demo.sh $(PY) $(ANIMAL) $(DATA_ROOT)

# One pytest process per core, at least 2 (pytest-xdist): many tests wait on subprocesses, servers
# and the browser. A module runs whole in one process, so its fixtures are built once; a session
# fixture used by several modules may be built in each. PYTEST_PROCS=0 runs in one process.
PYTEST_PROCS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -lt 2 ] && n=2; echo $$n)
test: $(VENV)/.installed
	@bash scripts/system-deps.sh test
	$(PY) -m pytest -n $(PYTEST_PROCS) --dist loadfile $(PYTEST_ARGS)

bench: $(VENV)/.installed
	PYTHONPATH=$(CURDIR) $(PY) -m bench $(BENCH_ARGS)

clean-demo:
	rm -rf $(DATA_ROOT)/$(ANIMAL) $(DATA_ROOT)/slidepipe.db
