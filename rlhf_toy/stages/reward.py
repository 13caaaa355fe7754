"""Stage 2, the reward model: TRL's RewardTrainer (Bradley-Terry loss) on preference pairs, then a
gain and bias that normalise its scores, then an evaluation against the gold judge.

    python scripts/train_reward.py --config configs/reward.yaml [--field value ...]

Training pre-tokenizes its pairs with `scoring.encode_for_reward`, so TRL's own tokenization never runs
and training sees exactly what `scoring.RewardScorer` (used by PPO, DPO, compare and inspect) sees.
Normalisation (lm-human-preferences): after training, the policy (the SFT model) samples responses to
train prompts; gain and bias are set so that those samples score mean 0, std 1, and stored beside the
weights in `final/reward_normalization.json`; `RewardScorer` refuses a directory without it.

Run directory: config.yaml, metrics.jsonl + tensorboard/ (TRL's loss, accuracy, margin per step),
checkpoints/, final/ (an `AutoModelForSequenceClassification` directory + the normalisation JSON),
samples.jsonl (calibration and eval samples with RM and gold scores), summary.json, rm_vs_gold.png.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_toy import data, models, rundir, runlog, sequences, task
from rlhf_toy.config import CommonConfig, ConfigError, LoraFields, PairFields, TrainerFields, above, at_least
from rlhf_toy.evaluation.sample_and_score import sample_and_score
from rlhf_toy.evaluation.stats import pair_calibration
from rlhf_toy.scoring import (
    NORMALIZATION_FILE,
    Judge,
    RewardScorer,
    encode_for_reward,
    load_reward_model,
    response_text,
)
from rlhf_toy.stages.common import (
    RewardPromptsOnce,
    begin_run,
    eval_sampling,
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
class RewardStageConfig(TrainerFields, PairFields, LoraFields, CommonConfig):
    model_name_or_path: str = "runs/sft/final"  # the RM starts from the SFT model (any model works)
    output_dir: str = "runs/reward"
    dataset: str = "data/preferences.jsonl"
    eval_fraction: float = 0.1  # held-out pairs (split by prompt) for the accuracy
    max_train_pairs: int = 0  # subsample the training pairs (0 = all) to fit a time budget
    max_eval_pairs: int = 0  # 0 = all held-out pairs
    learning_rate: float = 1e-5  # (per_device_train_batch_size counts pairs: twice as many sequences)
    max_length: int = 512  # prompt + response + EOS; longer prompts lose their beginning
    margin: float | None = None  # TRL's `margin` column: None = use the dataset's if it has one
    center_rewards_coefficient: float | None = None  # TRL's name; 0.01 is the paper's value
    num_hidden_layers: int = 0  # keep only the N lowest blocks of the init model (0 = all): a
    # shallower RM is faster to train and to score, for every consumer
    eval_steps: int = 0  # TRL's eval loss/accuracy every N steps (0 = only at the end)
    # normalisation and evaluation
    policy_model: str = ""  # the model whose samples calibrate the RM ("" = model_name_or_path)
    train_prompts: str = "data/prompts_train.jsonl"
    eval_prompts: str = "data/prompts_eval.jsonl"
    num_norm_samples: int = 64  # calibration samples (train prompts)
    num_eval_prompts: int = 64  # fresh samples on eval prompts for the Spearman correlation
    max_new_tokens: int = 64
    temperature: float = 0.7
    sample_batch_size: int = 32
    score_batch_size: int = 16

    def validate(self):
        super().validate()
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        at_least(self, 1, "max_new_tokens", "sample_batch_size", "score_batch_size")
        at_least(self, 0, "num_eval_prompts", "eval_steps", "max_train_pairs", "max_eval_pairs")
        above(self, 0, "temperature")
        if self.center_rewards_coefficient is not None:
            at_least(self, 0, "center_rewards_coefficient")
        if self.num_norm_samples < 2:
            raise ConfigError(
                f"num_norm_samples must be at least 2 (a standard deviation), got {self.num_norm_samples}"
            )
        if self.num_hidden_layers < 0:
            raise ConfigError(f"num_hidden_layers must be >= 0, got {self.num_hidden_layers}")
        if self.num_hidden_layers and self.freeze_bottom_layers >= self.num_hidden_layers:
            raise ConfigError(
                f"freeze_bottom_layers={self.freeze_bottom_layers} leaves nothing to train in "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        if self.max_length < 8:
            raise ConfigError(f"max_length must be at least 8 tokens, got {self.max_length}")


# --------------------------------------------------------------------------------------------------
# Normalisation.


def fit_normalization(raw_scores: torch.Tensor) -> dict:
    """Gain and bias that map these scores to mean 0, std 1 (population std, as lm-human-preferences)."""
    raw = raw_scores.double()
    mean, std = raw.mean().item(), raw.std(unbiased=False).item()
    gain = 1.0 / max(std, 1e-8)
    return {"gain": gain, "bias": -mean * gain, "raw_mean": mean, "raw_std": std, "n_samples": len(raw)}


def calibrate(
    scorer: RewardScorer,
    policy,
    tokenizer,
    prompts,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    sample_batch_size: int = 32,
    policy_name: str = "",
) -> tuple[dict, list]:
    """Sample the policy on `prompts`, fit gain and bias on the samples' raw scores, write them beside
    the reward model and into `scorer`. Returns (the normalisation record, [(sample, raw score)])."""
    rng = random.Random(seed)
    chosen = [prompts[i % len(prompts)] for i in range(num_samples)]
    rng.shuffle(chosen)
    samples = sequences.generate(
        policy,
        tokenizer,
        chosen,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=sample_batch_size,
        seed=seed,
        progress="sampling calibration responses",
        precision=scorer.precision,
    )  # the policy runs as the reward model does
    truncated_before = scorer.n_truncated
    raw = scorer.score_raw([s.prompt for s in samples], [s.response for s in samples])
    record = {
        **fit_normalization(raw),
        "policy": policy_name,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "prompts_truncated": scorer.n_truncated - truncated_before,
    }
    (scorer.path / NORMALIZATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    scorer.normalization, scorer.gain, scorer.bias = record, record["gain"], record["bias"]
    return record, list(zip(samples, raw.tolist()))


# --------------------------------------------------------------------------------------------------
# Training data.


def gold_of(record: dict, which: str) -> float:
    """The gold score stored with a pair (`gold_chosen`), or the gold judge's verdict on the text."""
    stored = record.get(f"gold_{which}")
    return (
        float(stored)
        if stored is not None
        else task.gold_score(response_text(record[which]), record.get("title"))
    )


