"""One table of the policy-gradient variants' runs (make variants): success on the eval prompts before and after,
pooled distinct-2 of the eval answers, the policy's entropy at the last step, the diagnostics over training and
the time: the median step and all steps (rollout, extra sampling rounds and update; without the evaluations),
and the run's wall time (evaluations included, and any time the process was stopped).

    python scripts/variants_summary.py grpo=runs/variants/grpo clip_higher=runs/variants/clip_higher \\
        --reward rewards/uses_word/mean --output reports/variants/rlvr_word.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rlhf_toy import runlog


def summarize_run(run_dir: Path, reward: str) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [r for r in runlog.read_jsonl(run_dir / "metrics.jsonl") if "objective/scores" in r]
    mean_of = lambda key: statistics.mean(r[key] for r in steps) if all(key in r for r in steps) else None
    return {
        "steps": len(steps),
        "success_before": summary["before"].get(reward),
        "success_after": summary["after"].get(reward),
        "distinct_2_before": summary["before"]["corpus_distinct_2"],
        "distinct_2_after": summary["after"]["corpus_distinct_2"],
        "entropy_first": steps[0]["policy/entropy_avg"],
        "entropy_last": steps[-1]["policy/entropy_avg"],
        "train_distinct_2_last": steps[-1].get("completions/pooled_distinct_2"),
        "frac_reward_zero_std": mean_of("frac_reward_zero_std"),
        "clip_low": mean_of("clip_ratio/low_mean"),
        "clip_high": mean_of("clip_ratio/high_mean"),
        "resample_rounds": sum(r.get("rollout/resample_rounds", 0) for r in steps),
        "wall_s": steps[-1]["time/wall_s"],
        # the median step (its rollout, dynamic sampling's extra rounds included, and its update): robust to a
        # few steps that shared the machine, where the wall time is not
        "median_step_s": statistics.median(r["time/rollout_s"] + r["time/update_s"] for r in steps),
        "steps_s": sum(r["time/rollout_s"] + r["time/update_s"] for r in steps),
    }


def table(rows: dict[str, dict], reward: str) -> str:
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)
    lines = [
        f"| run | {reward} before → after | pooled distinct-2 (eval) before → after | entropy first → last step "
        f"| train distinct-2, last step | frac_reward_zero_std | clip low / high | extra rounds "
        f"| median step | all steps | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {fmt(r['success_before'])} → {fmt(r['success_after'])} | "
            f"{fmt(r['distinct_2_before'])} → {fmt(r['distinct_2_after'])} | "
            f"{fmt(r['entropy_first'])} → {fmt(r['entropy_last'])} | {fmt(r['train_distinct_2_last'])} | "
            f"{fmt(r['frac_reward_zero_std'])} | {fmt(r['clip_low'], '.4f')} / {fmt(r['clip_high'], '.4f')} | "
            f"{r['resample_rounds']} | {r['median_step_s']:.1f} s | {r['steps_s'] / 60:.1f} min | "
            f"{r['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    parser.add_argument(
        "--reward", default="rewards/uses_word/mean", help="the success metric in summary.json"
    )
    parser.add_argument("--output", default=None, help="write the table (and a .json beside it) here")
    args = parser.parse_args(argv)
    runs = dict(entry.split("=", 1) for entry in args.runs)
    missing = [f"{name}={path}" for name, path in runs.items() if not (Path(path) / "summary.json").exists()]
    if missing:
        raise SystemExit(f"variants_summary: no finished run (summary.json) at {', '.join(missing)}")
    rows = {name: summarize_run(Path(path), args.reward) for name, path in runs.items()}
    text = table(rows, args.reward)
    print(text)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
