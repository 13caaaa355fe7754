"""The overoptimisation study (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"): gold and
the reward model's score against d = √KL, for best-of-n of the reference and for PPO along its checkpoints,
with Gao's fitted forms and their peaks.

    python scripts/overopt.py reports/overopt [--split eval] [--samples 12]

Reads a compare report (`make overopt` writes one: bon:1 ... bon:64 and PPO runs with their checkpoints) and
writes overopt.md, overopt.json and overopt.png beside it. The forms are fitted to the gold gain over the
reference, R(d) = gold(d) − gold(0):
- best-of-n: R(d) = d (α − β d), a peak at d* = α / (2β);
- RL: R(d) = d (α − β log d), a peak at d* = exp(α/β − 1).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from rlhf_toy import runlog
from rlhf_toy.evaluation.compare import _int_at_least, samples_key
from rlhf_toy.evaluation.report import fmt

BEST_OF = re.compile(r"^best of (\d+) from ")
FORMS = {"bon": "d (α − β d)", "rl": "d (α − β log d)"}


class OveroptError(ValueError):
    """A compare report the study cannot read (no best-of-n, no reference point); the message says why."""


# ----------------------------------------------------------------------------------------------
# Gao et al.'s functional forms
# ----------------------------------------------------------------------------------------------
def _features(d: np.ndarray, form: str) -> np.ndarray:
    if form == "bon":
        return np.stack([d, -d * d], axis=1)
    if form == "rl":
        safe = np.where(d > 0, d, 1.0)  # d log d -> 0 as d -> 0
        return np.stack([d, -d * np.log(safe)], axis=1)
    raise ValueError(f"unknown form {form!r}; one of {sorted(FORMS)}")


def gao_curve(d, alpha: float, beta: float, form: str) -> np.ndarray:
    """R(d) of `form` ('bon' or 'rl') at the distances d (an array)."""
    d = np.asarray(d, dtype=float)
    return _features(d, form) @ np.array([alpha, beta])


def fit_gao(d, gain, form: str) -> dict:
    """Least-squares α, β of R(d) = `form` through the origin, from distances d = √KL and gold gains
    R = gold(d) − gold(0). Returns {alpha, beta, r2, peak_d, peak_gain}; peak_d is None where the fitted
    curve has no maximum (β ≤ 0: it only rises)."""
    d, gain = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    if len(d) < 3:
        raise ValueError(f"fitting two parameters needs at least 3 points, got {len(d)}")
    X = _features(d, form)
    (alpha, beta), *_ = np.linalg.lstsq(X, gain, rcond=None)
    residual = gain - X @ np.array([alpha, beta])
    total = float(((gain - gain.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else None
    peak = gao_peak(float(alpha), float(beta), form)
    return {
        "form": FORMS[form],
        "alpha": float(alpha),
        "beta": float(beta),
        "r2": r2,
        "peak_d": peak,
        "peak_gain": None if peak is None else float(gao_curve([peak], alpha, beta, form)[0]),
    }


def gao_peak(alpha: float, beta: float, form: str) -> float | None:
    """The d that maximises R(d) (dR/dd = 0), or None when β ≤ 0 (no maximum)."""
    if beta <= 0:
        return None
    if form == "bon":
        return alpha / (2 * beta)
    return math.exp(alpha / beta - 1) if alpha / beta - 1 < 700 else math.inf


# ----------------------------------------------------------------------------------------------
# The points, from a compare report
# ----------------------------------------------------------------------------------------------
def _point(label: str, metrics: dict, **extra) -> dict:
    kl = metrics.get("kl_to_ref")
    return {
        "label": label,
        "kl": kl,
        "d": math.sqrt(max(kl, 0.0)) if kl is not None else None,
        "gold": metrics.get("gold_mean"),
        "rm": metrics.get("rm_mean"),
        **extra,
    }


def study_points(table: dict, ref_label: str) -> dict:
    """{"origin": the reference's point (d = 0), "bon": [best-of-n points by n], "rl": {run: [its points
    by step, origin first, final last]}} from one split's table of a compare report (`runs`)."""
    runs = table["runs"]
    bon, rl = [], {}
    for label, metrics in runs.items():
        match = BEST_OF.match(str(metrics.get("model", "")))
        if match:
            bon.append(_point(label, metrics, n=int(match[1])))
        elif metrics.get("checkpoints"):
            path = [_point(c["label"], c, step=c["step"]) for c in metrics["checkpoints"]]
            rl[label] = sorted(path, key=lambda p: p["step"]) + [_point(label, metrics, step=None)]
    bon.sort(key=lambda p: p["n"])
    origin = next((p for p in bon if p["n"] == 1), None)
    if origin is None and ref_label in runs:
        origin = _point(ref_label, runs[ref_label], n=1)
    if origin is None:
        raise OveroptError(
            "the report has no point at d = 0: add bon:1 (or the reference) to compare's --runs"
        )
    if len(bon) < 3:
        raise OveroptError(
            f"the report has {len(bon)} best-of-n runs; the study fits them from at least 3 "
            "(compare --runs bon:1 bon:2 bon:4 ...)"
        )
    for label, path in rl.items():
        start = {key: value for key, value in origin.items() if key != "n"}
        rl[label] = [{**start, "label": f"{label}@0", "step": 0}] + [p for p in path if p["d"] is not None]
    return {"origin": origin, "bon": bon, "rl": rl}