def clean_pairs(records: list[dict], source: str) -> tuple[list[dict], dict]:
    """Normalise the pairs to (prompt messages, chosen text, rejected text) and drop the ones that
    carry no preference (chosen == rejected; a DataError when none is left). Empty responses are kept:
    "something beats nothing" is a preference, and the policy can produce an empty response that the RM
    must then score. The reward and DPO stages both read their pairs through it."""
    pairs, identical = [], 0
    for index, record in enumerate(records):
        where = f"{source}:{index + 1}"
        chosen = response_text(record["chosen"], f"{where}: field 'chosen'")
        rejected = response_text(record["rejected"], f"{where}: field 'rejected'")
        if chosen.strip() == rejected.strip():
            identical += 1
            continue
        pairs.append(
            {
                "prompt": data.as_messages(record["prompt"], "user"),
                "chosen": chosen,
                "rejected": rejected,
                "gold_chosen": gold_of(record, "chosen"),
                "gold_rejected": gold_of(record, "rejected"),
                **({"margin": float(record["margin"])} if record.get("margin") is not None else {}),
            }
        )
    if not pairs:
        raise data.DataError(f"{source}: no usable pairs (all {len(records)} have chosen == rejected)")
    if identical:
        print(
            f"note: {source}: {identical} of {len(records)} pairs dropped (chosen == rejected: no preference)"
        )
    return pairs, {"pairs_read": len(records), "pairs_identical_dropped": identical}


