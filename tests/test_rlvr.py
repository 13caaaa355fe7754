"""The verifiable-reward task (rlhf_toy/rlvr.py, configs/rlvr.yaml): the exact check, its prompts, and reward
functions in every evaluation (PPO's before/after, compare's --rewards)."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, run_in_process
from test_compare import SAMPLING, setup, tiny_copy  # noqa: F401 (setup: the fixture)

from rlhf_toy import data, models, rlvr
from rlhf_toy.config import parse_config
from rlhf_toy.evaluation import compare
from rlhf_toy.evaluation.sample_and_score import Sampling, sample_and_score
from rlhf_toy.rewards import load_reward_functions
from rlhf_toy.scoring import Judge
from rlhf_toy.stages.ppo.config import PPOStageConfig

# answer -> (correct_sum, number_only) for "What is 7 + 5?"
CASES = {
    "12": (1, 1),
    "12.": (1, 1),
    "**12**": (1, 1),
    " 12 \n": (1, 1),
    "7 + 5 = 12": (1, 0),
    "The answer is 12.": (1, 0),
    "It is 13, no, 12": (1, 0),
    "12!": (1, 0),
    "7 + 5 = 11": (0, 0),
    "12 or 13": (0, 0),
    "twelve": (0, 0),
    "": (0, 0),
    "12.5": (0, 0),
    "-12": (0, 0),
    "1 2": (0, 0),
}


def test_the_check_reads_the_last_number_and_number_only_the_instruction():
    texts = list(CASES)
    for completions in (
        texts,
        [[{"role": "assistant", "content": t}] for t in texts],
    ):  # plain and conversational
        correct = rlvr.correct_sum(prompts=None, completions=completions, answer=[12] * len(texts))
        literal = rlvr.number_only(prompts=None, completions=completions, answer=[12] * len(texts))
        assert dict(zip(texts, zip(correct, literal))) == CASES
    assert (
        rlvr.last_number("3,5 then 4.25") == 4.25
        and rlvr.last_number("1,5") == 1.5
        and rlvr.last_number("x") is None
    )


def test_prompts_are_split_by_pair_and_the_committed_files_are_the_scripts(tmp_path):
    train, held_out = rlvr.make_prompts(1, 9, 20, seed=3)
    pairs = lambda records: {(r["a"], r["b"]) for r in records}
    assert len(held_out) == 20 and len(train) == 61 and not pairs(train) & pairs(held_out)
    assert pairs(train) | pairs(held_out) == {(a, b) for a in range(1, 10) for b in range(1, 10)}
    assert all(
        r["answer"] == r["a"] + r["b"] and f"What is {r['a']} + {r['b']}?" in r["prompt"][0]["content"]
        for r in train + held_out
    )
    for split in ("train", "test"):  # the word task's films
        shutil.copy(ROOT / f"data/prompts_{split}.jsonl", tmp_path)
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/make_rlvr_data.py"), "--out", str(tmp_path)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    for name in ("rlvr/train", "rlvr/eval", "rlvr_word/train", "rlvr_word/eval"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (ROOT / f"data/{name}.jsonl").read_bytes()
    records = data.load_prompt_records(str(ROOT / "data/rlvr/eval.jsonl"))
    assert len(records) == 128 and set(records[0]) == {"prompt", "answer", "a", "b"}
    words = data.load_prompt_records(str(ROOT / "data/rlvr_word/eval.jsonl"))
    tests = data.load_prompt_records(str(ROOT / "data/prompts_test.jsonl"))
    assert [r["title"] for r in words] == [r["title"] for r in tests] and {r["word"] for r in words} == {
        "brilliant"
    }


def test_the_word_check_wants_the_word_not_a_review():
    answers = [
        "A brilliant film.",
        "BRILLIANT!",
        "Brilliantly shot.",
        "brilliant brilliant brilliant",
        "Not good.",
    ]
    assert rlvr.uses_word(None, answers, ["brilliant"] * 5) == [1, 1, 0, 1, 0]
    echoes = [
        "A one-sentence review of \"X\" that uses the word 'brilliant' is a masterpiece.",
        'In "X", the word "brilliant" is used well.',
        "The word brilliant fits X.",
        "X is ‘brilliant’.",
        "X is brilliant, the best word for it.",
        "A brilliant film.",
    ]
    assert rlvr.quotes_word(None, echoes, ["brilliant"] * 6) == [1, 1, 1, 1, 0, 0]


def test_rlvr_config_is_valid_and_its_functions_load():
    cfg = parse_config(PPOStageConfig, ["--config", str(ROOT / "configs/rlvr.yaml")])
    assert cfg.critic == "none" and cfg.batch_size % cfg.num_generations == 0
    assert [name for _, name, _ in load_reward_functions(cfg.rewards)] == ["correct_sum", "number_only"]
    assert cfg.reward_weights == [1.0, 0.0] and "rm" not in cfg.rewards


def test_sample_and_score_scores_each_answer_with_the_reward_functions():
    path = models.resolve_model_path(models.TINY_MODEL)
    tokenizer, model = models.load_tokenizer(path), models.load_causal_lm(path, dtype="float32")
    records = data.load_prompt_records(str(ROOT / "data/rlvr/eval.jsonl"))[:6]
    functions = load_reward_functions(["reward_functions:fewer_words", "rlhf_toy.rlvr:correct_sum"])
    summary, rows = sample_and_score(
        model,
        tokenizer,
        [r["prompt"] for r in records],
        Sampling(max_new_tokens=8, temperature=1.0, batch_size=3, seed=0),
        judge=Judge(None),
        records=records,
        reward_functions=functions,
    )
    words = [-0.1 * len(r["response"].split()) for r in rows]
    assert [r["rewards"]["fewer_words"] for r in rows] == pytest.approx(words)
    assert [r["rewards"]["correct_sum"] for r in rows] == rlvr.correct_sum(
        None, [r["response"] for r in rows], [r["answer"] for r in records]
    )
    assert summary["rewards/fewer_words/mean"] == pytest.approx(sum(words) / 6)


def test_tiny_rlvr_run_logs_and_evaluates_the_check(pipeline, tmp_path):
    """configs/rlvr.yaml's rewards and data on the tiny model: each function logged per step and in the
    before/after evaluation, no reward model or critic needed."""
    out = tmp_path / "rlvr"
    run_in_process(
        pipeline,
        out,
        prompts=ROOT / "data/rlvr/train.jsonl",
        eval_prompts=ROOT / "data/rlvr/eval.jsonl",
        num_eval_prompts=4,
        rewards="rlhf_toy.rlvr:correct_sum,rlhf_toy.rlvr:number_only",
        reward_weights="1,0",
        advantage_estimator="grpo",
        num_generations=4,
        total_episodes=16,
        reward_model_path=tmp_path / "no_reward_model",
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "objective/scores" in m]
    assert len(steps) == 2 and all(
        {"rewards/correct_sum/mean", "rewards/number_only/mean"} <= set(m) for m in steps
    )
    summary = json.loads((out / "summary.json").read_text())
    for when in ("before", "after"):
        assert summary[when]["n_samples"] == 4
        assert summary[when]["rewards/correct_sum/mean"] in (0, 0.25, 0.5, 0.75, 1)
        assert summary[when]["rewards/number_only/mean"] <= summary[when]["rewards/correct_sum/mean"]


def test_compare_reports_reward_functions_and_their_paired_differences(tmp_path, setup):
    a, b = tiny_copy(tmp_path / "a"), tiny_copy(tmp_path / "b", noise=0.05, seed=1)
    out = tmp_path / "report"
    compare.main(
        [
            "--runs",
            str(a),
            str(b),
            "--prompts",
            str(setup["prompts"]),
            "--output_dir",
            str(out),
            "--reward_model",
            "none",
            "--rewards",
            "reward_functions:fewer_words",
            "--checkpoints",
            "0",
            *SAMPLING,
        ]
    )
    report = json.loads((out / "compare.json").read_text())
    rows = {
        label: [json.loads(line) for line in (out / f"samples/{label}.jsonl").read_text().splitlines()]
        for label in ("a", "b")
    }
    for label in ("a", "b"):
        assert all(
            r["rewards"]["fewer_words"] == pytest.approx(-0.1 * len(r["response"].split()))
            for r in rows[label]
        )
        assert report["runs"][label]["rewards/fewer_words/mean"] == pytest.approx(
            sum(r["rewards"]["fewer_words"] for r in rows[label]) / 6
        )
    pair = report["pairs"][0]["rewards"]["fewer_words"]
    assert pair["diff"] == pytest.approx(
        report["runs"]["b"]["rewards/fewer_words/mean"] - report["runs"]["a"]["rewards/fewer_words/mean"]
    )
    assert pair["diff_ci95"][0] <= pair["diff"] <= pair["diff_ci95"][1]
    md = (out / "compare.md").read_text()
    assert "| pooled distinct-2 | fewer_words |" in md
    assert "fewer_words difference (95% CI)" in md


def test_compare_reward_function_errors_name_the_entry(tmp_path, setup, capsys):
    for rewards, message in (
        (["rm"], "--rewards rm: the reward model is --reward_model"),
        (["no_such_module:f"], "cannot import module 'no_such_module'"),
        # the film prompts have no `answer` column
        (["rlhf_toy.rlvr:correct_sum"], "rewards entry 'rlhf_toy.rlvr:correct_sum' failed: TypeError"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            compare.main(
                [
                    "--runs",
                    str(setup["ref"]),
                    "--prompts",
                    str(setup["prompts"]),
                    "--output_dir",
                    str(tmp_path / "r"),
                    "--reward_model",
                    "none",
                    "--rewards",
                    *rewards,
                    *SAMPLING,
                ]
            )
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err


def test_a_reward_function_with_weight_zero_is_a_monitor_that_changes_no_training(pipeline, tmp_path):
    """configs/rlvr*.yaml log number_only / quotes_word with weight 0: the run must be the run without them."""
    flags = dict(
        advantage_estimator="grpo",
        num_generations=4,
        total_episodes=16,
        num_eval_prompts=0,
        reward_model_path=tmp_path / "none",
    )
    run_in_process(pipeline, tmp_path / "alone", rewards="reward_functions:fewer_words", **flags)
    run_in_process(
        pipeline,
        tmp_path / "monitored",
        rewards="reward_functions:fewer_words,reward_functions:short_and_on_title",
        reward_weights="1,0",
        **flags,
    )
    read = lambda run: [
        m
        for m in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        if "objective/scores" in m
    ]
    alone, monitored = read("alone"), read("monitored")
    assert len(alone) == len(monitored) == 2
    for a, m in zip(alone, monitored):
        assert "rewards/short_and_on_title/mean" in m
        same = {k: v for k, v in a.items() if not k.startswith(("time/", "perf/"))}  # all but timings
        assert same == {k: m[k] for k in same}
    assert (tmp_path / "alone/final/model.safetensors").read_bytes() == (
        tmp_path / "monitored/final/model.safetensors"
    ).read_bytes()
