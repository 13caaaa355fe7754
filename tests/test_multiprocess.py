"""Every stage under two real processes on the CPU (gloo). `accelerate launch --cpu --num_processes 2`
starts ONE process (accelerate's CPU launcher expects mpirun); `--multi_gpu` is accelerate's torchrun
launcher, which on a machine without GPUs gives a CPU process group. PPO's is in test_ppo_trainer.py."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from rlhf_toy import runlog


def launch(script, *args, timeout=300):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           str(ROOT / "scripts" / f"{script}.py"), *map(str, args)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SFT, then a reward model and DPO from it, each with 2 processes (a few steps of the tiny configs)."""
    tmp = tmp_path_factory.mktemp("two_processes")
    launch("sft", "--config", ROOT / "configs/tiny/sft.yaml", "--output_dir", tmp / "sft", "--max_steps", 4,
           "--num_eval_prompts", 4)
    launch("train_reward", "--config", ROOT / "configs/tiny/reward.yaml", "--output_dir", tmp / "rm",
           "--model_name_or_path", tmp / "sft/final", "--policy_model", tmp / "sft/final", "--max_steps", 4,
           "--num_eval_prompts", 8, "--num_norm_samples", 8)
    launch("dpo", "--config", ROOT / "configs/tiny/dpo.yaml", "--output_dir", tmp / "dpo",
           "--model_name_or_path", tmp / "sft/final", "--reward_model", tmp / "rm/final", "--max_steps", 4,
           "--num_eval_prompts", 4)
    return tmp


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_trl_stages_train_on_two_processes_and_write_once(runs, stage):
    run = runs / stage
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert (run / "final/model.safetensors").exists() and (run / "final/config.json").exists()
    # rank 0 alone writes: each training step's loss once, each eval prompt's sample once per stage
    steps = [r["step"] for r in runlog.read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
    stages = [r["stage"] for r in runlog.read_jsonl(run / "samples.jsonl")]
    expected = {"sft": {"before": 4, "after": 4}, "rm": {"calibration": 8, "eval": 8},
                "dpo": {"before": 4, "after": 4}}[stage]
    assert {s: stages.count(s) for s in expected} == expected and len(stages) == sum(expected.values())
    if stage == "rm":
        assert json.loads((run / "final/reward_normalization.json").read_text())["n_samples"] == 8
