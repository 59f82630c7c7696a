# The two commands of the README:  make demo  |  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_ROOT ?= data
ANIMAL ?= DEMO
PYTEST_ARGS ?=

.PHONY: demo test install clean-demo

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

test: $(VENV)/.installed
	@bash scripts/system-deps.sh test
	$(PY) -m pytest $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DATA_ROOT)/$(ANIMAL) $(DATA_ROOT)/slidepipe.db
