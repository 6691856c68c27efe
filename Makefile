# Two set-up commands (see README): `make demo` and `make test`.
# Each creates .venv, installs torch==2.13.0 first (a CPU wheel, no CUDA download), then the project.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: demo test venv bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/topkconv reproduce

test: venv
	$(PY) -m pytest -q -p no:cacheprovider

bench: venv
	$(PY) benchmarks/bench_layers.py

clean:
	rm -rf $(VENV) runs reports
