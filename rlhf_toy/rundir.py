"""The one rule for run directories, the same in every stage (docs/running.md).

A stage calls `prepare_run_dir(cfg)` before it loads or writes anything; it reads the directory and
decides, writing nothing:

- no run there (no directory, or an empty one): a new run;
- a run with the same resolved config: resume it from its last checkpoint, or, if it finished, say so
  and do nothing;
- the same config with only a length raised (`max_steps`, `num_train_epochs`, `total_episodes`):
  extend it from its last checkpoint (finished or not);
- any other difference in a field that shapes training, `--resume false`, or a length lowered: a
  ConfigError naming each field `old -> new`, unless `--overwrite_output_dir`, which starts clean.

Fields that only shape output (OUTPUT_ONLY) may differ freely. A checkpoint that cannot be loaded (a file
cut short) is passed over for the one before it, and said. The stage then validates its inputs (datasets,
models) and only then calls `RunStart.begin()`, the first write: it takes the directory's lock (LOCK_FILE,
an OS lock on a file holding the pid, released when the process ends, however it ends), clears an overwritten
run, writes `config.yaml`, and cuts every append-only file and the checkpoints back to the step being resumed
from. A directory whose lock another process holds is refused, by `prepare_run_dir` and again by `begin`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhf_toy import runlog
from rlhf_toy.config import ConfigError, save_config

# Fields that shape only what a run writes or where it runs, never the weights it trains: they may change
# between the sessions of one run. (`eval_steps`: how often the trainer's eval loss is logged, not
# what it trains on; `sample_every`: how often PPO writes samples.jsonl; `trim_padding` and `compile`:
# how fast PPO's update runs, not what it computes.)
OUTPUT_ONLY = (
    "output_dir",
    "overwrite_output_dir",
    "resume",
    "device",
    "num_threads",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "report_to",
    "eval_steps",
    "sample_every",
    "trim_padding",
    "compile",
)
# How long a run trains: raising one extends a run from its last checkpoint.
LENGTH = ("max_steps", "num_train_epochs", "total_episodes")
FINISHED_FILE = "finished.json"  # written last by every stage: the run is complete
LOCK_FILE = ".lock"  # held (flock) by the process training in the directory; holds its pid
_held_locks: dict = {}  # run directory -> the open lock file this process holds


@dataclass
class RunStart:
    """What `prepare_run_dir` decided for a run directory."""

    run_dir: Path
    action: str  # "new", "overwrite", "resume", "extend" or "finished"
    checkpoint: Path | None = None  # the checkpoint to continue from (resume, extend)
    step: int = 0  # its step; 0 = from the start
    message: str | None = None  # what the stage prints about it (its main process)

    @property
    def finished(self) -> bool:
        return self.action == "finished"

    def begin(self, cfg) -> Path:
        """The stage's first write, once its inputs are validated (only the main process calls it)."""
        lock(self.run_dir)
        if self.action == "overwrite":
            for entry in self.run_dir.iterdir():
                if entry.name != LOCK_FILE:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        save_config(cfg, self.run_dir)
        (self.run_dir / FINISHED_FILE).unlink(missing_ok=True)
        if self.action in ("resume", "extend"):
            runlog.cut_back(self.run_dir, self.step)
            # A checkpoint past the resumed step is a damaged one passed over: the run writes that step again.
            for step, directory in runlog.checkpoints(self.run_dir / "checkpoints", complete_only=False):
                if step > self.step:
                    shutil.rmtree(directory)
        return self.run_dir


def is_main_process() -> bool:
    """Rank 0 of a launched group (`accelerate launch` and torchrun set RANK), or the only process. Under
    several processes the TRL trainers share the training; sampling, summaries and files are rank 0's."""
    return int(os.environ.get("RANK", "0")) == 0


def _lock_key(run_dir) -> str:
    return str(Path(run_dir).resolve())


def lock(run_dir: Path) -> None:
    """Take `run_dir`'s lock until the stage returns (`releases_lock`) or the process ends (a ConfigError naming
    the holder if another process has it)."""
    key = _lock_key(run_dir)
    if key in _held_locks:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise ConfigError(_in_use(run_dir, holder)) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held_locks[key] = handle


def _refuse_if_locked(run_dir: Path) -> None:
    """A ConfigError if another process holds `run_dir`'s lock; writes nothing (the lock is tried and let go)."""
    path = run_dir / LOCK_FILE
    if _lock_key(run_dir) in _held_locks or not path.is_file():
        return
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(_in_use(run_dir, handle.read().strip())) from None


def _in_use(run_dir: Path, holder: str) -> str:
    return (
        f"{run_dir} is in use: process {holder or '(unknown pid)'} is training in it (it holds "
        f"{run_dir / LOCK_FILE}). Wait for it to finish or stop it (a stopped process lets go of the lock), "
        "or choose another output_dir"
    )


