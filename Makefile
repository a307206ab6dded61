# The two commands of the README are `make demo` and `make test`; both create
# .venv when it is missing.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint bench demo clean

setup: $(STAMP)

# torch first and pinned: pip takes the local CPU wheel of 2.13.0 where there is
# one, and an unpinned torch would pull a multi-GB CUDA build. No torchvision.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	MOSE_TRIM=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

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

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
