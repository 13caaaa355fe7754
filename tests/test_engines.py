"""The scale-out engines on this CPU (docs/scaling_out.md): PPO's update under accelerate's DDP against one process
and against the hand-written `average_gradients`; PPO under accelerate's FSDP2 (switched on for the CPU by
engine_fsdp2_cpu.py) against one process and against DDP, resumed from its shards; the launch configs that accelerate
cannot run here refused with what to do instead. The TRL stages' 2-process runs are in test_multiprocess.py."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import engine_ppo_update
import pytest
import torch
from conftest import ROOT, tiny_flags

from rlhf_toy import rundir, runlog

# Two processes (or micro-batches) sum the same float32 gradients in another order: up to 1.6e-6 apart in the
# weights on an AVX2 CPU. A wrong average moves them by SGD's lr 0.5 times a share of the gradient: far more.
FLOAT32_ORDER = 1e-5


def launch(*args, timeout=300):
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )
    return result


def largest_difference(weights_a: list, weights_b: list) -> float:
    """The largest |a − b| over two lists of weight tensors, entry by entry."""
    return max((a - b).abs().max().item() for a, b in zip(weights_a, weights_b))


def test_ppo_update_under_ddp_equals_one_process_and_the_hand_written_all_reduce(pipeline, tmp_path):
    # the shipped DDP config, as a user launches it (on a machine without GPUs: a gloo group on the CPU); each
    # process's minibatch in 2 micro-batches of one episode, the one process's in one of four: the whitening, the
    # token means and the accumulation must all count the global minibatch for the weights to agree
    result = launch(
        "--config_file",
        ROOT / "configs/accelerate/ddp.yaml",
        "--num_processes",
        2,
        ROOT / "tests/engine_ppo_update.py",
        pipeline,
        tmp_path,
        2,
    )  # also checks average_gradients
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(tmp_path / "weights.pt")
    one = engine_ppo_update.update(pipeline, tmp_path / "one")
    assert len(one) == len(two)
    assert largest_difference(one, two) < FLOAT32_ORDER


def test_grpo_update_on_two_processes_equals_one(pipeline, tmp_path):
    """GRPO (its loss, the KL in it) data parallel: each process's share is one prompt's whole group of 4, and
    the weights after the update are one process's with both groups."""
    grpo = {
        "advantage_estimator": "grpo",
        "num_generations": 4,
        "kl_in": "loss",
        "kl_estimator": "k3",
        "loss_type": "grpo",
    }
    result = launch(
        "--config_file",
        ROOT / "configs/accelerate/ddp.yaml",
        "--num_processes",
        2,
        ROOT / "tests/engine_ppo_update.py",
        pipeline,
        tmp_path,
        1,
        *[x for kv in grpo.items() for x in kv],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = (
        torch.load(tmp_path / "weights.pt"),
        engine_ppo_update.update(pipeline, tmp_path / "one", **grpo),
    )
    assert len(one) == len(two)
    assert largest_difference(one, two) < FLOAT32_ORDER


@pytest.mark.parametrize(
    "overrides", [{}, {"advantage_estimator": "reinforce_pp", "kl_in": "loss", "kl_estimator": "k3"}]
)
def test_gradient_accumulation_gives_the_minibatch_token_mean(pipeline, tmp_path, overrides):
    """A minibatch of 4 episodes in 4 micro-batches of one updates the weights as in one micro-batch: bnpo (the
    policy, value and KL losses) is the mean over the minibatch's tokens, whatever each micro-batch's length."""
    whole = engine_ppo_update.update(pipeline, tmp_path / "one", 1, **overrides)
    accumulated = engine_ppo_update.update(pipeline, tmp_path / "four", 4, **overrides)
    assert largest_difference(whole, accumulated) < FLOAT32_ORDER


def test_policy_and_critic_gradients_are_clipped_each_on_its_own(pipeline, tmp_path):
    """With a separate critic and the clip reached, the policy's step does not depend on vf_coef: a large value
    gradient shrinks only the critic's step (one clip over both would shrink the policy's too)."""
    from transformers import AutoModelForCausalLM

    initial = [p.detach() for p in AutoModelForCausalLM.from_pretrained(pipeline / "sft/final").parameters()]
    small, large = (
        engine_ppo_update.update(pipeline, tmp_path / f"vf{vf_coef}", 1, vf_coef=vf_coef, max_grad_norm=0.01)
        for vf_coef in (0.01, 100.0)
    )
    policy = slice(0, len(initial))  # the trainable parameters are the policy's, then the critic's
    assert largest_difference(small[policy], initial) > 1e-3  # the policy learned
    assert largest_difference(small[policy], large[policy]) < 1e-7  # by the same step, whatever vf_coef


def fsdp2(*args, timeout=300):
    """tests/engine_fsdp2_cpu.py on 2 CPU processes: a stage (here PPO) under accelerate's FSDP2 engine."""
    return launch(
        "--config_file",
        ROOT / "configs/accelerate/ddp.yaml",
        "--num_processes",
        2,
        ROOT / "tests/engine_fsdp2_cpu.py",
        *args,
        timeout=timeout,
    )


def test_ppo_update_under_fsdp2_equals_one_process(pipeline, tmp_path):
    result = fsdp2("update", pipeline, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = torch.load(tmp_path / "weights.pt"), engine_ppo_update.update(pipeline, tmp_path / "one")
    assert len(one) == len(two)
    assert largest_difference(one, two) < FLOAT32_ORDER


def run_ppo(pipeline, out, engine: str):
    """The tiny PPO (4 steps, checkpoints every 2, evaluations) on 2 processes under `ddp` or `fsdp2`."""
    flags = tiny_flags(pipeline, out, total_episodes=32, save_steps=2)
    result = (
        fsdp2("ppo", *flags)
        if engine == "fsdp2"
        else launch("--config_file", ROOT / "configs/accelerate/ddp.yaml", ROOT / "scripts/ppo.py", *flags)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def killed_after_step_2(run_dir, copy):
    """A copy of a finished 4-step run as a kill after the step-2 checkpoint leaves it (step 4's files removed)."""
    shutil.copytree(run_dir, copy)
    for name in ("checkpoints/step-4", "final", rundir.FINISHED_FILE):
        path = copy / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return copy


def steps(run_dir):  # every step's metrics but timings
    return [
        {
            k: v
            for k, v in r.items()
            if not k.startswith(("time/", "perf/episodes_per_s", "perf/tokens_per_s"))
        }
        for r in runlog.read_jsonl(run_dir / "metrics.jsonl")
        if "objective/scores" in r
    ]


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "final/model.safetensors")


@pytest.fixture(scope="module")
def ddp_run(pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    run_ppo(pipeline, out, "ddp")
    return out


def test_ppo_under_ddp_resumes_from_its_checkpoint_as_if_never_stopped(pipeline, ddp_run, tmp_path):
    """Two processes, killed after the step-2 checkpoint and launched again: the same numbers as the run never
    stopped (each process restores its own RNG stream)."""
    killed = killed_after_step_2(ddp_run, tmp_path / "killed")
    assert "resuming from" in run_ppo(pipeline, killed, "ddp").stdout
    assert steps(killed) == steps(ddp_run)


def test_ppo_under_fsdp2_equals_ddp_and_resumes_from_its_shards(pipeline, ddp_run, tmp_path):
    """A whole run (rollouts, evaluations on every process, sharded checkpoints, the gathered final model) under FSDP2
    gives DDP's numbers: the same processes with the same random streams, the weights sharded rather than copied.
    Killed after the step-2 checkpoint and launched again, it goes on from the shards as if never stopped."""
    fsdp2_run = tmp_path / "fsdp2"
    run_ppo(pipeline, fsdp2_run, "fsdp2")
    assert sorted(p.name for p in (fsdp2_run / "checkpoints/step-4/engine").iterdir()) == [
        "optimizer_0",
        "pytorch_model_fsdp_0",
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    ddp_steps, fsdp2_steps = steps(ddp_run), steps(fsdp2_run)
    assert len(ddp_steps) == len(fsdp2_steps) == 4
    for ours, theirs in zip(fsdp2_steps, ddp_steps):
        assert ours.keys() == theirs.keys()
        assert all(abs(ours[k] - theirs[k]) <= 1e-5 * max(1.0, abs(theirs[k])) for k in ours), (ours, theirs)
    summaries = [json.loads((run_dir / "summary.json").read_text()) for run_dir in (fsdp2_run, ddp_run)]
    for when in ("before", "after"):
        assert summaries[0][when] == pytest.approx(summaries[1][when], rel=1e-5, abs=1e-6)
    ddp_final, fsdp2_final = final_weights(ddp_run), final_weights(fsdp2_run)
    assert fsdp2_final.keys() == ddp_final.keys()  # the tied LM head written once, as from the whole model
    assert max((fsdp2_final[k] - ddp_final[k]).abs().max().item() for k in ddp_final) < 1e-5

    killed = killed_after_step_2(fsdp2_run, tmp_path / "killed")
    assert "resuming from" in run_ppo(pipeline, killed, "fsdp2").stdout
    assert steps(killed) == fsdp2_steps
    assert all(torch.equal(final_weights(killed)[k], fsdp2_final[k]) for k in fsdp2_final)


def test_lora_under_an_engine_that_shards_the_weights_is_refused(pipeline, tmp_path, monkeypatch):
    flags = tiny_flags(pipeline, tmp_path / "ppo", total_episodes=16, num_eval_prompts=0, use_lora="true")
    result = launch("--config_file", ROOT / "configs/accelerate/fsdp.yaml", ROOT / "scripts/ppo.py", *flags)
    assert result.returncode != 0
    assert "error: use_lora under FSDP, which shards the weights" in result.stderr
    assert not (tmp_path / "ppo").exists()  # refused before anything was written
    # ZeRO-3 as `accelerate launch --config_file zero3.yaml` sets it (its launcher needs DeepSpeed installed)
    from rlhf_toy.config import ConfigError
    from rlhf_toy.stages.common import check_engine

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="use_lora under DeepSpeed ZeRO-3"):
        check_engine(torch.device("cuda"), use_lora=True)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # ZeRO-2 keeps whole weights: LoRA is fine
    with pytest.raises(ConfigError, match="accelerate runs on GPUs only"):
        check_engine(torch.device("cpu"), use_lora=True)


def test_launch_configs_accelerate_cannot_run_here_are_refused(pipeline, tmp_path):
    flags = tiny_flags(pipeline, tmp_path / "ppo", total_episodes=16, num_eval_prompts=0)
    result = launch("--config_file", ROOT / "configs/accelerate/fsdp.yaml", ROOT / "scripts/ppo.py", *flags)
    assert result.returncode != 0
    assert "error: the launch config asks for FSDP, which accelerate runs on GPUs only" in result.stderr
    assert not (tmp_path / "ppo").exists()  # refused before anything was written
    if importlib.util.find_spec("deepspeed") is None:  # accelerate's launcher says it first
        result = launch(
            "--config_file", ROOT / "configs/accelerate/zero2.yaml", ROOT / "scripts/ppo.py", *flags
        )
        assert (
            result.returncode != 0
            and "DeepSpeed is not installed => run `pip3 install deepspeed`" in result.stderr
        )
