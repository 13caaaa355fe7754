"""Configuration as plain dataclasses: `--config FILE.yaml` plus any field as a flag (HF/TRL style).

Precedence: dataclass defaults < YAML file < command-line flags. An unknown key, in the YAML file
or on the command line, is an error that names the nearest valid key. The resolved config is written
to the run directory as `config.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from pathlib import Path

import yaml

from rlhf_toy.data import not_utf8


class ConfigError(ValueError):
    """Bad configuration; the message names the file or flag and the key at fault."""


# Keys that were renamed: a config that still uses one gets told the new name.
RENAMED_KEYS = {
    "num_sample_prompts": "num_eval_prompts",  # SFT, DPO: the eval prompts sampled before and after
    "num_eval_samples": "num_eval_prompts",  # reward: the eval prompts sampled for the Spearman correlation
    "num_steps": "total_episodes",  # run-level cross-check: total_episodes = num_steps × batch_size
}


def _nearest(key: str, valid) -> str:
    if key in RENAMED_KEYS and RENAMED_KEYS[key] in valid:
        return f"; it was renamed {RENAMED_KEYS[key]!r}"
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(value, annotation, key: str, where: str):
    """Coerce a YAML value or a flag string to the field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, where)
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
        return [_convert(v, args[0] if args else str, key, where) for v in items]
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float, str):
            if annotation in (int, float) and isinstance(value, bool):  # YAML `true` is not the number 1
                raise ValueError(value)
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return annotation(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} must be {annotation.__name__}, got {value!r}") from None
    return value


def parse_config(cls, argv=None):
    """Build `cls` from `--config FILE.yaml` and `--field value` flags (flags win)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    types_ = _field_types(cls)
    values: dict = {}
    if "--help" in argv or "-h" in argv:
        print(f"usage: --config FILE.yaml [--field value ...]\n\nfields of {cls.__name__}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(
                f"  --{f.name} ({getattr(types_[f.name], '__name__', types_[f.name])}, default {default!r})"
            )
        raise SystemExit(0)

    flags: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(
                f"command line: unexpected argument {arg!r} (flags look like --learning_rate 1e-5)"
            )
        key, _, inline = arg[2:].partition("=")
        key = key.replace("-", "_")
        if inline:
            flags[key] = inline
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            flags[key] = argv[i + 1]
            i += 2
        elif types_.get(key) is bool:  # a bare boolean flag means true
            flags[key] = "true"
            i += 1
        else:
            raise ConfigError(f"command line: --{key} needs a value")

    config_path = flags.pop("config", None)
    if config_path is not None:
        path = Path(config_path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ConfigError(not_utf8(path, error)) from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if loaded is None:
            # An empty file is a mistake, not "no config": every field would silently take its default,
            # output_dir included, and an existing run there would be resumed.
            raise ConfigError(f"{path}: the config file is empty (expected field: value lines)")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value, got {type(loaded).__name__}")
        for key, value in loaded.items():
            if key not in types_:
                raise ConfigError(f"{path}: unknown key {key!r}{_nearest(key, types_)}")
            values[key] = _convert(value, types_[key], key, str(path))
    for key, value in flags.items():
        if key not in types_:
            raise ConfigError(f"command line: unknown flag --{key}{_nearest(key, types_)}")
        values[key] = _convert(value, types_[key], key, "command line")
    config = cls(**values)
    if hasattr(config, "validate"):
        config.validate()
    return config


def save_config(config, output_dir) -> Path:
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    return path


# What `dtype` may name. `auto` resolves (models.resolve_precision) to bfloat16-mixed where the device has
# native bf16, float32 elsewhere; the run's config.yaml records what ran, never `auto`.
DTYPES = ("auto", "float32", "bfloat16-mixed", "bfloat16", "float16")
DEVICES = "auto, cpu, cuda, cuda:N, mps"


def check_device(device: str) -> str:
    """`device` if it names one torch has here (auto, cpu, cuda, cuda:N, mps), else a ConfigError."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ConfigError(f"device must be one of {DEVICES}; got {device!r}")
    if device.startswith(("cuda", "mps")):
        import torch

        backend = torch.cuda if device.startswith("cuda") else torch.backends.mps
        if not backend.is_available():
            raise ConfigError(f"device {device!r}: torch finds no such device here (use auto or cpu)")
    return device


def at_least(config, minimum, *names) -> None:
    """A ConfigError naming the first of the config's fields `names` below `minimum`."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def above(config, bound, *names) -> None:
    """A ConfigError naming the first of the config's fields `names` not above `bound`."""
    for name in names:
        value = getattr(config, name)
        if not value > bound:
            raise ConfigError(f"{name} must be > {bound}, got {value}")


