"""Run directory I/O shared by every stage: metrics.jsonl + TensorBoard, samples.jsonl, checkpoints.

    runs/NAME/config.yaml      the resolved config
    runs/NAME/metrics.jsonl    one JSON object per logging step ({"step": N, ...})
    runs/NAME/samples.jsonl    prompt, response and scores
    runs/NAME/tensorboard/     TensorBoard events (the same scalars as metrics.jsonl)
    runs/NAME/checkpoints/     resumable state
    runs/NAME/final/           the HF model and tokenizer
    runs/NAME/finished.json    written last: the run is complete (`rundir`)

metrics.jsonl, samples.jsonl and TensorBoard only grow while a run trains; a resumed run cuts each of
them back to the step it resumes from (`cut_back`, `MetricsLogger(resume_step=...)`), so every step is
in each exactly once.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from transformers import TrainerCallback

from rlhf_toy import models
from rlhf_toy.data import DataError


def read_jsonl(path) -> list[dict]:
    """The records of an append-only JSONL file. A torn last line (a process killed mid-write: no newline after
    it, not valid JSON) is dropped; a bad line anywhere else is a DataError naming it."""

    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                break  # torn: the write it belonged to never finished
            raise DataError(
                f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno}); the file is "
                "damaged: delete that line, or pass --overwrite_output_dir to start the run again"
            ) from None
    return records


def write_jsonl(path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def append_jsonl(path, rows) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def cut_back(run_dir, step: int) -> None:
    """A resumed run's append-only files as they were at `step` (the checkpoint it resumes from):
    metrics.jsonl loses the records past it and the end-of-run summary record; samples.jsonl the rows
    past it (PPO's have a "step") and the "after" samples (SFT, DPO), which the run's end writes again.
    (TensorBoard is cut by `MetricsLogger(resume_step=...)`, through its purge step.)"""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        _write_jsonl(metrics, [r for r in read_jsonl(metrics) if _kept(r, step) and "summary" not in r])
    samples = run_dir / "samples.jsonl"
    if samples.exists():
        _write_jsonl(
            samples, [r for r in read_jsonl(samples) if _kept(r, step) and r.get("stage") != "after"]
        )


WALL_KEY = "time/wall_s"


def _kept(record: dict, step: int) -> bool:
    return record.get("step") is None or record["step"] <= step


class MetricsLogger:
    """Appends metrics to metrics.jsonl and TensorBoard. On resume, drops records past the step the
    checkpoint holds (in both), so a killed-and-resumed run has each step exactly once."""

    def __init__(self, run_dir, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        # Every record's `time/wall_s`: seconds since the run began, summed over its sessions (a resumed run
        # goes on from its last kept record), so curves of runs of different kinds can share a wall-clock axis.
        self.wall_offset = max(
            (r[WALL_KEY] for r in read_jsonl(self.path) if isinstance(r.get(WALL_KEY), (int, float))),
            default=0.0,
        )
        self.started = time.perf_counter()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events at and past it that earlier sessions wrote.
            self.writer = SummaryWriter(
                log_dir=str(Path(run_dir) / "tensorboard"),
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def truncate_after(self, step: int) -> None:
        _write_jsonl(self.path, [r for r in read_jsonl(self.path) if _kept(r, step) and "summary" not in r])

    def log(self, step: int, metrics: dict) -> None:
        metrics = {**metrics, WALL_KEY: self.wall_offset + time.perf_counter() - self.started}
        record = {"step": step, **metrics}
        append_jsonl(self.path, [record])
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def flatten(summary: dict) -> dict:
    """A summary's numbers as one flat record for metrics.jsonl:
    {"before": {"gold_mean": x}} -> {"before/gold_mean": x}."""
    out = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in flatten(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


class MetricsCallback(TrainerCallback):
    """Sends an HF/TRL trainer's logs to our MetricsLogger (metrics.jsonl + TensorBoard)."""

    def __init__(self, run_dir, tensorboard: bool = True):
        self.run_dir = run_dir
        self.tensorboard = tensorboard
        self.logger = None

    def on_train_begin(self, args, state, control, **kwargs):
        # state.global_step is the resumed checkpoint's step here (0 on a fresh run). Under several
        # processes every one gets the callbacks; only the first writes.
        if state.is_world_process_zero:
            self.logger = MetricsLogger(self.run_dir, self.tensorboard, resume_step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.logger is not None and logs:
            self.logger.log(state.global_step, {k: v for k, v in logs.items() if isinstance(v, (int, float))})

    def on_train_end(self, args, state, control, **kwargs):
        if self.logger is not None:
            self.logger.close()


def checkpoints(checkpoints_dir, complete_only: bool = True) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run (all of them with `complete_only=False`), oldest first, as (step,
    directory): HF trainers' `checkpoint-N` (SFT, reward, DPO; complete once `trainer_state.json` is written)
    and the PPO stage's `step-N` (renamed into place only when complete, holding `trainer_state.pt`)."""
    path = Path(checkpoints_dir)
    if not path.is_dir():
        return []
    found = []
    for directory in path.iterdir():
        match = re.fullmatch(r"(checkpoint|step)-(\d+)", directory.name)
        state = "trainer_state.json" if match and match.group(1) == "checkpoint" else "trainer_state.pt"
        if match and (not complete_only or (directory / state).exists()):
            found.append((int(match.group(2)), directory))
    return sorted(found)


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What makes a checkpoint unloadable ("FILE: why"), or None. Cheap checks that catch a file cut short (a
    kill or a full disk mid-write): every safetensors file's header and length, every torch file's zip
    directory (written last), every JSON file parsed. Flipped bytes inside a tensor go unseen."""
    import zipfile

    from safetensors import safe_open

    for file in sorted(Path(checkpoint).rglob("*")):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as f:
                    f.keys()
            elif file.suffix in (".pt", ".pth", ".bin"):
                zipfile.ZipFile(file).close()
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except Exception as error:  # safetensors, zipfile and json each raise their own types
            return f"{file.relative_to(checkpoint)}: {type(error).__name__}: {str(error)[:120]}"
    return None


def checkpoint_step(checkpoint: Path) -> int:
    """N of `checkpoint-N` or `step-N`."""
    return int(Path(checkpoint).name.rpartition("-")[2])


def last_checkpoint(checkpoints_dir) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    found = checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def environment(precision) -> dict:
    """What a report's numbers depend on besides the code and the config: the hardware (bf16 numerics
    differ between CPUs with and without native bf16, so results reproduce per kind of machine), the
    resolved precision, the library versions and the project's commit."""
    import platform
    import subprocess

    import torch
    import transformers
    import trl

    root = Path(__file__).resolve().parents[1]

    def git(*args) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "--short=12", "HEAD")
    # Changed tracked files, reports excluded: a report rewrites its own committed files before it is done.
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)reports"):
        commit += " (with uncommitted changes)"
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read_text("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "dtype": precision.name,
        "device": precision.device_type
        + (f" ({torch.cuda.get_device_name()})" if precision.device_type == "cuda" else ""),
        "cpu": cpu,
        "cpu_native_bf16": models.cpu_has_native_bf16(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "python": platform.python_version(),
        "commit": commit or "unknown",
    }


def environment_line(env: dict) -> str:
    """`environment()` as one line for a report's notes."""
    return (
        f"Environment: dtype {env['dtype']} on {env['device']}; CPU {env['cpu']} (native bf16: "
        f"{'yes' if env['cpu_native_bf16'] else 'no'}, {env['cpu_threads']} threads); torch {env['torch']}, "
        f"transformers {env['transformers']}, trl {env['trl']}; commit {env['commit']}."
    )


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
