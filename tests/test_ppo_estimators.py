"""The critic-free estimators (grpo, rloo, reinforce_pp), the KL in the loss, and reward functions with
TRL's signature, end to end on the tiny pipeline (tests/conftest.py's `pipeline`)."""

import json
import math
import subprocess
import sys

import pytest
import reward_functions
import torch
from conftest import ROOT, kill_after_checkpoint, run_in_process, tiny_flags

from rlhf_toy import runlog, task
from rlhf_toy.config import ConfigError, parse_config
from rlhf_toy.rewards import RewardFunctionError, call_reward_function, combine, load_reward_functions
from rlhf_toy.stages.ppo import trainer
from rlhf_toy.stages.ppo.config import PPOStageConfig, split_batch

# 6 steps of 2 prompts x 4 samples, a checkpoint every 2nd
CRITIC_FREE = {
    "grpo": dict(
        advantage_estimator="grpo", num_generations=4, kl_in="loss", kl_estimator="k3", loss_type="grpo"
    ),
    "rloo": dict(advantage_estimator="rloo", num_generations=4, loss_type="sequence"),
    "reinforce_pp": dict(advantage_estimator="reinforce_pp", num_generations=2, gamma=0.99),
}
SHORT = dict(total_episodes=48, save_steps=2, num_eval_prompts=0)
VALUE_METRICS = ("loss/value_avg", "val/clipfrac_avg", "val/explained_variance")


def steps(run_dir):
    return [r for r in runlog.read_jsonl(run_dir / "metrics.jsonl") if "objective/scores" in r]


def config(pipeline, tmp_path, **overrides):
    return parse_config(PPOStageConfig, tiny_flags(pipeline, tmp_path / "x", **overrides))


def test_config_refuses_what_does_not_combine(pipeline, tmp_path):
    cfg = config(pipeline, tmp_path, advantage_estimator="grpo", num_generations=4)
    assert cfg.critic == "none" and config(pipeline, tmp_path).critic == "separate"  # auto, resolved
    refused = [
        (
            dict(advantage_estimator="grpo", num_generations=4, critic="shared"),
            "critic: shared needs a value model, which advantage_estimator: grpo does not use",
        ),
        (
            dict(advantage_estimator="rloo", num_generations=4, critic="separate"),
            "critic: separate needs a value model",
        ),
        (dict(critic="none"), "advantage_estimator: gae needs a critic"),
        (dict(advantage_estimator="grpo"), "num_generations must be >= 2, got 1"),
        (
            dict(advantage_estimator="grpo", num_generations=3),
            r"batch_size \(8\) must be a multiple of num_generations",
        ),
        (dict(advantage_estimator="ppo"), "advantage_estimator must be one of gae, grpo, rloo, reinforce_pp"),
        (dict(kl_in="loss"), "kl_in: loss adds the k3 estimator .* set kl_estimator: k3"),
        (dict(loss_type="sequence"), "loss_type: sequence needs one advantage per sequence"),
        (
            dict(
                advantage_estimator="rloo",
                num_generations=2,
                loss_type="sequence",
                kl_in="loss",
                kl_estimator="k3",
            ),
            "loss_type: sequence has no per-token loss",
        ),
        (
            dict(advantage_estimator="grpo", num_generations=2, whiten_rewards="true"),
            "whiten_rewards whitens per-token",
        ),
        (
            dict(rewards="rm,reward_functions"),
            "rewards entry 'reward_functions': expected rm or module:function",
        ),
        (
            dict(rewards="rm,reward_functions:wrong_length", reward_weights="1"),
            "reward_weights has 1 weights for 2",
        ),
        (dict(rewards="rm,rm"), "rewards lists an entry twice"),
    ]
    for overrides, message in refused:
        with pytest.raises(ConfigError, match=message):
            config(pipeline, tmp_path, **overrides)
    # the run-level cross-check trains TRL's PPOTrainer beside ours: PPO with GAE only
    from rlhf_toy.verify.trl_run import CrosscheckRunConfig

    with pytest.raises(
        ConfigError, match="advantage_estimator: 'grpo': the run-level cross-check trains TRL's"
    ):
        parse_config(CrosscheckRunConfig, ["--advantage_estimator", "grpo", "--num_generations", "2"])


