"""Our PPO math (rlhf_toy.ppo.core) against TRL 1.12's own PPOTrainer, run for one iteration on a
tiny random GPT-2 (see rlhf_toy/crosscheck.py for how TRL's tensors are observed)."""

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
    bad = {k: v for k, v in res["max_abs_diff"].items() if not v <= X.TOLERANCE}
    assert not bad, f"{name}: quantities beyond {X.TOLERANCE}: {bad}"
    # the same mask and TRL's one-longer mask, from our EOS-based construction
    assert res["max_abs_diff"]["mask (count of differing positions)"] == 0
    # one full update (our forward, core losses, torch AdamW) gives TRL's weights
    assert res["update"]["weights_rel_diff"] < X.UPDATE_TOLERANCE
    assert res["update"]["weight_change_norm"] > 0.1  # the update really moved the weights


def test_settings_exercise_what_they_claim():
    r = {n: result(n) for n in NAMES}
    # responses with and without EOS, padded batches
    assert sum(x["batch"]["rows_with_eos"] for x in r.values()) > 0
    assert r["trl_defaults"]["batch"]["rows_with_eos"] > 0 and r["trl_defaults"]["batch"]["rows_truncated"] > 0
    assert r["trl_defaults"]["batch"]["padded_positions"] > 0
    assert r["no_eos_truncation"]["batch"]["padded_positions"] == 0
    # clipping actually happens (the clip fractions are compared on non-trivial values)
    for n in ("tight_clip_2_epochs", "2_minibatches_mostly_eos"):
        assert r[n]["trl_metrics"]["policy/clipfrac_avg"] > 0.05
        assert r[n]["trl_metrics"]["val/clipfrac_avg"] > 0.05
        assert r[n]["update"]["optimizer_steps"] >= 2
    assert r["k3_whiten_rewards"]["trl_metrics"]["objective/kl"] > 0.01  # KL penalty is not ~0


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
    # 4. approx-KL: ours averages over real tokens, TRL over padding too (so TRL's is smaller)
    ours_kl, trl_kl = d["approxkl(first mb): ours masked vs TRL over padding"]
    assert ours_kl >= trl_kl


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
    report = {"tolerance": X.TOLERANCE, "update_tolerance": X.UPDATE_TOLERANCE, "passed": True,
              "results": {"trl_defaults": {**result("trl_defaults"), "passed": True}}}  # fmt: skip
    text = X.format_report(report)
    assert "advantages" in text and "weights: rel. diff of the change" in text and "PASSED" in text