def tokenize_pairs(
    pairs: list[dict], tokenizer, max_length: int, margin: float | None
) -> tuple[list[dict], dict]:
    """Pre-tokenized rows for RewardTrainer (`chosen_ids`, `rejected_ids`, optional `margin`): TRL then
    skips its own tokenization, and training sees exactly what `RewardScorer` will see."""
    rows, truncated, too_long = [], 0, 0
    use_margin = margin is not None or any("margin" in p for p in pairs)
    for pair in pairs:
        try:
            chosen_ids, chosen_cut = encode_for_reward(tokenizer, pair["prompt"], pair["chosen"], max_length)
            rejected_ids, rejected_cut = encode_for_reward(
                tokenizer, pair["prompt"], pair["rejected"], max_length
            )
        except ValueError:
            too_long += 1  # a response longer than the context: never truncated, so the pair is dropped
            continue
        truncated += chosen_cut or rejected_cut
        row = {"chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
        if use_margin:
            row["margin"] = margin if margin is not None else pair.get("margin", 0.0)
        rows.append(row)
    return rows, {"prompts_truncated": truncated, "pairs_response_too_long_dropped": too_long}


# --------------------------------------------------------------------------------------------------
# Evaluation.


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs ranked as labelled; a tie counts half (a coin flip)."""
    if len(chosen) == 0:
        return float("nan")
    return ((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean().item()


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def plot_rm_vs_gold(rm, gold, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.scatter(gold, rm, s=12, alpha=0.7)
    ax.set_xlabel("gold score")
    ax.set_ylabel("reward model score (normalised)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def label_temperature(dataset: str) -> float | None:
    """The Bradley–Terry temperature gold's labeler drew the dataset's labels with, from the `stats.json` that
    `scripts/make_data.py` writes beside it; None for a dataset without one."""
    stats = Path(dataset).parent / "stats.json"
    try:
        return float(json.loads(stats.read_text())["label_temperature"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def held_out_calibration(
    raw_chosen: list[float], raw_rejected: list[float], *, pairs: list[dict], dataset: str, plot_path=None
) -> dict:
    """`stats.pair_calibration` of the RM's raw scores on held-out `pairs`, beside gold's own Bradley–Terry
    probability where the dataset records its labeler's temperature; with `plot_path`, the diagram too."""
    temperature = label_temperature(dataset)
    gold_p = (
        None
        if temperature is None
        else [task.preference_probability(p["gold_chosen"], p["gold_rejected"], temperature) for p in pairs]
    )
    result = pair_calibration(raw_chosen, raw_rejected, gold_p)
    if plot_path is not None:
        plot_reliability(result, plot_path, temperature)
    return result


def plot_reliability(result: dict, path, temperature: float | None) -> None:
    """The reliability diagram of `stats.pair_calibration`'s result: per bin of the RM's P(a ≻ b), how often the
    labels chose a (and gold's own P), against the diagonal a calibrated model lies on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = result["bins"]
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=120)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="calibrated")
    ax.plot([b["confidence"] for b in bins], [b["frequency"] for b in bins], "o-", label="labels' choice")
    if bins and "reference" in bins[0]:
        ax.plot(
            [b["confidence"] for b in bins],
            [b["reference"] for b in bins],
            "s--",
            label=f"gold's P (Bradley–Terry, T = {temperature:g})",
        )
    ax.set_xlabel("reward model's P(a ≻ b) = σ(r_a − r_b)")
    ax.set_ylabel("how often a was preferred")
    ax.set_title(f"{result['n'] // 2} held-out pairs, both orders: ECE {result['ece']:.3f}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _finite(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


# --------------------------------------------------------------------------------------------------
# The stage.


@rundir.releases_lock
def train_reward(cfg: RewardStageConfig) -> Path:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    started = time.time()
    precision = resolve_run_precision(cfg)  # `auto` -> what this machine runs (recorded in config.yaml)
    start = open_run(cfg)
    if start.finished:
        return start.run_dir
    run_dir = start.run_dir
    records = data.load_records(cfg.dataset, data.PREFERENCE_FIELDS)
    pairs, data_stats = clean_pairs(records, cfg.dataset)
    train_pairs, eval_pairs = data.split_records(pairs, cfg.eval_fraction, cfg.seed)
    if cfg.max_train_pairs and len(train_pairs) > cfg.max_train_pairs:
        train_pairs = random.Random(cfg.seed).sample(train_pairs, cfg.max_train_pairs)
    if cfg.max_eval_pairs and len(eval_pairs) > cfg.max_eval_pairs:
        eval_pairs = random.Random(cfg.seed + 1).sample(eval_pairs, cfg.max_eval_pairs)

    tokenizer = models.load_tokenizer(cfg.model_name_or_path)
    train_rows, train_stats = tokenize_pairs(train_pairs, tokenizer, cfg.max_length, cfg.margin)
    eval_rows, _ = tokenize_pairs(eval_pairs, tokenizer, cfg.max_length, cfg.margin)
    if not train_rows:
        raise data.DataError(f"{cfg.dataset}: no training pair fits max_length={cfg.max_length}")
    # What normalisation and evaluation read after training, checked before it (a bad policy or prompts
    # file would otherwise fail only after training, leaving a final/ without its normalisation).
    policy_name = cfg.policy_model or cfg.model_name_or_path
    policy_tokenizer = models.load_tokenizer(policy_name)
    models.check_kind(policy_name, models.CAUSAL_LM)  # it samples the calibration answers
    train_prompts, train_titles = data.load_prompts_and_titles(cfg.train_prompts)
    eval_prompts, eval_titles = data.load_prompts_and_titles(cfg.eval_prompts, cfg.num_eval_prompts)
    model = load_reward_model(cfg.model_name_or_path, cfg.device, cfg.dtype, cfg.num_hidden_layers)
    models.align_with_tokenizer(model, tokenizer)
    models.with_training_attention(model)
    freeze_bottom(model, cfg.freeze_bottom_layers)
    begin_run(start, cfg)  # the first write: the config and the inputs are valid

    checkpoints = run_dir / "checkpoints"
    summary_path = run_dir / "summary.json"
    args = RewardConfig(
        output_dir=str(checkpoints),
        **trainer_fields(cfg, evaluate=bool(eval_rows)),
        max_length=None,  # already fitted by encode_for_reward (TRL would drop, not truncate)
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        activation_checkpointing=False,  # TRL defaults gradient checkpointing on; recomputing only costs time here
    )
    # TRL's trainer; with share_prompts, each pair's prompt through the model once (RewardPromptsOnce)
    trainer_class = (
        type("RewardTrainer", (RewardPromptsOnce, RewardTrainer), {})
        if cfg.shares_prompts(precision.compute == torch.float32)
        else RewardTrainer
    )
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if cfg.eval_steps and eval_rows else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg, "SEQ_CLS"),
        callbacks=[runlog.MetricsCallback(run_dir, tensorboard=cfg.report_to == "tensorboard")],
    )
    train_started = time.time()
    result = train(trainer, start)
    trained = json.loads(summary_path.read_text()) if result is None and summary_path.exists() else {}
    if result is not None:
        trained = {"train_loss": result.training_loss, "train_wall_s": time.time() - train_started}
        if is_main_process():  # kept for a resume that finds training done
            summary_path.write_text(json.dumps(trained, indent=2) + "\n")
    summary = {
        **data_stats,
        "train_pairs": len(train_rows),
        "eval_pairs": len(eval_rows),
        "train_prompts_truncated": train_stats["prompts_truncated"],
        "train_pairs_response_too_long_dropped": train_stats["pairs_response_too_long_dropped"],
        "train_loss": trained.get("train_loss"),
        "train_wall_s": trained.get("train_wall_s"),
        "global_step": trainer.state.global_step,
        "num_processes": trainer.accelerator.num_processes,
    }
    final = save_final(trainer, tokenizer, run_dir)
    del trainer, model
    if not is_main_process():  # calibration and evaluation are rank 0's
        return run_dir

    # Normalisation on the policy's own samples (the distribution PPO starts from).
    policy = models.load_causal_lm(policy_name, policy_tokenizer, cfg.device, cfg.dtype)
    scorer = RewardScorer(
        str(final), cfg.device, cfg.dtype, cfg.score_batch_size, cfg.max_length, require_normalization=False
    )
    normalization, calibration = calibrate(
        scorer,
        policy,
        policy_tokenizer,
        train_prompts,
        num_samples=cfg.num_norm_samples,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
        sample_batch_size=cfg.sample_batch_size,
        policy_name=policy_name,
    )
    summary["normalization"] = normalization
    scorer.n_truncated = 0
    title_of = {json.dumps(p): t for p, t in zip(train_prompts, train_titles)}
    rows = [
        {
            "stage": "calibration",
            "prompt": s.prompt,
            "response": s.response,
            "rm": raw * scorer.gain + scorer.bias,
            "gold": task.gold_score(s.response, title_of.get(json.dumps(s.prompt))),
            "n_tokens": len(s.response_ids),
            "has_eos": s.has_eos,
        }
        for s, raw in calibration
    ]

    # Held-out pair accuracy, next to the ceiling the label noise allows: the gold judge's own
    # accuracy on the same (noisy) labels.
    if eval_pairs:
        prompts = [p["prompt"] for p in eval_pairs]
        raw_c = scorer.score_raw(prompts, [p["chosen"] for p in eval_pairs])
        raw_r = scorer.score_raw(prompts, [p["rejected"] for p in eval_pairs])
        chosen, rejected = (
            raw_c * scorer.gain + scorer.bias,
            raw_r * scorer.gain + scorer.bias,
        )  # = scorer.score
        gold_c = torch.tensor([p["gold_chosen"] for p in eval_pairs])
        gold_r = torch.tensor([p["gold_rejected"] for p in eval_pairs])
        gold_differs = gold_c != gold_r
        rm_says_c = chosen > rejected
        summary.update(
            {
                "eval_accuracy": pair_accuracy(chosen, rejected),
                "eval_accuracy_ceiling": pair_accuracy(gold_c, gold_r),
                # how often the RM orders a pair as the gold judge does (labels without noise)
                "eval_gold_agreement": (rm_says_c == (gold_c > gold_r))[gold_differs].double().mean().item(),
                "eval_prompts_truncated": scorer.n_truncated,
            }
        )
        summary["eval_accuracy_gap"] = summary["eval_accuracy_ceiling"] - summary["eval_accuracy"]
        calibration_result = held_out_calibration(
            raw_c.tolist(),
            raw_r.tolist(),
            pairs=eval_pairs,
            dataset=cfg.dataset,
            plot_path=run_dir / "rm_calibration.png",
        )
        summary["eval_rm_ece"] = calibration_result["ece"]
        summary["eval_rm_calibration"] = calibration_result["bins"]

    # Rank correlation with gold on fresh samples of the eval prompts.
    if eval_prompts:
        summary["eval_samples"], scored = sample_and_score(
            policy,
            policy_tokenizer,
            eval_prompts,
            eval_sampling(cfg, scorer.precision, seed=cfg.seed + 1),
            titles=eval_titles,
            judge=Judge(scorer),
            progress="sampling eval responses",
        )
        rm, gold = [r["rm"] for r in scored], [r["gold"] for r in scored]
        summary["spearman_rm_gold"] = spearman(rm, gold)
        rows += [{"stage": "eval", **row} for row in scored]
        plot_rm_vs_gold(
            rm,
            gold,
            run_dir / "rm_vs_gold.png",
            f"{len(scored)} samples on eval prompts: Spearman {summary['spearman_rm_gold']:.3f}",
        )
    (run_dir / "samples.jsonl").unlink(missing_ok=True)
    runlog.append_jsonl(run_dir / "samples.jsonl", rows)

    summary["wall_s"] = time.time() - started
    summary = {k: _finite(v) for k, v in summary.items()}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    runlog.MetricsLogger(run_dir, tensorboard=False).log(
        summary["global_step"], {"summary": 1, **runlog.flatten(summary)}
    )
    rundir.mark_finished(run_dir, summary["global_step"])
    print_summary(summary, run_dir)
    return run_dir


def print_summary(summary: dict, run_dir: Path) -> None:
    def fmt(key, spec=".3f"):
        value = summary.get(key)
        return "n/a" if value is None else format(value, spec)

    print(f"\nreward model: {run_dir / 'final'}")
    print(f"  held-out pairs          {summary['eval_pairs']}")
    print(
        f"  held-out accuracy       {fmt('eval_accuracy')}   (noise ceiling, the gold judge on the same "
        f"labels: {fmt('eval_accuracy_ceiling')})"
    )
    print(f"  agreement with gold     {fmt('eval_gold_agreement')}")
    print(f"  calibration (ECE)       {fmt('eval_rm_ece')}   (rm_calibration.png)")
    print(
        f"  Spearman(RM, gold)      {fmt('spearman_rm_gold')}   on "
        f"{summary.get('eval_samples', {}).get('n_samples', 0)} fresh samples"
    )
    print(
        f"  normalisation           gain {summary['normalization']['gain']:.4f}, "
        f"bias {summary['normalization']['bias']:.4f} ({summary['normalization']['n_samples']} samples)"
    )
    print(
        f"  dropped/truncated       {summary['pairs_identical_dropped']} identical pairs dropped, "
        f"{summary['train_prompts_truncated']} training prompts truncated"
    )
    print(f"  wall time               {summary['wall_s']:.0f} s (training {fmt('train_wall_s', '.0f')} s)")


def _normalize_main(argv=None) -> None:
    """`python -m rlhf_toy.stages.reward normalize RM_DIR [--policy MODEL]`: (re)write the gain and bias of an
    existing reward model directory."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m rlhf_toy.stages.reward normalize", description=_normalize_main.__doc__
    )
    parser.add_argument("reward_model")
    parser.add_argument("--policy", default="runs/sft/final")
    parser.add_argument("--prompts", default="data/prompts_train.jsonl")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    tokenizer = models.load_tokenizer(args.policy)
    policy = models.load_causal_lm(args.policy, tokenizer, args.device)
    scorer = RewardScorer(args.reward_model, device=args.device, require_normalization=False)
    record, _ = calibrate(
        scorer,
        policy,
        tokenizer,
        data.load_prompts(args.prompts),
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        policy_name=args.policy,
    )
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["normalize"]:
        raise SystemExit(
            "usage: python -m rlhf_toy.stages.reward normalize RM_DIR [--policy MODEL] [--prompts FILE]"
        )
    try:
        _normalize_main(sys.argv[2:])
    except (ConfigError, data.DataError, models.ModelNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
