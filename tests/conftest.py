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
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, args)],
                                cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        if check and result.returncode != 0:
            raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    return run


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
        assert time.time() < deadline and process.poll() is None, f"no checkpoint at step >= {step} before the run ended"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def snapshot(directory: Path) -> dict:
    """Every file under `directory` and a hash of its bytes: equal snapshots, untouched files."""
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}
