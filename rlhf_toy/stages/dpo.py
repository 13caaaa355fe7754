"""Stage 4, Direct Preference Optimization with TRL's DPOTrainer, on the same preference pairs the
reward model learns from and from the same SFT model PPO starts from.

DPO needs no reward model and no sampling while it trains: it raises the policy's log-ratio against
the frozen reference on chosen answers over rejected ones (Rafailov et al. 2023). The implicit reward
β·(log π − log π_ref) is what TRL logs as `rewards/*`; `rewards/margins` (chosen − rejected) should
grow. Before and after training it samples the eval prompts and records gold, the RM score (when a
reward model exists) and the sequence KL to the reference, under the names PPO logs (`score/gold`,
`score/rm`, `objective/kl`), so compare.py can overlay the two.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_toy import data, models, rundir, runlog
from rlhf_toy.config import (
    CommonConfig,
    ConfigError,
    LoraFields,
    PairFields,
    TrainerFields,
    above,
    at_least,
    within,
)
from rlhf_toy.evaluation.sample_and_score import as_training_metrics, sample_and_score
from rlhf_toy.scoring import Judge
from rlhf_toy.stages.common import (
    DPOAnswerWindows,
    begin_run,
    eval_sampling,
    evaluate_before_training,
    freeze_bottom,
    is_main_process,
    lora_config,
    open_run,
    resolve_run_precision,
    save_final,
    shared_dataset,
    train,
    trainer_fields,
)
from rlhf_toy.stages.reward import clean_pairs

# TRL 1.12's DPO loss types (see trl.DPOConfig.loss_type); sigmoid is DPO, ipo is IPO (Azar et al.).
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


@dataclass
class DPOStageConfig(TrainerFields, PairFields, LoraFields, CommonConfig):
    model_name_or_path: str = "runs/sft/final"  # the SFT model PPO starts from, which is also the reference
    output_dir: str = "runs/dpo"
    dataset: str = "data/preferences.jsonl"
    max_pairs: int = 0  # a seeded subsample of the pairs (0 = all): CPU time is the budget
    # Only the pairs whose two answers ended on their own (`chosen_cut` and `rejected_cut` false): a cut answer
    # ends in an EOS the sampler never drew, so DPO, pushing a cut rejected answer down, learns not to end.
    finished_pairs_only: bool = False
    eval_fraction: float = 0.05  # held-out pairs (by prompt) for eval reward accuracy/margins
    beta: float = 0.1  # for IPO this is τ
    loss_type: str = "sigmoid"  # sigmoid (DPO), ipo, hinge, robust, ...; a comma list combines losses
    label_smoothing: float = 0.0  # robust DPO / cDPO: the assumed label-flip probability
    learning_rate: float = 5e-6
    max_length: int = 192  # prompt + answer tokens (longer pairs keep their start)
    # Reference log-probs of every pair computed once before training: the reference model then never
    # runs during training (and needs no memory), which on a CPU saves about a third of each step.
    precompute_ref_log_probs: bool = True
    gradient_checkpointing: bool = False  # TRL's default is on; on a small CPU model it only costs time
    eval_steps: int = 0  # 0 = evaluate the held-out pairs only before and after
    eval_prompts: str = "data/prompts_eval.jsonl"
    num_eval_prompts: int = 64  # eval prompts sampled before and after training (0 = skip)
    reward_model: str = "runs/reward/final"  # scores the samples when it exists ("" = never)
    max_new_tokens: int = 48
    temperature: float = 0.7
    sample_batch_size: int = 32

    def validate(self):
        super().validate()
        at_least(self, 1, "max_length", "max_new_tokens", "sample_batch_size")
        at_least(self, 0, "max_pairs", "num_eval_prompts", "eval_steps")
        above(self, 0, "temperature")
        within(self, 0, 0.5, "label_smoothing")  # a label-flip probability (TRL's range)
        unknown = [t for t in self.loss_types if t not in LOSS_TYPES]
        if unknown:
            import difflib

            near = difflib.get_close_matches(unknown[0], LOSS_TYPES, n=1, cutoff=0.0)
            raise ConfigError(
                f"loss_type {unknown[0]!r} is not one of TRL's DPO losses"
                + (f"; did you mean {near[0]!r}?" if near else f" ({', '.join(LOSS_TYPES)})")
            )
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if "exo_pair" in self.loss_types and self.label_smoothing <= 0:
            raise ConfigError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")

    @property
    def loss_types(self) -> list[str]:
        return [t.strip() for t in self.loss_type.split(",") if t.strip()]


def finished_pairs(records: list[dict], source: str) -> list[dict]:
    """The pairs neither of whose answers was cut at the sampling limit (`finished_pairs_only`)."""
    for line, record in enumerate(records, 1):
        for field in ("chosen_cut", "rejected_cut"):
            if not isinstance(record.get(field), bool):
                raise data.DataError(
                    f"{source}:{line}: finished_pairs_only needs field {field!r}, true or false (was the answer cut "
                    f"at the sampling limit), got {record.get(field)!r}; `python scripts/make_data.py --relabel` "
                    "writes it"
                )
    kept = [r for r in records if not r["chosen_cut"] and not r["rejected_cut"]]
    if not kept:
        raise data.DataError(f"{source}: finished_pairs_only left no pair (every pair has a cut answer)")
    return kept


def load_pairs(cfg: DPOStageConfig) -> tuple[list[dict], list[dict], dict]:
    """Preference pairs in TRL's conversational form, without the ones that carry no preference (the
    reward stage's `clean_pairs`: chosen == rejected would train on a constant loss of log 2),
    subsampled and split by prompt; and the counts."""
    records = data.load_records(cfg.dataset, data.PREFERENCE_FIELDS)
    kept = finished_pairs(records, cfg.dataset) if cfg.finished_pairs_only else records
    cleaned, stats = clean_pairs(kept, cfg.dataset)
    stats["pairs_with_a_cut_answer_dropped"] = len(records) - len(kept)
    pairs = [
        {
            "prompt": p["prompt"],
            "chosen": data.as_messages(p["chosen"], "assistant"),
            "rejected": data.as_messages(p["rejected"], "assistant"),
        }
        for p in cleaned
    ]
    if cfg.max_pairs and cfg.max_pairs < len(pairs):
        pairs = random.Random(cfg.seed).sample(pairs, cfg.max_pairs)
    return *data.split_records(pairs, cfg.eval_fraction, cfg.seed), stats


def pairs_longer_than(pairs: list[dict], tokenizer, max_length: int) -> int:
    """How many pairs have a side longer than `max_length` tokens as the chat template formats it: TRL's DPOTrainer
    keeps the first max_length tokens of each sequence, so their answers lose their end (or, past a long
    prompt, all of it)."""

    def n_tokens(messages) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    prompts = [data.as_messages(p["prompt"], "user") for p in pairs]
    return sum(
        max(n_tokens(m + p["chosen"]), n_tokens(m + p["rejected"])) > max_length
        for m, p in zip(prompts, pairs)
    )


@rundir.releases_lock
def run_dpo(cfg: DPOStageConfig) -> Path:
    from trl import DPOConfig, DPOTrainer

    precision = resolve_run_precision(cfg)  # `auto` -> what this machine runs (recorded in config.yaml)
    start = open_run(cfg)
    if start.finished:
        return start.run_dir
    run_dir = start.run_dir
    train_pairs, eval_pairs, pair_stats = load_pairs(cfg)
    eval_prompts, eval_titles = data.load_prompts_and_titles(cfg.eval_prompts, cfg.num_eval_prompts)

    tokenizer = models.load_tokenizer(cfg.model_name_or_path)
    pairs_truncated = pairs_longer_than(train_pairs + eval_pairs, tokenizer, cfg.max_length)
    if pairs_truncated:
        print(
            f"note: {pairs_truncated} of {len(train_pairs) + len(eval_pairs)} pairs are longer than max_length="
            f"{cfg.max_length} tokens: TRL keeps the first {cfg.max_length} of each (pairs_truncated in summary.json)"
        )
    model = models.load_causal_lm(cfg.model_name_or_path, tokenizer, cfg.device, cfg.dtype)
    models.with_training_attention(model)
    freeze_bottom(model, cfg.freeze_bottom_layers)
    judge = Judge(cfg.reward_model or None, device=cfg.device, dtype=cfg.dtype) if eval_prompts else None
    if judge is not None and judge.note:
        print(f"note: {judge.note}")
    begin_run(start, cfg)  # the first write: the config and the inputs are valid
    checkpoints = run_dir / "checkpoints"
    resume_from = start.checkpoint
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if resume_from and summary_path.exists() else {}

    def evaluate(policy, when: str, ref=None) -> None:  # gold, RM and (after) the KL to the reference
        summary[when], rows = sample_and_score(
            policy,
            tokenizer,
            eval_prompts,
            eval_sampling(cfg, precision),
            titles=eval_titles,
            judge=judge,
            ref=ref,
            progress=f"sampling eval prompts ({when})",
        )
        runlog.append_jsonl(run_dir / "samples.jsonl", [{"stage": when, **row} for row in rows])

    if eval_prompts and "before" not in summary and is_main_process():
        (run_dir / "samples.jsonl").unlink(missing_ok=True)
        evaluate(model, "before")
        summary["before"]["kl_to_ref"] = 0.0  # the policy is the reference
        # Step 0 of PPO-named curves (score/gold, score/rm, objective/kl) that compare.py overlays.
        logger = runlog.MetricsLogger(
            run_dir, tensorboard=cfg.report_to == "tensorboard", resume_step=None if resume_from else -1
        )  # fresh run: drop old records
        logger.log(0, {**as_training_metrics(summary["before"]), "sample_stage": 0})
        logger.close()

    args = DPOConfig(
        output_dir=str(checkpoints),
        **trainer_fields(cfg, evaluate=bool(eval_pairs)),
        max_length=cfg.max_length,
        beta=cfg.beta,
        loss_type=cfg.loss_types,
        label_smoothing=cfg.label_smoothing,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    # The reference: with LoRA, the same weights with the adapter disabled (TRL's default); with
    # precomputed log-probs, TRL runs the initial model once over the pairs (before any resume loads a
    # checkpoint) and keeps no second copy; otherwise a frozen copy loaded like the policy (same pad token).
    ref_model = None
    if not cfg.use_lora and not cfg.precompute_ref_log_probs:
        ref_model = models.load_causal_lm(cfg.model_name_or_path, tokenizer, cfg.device, cfg.dtype)
    # TRL precomputes the reference log-probs here, in __init__, before accelerate puts the model under its
    # autocast: run that pass in the precision training runs in (bf16 compute under mixed precision, ~2x faster).
    with precision.autocast():
        # TRL's trainer reading each answer's logits only; with share_prompts, each pair's prompt through the model
        # once (DPOAnswerWindows)
        share_prompts = cfg.shares_prompts(precision.compute == torch.float32)
        mixed = {"share_prompts": share_prompts, "frozen_bottom": cfg.freeze_bottom_layers}
        trainer = type("DPOTrainer", (DPOAnswerWindows, DPOTrainer), mixed)(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=shared_dataset(train_pairs, run_dir / "datasets/train", cfg),
            eval_dataset=shared_dataset(eval_pairs, run_dir / "datasets/eval", cfg) if eval_pairs else None,
            processing_class=tokenizer,
            peft_config=lora_config(cfg),
            callbacks=[runlog.MetricsCallback(run_dir, tensorboard=cfg.report_to == "tensorboard")],
        )
    before = evaluate_before_training(trainer) if eval_pairs and "eval_before" not in summary else None
    if before is not None:
        summary["eval_before"] = _eval_metrics(before)
    if is_main_process():
        summary_path.write_text(json.dumps(summary) + "\n")

    started = time.time()
    result = train(trainer, start)
    if result is not None:
        summary["train_wall_s"] = time.time() - started
        summary["train_loss"] = result.training_loss
        summary["num_processes"] = trainer.accelerator.num_processes
        if is_main_process():
            summary_path.write_text(json.dumps(summary) + "\n")  # kept for a resume that finds training done
    summary["train_pairs"], summary["eval_pairs"] = len(train_pairs), len(eval_pairs)
    summary["pairs_identical_dropped"] = pair_stats["pairs_identical_dropped"]
    summary["pairs_with_a_cut_answer_dropped"] = pair_stats["pairs_with_a_cut_answer_dropped"]
    summary["pairs_truncated"] = pairs_truncated
    margins = [
        r["rewards/margins"] for r in runlog.read_jsonl(run_dir / "metrics.jsonl") if "rewards/margins" in r
    ]
    if margins:
        summary["train_margin_first"], summary["train_margin_last"] = margins[0], margins[-1]
    if eval_pairs:
        summary["eval_after"] = _eval_metrics(trainer.evaluate())
    final = save_final(trainer, tokenizer, run_dir)
    if not is_main_process():  # the rest (sampling, summary) is rank 0's
        return run_dir

    step = trainer.state.global_step
    logger = runlog.MetricsLogger(run_dir, tensorboard=cfg.report_to == "tensorboard")
    # A rerun of this tail (killed after training) replaces, not repeats, its records.
    kept = [r for r in runlog.read_jsonl(logger.path) if r.get("sample_stage") != 1 and "summary" not in r]
    logger.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    if eval_prompts:
        del trainer, model, ref_model
        reference = models.load_causal_lm(cfg.model_name_or_path, tokenizer, cfg.device, cfg.dtype)
        evaluate(models.load_causal_lm(str(final), tokenizer, cfg.device, cfg.dtype), "after", reference)
        logger.log(step, {**as_training_metrics(summary["after"]), "sample_stage": 1})
    summary_path.write_text(json.dumps(summary) + "\n")
    logger.log(step, {"summary": 1, **runlog.flatten(summary)})
    logger.close()
    rundir.mark_finished(run_dir, step)
    return run_dir


def _eval_metrics(metrics: dict) -> dict:
    """The evaluation's loss, accuracy and margin, without the eval_ prefix."""
    return {
        k.removeprefix("eval_"): v
        for k, v in metrics.items()
        if k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
    }
