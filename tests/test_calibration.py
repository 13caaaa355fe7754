"""The reward model's reliability diagram (`stats.reliability`, `stats.pair_calibration`) on synthetic scorers whose
calibration is known."""

import math
import random

import pytest

from rlhf_toy.evaluation import stats


def test_a_calibrated_predictor_has_ece_near_zero_and_a_miscalibrated_one_does_not():
    rng = random.Random(0)
    predicted = [rng.random() for _ in range(40000)]
    outcomes = [float(rng.random() < p) for p in predicted]
    calibrated = stats.reliability(predicted, outcomes)
    assert calibrated["ece"] < 0.01 and sum(b["n"] for b in calibrated["bins"]) == 40000
    for b in calibrated["bins"]:
        assert b["low"] <= b["confidence"] < b["high"] and b["frequency"] == pytest.approx(
            b["confidence"], abs=0.03
        )
    # Overconfident: it says p**0.3 where the truth is p. The mean gap |p - p**0.3| over uniform p is 0.27.
    overconfident = stats.reliability([p**0.3 for p in predicted], outcomes)
    assert overconfident["ece"] == pytest.approx(0.27, abs=0.03)


def test_an_ece_by_hand():
    # bin [0.1, 0.2): predictions 0.1, 0.1, outcomes 1, 0 -> |0.5 - 0.1| ; bin [0.9, 1]: 0.95, outcome 1 -> 0.05
    result = stats.reliability([0.1, 0.1, 0.95], [1.0, 0.0, 1.0], n_bins=10)
    assert result["ece"] == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.05)
    assert [(b["n"], b["frequency"]) for b in result["bins"]] == [(2, 0.5), (1, 1.0)]


def test_pairs_drawn_from_the_models_own_bradley_terry_probabilities_are_calibrated():
    rng = random.Random(1)
    chosen, rejected, gold_p = [], [], []
    for _ in range(20000):
        a, b = rng.gauss(0, 1.5), rng.gauss(0, 1.5)
        p_a = 1 / (1 + math.exp(-(a - b)))
        preferred_a = rng.random() < p_a  # the labeler draws from the model's own P
        chosen.append(a if preferred_a else b)
        rejected.append(b if preferred_a else a)
        gold_p.append(p_a if preferred_a else 1 - p_a)
    result = stats.pair_calibration(chosen, rejected, gold_p)
    assert result["n"] == 40000 and result["ece"] < 0.015
    for b in result["bins"]:  # gold's probability is the model's here: the two curves coincide
        assert b["reference"] == pytest.approx(b["confidence"], abs=1e-9)
    # A model twice as sure as the labels (scores doubled) is overconfident: a larger ECE.
    assert stats.pair_calibration([2 * c for c in chosen], [2 * r for r in rejected])["ece"] > 0.05
