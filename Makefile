# The README's two commands: `make demo` (the whole job on the toy world) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test bench clean-demo tables tables-quick lifelong

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: setup
	$(PY) run_demo.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench_editing.py --shapes tiny --quick

clean-demo:
	rm -rf records/demo records/pretrained data/toyworld eval_results/demo

tables: setup
	$(PY) run_tables.py

tables-quick: setup
	$(PY) run_tables.py --quick

lifelong: setup
	$(PY) run_lifelong.py
