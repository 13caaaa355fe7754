"""The critic-free estimators (rlhf_toy.stages.ppo.core) against TRL 1.12's own GRPOTrainer (loss_type grpo,
dr_grpo, bnpo, dapo, cispo; epsilon_high, importance_sampling_level sequence, mask_truncated_completions) and
RLOOTrainer, from the same rewards and log-probs (rlhf_toy/verify/trl_critic_free.py says
how TRL's code is called)."""

import os

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from rlhf_toy.verify import trl_critic_free as X  # noqa: E402


@pytest.fixture(scope="module")
def report():
    return X.crosscheck()


@pytest.mark.parametrize("name", [s["name"] for s in X.SETTINGS])
def test_advantages_loss_and_gradient_equal_trl(report, name):
    result = report["results"][name]
    bad = {k: v for k, v in result["max_abs_diff"].items() if not v <= X.TOLERANCE}
    assert not bad, f"{name}: beyond {X.TOLERANCE}: {bad}"
    assert result["passed"]
    # what was compared is not trivial: a real loss and gradient, clipped ratios, stopped and truncated responses
    assert abs(result["trl_loss"]) > 1e-3 and result["gradient_norm"] > 1
    assert result["clipped_low"] + result["clipped_high"] > 0.01
    if result["setting"].get("epsilon_high"):  # the upper side, which clip-higher and CISPO's cap move, binds
        assert result["clipped_high"] > 0.01
    assert result["rows_with_eos"] > 0 and result["rows_truncated"] > 0


def test_settings_cover_what_they_claim(report):
    settings = {n: r["setting"] for n, r in report["results"].items()}
    assert {s["loss_type"] for s in settings.values()} == {
        "grpo",
        "dr_grpo",
        "bnpo",
        "dapo",
        "cispo",
        "sequence",
    }
    assert {s.get("importance_sampling_level", "token") for s in settings.values()} == {"token", "sequence"}
    assert any(s.get("mask_truncated_completions") for s in settings.values())
    kl_weights = {
        s.get("use_bias_correction_kl", True)
        for s in settings.values()
        if s["beta"] and s["trainer"] == "grpo"
    }
    assert kl_weights == {True, False}
    assert not settings["dr_grpo"]["scale_rewards"] and settings["grpo"]["scale_rewards"]
    # RLOO's sequence-level KL in the reward moved its advantages, and agrees with the KL TRL logs
    assert report["results"]["rloo"]["kl_effect"] > 1e-3
    assert report["results"]["rloo"]["max_abs_diff"]["KL per token (TRL's logged kl)"] <= X.TOLERANCE
    text = X.format_report(report)
    assert "advantages" in text and "overall: PASSED" in text
