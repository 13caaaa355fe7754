"""Run directory I/O shared by every stage: metrics.jsonl + TensorBoard, samples.jsonl, checkpoints.

    runs/NAME/config.yaml      the resolved config
    runs/NAME/metrics.jsonl    one JSON object per logging step ({"step": N, ...})
    runs/NAME/samples.jsonl    prompt, response and scores
    runs/NAME/tensorboard/     TensorBoard events (the same scalars as metrics.jsonl)
    runs/NAME/checkpoints/     resumable state
    runs/NAME/final/           the HF model and tokenizer
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from transformers import TrainerCallback


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path, rows) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


class MetricsLogger:
    """Appends metrics to metrics.jsonl and TensorBoard. On resume, drops records past the step the
    checkpoint holds, so a killed-and-resumed run has each step exactly once."""

    def __init__(self, run_dir, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        kept = [r for r in read_jsonl(self.path) if r.get("step") is None or r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, step: int, metrics: dict) -> None:
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
    """A summary's numbers as one flat record for metrics.jsonl: {"before": {"gold_mean": x}} -> {"before/gold_mean": x}."""
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


def checkpoints(checkpoints_dir) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run, oldest first, as (step, directory): HF trainers'
    `checkpoint-N` (SFT, reward, DPO; complete once `trainer_state.json` is written) and the PPO
    stage's `step-N` (renamed into place only when complete, holding `trainer_state.pt`)."""
    path = Path(checkpoints_dir)
    if not path.is_dir():
        return []
    found = []
    for directory in path.iterdir():
        match = re.fullmatch(r"(checkpoint|step)-(\d+)", directory.name)
        state = "trainer_state.json" if match and match.group(1) == "checkpoint" else "trainer_state.pt"
        if match and (directory / state).exists():
            found.append((int(match.group(2)), directory))
    return sorted(found)


def last_checkpoint(checkpoints_dir) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    found = checkpoints(checkpoints_dir)
    return found[-1][1] if found else None
