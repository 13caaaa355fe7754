"""PPO's critic-free successors beside PPO and DPO (`make algorithms`): speed and memory of each, gold and KL.

    python scripts/algorithms_summary.py --report reports/algorithms --runs runs/ppo runs/algorithms/grpo ... \
        --memory_logs runs/algorithms/memory

Speed: each run's median `perf/episodes_per_s` over its steps (PPO-family runs) or episodes / training time
(DPO: pairs per second of `train_wall_s`). Memory: peak RSS (`/usr/bin/time -v`'s "Maximum resident set
size") of a short run of each (`MEMORY_LOGS/NAME.time`), the same for every method. Gold and KL: the
compare report's headline split. Writes algorithms.md beside compare.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from rlhf_toy import runlog


def episodes_per_s(run_dir: Path) -> float | None:
    records = runlog.read_jsonl(run_dir / "metrics.jsonl")
    speeds = [
        r["perf/episodes_per_s"] for r in records if isinstance(r.get("perf/episodes_per_s"), (int, float))
    ]
    if speeds:
        return statistics.median(speeds)
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("train_pairs") and summary.get("train_wall_s"):
        return summary["train_pairs"] / summary["train_wall_s"]
    return None


def peak_rss_mb(log: Path) -> float | None:
    match = (
        re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text()) if log.exists() else None
    )
    return int(match.group(1)) / 1024 if match else None


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", required=True, help="the compare report of the runs (compare.json)")
    p.add_argument("--runs", nargs="+", required=True, help="run directories, named as in the report")
    p.add_argument("--memory_logs", required=True, help="folder of NAME.time files (/usr/bin/time -v output)")
    args = p.parse_args(argv)
    report = json.loads((Path(args.report) / "compare.json").read_text())
    lines = [
        f"# PPO, its critic-free successors and DPO ({report['settings']['headline_split']} prompts)",
        "",
        "| run | gold | KL to ref | win rate vs ref | EOS rate | pooled distinct-2 | episodes/s (median step) "
        "| peak RSS, short run (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in map(Path, args.runs):
        m = report["runs"].get(run.name, {})
        speed, rss = episodes_per_s(run), peak_rss_mb(Path(args.memory_logs) / f"{run.name}.time")
        cell = lambda v, f: "—" if v is None else format(v, f)
        lines.append(
            f"| {run.name} | {cell(m.get('gold_mean'), '.3f')} | {cell(m.get('kl_to_ref'), '.2f')} | "
            f"{cell(m.get('win_rate_vs_ref'), '.3f')} | {cell(m.get('eos_rate'), '.3f')} | "
            f"{cell(m.get('corpus_distinct_2'), '.3f')} | {cell(speed, '.3f')} | {cell(rss, '.0f')} |"
        )
    lines += [
        "",
        "episodes/s: PPO-family runs, the median of `perf/episodes_per_s` over steps (rollout and update; "
        "evaluation excluded); DPO, trained pairs per second of training. Peak RSS: `/usr/bin/time -v` of a "
        "two-step run of each (loading, the first steps; no evaluation).",
        "",
    ]
    text = "\n".join(lines)
    (Path(args.report) / "algorithms.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
