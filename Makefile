# Two entry points for a fresh machine; both create .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,eval]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m experiments.demo

test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 tests

bench: $(VENV)/.installed
	$(PY) bench/bench_logprob.py
	$(PY) bench/bench_sampling.py
	$(PY) bench/bench_train_step.py
