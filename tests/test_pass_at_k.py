"""pass@k (scripts/pass_at_k.py): the estimator against counting subsets, and the script on the tiny model."""

import itertools
import json

import pytest
import yaml

from rlhf_toy.evaluation.pass_at_k import main, pass_at_k


@pytest.mark.parametrize("n,c,k", [(4, 1, 2), (5, 2, 3), (6, 0, 2), (6, 6, 1), (7, 3, 7), (8, 5, 1)])
def test_estimator_is_the_share_of_k_subsets_with_a_pass(n, c, k):
    answers = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(answers, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_estimator_refuses_k_above_n():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


@pytest.fixture
def task(tmp_path):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": a + 1}) + "\n" for a in range(3))
    )
    config = tmp_path / "task.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "eval_prompts": str(prompts),
                "rewards": ["reward_functions:first_token_even"],
                "response_length": 6,
                "temperature": 1.0,
                "max_prompt_length": 32,
            }
        )
    )
    return config


def test_pass_at_k_on_the_tiny_model(task, tmp_path):
    out = tmp_path / "report" / "pass.md"
    results = main(
        [
            "--config",
            str(task),
            "--models",
            "tiny-random-gpt2",
            "--n",
            "8",
            "--k",
            "1",
            "2",
            "8",
            "--batch_size",
            "5",
            "--output",
            str(out),
        ]
    )
    r = results["tiny-random-gpt2"]
    assert len(r["counts"]) == 3 and all(0 <= c <= 8 for c in r["counts"])
    # pass@1 is the share of passing answers; pass@n the share of prompts solved at least once; k only helps.
    assert r["pass_at_k"]["1"] == pytest.approx(sum(r["counts"]) / 24)
    assert r["pass_at_k"]["8"] == pytest.approx(1 - r["never_solved"] / 3)
    assert r["pass_at_k"]["1"] <= r["pass_at_k"]["2"] <= r["pass_at_k"]["8"]
    assert 0 < sum(r["counts"]) < 24, "the check should split the tiny model's answers"
    assert "| tiny-random-gpt2 |" in out.read_text()
    assert (
        json.loads(out.with_suffix(".json").read_text())["models"]["tiny-random-gpt2"]["counts"]
        == r["counts"]
    )
    # Same seed and batch size, same counts: the table is reproducible.
    again = main(
        ["--config", str(task), "--models", "tiny-random-gpt2", "--n", "8", "--k", "1", "--batch_size", "5"]
    )
    assert again["tiny-random-gpt2"]["counts"] == r["counts"]


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(rewards=["rm"]), "'rewards' names no check"),
        (dict(rewards=["reward_functions:no_such_function"]), "no function 'no_such_function'"),
        (dict(eval_prompts="nowhere.jsonl"), "nowhere.jsonl"),
    ],
)
def test_bad_task_config_is_named(task, change, message):
    config = yaml.safe_load(task.read_text())
    task.write_text(yaml.safe_dump({**config, **change}))
    with pytest.raises(SystemExit, match=message):
        main(["--config", str(task), "--models", "tiny-random-gpt2", "--n", "2", "--k", "1"])


def test_k_above_n_and_missing_config_are_named(task, tmp_path):
    with pytest.raises(SystemExit, match="--k"):
        main(["--config", str(task), "--models", "tiny-random-gpt2", "--n", "4", "--k", "1", "8"])
    with pytest.raises(SystemExit, match="no such file"):
        main(["--config", str(tmp_path / "missing.yaml"), "--models", "tiny-random-gpt2"])