@pytest.fixture(scope="module")
def critic_free_runs(pipeline, tmp_path_factory):
    """One finished 6-step run per critic-free estimator (read only)."""
    root = tmp_path_factory.mktemp("critic_free")
    for name, flags in CRITIC_FREE.items():
        run_in_process(pipeline, root / name, **SHORT, **flags)
    return root


@pytest.mark.parametrize("name", list(CRITIC_FREE))
def test_critic_free_run_trains_the_policy_alone(critic_free_runs, name):
    out = critic_free_runs / name
    records = steps(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert not any(k in r for k in (*VALUE_METRICS, "time/value_forward_s"))  # no critic, no value pass
        assert r["rewards/rm/mean"] == pytest.approx(r["score/rm"])
        # the policy moved within each step (2 PPO epochs: the second starts from updated weights); its loss is finite
        assert (
            r["policy/approxkl_avg"] > 0
            and math.isfinite(r["loss/policy_avg"])
            and math.isfinite(r["objective/kl"])
        )
    assert ("loss/kl_avg" in records[0]) == (name == "grpo")  # the KL in the loss, logged
    if name == "grpo":  # kl_in: loss: no KL in the reward
        assert all(r["objective/non_score_reward"] == 0 for r in records)
    else:
        assert all(r["objective/non_score_reward"] != 0 for r in records[1:])
    checkpoint = out / "checkpoints/step-6"
    assert (checkpoint / "policy/model.safetensors").exists() and not (checkpoint / "value").exists()
    # every step's batch is its prompts, each num_generations times, next to each other
    group = CRITIC_FREE[name]["num_generations"]
    prompts = [json.dumps(r["prompt"]) for r in runlog.read_jsonl(out / "samples.jsonl") if r["step"] == 2]
    assert prompts == [p for p in prompts[::group] for _ in range(group)] and len(set(prompts)) == 8 // group


def test_critic_free_run_learns(critic_free_runs):
    """GRPO with the KL in the loss on the easy reward: the policy learns to say "wonderful"."""
    records = steps(critic_free_runs / "grpo")
    first, last = records[0]["score/rm"], sum(r["score/rm"] for r in records[-2:]) / 2
    assert last > first + 0.3, (first, last)


def test_critic_free_run_with_a_function_reward_needs_no_reward_model(pipeline, tmp_path):
    """No value model and, with only a reward function, no reward model: none is loaded (its path does not
    exist), the optimizer holds the policy alone, and the before/after evaluation runs without an RM."""
    flags = dict(
        advantage_estimator="rloo",
        num_generations=2,
        reward_model_path=tmp_path / "none",
        rewards="reward_functions:fewer_words",
        total_episodes=16,
        num_eval_prompts=4,
    )
    state, _, _ = trainer.build(config(pipeline, tmp_path, **flags))
    assert state.value_model is None and state.scorer is None
    assert sum(p.numel() for p in state.parameters) == sum(p.numel() for p in state.policy.parameters())
    out = tmp_path / "ppo"
    run_in_process(pipeline, out, **flags)
    records = steps(out)
    assert [r["step"] for r in records] == [1, 2] and "score/rm" not in records[0]
    assert all(r["rewards/fewer_words/mean"] < 0 for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["rm_mean"] is None and summary["after"]["gold_mean"] is not None


def test_killed_critic_free_run_resumes_with_no_step_lost_or_repeated(pipeline, critic_free_runs, tmp_path):
    flags = tiny_flags(pipeline, tmp_path / "killed", **SHORT, **CRITIC_FREE["grpo"])
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/ppo.py"), *flags],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_after_checkpoint(process, tmp_path / "killed/checkpoints", 2, timeout=180)
    assert len(steps(tmp_path / "killed")) < 6  # killed before the end
    run_in_process(pipeline, tmp_path / "killed", **SHORT, **CRITIC_FREE["grpo"])
    resumed, whole = steps(tmp_path / "killed"), steps(critic_free_runs / "grpo")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(resumed, whole):
        assert a["objective/scores"] == pytest.approx(b["objective/scores"], abs=1e-5)
        assert a["loss/kl_avg"] == pytest.approx(b["loss/kl_avg"], abs=1e-5)


def test_reward_functions_get_trl_arguments_and_are_logged(pipeline, tmp_path, monkeypatch):
    """A function written for TRL's GRPOTrainer, beside the reward model with weights: it gets the
    conversational prompts and completions, the records' other columns by name; each component is logged."""
    records = [json.loads(line) for line in (pipeline / "prompts.jsonl").read_text().splitlines()]
    titles = [r["prompt"][0]["content"].split()[-1].strip("?.!\"'") for r in records]
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({**r, "title": t}) + "\n" for r, t in zip(records, titles))
    )
    gold_titles = []
    real_gold = task.gold_score
    monkeypatch.setattr(
        task, "gold_score", lambda text, title=None: gold_titles.append(title) or real_gold(text, title)
    )
    reward_functions.CALLS.clear()
    out = tmp_path / "ppo"
    run_in_process(
        pipeline,
        out,
        total_episodes=16,
        num_eval_prompts=0,
        prompts=tmp_path / "prompts.jsonl",
        advantage_estimator="grpo",
        num_generations=2,
        rewards="rm,reward_functions:short_and_on_title",
        reward_weights="1,0.5",
        length_coef=0,
        missing_eos_penalty=0,
    )
    call = reward_functions.CALLS[0]
    assert len(reward_functions.CALLS) == 2 and [c["step"] for c in reward_functions.CALLS] == [1, 2]
    assert all(isinstance(p, list) and p[0]["role"] == "user" for p in call["prompts"])
    assert all(c == [{"role": "assistant", "content": c[0]["content"]}] for c in call["completions"])
    by_prompt = {json.dumps(r["prompt"]): t for r, t in zip(records, titles)}
    assert call["title"] == [by_prompt[json.dumps(p)] for p in call["prompts"]]  # each prompt's own column
    assert all(isinstance(ids, list) and ids for ids in call["completion_ids"])
    assert call["other"] == ["log_extra"]
    metrics = steps(out)
    assert gold_titles[:8] == call["title"]  # the gold judge reads the prompt's film too
    for r, c in zip(metrics, reward_functions.CALLS):
        assert r["rewards/short_and_on_title/mean"] == pytest.approx(sum(c["rewards"]) / 8, abs=1e-6)
        assert r["short_and_on_title/words"] == pytest.approx(sum(len(x.split()) for x in c["texts"]) / 8)
        assert r["objective/scores"] == pytest.approx(
            r["rewards/rm/mean"] + 0.5 * r["rewards/short_and_on_title/mean"], abs=1e-5
        )
    samples = runlog.read_jsonl(out / "samples.jsonl")
    assert (
        set(samples[0]["rewards"]) == {"rm", "short_and_on_title"}
        and samples[0]["rm"] == samples[0]["rewards"]["rm"]
    )


