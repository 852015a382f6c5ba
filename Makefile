# The two README commands: `make demo` (the main job on embedded defaults) and `make test`.
# Both create .venv and install what they need. On a GPU host: make TORCH_SPEC="torch==2.13.0" \
#   TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128" demo
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# Two pytest workers, one test file each at a time: the integration tests spend most of their
# time waiting on process and cluster start-up, so two streams fit on two cores.
# `make test PYTEST_WORKERS=0` runs them in one process.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=
WORKDIR ?= adrel-work
BIN := $(VENV)/bin

.PHONY: demo test lint format bench-adapter clean install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/adrel demo --workdir $(WORKDIR)

test: install
	$(BIN)/python -m pytest -ra --durations=15 $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-adapter: install
	$(BIN)/python benchmarks/bench_adapter.py

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache .ruff_cache
