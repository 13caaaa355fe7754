"""Statistics of sampled answers: the one summary shape every stage and compare report, and win rates
with bootstrap intervals over prompts."""

from __future__ import annotations

import math
import random
import statistics

# Fewer resamples than this make the 95% interval an artefact of the draws (one resample: an interval of zero
# width that need not contain the estimate), so every bootstrap here refuses them.
MIN_BOOTSTRAP = 100


def distinct_n(texts, n: int = 2) -> float:
    """Distinct word n-grams / all word n-grams, pooled over `texts`. Over one run's answers (corpus_distinct_2)
    it sees what per-answer distinct-2 cannot: a policy that tells every prompt the same thing."""
    grams = [
        tuple(words[i : i + n])
        for t in texts
        for words in [t.lower().split()]
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def _percentile_interval(values: list[float]) -> tuple[float, float]:
    ordered, n = sorted(values), len(values)
    return ordered[int(0.025 * (n - 1))], ordered[int(math.ceil(0.975 * (n - 1)))]


def _paired_per_prompt(golds: dict, other_golds: dict) -> tuple[dict, dict]:
    """Answers paired by (prompt_id, sample), grouped by prompt in `golds`' order: {prompt_id: [gold − other]}
    and {prompt_id: [1 win, ½ tie, 0 loss]}. `golds`, `other_golds`: {(prompt_id, sample): gold}."""
    diffs, wins = {}, {}
    for (pid, j), g in golds.items():
        if (pid, j) in other_golds:
            other = other_golds[(pid, j)]
            diffs.setdefault(pid, []).append(g - other)
            wins.setdefault(pid, []).append(1.0 if g > other else 0.5 if g == other else 0.0)
    return diffs, wins


def _paired_bootstrap(values_a: dict, values_b: dict, n_bootstrap: int, seed: int) -> dict:
    """a − b on the same (prompt_id, sample) keys: the mean difference and a's win rate (ties ½), each with a
    95% percentile-bootstrap interval over prompts (paired: a prompt's two answers are resampled together, so
    the prompt-to-prompt spread both runs share cancels)."""
    if n_bootstrap < MIN_BOOTSTRAP:
        raise ValueError(f"n_bootstrap must be >= {MIN_BOOTSTRAP}, got {n_bootstrap}")
    diffs, wins = _paired_per_prompt(values_a, values_b)
    prompts = sorted(diffs)
    if not prompts:
        return {"n_prompts": 0}
    d = [statistics.mean(diffs[p]) for p in prompts]
    w = [statistics.mean(wins[p]) for p in prompts]
    rng = random.Random(seed)
    boot_d, boot_w = [], []
    for _ in range(n_bootstrap):
        idx = rng.choices(range(len(prompts)), k=len(prompts))
        boot_d.append(statistics.fmean(d[i] for i in idx))
        boot_w.append(statistics.fmean(w[i] for i in idx))
    d_lo, d_hi = _percentile_interval(boot_d)
    return {
        "n_prompts": len(prompts),
        "diff": statistics.mean(d),
        "diff_ci95": [d_lo, d_hi],
        "win_rate": statistics.mean(w),
        "win_rate_ci95": list(_percentile_interval(boot_w)),
        "significant": d_lo > 0 or d_hi < 0,
    }


def paired_comparison(rows_a: list[dict], rows_b: list[dict], n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Run a against run b on the same prompts and sampling seeds, by gold (`_paired_bootstrap`); with reward
    functions (rows' "rewards"), each one's difference too, under "rewards"."""
    key = lambda r: (r["prompt_id"], r["sample"])
    out = _paired_bootstrap(
        {key(r): r["gold"] for r in rows_a}, {key(r): r["gold"] for r in rows_b}, n_bootstrap, seed
    )
    if not out["n_prompts"]:
        return out
    out = {
        "n_prompts": out["n_prompts"],
        "gold_diff": out["diff"],
        "gold_diff_ci95": out["diff_ci95"],
        "win_rate": out["win_rate"],
        "win_rate_ci95": out["win_rate_ci95"],
        "significant": out["significant"],
    }
    names = sorted({n for r in rows_a + rows_b for n in r.get("rewards") or {}})
    if names:

        def values(rows, name):
            return {
                key(r): r["rewards"][name] for r in rows if (r.get("rewards") or {}).get(name) is not None
            }

        out["rewards"] = {}
        for name in names:
            paired = _paired_bootstrap(values(rows_a, name), values(rows_b, name), n_bootstrap, seed)
            out["rewards"][name] = {
                k: paired[k] for k in ("n_prompts", "diff", "diff_ci95", "significant") if k in paired
            }
    return out


def _clustered_se(rows: list[dict], key: str) -> float | None:
    """The standard error of the mean of `key`, counting each prompt once: a prompt's samples share it and are
    not independent, so the spread is that of the per-prompt means over the number of prompts (rows without
    a prompt_id are their own prompt). None with fewer than two prompts."""
    per_prompt = {}
    for i, r in enumerate(rows):
        per_prompt.setdefault(r.get("prompt_id", ("row", i)), []).append(r[key])
    means = [statistics.fmean(v) for v in per_prompt.values()]
    return statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else None


def summarize(
    rows: list[dict], ref_rows: list[dict] | None = None, n_bootstrap: int = 1000, seed: int = 0
) -> dict:
    """The summary of scored answers (`sample_and_score`'s rows); with the reference's rows for the same
    prompts and seeds, also the win rate against it."""

    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.mean(values) if values and len(values) == len(rows) else None

    out = {
        "n_samples": len(rows),
        # prompts longer than max_prompt_length, answered from their last tokens (sample_and_score marks them)
        "prompts_truncated": sum(bool(r.get("prompt_truncated")) for r in rows),
        "gold_mean": mean("gold"),
        "rm_mean": mean("rm"),
        "score_mean": mean("score"),
        "kl_to_ref": mean("kl"),
    }
    out["kl_to_ref_se"] = _clustered_se(rows, "kl") if out["kl_to_ref"] is not None else None
    if ref_rows is not None:
        # The win rate (ties ½) and its interval are the paired bootstrap's, over prompts.
        key = lambda r: (r["prompt_id"], r["sample"])
        paired = _paired_bootstrap(
            {key(r): r["gold"] for r in rows}, {key(r): r["gold"] for r in ref_rows}, n_bootstrap, seed
        )
        out.update(
            win_rate_vs_ref=paired.get("win_rate", float("nan")),
            win_rate_vs_ref_ci95=paired.get("win_rate_ci95", [float("nan"), float("nan")]),
        )
    parts = [r.get("gold_parts") or {} for r in rows]
    flagged = all("flags" in p for p in parts)  # scored by a judge that flags junk (v3)
    on_topic = [p.get("on_topic") for p in parts]
    out.update(
        length_mean=mean("n_tokens"),
        words_mean=mean("n_words"),
        eos_rate=statistics.mean(float(r["has_eos"]) for r in rows),
        # null where a prompt's film is unknown (a prompts file without titles): no on-topic judgement
        on_topic_rate=statistics.mean(map(float, on_topic)) if None not in on_topic else None,
        flattery_rate=(
            statistics.mean(float(bool(p.get("flattery_reason"))) for p in parts)
            if all("flattery_reason" in p for p in parts)
            else None
        ),
        # gold's flags: the share of answers it calls junk of any kind, and of each kind
        junk_rate=statistics.mean(float(bool(p["flags"])) for p in parts) if flagged else None,
        distinct_2=statistics.mean(distinct_n([r["response"]], 2) for r in rows),
        corpus_distinct_2=distinct_n([r["response"] for r in rows], 2),
    )
    # Reward functions (compare's --rewards, PPO's evaluation): each one's mean over the answers it scored,
    # under its training metric's name.
    for name in sorted({n for r in rows for n in r.get("rewards") or {}}):
        values = [r["rewards"][name] for r in rows if (r.get("rewards") or {}).get(name) is not None]
        out[f"rewards/{name}/mean"] = statistics.mean(values) if values else None
    # Each kind of junk gold flags: the share of answers with it, as `junk/<flag>` (flat, like every metric).
    if flagged:
        for flag in sorted({f for p in parts for f in p["flags"]}):
            out[f"junk/{flag}"] = statistics.mean(float(flag in p["flags"]) for p in parts)
    return out


def reliability(
    predicted: list[float], outcomes: list[float], n_bins: int = 10, reference: list[float] | None = None
) -> dict:
    """A reliability diagram's numbers: the predictions cut into `n_bins` equal-width bins of [0, 1], each bin's
    mean prediction (`confidence`), mean outcome (`frequency`, outcomes 0/1) and, given `reference`
    probabilities for the same items, their mean (`reference`); and the expected calibration error,
    ECE = Σ_bins (n_bin / n) · |frequency − confidence| (Guo et al. 2017)."""
    if len(predicted) != len(outcomes) or not predicted:
        raise ValueError(
            f"reliability needs as many outcomes as predictions (> 0), got {len(predicted)} and {len(outcomes)}"
        )
    bins = [[] for _ in range(n_bins)]
    for i, p in enumerate(predicted):
        bins[min(int(p * n_bins), n_bins - 1)].append(i)
    rows, ece = [], 0.0
    for b, members in enumerate(bins):
        if not members:
            continue
        confidence = statistics.mean(predicted[i] for i in members)
        frequency = statistics.mean(outcomes[i] for i in members)
        ece += len(members) / len(predicted) * abs(frequency - confidence)
        rows.append(
            {
                "low": b / n_bins,
                "high": (b + 1) / n_bins,
                "n": len(members),
                "confidence": confidence,
                "frequency": frequency,
                **({"reference": statistics.mean(reference[i] for i in members)} if reference else {}),
            }
        )
    return {"bins": rows, "ece": ece, "n": len(predicted)}


def pair_calibration(
    score_chosen: list[float],
    score_rejected: list[float],
    gold_probability: list[float] | None = None,
    n_bins: int = 10,
) -> dict:
    """How far a Bradley–Terry reward model's P(a ≻ b) = σ(r_a − r_b) (raw scores, the scale it was trained on)
    is from how often the labels preferred a, on held-out pairs. Each pair counts in both orders, (chosen,
    rejected) with outcome 1 and (rejected, chosen) with outcome 0, so the diagram does not depend on which
    side a file lists first. `gold_probability`: the labeler's own P(chosen ≻ rejected) per pair (gold's
    Bradley–Terry draw), binned beside the labels."""
    p = [1 / (1 + math.exp(-(c - r))) for c, r in zip(score_chosen, score_rejected)]
    reference = (
        None if gold_probability is None else list(gold_probability) + [1 - g for g in gold_probability]
    )
    return reliability(p + [1 - x for x in p], [1.0] * len(p) + [0.0] * len(p), n_bins, reference)
