# Two set-up commands (see README): `make demo` and `make test`.
# Each creates .venv, installs torch==2.13.0 first (a CPU wheel, no CUDA download), then the project.
# `make test` also builds .venv-vision (the optional `vision` extra: torchvision works here only with
# torch 2.14.1 and torchvision 0.29.1) and runs the torchvision tests in it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
VISION_VENV ?= .venv-vision
VISION_PY   := $(VISION_VENV)/bin/python
VISION_TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-main test-vision venv vision-venv bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m topkconv.layers.kernels.warmup  # numba's one-time compilation, cached beside the package
	touch $@

venv: $(VENV)/.installed

$(VISION_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VISION_VENV)
	$(VISION_PY) -m pip install -q --upgrade pip
	$(VISION_PY) -m pip install -q $(VISION_TORCH)
	$(VISION_PY) -m pip install -q -e ".[test,vision]"
	touch $@

vision-venv: $(VISION_VENV)/.installed

demo: venv
	$(VENV)/bin/topkconv reproduce

test: test-main test-vision

test-main: venv
	$(PY) -m pytest -q -p no:cacheprovider

# tests/conftest.py leaves test_vision.py uncollected where torchvision is missing (.venv); here it is not.
test-vision: vision-venv
	$(VISION_PY) -m pytest -q -p no:cacheprovider tests/test_vision.py

bench: venv
	$(PY) benchmarks/bench_layers.py

clean:
	rm -rf $(VENV) $(VISION_VENV) runs reports
