"""Seed spread: what holds across training seeds, from one compare report of several seeds per method.

    python scripts/study_summary.py reports/study [--split test]

Runs are grouped by their label before `_seed` (`ppo_seed1`, `ppo_seed2` -> `ppo`; a run without one is a
group of its own). Per group: mean ± sd over seeds of gold, KL, on-topic and flattery rates, EOS rate and
pooled distinct-2; per seed, whether its difference in gold to every other group's same-seed run (and to the
runs that are not seeded, such as sft) has a 95% interval that excludes zero. Writes study.md and study.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from rlhf_toy.evaluation.report import fmt

METRICS = [
    ("gold_mean", "gold"),
    ("kl_to_ref", "KL to ref"),
    ("on_topic_rate", "on-topic"),
    ("flattery_rate", "flattery"),
    ("eos_rate", "EOS rate"),
    ("corpus_distinct_2", "pooled distinct-2"),
]
SEEDED = re.compile(r"^(?P<group>.+)_seed(?P<seed>\d+)$")


def group_runs(labels) -> dict[str, dict[int | None, str]]:
    """{group: {seed: label}}; an unseeded run is its own group with seed None."""
    groups: dict = {}
    for label in labels:
        match = SEEDED.match(label)
        group, seed = (match["group"], int(match["seed"])) if match else (label, None)
        groups.setdefault(group, {})[seed] = label
    return groups


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize_seeds(report: dict, split: str | None = None) -> dict:
    table = report["splits"][split] if split else {"runs": report["runs"], "pairs": report["pairs"]}
    groups = group_runs(table["runs"])
    pairs = {(p["a"], p["b"]): p for p in table["pairs"] if p.get("n_prompts")}
    summary = {"split": split or report["settings"].get("headline_split"), "groups": {}, "differences": []}
    for group, members in groups.items():
        runs = [table["runs"][label] for label in members.values()]
        summary["groups"][group] = {
            "seeds": sorted(s for s in members if s is not None),
            "n": len(runs),
            **{key: _mean_sd([r.get(key) for r in runs]) for key, _ in METRICS},
        }
    seeded = [g for g, m in groups.items() if None not in m]
    for i, group in enumerate(seeded):
        others = [g for g in seeded[i + 1 :]] + [g for g, m in groups.items() if None in m]
        for other in others:
            rows = []
            for seed, label in sorted(groups[group].items()):
                other_label = groups[other].get(seed, groups[other].get(None))
                if other_label is None:
                    continue
                pair = pairs.get((label, other_label)) or pairs.get((other_label, label))
                if pair is None:
                    continue
                sign = 1 if pair["a"] == label else -1  # always group − other
                lo, hi = sorted(sign * x for x in pair["gold_diff_ci95"])
                rows.append(
                    {
                        "seed": seed,
                        "a": label,
                        "b": other_label,
                        "gold_diff": sign * pair["gold_diff"],
                        "ci95": [lo, hi],
                        "significant": pair["significant"],
                    }
                )
            if rows:
                summary["differences"].append(
                    {
                        "a": group,
                        "b": other,
                        "per_seed": rows,
                        "mean": statistics.mean(r["gold_diff"] for r in rows),
                    }
                )
    return summary


def fmt_mean_sd(mean_sd, digits=3) -> str:
    mean, sd = mean_sd
    if mean is None:
        return "—"
    return fmt(float(mean), digits) + (f" ± {fmt(float(sd), digits)}" if sd is not None else "")


def study_markdown(summary: dict, report: dict) -> str:
    lines = [
        f"# Seed spread ({summary['split']} prompts)",
        "",
        "Mean ± sd over training seeds (sd: sample standard deviation; a run without seeds has none).",
        "",
        "| group | seeds | " + " | ".join(title for _, title in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for group, g in summary["groups"].items():
        lines.append(
            f"| {group} | {', '.join(map(str, g['seeds'])) or '—'} | "
            + " | ".join(fmt_mean_sd(g[key]) for key, _ in METRICS)
            + " |"
        )
    lines += [
        "",
        "Differences in gold, seed by seed (group − other, same prompts and sampling seeds; * = the 95% "
        "paired-bootstrap interval excludes zero, no correction for multiple comparisons):",
        "",
    ]
    for d in summary["differences"]:
        cells = [
            f"seed {r['seed']}: {r['gold_diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
            + (" *" if r["significant"] else "")
            for r in d["per_seed"]
        ]
        positive = sum(r["significant"] and r["gold_diff"] > 0 for r in d["per_seed"])
        negative = sum(r["significant"] and r["gold_diff"] < 0 for r in d["per_seed"])
        verdict = (
            f"{d['a']} above {d['b']} in every seed"
            if positive == len(d["per_seed"])
            else f"{d['a']} below {d['b']} in every seed"
            if negative == len(d["per_seed"])
            else f"does not hold across seeds ({positive} above, {negative} below, "
            f"{len(d['per_seed']) - positive - negative} not separable)"
        )
        lines.append(
            f"- **{d['a']} − {d['b']}**: mean {d['mean']:+.3f}; " + "; ".join(cells) + f". {verdict}."
        )
    lines += [
        "",
        f"From `{report.get('source', 'compare.json')}`; the compare's own tables are in compare.md.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report_dir", help="a compare report directory (compare.json) with seeded runs")
    p.add_argument("--split", default=None, help="a split of the report (default: its headline split)")
    args = p.parse_args(argv)
    path = Path(args.report_dir) / "compare.json"
    if not path.exists():
        print(f"error: {path}: no compare report there (run scripts/compare.py first)", file=sys.stderr)
        raise SystemExit(2)
    report = json.loads(path.read_text())
    if args.split and args.split not in report.get("splits", {}):
        print(
            f"error: --split {args.split}: the report has {sorted(report.get('splits', {})) or 'one split'}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    report["source"] = str(path)
    summary = summarize_seeds(report, args.split)
    (path.parent / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
    (path.parent / "study.md").write_text(study_markdown(summary, report))
    print(study_markdown(summary, report))
    return summary