def fit_points(points: list[dict], origin: dict, form: str) -> dict | None:
    """Gao's form fitted to `points` (the origin among them), or None with fewer than 4 points: two
    parameters through fewer than three points beside the origin would fit exactly and say nothing."""
    if len(points) < 4:
        return None
    return fit_gao([p["d"] for p in points], [p["gold"] - origin["gold"] for p in points], form)


# ----------------------------------------------------------------------------------------------
# The samples past the peak
# ----------------------------------------------------------------------------------------------
def past_peak_samples(
    report_dir: Path, path: list[dict], *, fit: dict | None, prompt_ids: set, limit: int
) -> dict:
    """The samples of the points of one RL run past its fitted peak (or, when it has none inside the path,
    of its last point), sorted by RM − gold: the answers the reward model likes and the judge does not."""
    peak = fit["peak_d"] if fit else None
    beyond = [p for p in path if peak is not None and p["d"] > peak] or path[-1:]
    rows = []
    for point in beyond:
        for row in runlog.read_jsonl(report_dir / "samples" / f"{samples_key(point['label'])}.jsonl"):
            if row["prompt_id"] in prompt_ids and row.get("rm") is not None:
                rows.append(
                    {
                        "label": point["label"],
                        "rm": row["rm"],
                        "gold": row["gold"],
                        "flags": row.get("gold_parts", {}).get("flags", []),
                        "response": row["response"],
                    }
                )
    rows.sort(key=lambda r: r["gold"] - r["rm"])
    return {
        "past_peak": peak is not None and any(p["d"] > peak for p in path),
        "points": [p["label"] for p in beyond],
        "rows": rows[:limit],
    }


