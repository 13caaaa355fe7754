"""compare's statistics held against implementations written here from their definitions (numpy), on rows made
up for the purpose: no model, no sampling."""

import math
import random

import numpy as np
import pytest

from rlhf_toy.evaluation import stats


def as_rows(golds: np.ndarray, rewards: np.ndarray | None = None, order_seed: int = 0) -> list[dict]:
    """golds[p, j] (prompt p, sample j) as compare's scored rows, in a shuffled order (the pairing is by key)."""
    rows = [
        {
            "prompt_id": p,
            "sample": j,
            "gold": float(golds[p, j]),
            **({"rewards": {"r": float(rewards[p, j])}} if rewards is not None else {}),
        }
        for p in range(golds.shape[0])
        for j in range(golds.shape[1])
    ]
    random.Random(order_seed).shuffle(rows)
    return rows


def percentile_interval(boot: np.ndarray) -> list[float]:
    """The 95% percentile interval: the 2.5% and 97.5% order statistics, rounded outwards."""
    return [
        float(np.percentile(boot, 2.5, method="lower")),
        float(np.percentile(boot, 97.5, method="higher")),
    ]


def prompt_resamples(n_prompts: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """(n_bootstrap, n_prompts) prompt indices, drawn with replacement as stats draws them (one
    `random.Random(seed)`, one `choices` per resample), so that the test can match the code exactly."""
    rng = random.Random(seed)
    return np.array([rng.choices(range(n_prompts), k=n_prompts) for _ in range(n_bootstrap)])


def paired_bootstrap_by_hand(a: np.ndarray, b: np.ndarray, n_bootstrap: int, seed: int) -> dict:
    """The paired bootstrap over prompts, from its definition: per prompt the mean of its samples' paired
    differences a − b (and of a's wins, ties ½); resample prompts with replacement; the mean over the resampled
    prompts; the percentile interval of those means."""
    d = (a - b).mean(axis=1)
    w = ((a > b) + 0.5 * (a == b)).mean(axis=1)
    idx = prompt_resamples(len(d), n_bootstrap, seed)
    d_lo, d_hi = percentile_interval(d[idx].mean(axis=1))
    return {
        "n_prompts": len(d),
        "gold_diff": d.mean(),
        "gold_diff_ci95": [d_lo, d_hi],
        "win_rate": w.mean(),
        "win_rate_ci95": percentile_interval(w[idx].mean(axis=1)),
        "significant": d_lo > 0 or d_hi < 0,
    }


def assert_same(got: dict, want: dict) -> None:
    """Every key of `want` in `got`, numbers (and intervals) to rounding."""
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_paired_bootstrap_matches_one_written_from_its_definition():
    """15 prompts × 3 samples with ties (golds on a 0.1 grid): every number of the pair, the reward function's
    difference and the win rate against the reference, exactly as the definition gives them."""
    rng = np.random.default_rng(0)
    prompt_effect = rng.uniform(-0.6, 0.6, size=(15, 1))
    a = np.round(np.clip(prompt_effect + 0.1 + rng.normal(0, 0.3, (15, 3)), -1, 1), 1)
    b = np.round(np.clip(prompt_effect + rng.normal(0, 0.3, (15, 3)), -1, 1), 1)
    reward_a, reward_b = rng.integers(0, 2, (15, 3)).astype(float), rng.integers(0, 2, (15, 3)).astype(float)
    got = stats.paired_comparison(as_rows(a, reward_a, 1), as_rows(b, reward_b, 2), n_bootstrap=2000, seed=7)
    want = paired_bootstrap_by_hand(a, b, 2000, 7)
    assert (a == b).any() and 0 < want["win_rate"] < 1  # the case has ties, wins and losses
    assert_same(got, want)
    reward = paired_bootstrap_by_hand(reward_a, reward_b, 2000, 7)
    assert_same(
        got["rewards"]["r"],
        {
            "n_prompts": 15,
            "diff": reward["gold_diff"],
            "diff_ci95": reward["gold_diff_ci95"],
            "significant": reward["significant"],
        },
    )
    summary = stats.summarize(
        [{**r, "response": "x", "has_eos": True} for r in as_rows(a)],
        [{**r, "response": "x", "has_eos": True} for r in as_rows(b)],
        n_bootstrap=2000,
        seed=7,
    )
    assert summary["win_rate_vs_ref"] == pytest.approx(want["win_rate"], rel=1e-12)
    assert summary["win_rate_vs_ref_ci95"] == pytest.approx(want["win_rate_ci95"], rel=1e-12, abs=1e-12)


def test_a_constant_per_prompt_difference_has_a_zero_width_interval():
    """Every prompt's samples differ by +0.1 and +0.4: each prompt's mean difference is 0.25, so resampling
    prompts can give nothing else; resampling answers (rows) would give an interval about ±0.1 wide."""
    golds = np.linspace(-0.9, 0.9, 20)[:, None] + np.zeros((20, 2))
    a = golds + np.array([0.1, 0.4])
    got = stats.paired_comparison(as_rows(a), as_rows(golds), n_bootstrap=1000, seed=0)
    assert got["gold_diff"] == pytest.approx(0.25)
    assert got["gold_diff_ci95"] == pytest.approx([0.25, 0.25]) and got["significant"]
    assert got["win_rate"] == 1.0 and got["win_rate_ci95"] == [1.0, 1.0]


def test_the_bootstrap_is_paired_a_shared_prompt_effect_cancels():
    """Prompts differ far more from each other (±0.8) than the two runs do (+0.05): paired, the difference is
    clear; resampling each run's prompts on its own (unpaired), the same data cannot tell the runs apart."""
    rng = np.random.default_rng(1)
    prompt_effect = rng.uniform(-0.8, 0.8, size=(40, 1))
    b = prompt_effect + rng.normal(0, 0.02, (40, 2))
    a = prompt_effect + 0.05 + rng.normal(0, 0.02, (40, 2))
    got = stats.paired_comparison(as_rows(a), as_rows(b), n_bootstrap=1000, seed=0)
    lo, hi = got["gold_diff_ci95"]
    assert 0 < lo < 0.05 < hi and got["significant"]
    # The unpaired interval of the same data, by hand: it straddles zero.
    draw = np.random.default_rng(2).integers(0, 40, size=(2, 1000, 40))
    means_a, means_b = a.mean(axis=1), b.mean(axis=1)
    unpaired_lo, unpaired_hi = percentile_interval(
        means_a[draw[0]].mean(axis=1) - means_b[draw[1]].mean(axis=1)
    )
    assert unpaired_lo < 0 < unpaired_hi


def test_too_few_resamples_are_refused():
    """A 95% percentile interval of a few resamples is an artefact of them (one resample: zero width, and it
    need not contain the estimate); below stats.MIN_BOOTSTRAP every bootstrap refuses."""
    rows = as_rows(np.array([[0.1, 0.2], [0.3, 0.5]]))
    for call in (
        lambda n: stats.paired_comparison(rows, rows, n_bootstrap=n),
        lambda n: stats.summarize(
            [{**r, "response": "x", "has_eos": True} for r in rows],
            [{**r, "response": "x", "has_eos": True} for r in rows],
            n_bootstrap=n,
        ),
    ):
        for n in (0, 1, stats.MIN_BOOTSTRAP - 1):
            with pytest.raises(ValueError, match=f"n_bootstrap must be >= {stats.MIN_BOOTSTRAP}, got {n}"):
                call(n)
        call(stats.MIN_BOOTSTRAP)
    assert stats.summarize([{**r, "response": "x", "has_eos": True} for r in rows])[
        "gold_mean"
    ] == pytest.approx(0.275)


def test_kl_standard_error_counts_a_prompt_once():
    """Samples of one prompt share it: the ± of kl_to_ref is the standard error of the mean of per-prompt means
    (with one sample per prompt, the plain standard error of the mean, as before)."""

    def rows(kls, prompt_ids=None):
        return [
            {"kl": kl, "response": "x", "has_eos": True, **({"prompt_id": p} if prompt_ids else {})}
            for kl, p in zip(kls, prompt_ids or kls)
        ]

    one_each = [1.0, 3.0, 2.0, 6.0]
    plain_se = np.std(one_each, ddof=1) / math.sqrt(4)
    assert stats.summarize(rows(one_each))["kl_to_ref_se"] == pytest.approx(plain_se, rel=1e-12)
    assert stats.summarize(rows(one_each, [0, 1, 2, 3]))["kl_to_ref_se"] == pytest.approx(plain_se, rel=1e-12)
    # Two samples per prompt, close to each other: four observations, not eight.
    kls, ids = [1.0, 1.2, 3.0, 3.4, 2.0, 2.2, 6.0, 5.6], [0, 0, 1, 1, 2, 2, 3, 3]
    per_prompt = np.array(kls).reshape(4, 2).mean(axis=1)
    summary = stats.summarize(rows(kls, ids))
    assert summary["kl_to_ref"] == pytest.approx(np.mean(kls))
    assert summary["kl_to_ref_se"] == pytest.approx(np.std(per_prompt, ddof=1) / math.sqrt(4), rel=1e-12)
    assert summary["kl_to_ref_se"] > 1.3 * np.std(kls, ddof=1) / math.sqrt(8)  # what counting rows would say
    assert (
        stats.summarize(rows([2.0, 2.5], [0, 0]))["kl_to_ref_se"] is None
    )  # one prompt: no spread to measure