def prepare_run_dir(cfg) -> RunStart:
    """Apply the rule to `cfg.output_dir` (see the module docstring). Writes nothing; raises ConfigError."""

    run_dir = Path(cfg.output_dir)
    _check_writable(run_dir)
    if (
        is_main_process()
    ):  # the other processes of a launch read the directory after their main one took the lock
        _refuse_if_locked(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        if run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            raise ConfigError(
                f"output_dir {run_dir} is not empty and holds no run (no config.yaml): "
                "choose another output_dir"
            )
        return RunStart(run_dir, "new")
    if cfg.overwrite_output_dir:
        return RunStart(
            run_dir,
            "overwrite",
            message=f"--overwrite_output_dir: the run in {run_dir} is deleted and started again",
        )
    if not cfg.resume:
        raise ConfigError(
            f"{run_dir} already holds a run; --resume false would mix two runs in one directory: "
            "pass --overwrite_output_dir to start it again, or choose another output_dir"
        )

    lengths = "/".join(f for f in LENGTH if hasattr(cfg, f))
    differ, longer = compare_configs(_read_config(config_path), cfg)
    if differ:
        raise ConfigError(
            f"{run_dir} holds a run with another config ({'; '.join(differ)}): pass --overwrite_output_dir to "
            f"start it again, or choose another output_dir (of its training fields, only a raised {lengths} "
            "continues an existing run)"
        )
    finished = run_dir / FINISHED_FILE
    if finished.exists() and not longer:
        checkpoint = runlog.last_checkpoint(run_dir / "checkpoints")
        done = json.loads(finished.read_text()).get("step")
        return RunStart(
            run_dir,
            "finished",
            checkpoint,
            runlog.checkpoint_step(checkpoint) if checkpoint else 0,
            message=(
                f"run in {run_dir} is finished ({done} steps); nothing to do (raise {lengths} to "
                "extend it, or pass --overwrite_output_dir to start it again)"
            ),
        )
    checkpoint, passed_over = None, []
    for _, candidate in reversed(runlog.checkpoints(run_dir / "checkpoints")):
        damage = runlog.checkpoint_damage(candidate)
        if damage is None:
            checkpoint = candidate
            break
        passed_over.append(f"checkpoint {candidate.name} cannot be loaded ({damage}), so it is passed over")
    step = runlog.checkpoint_step(checkpoint) if checkpoint is not None else 0
    action = "extend" if longer else "resume"
    return RunStart(
        run_dir,
        action,
        checkpoint,
        step,
        message="".join(f"warning: {line}\n" for line in passed_over)
        + (
            f"{action}: the run in {run_dir} continues from {checkpoint.name if checkpoint else 'its start'}"
            + (f" ({', '.join(longer)})" if longer else "")
        ),
    )


def compare_configs(old: dict, cfg) -> tuple[list[str], list[str]]:
    """(differences that refuse a resume, lengths that grew) between a run's config.yaml and `cfg`, each
    as "field old -> new". A field the old config lacks (added since) counts as its default."""
    # Through YAML, as config.yaml was written, so types compare alike (tuples, floats).
    new = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cfg)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    differ, longer = [], []
    for name, value in new.items():
        before = old.get(name, defaults.get(name))
        if name in OUTPUT_ONLY or _same(before, value):
            continue
        change = f"{name} {before!r} -> {value!r}"
        if name in LENGTH and _grows(name, before, value):
            longer.append(change)
        elif name in LENGTH and _grows(name, value, before):
            differ.append(change + " (a run can be extended, not shortened)")
        else:
            differ.append(change)
    return differ, longer


def _same(a, b) -> bool:
    """Equal, with NaN equal to NaN (a config.yaml written before NaN was refused holds `.nan`)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _grows(name: str, before, after) -> bool:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return False
    if name == "max_steps" and (before <= 0 or after <= 0):  # -1: the epochs decide; not comparable
        return False
    return after > before


def mark_finished(run_dir: Path, step: int) -> None:
    """The last write of a run: a re-run with the same config then knows there is nothing to do."""
    (Path(run_dir) / FINISHED_FILE).write_text(json.dumps({"step": step}) + "\n")


def releases_lock(stage):
    """A stage function (cfg -> ...) that lets go of its output_dir's lock when it returns or raises, so that one
    process can run a stage again, or another process run it, without ending first (tests, notebooks)."""

    @functools.wraps(stage)
    def run(cfg, *args, **kwargs):
        try:
            return stage(cfg, *args, **kwargs)
        finally:
            handle = _held_locks.pop(_lock_key(cfg.output_dir), None)
            if handle is not None:
                handle.close()

    return run


def _read_config(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{path} is not a readable config ({type(error).__name__}): pass "
            "--overwrite_output_dir to start the run again"
        ) from None
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path} is not a config (expected field: value lines): pass --overwrite_output_dir "
            "to start the run again"
        )
    return loaded


def _check_writable(run_dir: Path) -> None:
    """output_dir, or the nearest part of it that exists, must be a writable directory."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir {run_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {run_dir}: {existing} is not writable")
