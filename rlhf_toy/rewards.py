"""PPO's reward components: the reward model (`rm`) and reward functions written for TRL's GRPOTrainer.

A reward function is named `module:function` in the config's `rewards` and called as TRL 1.12's
GRPOTrainer calls it (`_calculate_rewards`):

    f(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=..., log_extra=..., log_metric=...)

* `prompts`: each episode's prompt as the dataset has it: a list of messages (conversational) or a string;
* `completions`: the decoded response, as `[{"role": "assistant", "content": text}]` when the prompt is
  conversational, else the text;
* `completion_ids`: the response's token ids (EOS included when the response stopped);
* `columns`: every other column of the prompt records, by name, one value per episode (an answer key, a title);
* `trainer_state` (its `global_step`, `max_steps`), `log_extra` (accepted, not recorded) and `log_metric(name,
  value)` (logged with the step's metrics), so functions that use them run unchanged.

It returns one float per completion, or None where it does not apply (TRL: that component is left out of the
sum for that episode). Any other failure (wrong length, a NaN or Inf, an episode no component scores) stops
the run with a `RewardFunctionError` that names the entry.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from types import SimpleNamespace

import torch


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded or returned something unusable; the message names the entry."""


def load_reward_functions(entries: list[str]) -> list[tuple[str, str, Callable | None]]:
    """(entry, name, function) per `rewards` entry: `rm` has no function (the reward model scores it); the
    others are imported now, so a missing module or function stops the run before anything is trained. The
    name (logged as rewards/<name>/mean) is `rm` or the function's `__name__`, as TRL names it."""
    loaded = []
    for entry in entries:
        if entry == "rm":
            loaded.append((entry, "rm", None))
            continue
        module_name, _, function_name = entry.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise RewardFunctionError(
                f"rewards entry {entry!r}: cannot import module {module_name!r} ({error}); "
                "it must be on PYTHONPATH or installed"
            ) from None
        except Exception as error:  # the module itself fails on import: any exception type
            raise RewardFunctionError(
                f"rewards entry {entry!r}: importing {module_name!r} failed ({type(error).__name__}: {error})"
            ) from None
        function = getattr(module, function_name, None)
        if not callable(function):
            raise RewardFunctionError(
                f"rewards entry {entry!r}: module {module_name!r} has no function {function_name!r}"
            )
        loaded.append((entry, getattr(function, "__name__", function_name), function))
    names = [name for _, name, _ in loaded]
    if len(set(names)) != len(names):
        raise RewardFunctionError(
            f"rewards {entries}: two entries have the same name {names}; each is logged as "
            "rewards/<name>/mean, so the names must differ"
        )
    return loaded


def prompt_columns(records: list[dict]) -> dict[str, list]:
    """Every column of the records but the prompt, as lists (TRL: the dataset's other columns, by name)."""
    keys = [k for k in records[0] if k not in ("prompt", "completion", "completion_ids")]
    return {k: [r.get(k) for r in records] for k in keys}


def call_reward_function(
    entry: str,
    function: Callable,
    records: list[dict],
    texts: list[str],
    completion_ids: list[list[int]],
    *,
    step: int,
    max_steps: int,
    log_metric: Callable[[str, float], None],
) -> torch.Tensor:
    """One component's rewards, float32 ``[B]``, NaN where the function returned None (TRL's convention)."""
    prompts = [r["prompt"] for r in records]
    conversational = isinstance(prompts[0], list)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else list(texts)
    columns = prompt_columns(records)
    try:
        output = function(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            **columns,
            trainer_state=SimpleNamespace(global_step=step, max_steps=max_steps),
            log_extra=lambda column, values: None,
            log_metric=log_metric,
        )
    except (
        Exception
    ) as error:  # a column it needs is missing, or a bug of its own: name the entry, not a traceback
        raise RewardFunctionError(
            f"rewards entry {entry!r} failed: {type(error).__name__}: {error} (the prompt "
            f"records' columns it was given: {', '.join(columns) or 'none'})"
        ) from error
    try:
        output = list(output)
    except TypeError:
        raise RewardFunctionError(
            f"rewards entry {entry!r} returned {type(output).__name__}, not a list of {len(texts)} floats"
        ) from None
    if len(output) != len(texts):
        raise RewardFunctionError(
            f"rewards entry {entry!r} returned {len(output)} rewards for {len(texts)} "
            "completions (one float, or None, per completion)"
        )
    values = []
    for i, value in enumerate(output):
        if value is None:
            values.append(math.nan)
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise RewardFunctionError(
                f"rewards entry {entry!r} returned {value!r} for completion {i}: not a number"
            ) from None
        if not math.isfinite(value):
            raise RewardFunctionError(
                f"rewards entry {entry!r} returned {value} for completion {i} "
                f"({texts[i][:60]!r}): rewards must be finite (or None)"
            )
        values.append(value)
    return torch.tensor(values, dtype=torch.float32)


def combine(components: dict[str, torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum_k w_k r_k`` per episode, a function's None (NaN) left out (TRL: nansum); an episode that no
    component scored is an error. The reward model (`rm`) has no None: a NaN of its stays in the sum, and
    stops the run as a non-finite score."""
    stacked = torch.stack(list(components.values()), dim=1)
    left_out = torch.isnan(stacked) & torch.tensor([name != "rm" for name in components])
    unscored = left_out.all(dim=1)
    if unscored.any():
        raise RewardFunctionError(
            f"every rewards entry ({', '.join(components)}) returned None for completion "
            f"{int(unscored.nonzero()[0])}: at least one must score each completion"
        )
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype)
    return torch.where(left_out, torch.zeros((), dtype=stacked.dtype), weighted).sum(dim=1)