def test_bad_reward_functions_stop_with_the_entry_named(pipeline, tmp_path):
    with pytest.raises(
        RewardFunctionError, match="rewards entry 'no_such_module:f': cannot import module 'no_such_module'"
    ):
        load_reward_functions(["rm", "no_such_module:f"])
    with pytest.raises(
        RewardFunctionError, match="'reward_functions:missing': module 'reward_functions' has no function"
    ):
        load_reward_functions(["reward_functions:missing"])
    with pytest.raises(
        RewardFunctionError, match="'reward_functions:not_a_function': module 'reward_functions' has no"
    ):
        load_reward_functions(["reward_functions:not_a_function"])
    records = [
        {"prompt": "Review a film.", "title": "X"}
    ] * 3  # plain text: the completions are plain text too

    def call(name):
        return call_reward_function(
            f"reward_functions:{name}",
            getattr(reward_functions, name),
            records,
            ["a", "b", "c"],
            [[5], [6], [7]],
            step=1,
            max_steps=2,
            log_metric=lambda *a: None,
        )

    with pytest.raises(
        RewardFunctionError, match="'reward_functions:wrong_length' returned 2 rewards for 3 completions"
    ):
        call("wrong_length")
    with pytest.raises(
        RewardFunctionError, match="'reward_functions:nan_for_the_second' returned nan for completion 1"
    ):
        call("nan_for_the_second")
    # None: the function does not apply there (TRL): left out of the weighted sum, unless nothing scored it
    some = call("none_for_odd")
    assert torch.equal(some.isnan(), torch.tensor([False, True, False]))
    assert combine({"rm": torch.tensor([0.5, 0.5, 0.5]), "f": some}, [1.0, 2.0]).tolist() == [2.5, 0.5, 2.5]
    with pytest.raises(
        RewardFunctionError, match=r"every rewards entry \(f\) returned None for completion 1"
    ):
        combine({"f": some}, [1.0])
    # the reward model has no None: its NaN is not left out (it stops the run as a non-finite score)
    assert combine(
        {"rm": torch.tensor([float("nan"), 0.5, 0.5]), "f": some}, [1.0, 1.0]
    ).isnan().tolist() == [True, False, False]
    # in a run: a missing module before any model loads, a wrong length at the first step
    with pytest.raises(RewardFunctionError, match="cannot import module 'no_such_module'"):
        run_in_process(
            pipeline, tmp_path / "a", total_episodes=8, num_eval_prompts=0, rewards="rm,no_such_module:f"
        )
    with pytest.raises(RewardFunctionError, match="'reward_functions:wrong_length' returned 7 rewards for 8"):
        run_in_process(
            pipeline,
            tmp_path / "b",
            total_episodes=8,
            num_eval_prompts=0,
            rewards="reward_functions:wrong_length",
        )


