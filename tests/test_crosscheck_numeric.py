"""Our PPO (its math in rlhf_toy.stages.ppo.core, and one step of the trainer itself) against TRL 1.12's
own PPOTrainer, run for one iteration on a tiny random GPT-2 (rlhf_toy/verify/trl_numeric.py says how
TRL's tensors are observed)."""

import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from rlhf_toy.verify import trl_numeric as X  # noqa: E402

NAMES = [s["name"] for s in X.DEFAULT_SETTINGS]
_CACHE: dict = {}


def result(name):
    """One TRL run + comparison per setting, shared by the tests of this module."""
    if name not in _CACHE:
        setting = next(s for s in X.DEFAULT_SETTINGS if s["name"] == name)
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _CACHE[name] = X.compare_one(X.run_trl_one_update(setting))
        finally:
            torch.set_num_threads(n)
    return _CACHE[name]


@pytest.mark.parametrize("name", NAMES)
def test_equal_to_trl_in_compat_mode(name):
    res = result(name)
    bad = {k: v for k, v in res["max_abs_diff"].items() if not v <= X.tolerance(k)}
    assert not bad, f"{name}: quantities beyond their tolerance: {bad}"
    assert (
        sum(X.tolerance(k) > 0 for k in res["max_abs_diff"]) == len(X.ROUND_OFF_QUANTITIES) == 2
    )  # the rest: 0
    # the same mask and TRL's one-longer mask, from our EOS-based construction
    assert res["max_abs_diff"]["mask (count of differing positions)"] == 0
    # one step of the trainer itself (its forwards, its minibatch/accumulation loop, its AdamW) gives TRL's
    # tensors, its accumulated gradients before every optimizer step and its weights, bit for bit; the weights
    # really moved
    trainer = {k: v for k, v in res["max_abs_diff"].items() if k.startswith("trainer:")}
    assert len(trainer) == 15
    assert res["max_abs_diff"]["trainer: gradients before each optimizer step"] == 0.0
    assert res["max_abs_diff"]["trainer: updated weights"] == 0.0
    assert res["update"]["weight_change_norm"] > 0.1


def test_settings_exercise_what_they_claim():
    r = {n: result(n) for n in NAMES}
    # responses with and without EOS, padded batches
    assert sum(x["batch"]["rows_with_eos"] for x in r.values()) > 0
    assert (
        r["trl_defaults"]["batch"]["rows_with_eos"] > 0 and r["trl_defaults"]["batch"]["rows_truncated"] > 0
    )
    assert r["trl_defaults"]["batch"]["padded_positions"] > 0
    assert r["no_eos_truncation"]["batch"]["padded_positions"] == 0
    # clipping actually happens (the clip fractions are compared on non-trivial values)
    for n in ("tight_clip_2_epochs", "2_minibatches_mostly_eos"):
        assert r[n]["trl_metrics"]["policy/clipfrac_avg"] > 0.05
        assert r[n]["trl_metrics"]["val/clipfrac_avg"] > 0.05
        assert r[n]["update"]["optimizer_steps"] >= 2
    assert r["k3_whiten_rewards"]["trl_metrics"]["objective/kl"] > 0.01  # KL penalty is not ~0
    # the trainer-level check covers 2 minibatches x 2 accumulated micro-batches x 2 epochs, k1 and k3,
    # with responses that stopped and responses that ran to the limit
    for n in ("accumulate_2x2_k1", "accumulate_2x2_k3"):
        assert r[n]["update"]["micro_batches"] == 8 and r[n]["update"]["optimizer_steps"] == 2
        assert r[n]["batch"]["rows_with_eos"] > 0 and r[n]["batch"]["rows_truncated"] > 0
    assert {r[n]["setting"]["kl_estimator"] for n in ("accumulate_2x2_k1", "accumulate_2x2_k3")} == {
        "k1",
        "k3",
    }


def test_differences_by_design_are_where_we_say():
    d = result("trl_defaults")["design"]
    # 1. score position: TRL puts it one past the EOS; ours on the EOS -> rewards differ on those rows only
    assert d["rows_score_moved"] > 0
    assert d["rewards max|ours-TRL|"] > 0.1
    assert d["rewards max|ours-TRL| on rows with the same score position"] == 0.0
    # ... and so do the advantages (gamma = 1, lam = 0.95: TRL discounts the score by lam on the EOS token)
    assert d["advantages max|ours-TRL|"] > 1e-3
    # 2. value-loss mask: ours over the response, TRL's one position longer
    ours_vf, trl_vf = d["value_loss(first mb): ours mask vs TRL p1 mask"]
    assert abs(ours_vf - trl_vf) > 1e-4
    # 4. approx-KL: ours averages over real tokens, TRL over every position: TRL's = ours x real-token share
    ours_kl, trl_kl = d["approxkl(first mb): ours masked vs TRL over padding"]
    share = d["approxkl(first mb): real-token share"]
    assert share < 1 and trl_kl == pytest.approx(ours_kl * share, rel=1e-4)


def test_trl_logged_update_statistics_are_diluted_by_accumulation():
    # TRL averages its update statistics over epochs x minibatches x gradient_accumulation_steps slots,
    # of which only half are filled in these settings: its logged loss/policy_avg etc. read half size
    for n in NAMES:
        share = result(n)["design"]["TRL logged update stats: filled share of its stats slots"]
        assert share == (0.5 if n.startswith("accumulate") else 1.0), n


def test_no_difference_when_no_response_stops_early():
    d = result("no_eos_truncation")["design"]
    assert d["rows_score_moved"] == 0
    assert d["rewards max|ours-TRL|"] == 0.0 and d["advantages max|ours-TRL|"] == 0.0
    ours_vf, trl_vf = d["value_loss(first mb): ours mask vs TRL p1 mask"]
    assert ours_vf == pytest.approx(trl_vf, abs=1e-7)


def test_gamma_lam_one_makes_score_position_irrelevant_for_advantages():
    # with gamma = lam = 1 GAE telescopes: the extra pad-position value cancels, advantages agree
    res = result("2_minibatches_mostly_eos")
    assert res["setting"]["gamma"] == 1.0 and res["setting"]["lam"] == 1.0
    assert res["design"]["rows_score_moved"] > 0
    assert res["design"]["advantages max|ours-TRL|"] <= X.TOLERANCE
    assert res["design"]["returns max|ours-TRL| (on response mask)"] <= X.TOLERANCE


def test_report_table_renders():
    report = {"tolerance": X.TOLERANCE, "passed": True,
              "results": {"trl_defaults": {**result("trl_defaults"), "passed": True}}}  # fmt: skip
    text = X.format_report(report)
    assert "advantages" in text and "trainer: updated weights" in text and "PASSED" in text
    assert "trainer step: largest |ours - TRL|" in text
