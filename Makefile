# memscan tasks. `make demo` and `make test` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; install your CUDA build into the venv first to use a GPU.
TORCH ?= torch==2.13.0
# Which faiss: the extra `cpu` (faiss-cpu) or `gpu` (faiss-gpu), never both (one `faiss` module).
FAISS ?= cpu

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[$(FAISS),dev,ray]'
	touch $@

demo: setup
	$(BIN)/memscan demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_extract.py

clean:
	rm -rf memscan-demo .pytest_cache
