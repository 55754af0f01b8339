# Two entry points for a fresh machine; both create .venv on first use. Each installs the project (editable) with
# the extras it needs: `demo` the demo's data packages (pyproject.toml, [demo]), `test` the test and eval ones.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench

$(PY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(PY)
	$(VENV)/bin/pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(VENV)/bin/pip install --quiet -e '.[test,eval]'
	touch $@

demo: $(VENV)/.installed-demo
	$(PY) -m experiments.demo

test: $(VENV)/.installed-test
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 tests

bench: $(VENV)/.installed-test
	$(PY) bench/bench_logprob.py
	$(PY) bench/bench_sampling.py
	$(PY) bench/bench_train_step.py
