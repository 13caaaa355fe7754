"""The one entry point every scripts/*.py uses: parse the config, run the stage, turn known errors
(bad config, bad data, missing model) into a one-line message instead of a library traceback."""

from __future__ import annotations

import sys

from rlhf_toy.config import ConfigError, parse_config
from rlhf_toy.data import DataError
from rlhf_toy.models import ModelNotFoundError
from rlhf_toy.rewards import RewardFunctionError

USER_ERRORS = (ConfigError, DataError, ModelNotFoundError, RewardFunctionError)


def run_stage(config_class, stage, argv=None):
    try:
        config = parse_config(config_class, argv)
        result = stage(config)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    close_process_group()
    if result is not None:
        print(f"done: {result}")
    return result


def close_process_group() -> None:
    """Under `accelerate launch`: wait for every process, then tear the process group down before the interpreter
    exits. Left to the interpreter's exit, gloo's threads can be destroyed still joinable, and one process aborts
    ("terminate called without an active exception") while the others are still writing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
