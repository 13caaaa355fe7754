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
    if result is not None:
        print(f"done: {result}")
    return result
