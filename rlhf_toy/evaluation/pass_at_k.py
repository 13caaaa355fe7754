"""pass@k on a task with an exact check (RLVR): n answers to each eval prompt, and the unbiased estimator of
Chen et al. (2021, HumanEval), pass@k = 1 − C(n − c, k) / C(n, k) averaged over prompts, c the prompt's
answers that pass. Before and after RL it shows what a single number hides: whether training sharpened
pass@1 by narrowing what the model can still find in k tries (Yue et al. 2025, "Does RL really incentivize
reasoning capacity...").

    python scripts/pass_at_k.py --config configs/rlvr.yaml --models sft=runs/sft grpo=runs/variants/rlvr/grpo \\
        --n 16 --k 1 4 16 --output reports/variants/rlvr_pass_at_k.md

The config (a PPO stage YAML) names the eval prompts, the check (its first `rewards` entry; an answer passes
when the check returns 1), the answer length, temperature and prompt length, as PPO's own evaluation uses
them. Prints one table (a .json beside --output holds every prompt's count).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import yaml

from rlhf_toy import data, models, sequences
from rlhf_toy.evaluation.compare import CompareError, load_model_and_tokenizer, resolve_entries
from rlhf_toy.rewards import RewardFunctionError, call_reward_function, load_reward_functions


class PassAtKError(ValueError):
    """Bad pass@k input (a config without a check, k above n); the message names the setting."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k answers drawn without replacement from n, c of them passing,
    passes: 1 − C(n − c, k) / C(n, k). Unbiased for the model's pass@k, unlike 1 − (1 − c/n)^k."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def passing_counts(
    model,
    tokenizer,
    records: list[dict],
    prompts: list,
    check: tuple,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    max_prompt_length: int,
    batch_size: int,
    seed: int,
    precision,
    label: str,
) -> list[int]:
    """Per prompt, how many of its n sampled answers the check passes (returns 1). Each prompt is repeated n
    times next to each other, as PPO's groups are, and sampled with `sequences.generate`."""
    repeated = [p for p in prompts for _ in range(n)]
    samples = sequences.generate(
        model,
        tokenizer,
        repeated,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
        max_prompt_length=max_prompt_length,
        progress=f"sampling {label} ({n} per prompt)",
        precision=precision,
    )
    entry, _, function = check
    values = call_reward_function(
        entry,
        function,
        [r for r in records for _ in range(n)],
        [s.response for s in samples],
        [s.response_ids for s in samples],
        step=0,
        max_steps=0,
        log_metric=lambda *_: None,
    ).tolist()
    passed = [v == 1.0 for v in values]  # a NaN (the check's None: does not apply) does not pass
    return [sum(passed[i * n : (i + 1) * n]) for i in range(len(prompts))]


def load_task(config_path: str, limit: int) -> dict:
    """The eval prompts, the check and the sampling settings from a PPO stage config."""
    path = Path(config_path)
    if not path.is_file():
        raise PassAtKError(f"--config {config_path}: no such file")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise PassAtKError(f"--config {config_path}: not valid YAML ({error})") from None
    checks = [entry for entry in cfg.get("rewards") or [] if entry != "rm"]
    if not checks:
        raise PassAtKError(
            f"--config {config_path}: 'rewards' names no check (a module:function entry); "
            "pass@k needs an exact check, not a reward model"
        )
    if "eval_prompts" not in cfg:
        raise PassAtKError(f"--config {config_path}: no 'eval_prompts' key")
    records = data.load_prompt_records(cfg["eval_prompts"])
    records = records[:limit] if limit > 0 else records
    if not records:
        raise PassAtKError(f"{cfg['eval_prompts']}: no prompts")
    prompts, _ = data.prompts_and_titles(records, cfg["eval_prompts"])
    return {
        "records": records,
        "prompts": prompts,
        "check": load_reward_functions(checks[:1])[0],
        "max_new_tokens": cfg.get("response_length", 53),
        "temperature": cfg.get("temperature", 0.7),
        "max_prompt_length": cfg.get("max_prompt_length", 64),
        "eval_prompts": cfg["eval_prompts"],
    }


def markdown(results: dict, ks: list[int], *, n: int, check: str, n_prompts: int) -> str:
    head = " | ".join(f"pass@{k}" for k in ks)
    lines = [
        f"pass@k of `{check}` on {n_prompts} eval prompts, {n} samples each (unbiased estimator, Chen et al. 2021)",
        "",
        f"| model | {head} | prompts never solved |",
        "|---|" + "---|" * len(ks) + "---|",
    ]
    for label, r in results.items():
        cells = " | ".join(f"{r['pass_at_k'][str(k)]:.3f}" for k in ks)
        lines.append(f"| {label} | {cells} | {r['never_solved']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="a PPO stage config with eval_prompts and a check in rewards"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        required=True,
        help="NAME=PATH or PATH: a run directory (its final model), a model directory, or base",
    )
    parser.add_argument("--base", default=models.DEFAULT_MODEL, help="the model `base` stands for")
    parser.add_argument("--n", type=int, default=16, help="answers sampled per prompt")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--limit", type=int, default=0, help="the first N eval prompts (0 = all)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--output", default=None, help="write the table here (and a .json beside it)")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        if args.n < 1 or any(not 1 <= k <= args.n for k in args.k):
            raise PassAtKError(f"--k {args.k}: every k must be between 1 and --n {args.n}")
        task = load_task(args.config, args.limit)
        entries = [resolve_entries(spec, args.base, max_checkpoints=0)[0] for spec in args.models]
    except (PassAtKError, CompareError, RewardFunctionError, data.DataError) as error:
        raise SystemExit(f"pass_at_k: {error}") from None
    precision = models.resolve_precision(args.dtype, models.pick_device(args.device))
    results = {}
    for entry in entries:
        model, tokenizer = load_model_and_tokenizer(
            entry.model, entry.tokenizer_from, args.device, precision.name
        )
        counts = passing_counts(
            model,
            tokenizer,
            task["records"],
            task["prompts"],
            task["check"],
            n=args.n,
            max_new_tokens=task["max_new_tokens"],
            temperature=task["temperature"],
            max_prompt_length=task["max_prompt_length"],
            batch_size=args.batch_size,
            seed=args.seed,
            precision=precision,
            label=entry.label,
        )
        results[entry.label] = {
            "model": entry.model,
            "counts": counts,
            "never_solved": sum(c == 0 for c in counts),
            "pass_at_k": {str(k): statistics.mean(pass_at_k(args.n, c, k) for c in counts) for k in args.k},
        }
        del model
    text = markdown(results, args.k, n=args.n, check=task["check"][0], n_prompts=len(task["prompts"]))
    print(text)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        settings = {
            "config": args.config,
            "eval_prompts": task["eval_prompts"],
            "n": args.n,
            "k": args.k,
            "seed": args.seed,
            "dtype": precision.name,
            "temperature": task["temperature"],
        }
        out.with_suffix(".json").write_text(
            json.dumps({"settings": settings, "models": results}, indent=1) + "\n"
        )
    return results
