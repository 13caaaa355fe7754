"""Every stage under two real processes on the CPU (gloo). `accelerate launch --cpu --num_processes 2`
starts ONE process (accelerate's CPU launcher expects mpirun); `--multi_gpu` is accelerate's torchrun
launcher, which on a machine without GPUs gives a CPU process group. PPO's is in test_ppo_trainer.py and
test_engines.py. Each TRL stage is run again in one process with gradient_accumulation_steps 2: the same
global batch (HF's sampler deals per-device batches to the processes in turn; one process accumulates the
same two), so the same losses and weights."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from safetensors.torch import load_file

from rlhf_toy import models, runlog, sequences


def launch(script, *args, timeout=300):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        str(ROOT / "scripts" / f"{script}.py"),
        *map(str, args),
    ]
    result = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def stage_args(tmp, stage: str, out) -> list:
    """Each stage's flags (a few steps of the tiny configs); the later stages start from the 2-process SFT."""
    return {
        "sft": [
            "--config",
            ROOT / "configs/tiny/sft.yaml",
            "--model_name_or_path",
            tmp / "base",
            "--max_steps",
            4,
            "--num_eval_prompts",
            4,
        ],
        "train_reward": [
            "--config",
            ROOT / "configs/tiny/reward.yaml",
            "--model_name_or_path",
            tmp / "sft/final",
            "--policy_model",
            tmp / "sft/final",
            "--max_steps",
            4,
            "--num_eval_prompts",
            8,
            "--num_norm_samples",
            8,
        ],
        "dpo": [
            "--config",
            ROOT / "configs/tiny/dpo.yaml",
            "--model_name_or_path",
            tmp / "sft/final",
            "--reward_model",
            tmp / "rm/final",
            "--max_steps",
            4,
            "--num_eval_prompts",
            4,
        ],
    }[stage] + ["--output_dir", out]


RUNS = {"sft": "sft", "rm": "train_reward", "dpo": "dpo"}  # run directory -> script


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SFT, then a reward model and DPO from it, each with 2 processes, from the tiny GPT-2 with dropout off (each
    process would draw its own dropout masks, which no single process can reproduce)."""
    tmp = tmp_path_factory.mktemp("two_processes")
    base = models.resolve_model_path(models.TINY_MODEL)
    subprocess.run(["cp", "-r", str(base), str(tmp / "base")], check=True)
    config = json.loads((tmp / "base/config.json").read_text())
    config.update({key: 0.0 for key in config if key.endswith("pdrop")})
    (tmp / "base/config.json").write_text(json.dumps(config))
    for run, script in RUNS.items():
        launch(script, *stage_args(tmp, script, tmp / run))
    return tmp


@pytest.fixture(scope="module")
def one_process_runs(runs):
    """The same stages in one process, accumulating 2 batches per step (each from the 2-process run's inputs)."""
    from rlhf_toy.config import parse_config
    from rlhf_toy.stages.dpo import DPOStageConfig, run_dpo
    from rlhf_toy.stages.reward import RewardStageConfig, train_reward
    from rlhf_toy.stages.sft import SFTStageConfig, run_sft

    stages = {
        "sft": (SFTStageConfig, run_sft),
        "train_reward": (RewardStageConfig, train_reward),
        "dpo": (DPOStageConfig, run_dpo),
    }
    for run, script in RUNS.items():
        config_class, stage = stages[script]
        # the computation each of the 2 processes runs: TRL's forward of the whole rows (the reward model's and DPO's
        # prompts once and DPO's answer windows are for one process)
        with pytest.MonkeyPatch.context() as whole_rows:
            whole_rows.setattr(sequences.AnswerWindow, "of", classmethod(lambda cls, completion_mask: None))
            stage(
                parse_config(
                    config_class,
                    [
                        *map(str, stage_args(runs, script, runs / f"{run}_1")),
                        "--gradient_accumulation_steps",
                        "2",
                        *(["--share_prompts", "false"] if script != "sft" else []),
                    ],
                )
            )
    return runs


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
    expected = {
        "sft": {"before": 4, "after": 4},
        "rm": {"calibration": 8, "eval": 8},
        "dpo": {"before": 4, "after": 4},
    }[stage]
    assert {s: stages.count(s) for s in expected} == expected and len(stages) == sum(expected.values())
    if stage == "rm":
        assert json.loads((run / "final/reward_normalization.json").read_text())["n_samples"] == 8


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_two_processes_train_as_one_process_with_the_same_global_batch(one_process_runs, stage):
    two, one = one_process_runs / stage, one_process_runs / f"{stage}_1"
    losses = [
        [r["loss"] for r in runlog.read_jsonl(run / "metrics.jsonl") if "loss" in r] for run in (two, one)
    ]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    weights = [load_file(run / "final/model.safetensors") for run in (two, one)]
    assert weights[0].keys() == weights[1].keys()
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-5


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_under_fsdp2_each_stage_trains_as_under_ddp(runs, stage):
    """The same 2 processes under accelerate's FSDP2 (switched on for the CPU by engine_fsdp2_cpu.py): the weights
    sharded rather than copied, the same losses and final weights (gathered onto rank 0, the tied LM head written
    once) as under DDP. Only the evaluation before training is missing: the HF Trainer cannot evaluate an FSDP model
    it has not prepared with its optimizer (`evaluate_before_training`)."""
    script = RUNS[stage]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs/accelerate/ddp.yaml"),
        "--num_processes",
        "2",
        str(ROOT / "tests/engine_fsdp2_cpu.py"),
        script,
        *map(str, stage_args(runs, script, runs / f"{stage}_fsdp2")),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    fsdp2, ddp = runs / f"{stage}_fsdp2", runs / stage
    losses = [
        [r["loss"] for r in runlog.read_jsonl(run / "metrics.jsonl") if "loss" in r] for run in (fsdp2, ddp)
    ]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    weights = [load_file(run / "final/model.safetensors") for run in (fsdp2, ddp)]
    assert weights[0].keys() == weights[1].keys()
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-5
    summaries = [json.loads((run / "summary.json").read_text()) for run in (fsdp2, ddp)]
    assert set(summaries[1]) - set(summaries[0]) <= {"eval_loss_before", "eval_before"}