def test_a_missing_reward_module_is_one_line_on_the_command_line(run_script, pipeline, tmp_path):
    result = run_script(
        "ppo", *tiny_flags(pipeline, tmp_path / "x", rewards="rm,no_such_module:f"), check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: rewards entry 'rm,no_such_module:f'" not in result.stderr  # the entry, not the whole list
    assert "error: rewards entry 'no_such_module:f': cannot import module 'no_such_module'" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_processes_keep_each_group_on_one_process(pipeline, tmp_path):
    """Data parallel: each process samples, scores and compares whole groups (its 4 episodes are one prompt's
    4 samples here); a share that is not whole groups is refused."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        str(ROOT / "scripts/ppo.py"),
        *tiny_flags(pipeline, out, total_episodes=16, num_eval_prompts=0, **CRITIC_FREE["grpo"]),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in steps(out)] == [1, 2] and all("loss/kl_avg" in r for r in steps(out))
    assert json.loads((out / "summary.json").read_text())["num_processes"] == 2
    prompts = [json.dumps(r["prompt"]) for r in runlog.read_jsonl(out / "samples.jsonl") if r["step"] == 2]
    assert prompts == [prompts[0]] * 4 + [prompts[4]] * 4 and prompts[0] != prompts[4]
    assert split_batch(
        8, num_processes=2, num_mini_batches=1, gradient_accumulation_steps=1, num_generations=4
    ) == (4, 4)
    with pytest.raises(
        ConfigError,
        match=r"batch_size \(8\) over 2 processes \(4 each\) must be a multiple of "
        r"num_generations \(8\)",
    ):
        split_batch(8, num_processes=2, num_mini_batches=1, gradient_accumulation_steps=1, num_generations=8)
