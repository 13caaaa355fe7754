"""Stage 1, supervised fine-tuning on demonstrations, with TRL's SFTTrainer (loss on completions only).

Before and after training it samples the eval prompts and records the gold mean, so the effect of
the stage is a number in metrics.jsonl, and the samples are in samples.jsonl.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_toy import data, models, rundir, runlog
from rlhf_toy.config import CommonConfig, ConfigError, LoraFields, TrainerFields, above, at_least
from rlhf_toy.evaluation.sample_and_score import sample_and_score
from rlhf_toy.scoring import Judge
from rlhf_toy.stages.common import (
    begin_run,
    eval_sampling,
    evaluate_before_training,
    freeze_bottom,
    is_main_process,
    lora_config,
    open_run,
    resolve_run_precision,
    save_final,
    train,
    trainer_fields,
)


@dataclass
class SFTStageConfig(TrainerFields, LoraFields, CommonConfig):
    output_dir: str = "runs/sft"
    dataset: str = "data/sft.jsonl"
    eval_fraction: float = 0.1  # held-out demonstrations for the eval loss
    eval_prompts: str = "data/prompts_eval.jsonl"
    num_eval_prompts: int = 64  # eval prompts sampled before and after training (0 = skip)
    max_length: int = 256
    eval_steps: int = 0  # 0 = evaluate only before and after
    max_new_tokens: int = 64  # for the before/after samples
    temperature: float = 0.7
    sample_batch_size: int = 32

    def validate(self):
        super().validate()
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        at_least(self, 1, "max_length", "max_new_tokens", "sample_batch_size")
        at_least(self, 0, "num_eval_prompts", "eval_steps")
        above(self, 0, "temperature")


def drop_prompts_too_long(records: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int, int]:
    """The records whose prompt leaves room for a completion token within `max_length`, the number
    dropped, and the longest prompt (tokens). TRL cuts every sequence to max_length and silently drops
    those left with nothing to learn (a prompt that fills it), which then fails as `num_samples=0` or a
    missing eval_loss; the prompt is tokenized as TRL does (chat template, generation prompt)."""
    kept, longest = [], 0
    for record in records:
        n = len(
            tokenizer.apply_chat_template(
                record["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        longest = max(longest, n)
        if n < max_length:
            kept.append(record)
    return kept, len(records) - len(kept), longest


@rundir.releases_lock
def run_sft(cfg: SFTStageConfig) -> Path:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    precision = resolve_run_precision(cfg)  # `auto` -> what this machine runs (recorded in config.yaml)
    start = open_run(cfg)
    if start.finished:
        return start.run_dir
    run_dir = start.run_dir
    records = data.load_records(cfg.dataset, data.SFT_FIELDS)
    records = [
        {
            "prompt": data.as_messages(r["prompt"], "user"),
            "completion": data.as_messages(r["completion"], "assistant"),
        }
        for r in records
    ]
    train_records, eval_records = data.split_records(records, cfg.eval_fraction, cfg.seed)
    eval_prompts, eval_titles = data.load_prompts_and_titles(cfg.eval_prompts, cfg.num_eval_prompts)

    tokenizer = models.load_tokenizer(cfg.model_name_or_path)
    train_records, too_long, longest = drop_prompts_too_long(train_records, tokenizer, cfg.max_length)
    if not train_records:
        raise data.DataError(
            f"{cfg.dataset}: every training example's prompt fills max_length={cfg.max_length} "
            f"tokens (the longest has {longest}), leaving no completion token to train on; "
            "raise max_length"
        )
    eval_records, eval_too_long, _ = drop_prompts_too_long(eval_records, tokenizer, cfg.max_length)
    if too_long or eval_too_long:
        print(
            f"note: {too_long + eval_too_long} examples dropped ({eval_too_long} of them held out): their prompt "
            f"alone fills max_length={cfg.max_length} tokens, so no completion token would be trained on"
        )
    model = models.load_causal_lm(cfg.model_name_or_path, tokenizer, cfg.device, cfg.dtype)
    models.with_training_attention(model)
    freeze_bottom(model, cfg.freeze_bottom_layers)
    begin_run(start, cfg)  # the first write: the config and the inputs are valid
    checkpoints = run_dir / "checkpoints"
    resume_from = start.checkpoint
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if resume_from and summary_path.exists() else {}

    def evaluate(policy, when: str) -> None:  # gold on the eval prompts (no reward model exists yet)
        summary[when], rows = sample_and_score(
            policy,
            tokenizer,
            eval_prompts,
            eval_sampling(cfg, precision),
            titles=eval_titles,
            judge=Judge(None),
            progress=f"sampling eval prompts ({when})",
        )
        runlog.append_jsonl(run_dir / "samples.jsonl", [{"stage": when, **row} for row in rows])

    if eval_prompts and "before" not in summary and is_main_process():
        (run_dir / "samples.jsonl").unlink(missing_ok=True)
        evaluate(model, "before")

    args = SFTConfig(
        output_dir=str(checkpoints),
        **trainer_fields(cfg, evaluate=bool(eval_records)),
        max_length=cfg.max_length,
        completion_only_loss=True,
        gradient_checkpointing=False,  # TRL defaults it on; on a small model on a CPU it only costs time (~30%)
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_records),
        eval_dataset=Dataset.from_list(eval_records) if eval_records else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        callbacks=[runlog.MetricsCallback(run_dir, tensorboard=cfg.report_to == "tensorboard")],
    )
    before = evaluate_before_training(trainer) if eval_records and "eval_loss_before" not in summary else None
    if before is not None:
        summary["eval_loss_before"] = before["eval_loss"]
    summary["examples_prompt_too_long_dropped"] = too_long + eval_too_long
    if is_main_process():
        summary_path.write_text(json.dumps(summary) + "\n")

    started = time.time()
    result = train(trainer, start)
    if result is not None:
        summary["train_wall_s"] = time.time() - started
        # TRL logs num_tokens, the tokens this process trained on (it restarts from 0 on resume).
        logged_tokens = [
            r["num_tokens"] for r in runlog.read_jsonl(run_dir / "metrics.jsonl") if "num_tokens" in r
        ]
        summary["train_tokens"] = logged_tokens[-1] if logged_tokens else 0
        summary["tokens_per_s"] = summary["train_tokens"] / max(result.metrics["train_runtime"], 1e-9)
        summary["train_loss"] = result.training_loss
        summary["num_processes"] = trainer.accelerator.num_processes
        if is_main_process():  # kept for a resume that finds training done
            summary_path.write_text(json.dumps(summary) + "\n")
    if eval_records:
        summary["eval_loss_after"] = trainer.evaluate()["eval_loss"]
    final = save_final(trainer, tokenizer, run_dir)
    if not is_main_process():  # the rest (sampling, summary) is rank 0's
        return run_dir

    if eval_prompts:
        evaluate(models.load_causal_lm(str(final), tokenizer, cfg.device, cfg.dtype), "after")
    summary_path.write_text(json.dumps(summary) + "\n")
    runlog.MetricsLogger(run_dir, tensorboard=False).log(
        trainer.state.global_step, {"summary": 1, **runlog.flatten(summary)}
    )
    rundir.mark_finished(run_dir, trainer.state.global_step)
    return run_dir
