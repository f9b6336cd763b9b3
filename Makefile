# The README's two commands: `make demo` and `make test`. Both bootstrap .venv from a clean clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch where there is no NVIDIA GPU; a plain `torch` requirement would pull a
# multi-GB CUDA build. On a GPU machine the index's default (CUDA) build is used.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.6" || echo "torch==2.13.0")

.PHONY: demo test setup lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Each demo gets its own run directory: a fresh run refuses a directory that already holds checkpoints.
demo: $(STAMP)
	$(PY) scripts/train.py --config configs/tiny.yaml --set train_config.output_dir=runs/tiny-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check llm scripts tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
