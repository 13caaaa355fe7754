import json

import pytest

from rlhf_toy.evaluation import study


def fake_report(tmp_path):
    """A compare report of sft, two seeds each of ppo and dpo, as compare.json holds it."""
    runs = {
        "sft": {
            "gold_mean": 0.2,
            "kl_to_ref": 0.0,
            "on_topic_rate": 0.7,
            "flattery_rate": 0.1,
            "eos_rate": 0.9,
            "corpus_distinct_2": 0.6,
        },
        "ppo_seed0": {
            "gold_mean": 0.5,
            "kl_to_ref": 4.0,
            "on_topic_rate": 0.8,
            "flattery_rate": 0.0,
            "eos_rate": 0.95,
            "corpus_distinct_2": 0.5,
        },
        "ppo_seed1": {
            "gold_mean": 0.7,
            "kl_to_ref": 6.0,
            "on_topic_rate": 0.9,
            "flattery_rate": 0.02,
            "eos_rate": 0.97,
            "corpus_distinct_2": 0.4,
        },
        "dpo_seed0": {
            "gold_mean": 0.6,
            "kl_to_ref": 3.0,
            "on_topic_rate": None,
            "flattery_rate": 0.05,
            "eos_rate": 0.9,
            "corpus_distinct_2": 0.55,
        },
        "dpo_seed1": {
            "gold_mean": 0.4,
            "kl_to_ref": 2.0,
            "on_topic_rate": None,
            "flattery_rate": 0.07,
            "eos_rate": 0.9,
            "corpus_distinct_2": 0.6,
        },
    }
    pair = lambda a, b, d, lo, hi: {
        "a": a,
        "b": b,
        "n_prompts": 10,
        "gold_diff": d,
        "gold_diff_ci95": [lo, hi],
        "significant": lo > 0 or hi < 0,
        "win_rate": 0.5,
        "win_rate_ci95": [0.4, 0.6],
    }
    pairs = [
        pair("ppo_seed0", "sft", 0.3, 0.1, 0.5),
        pair("ppo_seed1", "sft", 0.5, 0.3, 0.7),
        pair("dpo_seed0", "sft", 0.4, 0.2, 0.6),
        pair("dpo_seed1", "sft", 0.2, -0.1, 0.5),
        pair("dpo_seed0", "ppo_seed0", 0.1, -0.1, 0.3),
        pair("dpo_seed1", "ppo_seed1", -0.3, -0.5, -0.1),
    ]
    report = {"runs": runs, "pairs": pairs, "settings": {"headline_split": "test"}, "splits": {}}
    (tmp_path / "compare.json").write_text(json.dumps(report))
    return report


def test_seed_spread_groups_runs_and_says_what_holds_across_seeds(tmp_path):
    fake_report(tmp_path)
    summary = study.main([str(tmp_path)])
    ppo = summary["groups"]["ppo"]
    assert ppo["seeds"] == [0, 1] and ppo["gold_mean"] == pytest.approx((0.6, 0.1414213), abs=1e-6)
    assert summary["groups"]["sft"]["gold_mean"] == (0.2, None)  # unseeded: no sd
    assert summary["groups"]["dpo"]["on_topic_rate"] == (None, None)  # no titles: nothing to average
    diffs = {(d["a"], d["b"]): d for d in summary["differences"]}
    # ppo − dpo, seed by seed, signs turned so that it is always ppo − dpo
    ppo_dpo = diffs[("ppo", "dpo")]["per_seed"]
    assert [r["gold_diff"] for r in ppo_dpo] == pytest.approx([-0.1, 0.3])
    assert [r["ci95"] for r in ppo_dpo] == [pytest.approx([-0.3, 0.1]), pytest.approx([0.1, 0.5])]
    md = (tmp_path / "study.md").read_text()
    assert "**ppo − sft**" in md and "ppo above sft in every seed" in md
    assert "**dpo − sft**" in md and "does not hold across seeds (1 above, 0 below, 1 not separable)" in md
    assert json.loads((tmp_path / "study.json").read_text()) == json.loads(json.dumps(summary))


def test_seed_spread_without_a_report_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no compare report there" in capsys.readouterr().err


def test_algorithms_summary_reads_speed_memory_and_the_report(tmp_path):
    import runpy

    from conftest import ROOT

    summary_main = runpy.run_path(str(ROOT / "scripts/algorithms_summary.py"))["main"]
    report = {
        "settings": {"headline_split": "test"},
        "runs": {
            "ppo": {
                "gold_mean": 0.5,
                "kl_to_ref": 5.0,
                "win_rate_vs_ref": 0.6,
                "eos_rate": 1.0,
                "corpus_distinct_2": 0.5,
            },
            "dpo": {
                "gold_mean": 0.4,
                "kl_to_ref": 3.0,
                "win_rate_vs_ref": 0.55,
                "eos_rate": 0.5,
                "corpus_distinct_2": 0.55,
            },
        },
    }
    (tmp_path / "compare.json").write_text(json.dumps(report))
    ppo, dpo, logs = tmp_path / "ppo", tmp_path / "dpo", tmp_path / "memory"
    for path in (ppo, dpo, logs):
        path.mkdir()
    (ppo / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "perf/episodes_per_s": v}) + "\n"
            for s, v in ((1, 1.0), (2, 3.0), (3, 2.0))
        )
    )
    (dpo / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.6}) + "\n")
    (dpo / "summary.json").write_text(json.dumps({"train_pairs": 100, "train_wall_s": 50.0}))
    (logs / "ppo.time").write_text("\tMaximum resident set size (kbytes): 2097152\n")
    text = summary_main(["--report", str(tmp_path), "--runs", str(ppo), str(dpo), "--memory_logs", str(logs)])
    assert "| ppo | 0.500 | 5.00 | 0.600 | 1.000 | 0.500 | 2.000 | 2048 |" in text  # median step speed, MB
    assert "| dpo | 0.400 | 3.00 | 0.550 | 0.500 | 0.550 | 2.000 | — |" in text  # pairs/s; no memory log
    assert (tmp_path / "algorithms.md").read_text() == text
