import json
import math

import numpy as np
import pytest
from test_compare import fake_ppo_run, setup  # noqa: F401  (setup: the fixture)

from rlhf_toy import runlog
from rlhf_toy.evaluation import compare, overopt


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_gao_fits_recover_known_alpha_beta_and_their_peak(form):
    d = np.linspace(0.1, 6.0, 15)
    alpha, beta = (0.3, 0.04) if form == "bon" else (0.25, 0.12)
    fit = overopt.fit_gao(d, overopt.gao_curve(d, alpha, beta, form), form)
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-9) and fit["beta"] == pytest.approx(beta, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    # the peak is where the curve is highest (numerically, on a fine grid)
    grid = np.linspace(1e-3, 20, 200_001)
    assert fit["peak_d"] == pytest.approx(
        grid[np.argmax(overopt.gao_curve(grid, alpha, beta, form))], abs=1e-3
    )
    assert fit["peak_gain"] == pytest.approx(overopt.gao_curve(grid, alpha, beta, form).max(), abs=1e-9)
    # with noise the fit still lands near the truth
    noisy = overopt.gao_curve(d, alpha, beta, form) + np.random.default_rng(0).normal(0, 0.005, len(d))
    fit = overopt.fit_gao(d, noisy, form)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.02) and fit["beta"] == pytest.approx(beta, abs=0.02)


def test_a_curve_that_only_rises_has_no_peak_and_too_few_points_are_refused():
    d = np.array([0.5, 1.0, 2.0, 3.0])
    assert overopt.fit_gao(d, 0.2 * d, "bon")["peak_d"] is None  # β = 0: a straight line, no maximum
    assert overopt.gao_peak(0.2, -0.01, "rl") is None
    with pytest.raises(ValueError, match="at least 3 points"):
        overopt.fit_gao(d[:2], d[:2], "bon")
    origin = {"d": 0.0, "gold": 0.1}
    assert (
        overopt.fit_points([origin, {"d": 1.0, "gold": 0.2}, {"d": 2.0, "gold": 0.25}], origin, "rl") is None
    )


def test_overopt_study_from_a_compare_of_best_of_n_and_a_ppo_run(tmp_path, setup):  # noqa: F811
    ppo, out = fake_ppo_run(tmp_path), tmp_path / "report"
    compare.main(
        [
            "--runs",
            "bon:1",
            "bon:2",
            "bon:4",
            "bon:8",
            f"small_beta={ppo}",
            "--ref",
            str(setup["ref"]),
            "--prompts",
            str(setup["prompts"]),
            "--output_dir",
            str(out),
            "--reward_model",
            str(setup["rm"]),
            "--checkpoints",
            "10",
            "--limit",
            "5",
            "--max_new_tokens",
            "10",
            "--batch_size",
            "8",
            "--n_bootstrap",
            "200",
        ]
    )
    result = overopt.main([str(out), "--samples", "3"])
    report = json.loads((out / "compare.json").read_text())
    bon = result["points"]["bon"]
    assert [p["n"] for p in bon] == [1, 2, 4, 8]
    for p in bon:  # each point is the compare's numbers, d the square root of its (analytic) KL
        assert p["gold"] == report["runs"][f"bon:{p['n']}"]["gold_mean"]
        assert p["d"] == pytest.approx(math.sqrt(math.log(p["n"]) - (p["n"] - 1) / p["n"]))
    origin = result["points"]["origin"]
    assert origin["d"] == 0.0 and origin["gold"] == report["runs"]["bon:1"]["gold_mean"]
    # PPO's path: the reference (step 0), its kept checkpoint, its final model
    path = result["points"]["rl"]["small_beta"]
    assert [p["step"] for p in path] == [0, 2, None] and path[0]["gold"] == origin["gold"]
    assert path[2]["gold"] == report["runs"]["small_beta"]["gold_mean"]
    # best-of-n has 4 points: fitted, its gains measured from the origin; PPO's 3 are too few to fit
    fit = result["fits"]["best-of-n"]
    expected = overopt.fit_gao([p["d"] for p in bon], [p["gold"] - origin["gold"] for p in bon], "bon")
    assert fit == expected and result["fits"]["small_beta"] is None
    # the samples: of the last point (no fitted peak), the largest RM − gold first
    samples = result["samples"]["small_beta"]
    assert samples["points"] == ["small_beta"] and not samples["past_peak"] and len(samples["rows"]) == 3
    rows = runlog.read_jsonl(out / "samples/small_beta.jsonl")
    top = sorted((r["rm"] - r["gold"] for r in rows), reverse=True)[:3]
    assert [r["rm"] - r["gold"] for r in samples["rows"]] == pytest.approx(top)
    md = (out / "overopt.md").read_text()
    assert "| best-of-n | n = 8 |" in md and "| small_beta | step 2 |" in md and "not fitted" in md
    assert (out / "overopt.png").stat().st_size > 0 and json.loads((out / "overopt.json").read_text())["fits"]


def test_overopt_refuses_a_report_it_cannot_read(tmp_path, capsys):
    with pytest.raises(SystemExit):
        overopt.main([str(tmp_path)])
    assert "no compare report there" in capsys.readouterr().err
    report = {
        "ref": "sft",
        "settings": {"headline_split": "eval", "prompts": ["p.jsonl"], "n_prompts": 2},
        "splits": {},
        "runs": {
            "bon:4": {"model": "best of 4 from sft", "kl_to_ref": 0.6, "gold_mean": 0.3, "rm_mean": 1.0}
        },
    }
    (tmp_path / "compare.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit):
        overopt.main([str(tmp_path)])
    assert "no point at d = 0: add bon:1" in capsys.readouterr().err