# ----------------------------------------------------------------------------------------------
# Writing it out
# ----------------------------------------------------------------------------------------------
def plot_study(points: dict, fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    origin = points["origin"]
    fig, (gold_ax, rm_ax) = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    series = [("best-of-n", points["bon"], fits.get("best-of-n"), "bon")]
    series += [(label, path, fits.get(label), "rl") for label, path in points["rl"].items()]
    for i, (label, line, fit, form) in enumerate(series):
        color, marker = f"C{i % 10}", "o-" if form == "rl" else "s-"
        d = [p["d"] for p in line]
        gold_ax.plot(d, [p["gold"] for p in line], marker, color=color, ms=4, alpha=0.8, label=label)
        rm_ax.plot(d, [p["rm"] for p in line], marker, color=color, ms=4, alpha=0.8, label=label)
        if fit:  # drawn a quarter past the method's own points: further out it is extrapolation
            grid = np.linspace(0, max(d) * 1.25, 200)
            gold_ax.plot(
                grid,
                origin["gold"] + gao_curve(grid, fit["alpha"], fit["beta"], form),
                ":",
                color=color,
                label=f"{label} fit: {fit['form']}",
            )
            if fit["peak_d"] is not None and fit["peak_d"] <= grid[-1]:
                gold_ax.axvline(fit["peak_d"], color=color, alpha=0.3, ls="--")
    for p in points["bon"]:
        gold_ax.annotate(
            f"n={p['n']}", (p["d"], p["gold"]), textcoords="offset points", xytext=(3, -10), fontsize=7
        )
    gold_ax.set_ylabel("gold mean (the simulated human)")
    gold_ax.set_title("gold vs d = √KL (dotted: Gao et al.'s fits; dashed: their peaks)", fontsize=9)
    rm_ax.set_ylabel("reward model (normalised): the proxy optimised")
    rm_ax.set_title("RM vs d = √KL", fontsize=9)
    for ax in (gold_ax, rm_ax):
        ax.set_xlabel("d = √KL(π‖π_ref) (√nats per sequence)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def study_markdown(result: dict) -> str:
    lines = [
        f"# Overoptimisation: gold and RM against d = √KL ({result['split']} prompts, n = {result['n_prompts']})",
        "",
        "![gold and RM against √KL](overopt.png)",
        "",
        "| method | point | KL | d = √KL | gold | RM |",
        "|---|---|---|---|---|---|",
    ]
    for name, path in [("best-of-n", result["points"]["bon"])] + list(result["points"]["rl"].items()):
        for p in path:
            point = f"n = {p['n']}" if "n" in p else f"step {p['step'] if p['step'] is not None else 'final'}"
            lines.append(
                f"| {name} | {point} | {fmt(p['kl'], 2)} | {fmt(p['d'], 2)} | {fmt(p['gold'])} | {fmt(p['rm'])} |"
            )
    lines += [
        "",
        "Gao et al.'s forms fitted to the gold gain over the reference, R(d) = gold(d) − gold(0):",
        "",
        "| method | form | α | β | R² | peak d* | KL* = d*² | gold at the peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, fit in result["fits"].items():
        if fit is None:
            lines.append(f"| {name} | (fewer than 4 points: not fitted) | | | | | | |")
            continue
        peak = fit["peak_d"]
        gold_peak = None if peak is None else result["points"]["origin"]["gold"] + fit["peak_gain"]
        lines.append(
            f"| {name} | {fit['form']} | {fmt(fit['alpha'])} | {fmt(fit['beta'])} | {fmt(fit['r2'], 2)} | "
            f"{fmt(peak, 2) if peak is not None else 'none (only rises)'} | "
            f"{fmt(peak * peak, 1) if peak is not None and math.isfinite(peak) else '—'} | {fmt(gold_peak)} |"
        )
    for label, samples in result["samples"].items():
        fit = result["fits"].get(label)
        where = (
            "past the fitted peak"
            if samples["past_peak"]
            else "at the last point (too few points to fit)"
            if fit is None
            else "at the last point (the fitted curve only rises)"
            if fit["peak_d"] is None
            else "at the last point (gold had not reached its fitted peak)"
        )
        lines += [
            "",
            f"## {label}: the answers {where}, sorted by RM − gold ({', '.join(samples['points'])})",
            "",
            "| point | RM | gold | flags | answer |",
            "|---|---|---|---|---|",
        ]
        for r in samples["rows"]:
            answer = r["response"].replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {r['label']} | {fmt(r['rm'], 2)} | {fmt(r['gold'], 2)} | {', '.join(r['flags'])} | {answer} |"
            )
    return "\n".join(lines) + "\n"


def run_study(report_dir: Path, split: str | None, n_samples: int) -> dict:
    compare_path = report_dir / "compare.json"
    if not compare_path.exists():
        raise OveroptError(f"{compare_path}: no compare report there (make overopt writes one)")
    report = json.loads(compare_path.read_text())
    split = split or report["settings"]["headline_split"]
    table = (
        report["splits"].get(split)
        if report.get("splits")
        else (
            {"runs": report["runs"], "n_prompts": report["settings"]["n_prompts"]}
            if split == report["settings"]["headline_split"]
            else None
        )
    )
    if table is None:
        raise OveroptError(
            f"--split {split}: the report has the splits {sorted(report.get('splits') or [split])}"
        )
    points = study_points(table, report["ref"])
    fits = {"best-of-n": fit_points(points["bon"], points["origin"], "bon")}
    fits.update({label: fit_points(path, points["origin"], "rl") for label, path in points["rl"].items()})
    prompt_ids = _split_prompt_ids(report, split)
    samples = {
        label: past_peak_samples(report_dir, path, fit=fits[label], prompt_ids=prompt_ids, limit=n_samples)
        for label, path in points["rl"].items()
    }
    result = {
        "split": split,
        "n_prompts": table.get("n_prompts"),
        "points": points,
        "fits": fits,
        "samples": samples,
    }
    (report_dir / "overopt.json").write_text(json.dumps(result, indent=2) + "\n")
    (report_dir / "overopt.md").write_text(study_markdown(result))
    plot_study(points, fits, report_dir / "overopt.png")
    return result


def _split_prompt_ids(report: dict, split: str) -> set:
    """The prompt ids of a split: compare numbers prompts across its --prompts files in order."""
    start = 0
    for path in report["settings"]["prompts"]:
        n = (
            report["splits"][Path(path).stem.removeprefix("prompts_")]["n_prompts"]
            if report.get("splits")
            else report["settings"]["n_prompts"]
        )
        if Path(path).stem.removeprefix("prompts_") == split:
            return set(range(start, start + n))
        start += n
    return set()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report_dir", type=Path, help="a compare output directory (compare.json, samples/)")
    p.add_argument(
        "--split", default=None, help="the prompts split to read (default: the report's headline one)"
    )
    p.add_argument(
        "--samples", type=_int_at_least(0), default=12, help="answers listed per RL run past its peak"
    )
    args = p.parse_args(argv)
    try:
        result = run_study(args.report_dir, args.split, args.samples)
    except OveroptError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(study_markdown(result).split("\n## ")[0])
    return result