def within(config, low, high, *names) -> None:
    """A ConfigError naming the first of the config's fields `names` outside [low, high]."""
    for name in names:
        value = getattr(config, name)
        if not low <= value <= high:
            raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")


def check_finite(config) -> None:
    """Every float field (and every float in a list field) a finite number: NaN passes any `<` or `>` check,
    and a NaN or infinite coefficient trains on silently until it reaches the loss."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                what = "finite numbers" if isinstance(value, (list, tuple)) else "a finite number"
                raise ConfigError(f"{field.name} must be {what}, got {value}")


@dataclasses.dataclass
class CommonConfig:
    """Fields every stage has. A stage's `validate` calls `super().validate()`, so these checks (and
    TrainerFields' and LoraFields') run for every stage before anything is loaded or written."""

    model_name_or_path: str = "embedded:smollm2-135m-instruct"
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "auto"  # auto = bfloat16-mixed where the device has native bf16, else float32
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    logging_steps: int = 1
    save_steps: int = 20  # checkpoint every N optimizer steps (resume restarts from the last one)
    save_total_limit: int = 2
    report_to: str = "tensorboard"  # or "none"
    resume: bool = True  # false: never continue a run (an existing one is refused; see rundir)
    overwrite_output_dir: bool = False  # HF's name: delete the run in output_dir and start again

    def validate(self):
        check_finite(self)  # first: every range check below assumes a number
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        check_device(self.device)
        if self.report_to not in ("tensorboard", "none"):
            raise ConfigError(f"report_to must be tensorboard or none; got {self.report_to!r}")
        at_least(self, 0, "num_threads")
        at_least(self, 1, "logging_steps", "save_steps", "save_total_limit")


@dataclasses.dataclass
class PairFields:
    """The stages trained on preference pairs (the reward model, DPO)."""

    # Each pair's prompt through the model once, its keys and values shared by the two answers (one process; see
    # stages.common.PromptsOnce): the same loss in fewer token positions. auto: where the matmuls compute in float32
    # (scripts/bench_pairs.py on 2 cores held to AVX2: DPO 1.30x, reward 1.23x); under bf16 autocast on AMX the
    # smaller matmuls lose what the positions save (DPO 0.95x, reward 1.05x). false: TRL's forward of the padded rows.
    share_prompts: str = "auto"

    def validate(self):
        super().validate()
        self.share_prompts = str(self.share_prompts).lower()  # YAML's true and false
        if self.share_prompts not in ("auto", "true", "false"):
            raise ConfigError(f"share_prompts must be auto, true or false, got {self.share_prompts!r}")

    def shares_prompts(self, float32_matmuls: bool) -> bool:
        """Whether the stage puts each pair's prompt through the model once."""
        return float32_matmuls if self.share_prompts == "auto" else self.share_prompts == "true"


@dataclasses.dataclass
class LoraFields:
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    # The CPU alternative to LoRA: freeze the embeddings and the N lowest blocks (stages.common.freeze_bottom);
    # backward stops at the first trained block, so a step costs about a third less with half the blocks frozen.
    freeze_bottom_layers: int = 0

    def validate(self):
        super().validate()
        at_least(self, 0, "freeze_bottom_layers")
        if self.use_lora and self.freeze_bottom_layers:
            raise ConfigError("use_lora and freeze_bottom_layers are alternatives; set one of them")
        if self.use_lora:
            at_least(self, 1, "lora_r", "lora_alpha")
            if not 0 <= self.lora_dropout < 1:
                raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclasses.dataclass
class TrainerFields:
    """The optimisation fields of the stages built on an HF/TRL trainer (SFT, reward, DPO); a stage
    overrides a default by declaring the field again. `stages.trainer_fields` passes them on."""

    learning_rate: float = 5e-5
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_steps: float = 0.0  # an int counts steps; a float in [0, 1) is a fraction of the run
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0

    def validate(self):
        super().validate()
        at_least(self, 1, "per_device_train_batch_size", "gradient_accumulation_steps")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(
                f"max_steps must be a number of steps > 0, or -1 (num_train_epochs decides); "
                f"got {self.max_steps}"
            )
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ConfigError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError(
                f"warmup_steps and weight_decay must be >= 0, got {self.warmup_steps} and {self.weight_decay}"
            )


def positive_float(text: str) -> float:
    """An argparse type: a finite float > 0 (a temperature of 0 or less divides the logits by nothing useful)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value
