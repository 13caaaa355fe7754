"""Statistics of sampled answers: the one summary shape every stage and compare report, and win rates
with bootstrap intervals over prompts."""

from __future__ import annotations

import math
import random
import statistics


def distinct_n(texts, n: int = 2) -> float:
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.lower().split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(golds: dict, ref_golds: dict, n_bootstrap: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Win rate by gold against the reference (ties half), per prompt averaged over its samples,
    with a 95% percentile-bootstrap interval over prompts. `golds`: {(prompt_id, sample): gold}."""
    per_prompt: dict = {}
    for (pid, j), g in golds.items():
        if (pid, j) in ref_golds:
            r = ref_golds[(pid, j)]
            per_prompt.setdefault(pid, []).append(1.0 if g > r else 0.5 if g == r else 0.0)
    wins = [statistics.mean(v) for v in per_prompt.values()]
    if not wins:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    boots = sorted(statistics.mean(rng.choices(wins, k=len(wins))) for _ in range(n_bootstrap))
    lo, hi = boots[int(0.025 * (n_bootstrap - 1))], boots[int(math.ceil(0.975 * (n_bootstrap - 1)))]
    return statistics.mean(wins), lo, hi


def summarize(rows: list[dict], ref_rows: list[dict] | None = None, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """The summary of scored answers (`sample_and_score`'s rows); with the reference's rows for the same
    prompts and seeds, also the win rate against it."""
    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.mean(values) if values and len(values) == len(rows) else None

    out = {"n_samples": len(rows), "gold_mean": mean("gold"), "rm_mean": mean("rm"), "score_mean": mean("score"),
           "kl_to_ref": mean("kl")}
    kls = [r["kl"] for r in rows if r.get("kl") is not None]
    out["kl_to_ref_se"] = statistics.stdev(kls) / math.sqrt(len(kls)) if len(kls) > 1 and out["kl_to_ref"] is not None else None
    if ref_rows is not None:
        rate, lo, hi = win_rate({(r["prompt_id"], r["sample"]): r["gold"] for r in rows},
                                {(r["prompt_id"], r["sample"]): r["gold"] for r in ref_rows}, n_bootstrap, seed)
        out.update(win_rate_vs_ref=rate, win_rate_vs_ref_ci95=[lo, hi])
    out.update(length_mean=mean("n_tokens"), words_mean=mean("n_words"),
               eos_rate=statistics.mean(float(r["has_eos"]) for r in rows),
               distinct_2=distinct_n([r["response"] for r in rows], 2))
    return out
