import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests never touch the user's cache or a hub: the tiny model is built into a per-session cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads waiting for
# each other at barriers make every step many times slower. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch_threads = int(os.environ["OMP_NUM_THREADS"])


def pytest_configure(config):
    import torch

    torch.set_num_threads(torch_threads)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("rlhf_toy_cache")
    os.environ["RLHF_TOY_CACHE"] = str(cache)
    yield cache


@pytest.fixture
def run_script():
    """Run scripts/NAME.py in a subprocess the way a user does; returns the CompletedProcess."""
    import subprocess

    def run(name, *args, check=True, timeout=300):
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=os.environ.copy(),
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    return run


def make_tiny_llama(vocab_size: int, model_class=None, **config_fields):
    """A random 2-block Llama with grouped-query attention and tied embeddings (its projections are nn.Linear,
    GPT-2's are Conv1D), in eval mode: a causal LM, or `model_class` (e.g. a sequence classifier)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **config_fields,
    )
    return (model_class or LlamaForCausalLM)(config).eval()


def kill_after_checkpoint(process, checkpoints: Path, step: int, timeout: float = 120) -> None:
    """SIGKILL `process` once it has saved a complete checkpoint at `step` or later: a kill mid-run.
    Both formats count: HF trainers' `checkpoint-N` (SFT, reward, DPO) and our PPO's `step-N`.
    (Waiting for exactly `step` to be the newest races with the next save, or its rotation.)"""
    import signal
    import time

    from rlhf_toy import runlog

    def newest_step() -> int:
        return max((n for n, _ in runlog.checkpoints(checkpoints)), default=0)

    deadline = time.time() + timeout
    while newest_step() < step:
        assert time.time() < deadline and process.poll() is None, (
            f"no checkpoint at step >= {step} before the run ended"
        )
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def snapshot(directory: Path) -> dict:
    """Every file under `directory` and a hash of its bytes: equal snapshots, untouched files."""
    import hashlib

    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------------------------------------------
# PPO on the pipeline in miniature (tests/test_ppo_trainer.py, tests/test_ppo_estimators.py)
GOOD, BAD = "a wonderful film .", "a terrible film ."


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """The pipeline in miniature, so PPO has an easy, learnable reward: a tiny SFT model that answers
    GOOD or BAD about equally, and a reward model trained on pairs that prefer GOOD."""
    import json

    from rlhf_toy import task
    from rlhf_toy.config import parse_config
    from rlhf_toy.stages.reward import RewardStageConfig, train_reward
    from rlhf_toy.stages.sft import SFTStageConfig, run_sft

    tmp = tmp_path_factory.mktemp("pipeline")
    train, evals, _ = task.make_prompts(64, 16, 0, seed=5)
    write = lambda name, rows: (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    answer = lambda text: [{"role": "assistant", "content": text}]
    write("sft.jsonl", [{**r, "completion": answer([GOOD, BAD][i % 2])} for i, r in enumerate(train)])
    write("prompts.jsonl", evals)
    write("pairs.jsonl", [{**r, "chosen": answer(GOOD), "rejected": answer(BAD)} for r in train])
    run_sft(
        parse_config(
            SFTStageConfig,
            [
                "--config",
                str(ROOT / "configs/tiny/sft.yaml"),
                "--dataset",
                str(tmp / "sft.jsonl"),
                "--output_dir",
                str(tmp / "sft"),
                "--num_eval_prompts",
                "0",
                "--eval_fraction",
                "0",
                "--max_steps",
                "30",
                "--learning_rate",
                "1e-2",
            ],
        )
    )
    train_reward(
        parse_config(
            RewardStageConfig,
            [
                "--config",
                str(ROOT / "configs/tiny/reward.yaml"),
                "--model_name_or_path",
                str(tmp / "sft/final"),
                "--policy_model",
                str(tmp / "sft/final"),
                "--dataset",
                str(tmp / "pairs.jsonl"),
                "--train_prompts",
                str(tmp / "prompts.jsonl"),
                "--eval_prompts",
                str(tmp / "prompts.jsonl"),
                "--output_dir",
                str(tmp / "rm"),
                "--num_eval_prompts",
                "0",
                "--max_steps",
                "20",
            ],
        )
    )
    return tmp


def tiny_flags(pipeline, out, **overrides):
    flags = {
        "config": ROOT / "configs/tiny/ppo.yaml",
        "model_name_or_path": pipeline / "sft/final",
        "reward_model_path": pipeline / "rm/final",
        "output_dir": out,
        "prompts": pipeline / "prompts.jsonl",
        "eval_prompts": pipeline / "prompts.jsonl",
    }
    flags.update(overrides)
    return [str(x) for key, value in flags.items() for x in (f"--{key}", value)]


def run_in_process(pipeline, out, **overrides):
    from rlhf_toy.config import parse_config
    from rlhf_toy.stages.ppo import trainer
    from rlhf_toy.stages.ppo.config import PPOStageConfig

    return trainer.train_ppo(parse_config(PPOStageConfig, tiny_flags(pipeline, out, **overrides)))
