# bitsmith: `make demo` runs the main job, `make test` runs the suite. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP  := $(VENV)/.installed

FMNIST := /usr/share/datasets/fashion-mnist
RUNS   := runs

.PHONY: install data demo test lint mutants bench bench-ptq bench-noisyquant bench-mixed bench-bit-level bench-hero bench-sparsity bench-speed clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,hf,deploy]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's package: installed when missing and we are root, else the command is printed.
data:
	@if [ -n "$$BITSMITH_DATA" ] || [ -d $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST is missing; install it with: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"; fi

# The main job: train (or reuse) the zoo CNN, PTQ W8A8 and W4A8, compare.
demo: $(STAMP) data
	$(VENV)/bin/bitsmith train cnn
	$(VENV)/bin/bitsmith run recipes/cnn-ptq-w8a8.yaml --out $(RUNS)/cnn-ptq-w8a8
	$(VENV)/bin/bitsmith run recipes/cnn-ptq-w4a8.yaml --out $(RUNS)/cnn-ptq-w4a8
	$(VENV)/bin/bitsmith report $(RUNS)/cnn-ptq-w8a8 $(RUNS)/cnn-ptq-w4a8 --out $(RUNS)/demo

test: $(STAMP) data
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m pytest -q -n 2 --durations=10

lint: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m ruff format --check src tests examples benchmarks

# Core-logic mutations of every method (tests/mutants.py), one at a time: each must make a test fail.
mutants: $(STAMP)
	$(PY) tests/mutants.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache

# Benchmarks: long measurements that regenerate docs/results/ (not part of `make test`).
bench: bench-ptq bench-noisyquant bench-mixed bench-bit-level bench-hero bench-sparsity bench-speed

bench-ptq: $(STAMP) data
	$(PY) benchmarks/ptq_baselines.py

bench-noisyquant: $(STAMP) data
	$(PY) benchmarks/noisyquant.py

bench-mixed: $(STAMP) data
	$(PY) benchmarks/mixed_precision.py

bench-bit-level: $(STAMP) data
	$(PY) benchmarks/bit_level.py

bench-hero: $(STAMP) data
	$(PY) benchmarks/hero.py

bench-sparsity: $(STAMP) data
	$(PY) benchmarks/sparsity.py

bench-speed: $(STAMP) data
	$(PY) benchmarks/speed.py
	$(PY) benchmarks/speed_profile.py
