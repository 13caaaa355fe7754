"""The scale-out engines on this CPU (README, "Scaling out"): PPO's update under accelerate's DDP against one process
and against the hand-written `average_gradients`, torch's FSDP2 against one process, and the launch configs that
accelerate cannot run here refused with what to do instead. The TRL stages' 2-process runs are in
test_multiprocess.py."""

import importlib.util
import os
import shutil
import subprocess
import sys

import torch

import engine_fsdp2_step
import engine_ppo_update
from conftest import ROOT, tiny_flags
from rlhf_toy import rundir, runlog


def launch(*args, timeout=300):
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    return result


def test_ppo_update_under_ddp_equals_one_process_and_the_hand_written_all_reduce(pipeline, tmp_path):
    # the shipped DDP config, as a user launches it (on a machine without GPUs: a gloo group on the CPU)
    result = launch("--config_file", ROOT / "configs/accelerate/ddp.yaml", "--num_processes", 2,
                    ROOT / "tests/engine_ppo_update.py", pipeline, tmp_path)   # also checks average_gradients
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(tmp_path / "weights.pt")
    one = engine_ppo_update.update(pipeline, tmp_path / "one")
    assert len(one) == len(two)
    assert max((a - b).abs().max().item() for a, b in zip(one, two)) < 1e-6


def test_fsdp2_step_on_two_processes_equals_one_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "tests/engine_fsdp2_step.py"),
           str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = torch.load(tmp_path / "fsdp2.pt"), engine_fsdp2_step.step()
    assert two["sharded"] and not one["sharded"]
    # float32 tolerance: the gradients; AdamW's first step (about lr x sign(gradient)) can round differently by
    # ~1e-6 where a gradient is near 0, against a step of lr = 1e-2
    for kind, tolerance in (("grads", 1e-6), ("weights", 1e-5)):
        assert two[kind].keys() == one[kind].keys()
        worst = max((two[kind][k] - one[kind][k]).abs().max().item() for k in one[kind])
        assert worst < tolerance, (kind, worst)


def test_launch_configs_accelerate_cannot_run_here_are_refused(pipeline, tmp_path):
    flags = tiny_flags(pipeline, tmp_path / "ppo", total_episodes=16, num_eval_prompts=0)
    result = launch("--config_file", ROOT / "configs/accelerate/fsdp.yaml", ROOT / "scripts/ppo.py", *flags)
    assert result.returncode != 0
    assert "error: the launch config asks for FSDP, which accelerate runs on GPUs only" in result.stderr
    assert not (tmp_path / "ppo").exists()   # refused before anything was written
    if importlib.util.find_spec("deepspeed") is None:   # accelerate's launcher says it first
        result = launch("--config_file", ROOT / "configs/accelerate/zero2.yaml", ROOT / "scripts/ppo.py", *flags)
        assert result.returncode != 0 and "DeepSpeed is not installed => run `pip3 install deepspeed`" in result.stderr


def test_ppo_under_ddp_resumes_from_its_checkpoint_as_if_never_stopped(pipeline, tmp_path):
    """Two processes, killed after the step-2 checkpoint (step 4's files removed, as a kill leaves them) and launched
    again: the same numbers as the run never stopped (each process restores its own RNG stream)."""
    def ppo(out):
        flags = tiny_flags(pipeline, out, total_episodes=32, save_steps=2, num_eval_prompts=0)
        result = launch("--config_file", ROOT / "configs/accelerate/ddp.yaml", ROOT / "scripts/ppo.py", *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    ppo(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    for name in ("checkpoints/step-4", "final", rundir.FINISHED_FILE):
        path = tmp_path / "killed" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert "resuming from" in ppo(tmp_path / "killed").stdout
    steps = [[r for r in runlog.read_jsonl(tmp_path / run / "metrics.jsonl") if "objective/scores" in r]
             for run in ("whole", "killed")]
    timing = ("time/", "perf/episodes_per_s", "perf/tokens_per_s")
    assert [{k: v for k, v in r.items() if not k.startswith(timing)} for r in steps[1]] == \
           [{k: v for k, v in r.items() if not k.startswith(timing)} for r in steps[0]]
