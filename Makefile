# The README's two commands: `make run` and `make test`. Both set everything up first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; a machine that already has a (CUDA) torch in the venv keeps it.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup test lint run info clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

info: $(STAMP)
	$(BIN)/vident info

# The streaming service with the browser demo; settings from VIDENT_* variables (see docs/protocol.md).
run: $(STAMP)
	@echo "vident: starting; open http://$${VIDENT_HOST:-127.0.0.1}:$${VIDENT_PORT:-8000}/ (Ctrl-C stops)"
	$(BIN)/vident serve

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
