"""Dataset loading in TRL's standard formats, with errors that name the file, line and field.

Accepted sources: a local `.jsonl`, `.json` (a list of records) or `.parquet` file, or a hub dataset
name (`name` or `name:split`) through `datasets.load_dataset` where a hub is reachable.

Formats (conversational or plain text, as TRL):
    prompts:      {"prompt": [{"role": "user", "content": ...}]}          or {"prompt": "..."}
    SFT:          {"prompt": [...], "completion": [{"role": "assistant", ...}]}
    preferences:  {"prompt": [...], "chosen": [...], "rejected": [...]}  (gold_* optional)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PROMPT_FIELDS = ("prompt",)
SFT_FIELDS = ("prompt", "completion")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """Bad input data; the message names the file, the line or record, and the field."""


def load_records(source: str, required_fields=(), split: str = "train") -> list[dict]:
    path = Path(source)
    if path.is_dir():
        raise DataError(f"{source} is a directory, not a dataset file (.jsonl, .json or .parquet)")
    if path.exists():
        records = _read_local(path)
    elif (
        path.suffix in (".jsonl", ".json", ".parquet")
        or "/" in source
        and source.startswith((".", "/", "data/"))
    ):
        raise DataError(f"dataset file {source} does not exist")
    else:
        records = _read_hub(source, split)
        path = Path(source)
    if not records:
        raise DataError(f"{source}: the dataset is empty")
    for index, record in enumerate(records):
        where = f"{source}:{index + 1}" if path.suffix == ".jsonl" else f"{source} record {index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for field in required_fields:
            if field not in record:
                raise DataError(f"{where}: missing field {field!r} (has: {', '.join(record) or 'nothing'})")
            if record[field] is None or (isinstance(record[field], (str, list)) and not record[field]):
                raise DataError(
                    f"{where}: field {field!r} is empty ({json.dumps(record[field])}): it needs text or "
                    "a list of {'role', 'content'} messages"
                )
            _check_text_or_messages(record[field], f"{where}: field {field!r}")
    return records


def _check_text_or_messages(value, where: str) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return
    raise DataError(
        f"{where} must be a string or a list of {{'role': str, 'content': str}} messages, got {str(value)[:80]!r}"
    )


def not_utf8(path, error: UnicodeDecodeError, line_number: int | None = None) -> str:
    """ "FILE:LINE: not UTF-8 text (byte 0x.. at column N)" for a decode error in a whole file's bytes
    (or, with `line_number`, in that line's)."""
    raw = error.object
    line_start = raw.rfind(b"\n", 0, error.start) + 1
    line = line_number if line_number is not None else raw.count(b"\n", 0, error.start) + 1
    return f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start - line_start + 1})"


def _json_error(error: json.JSONDecodeError) -> str:
    # Some of json's messages end in "at" ("Invalid control character at"): one "at" is enough.
    return f"{error.msg.removesuffix(' at')} at column {error.colno}"


def _read_local(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        records = []
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(not_utf8(path, error, number)) from None
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({_json_error(error)})") from None
        return records
    if path.suffix == ".json":
        try:
            loaded = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as error:
            raise DataError(not_utf8(path, error)) from None
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({_json_error(error)})") from None
        if isinstance(loaded, dict) and isinstance(loaded.get("data"), list):
            loaded = loaded["data"]
        if not isinstance(loaded, list):
            raise DataError(f"{path}: expected a list of records (or {{'data': [...]}})")
        return loaded
    if path.suffix == ".parquet":
        import pandas as pd

        try:
            return pd.read_parquet(path).to_dict(orient="records")
        except Exception as error:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: cannot read parquet ({error})") from None
    raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json or .parquet)")


def _read_hub(name: str, split: str) -> list[dict]:
    import datasets

    name, _, named_split = name.partition(":")
    try:
        dataset = datasets.load_dataset(name, split=named_split or split)
    except Exception as error:  # offline, missing, gated: many exception types
        raise DataError(
            f"cannot load dataset {name!r} from the hub ({type(error).__name__}); no hub is reachable here: "
            "use a local .jsonl/.json/.parquet file such as data/preferences.jsonl"
        ) from None
    return [dict(row) for row in dataset]


def as_messages(value, role: str) -> list[dict]:
    """TRL's plain-text form as conversational messages, so one chat template formats both."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def load_prompts(source: str) -> list[list[dict]]:
    return [as_messages(r["prompt"], "user") for r in load_prompt_records(source)]


def load_prompts_and_titles(
    source: str, limit: int | None = None
) -> tuple[list[list[dict]], list[str | None]]:
    """The first `limit` prompts (all when None) and the film title each record carries (the gold judge's
    on-topic term), None where a record has none: any prompts file works, without that term."""
    return prompts_and_titles(load_prompt_records(source)[:limit], source)


def prompts_and_titles(records: list[dict], source: str) -> tuple[list[list[dict]], list[str | None]]:
    """`load_prompts_and_titles` of records already read from `source` (named in errors)."""
    titles = [r.get("title") for r in records]
    for i, title in enumerate(titles):
        if title is not None and not isinstance(title, str):
            raise DataError(f"{source}: record {i + 1}: 'title' must be a string, got {type(title).__name__}")
    return [as_messages(r["prompt"], "user") for r in records], titles


def load_prompt_records(source: str) -> list[dict]:
    """The prompt records whole: "prompt" as the file has it (text or messages) and every other column (a
    title, an answer key), which PPO passes to reward functions by name, as TRL's GRPOTrainer does."""
    return load_records(source, PROMPT_FIELDS)


def prompt_batch(prompts: list, step: int, *, batch_size: int, seed: int, num_generations: int = 1) -> list:
    """The prompts of training step `step`: consecutive slices of a seeded shuffle, reshuffled every
    pass over the data. A pure function of (seed, step), so a resumed run draws exactly the batches it
    would have, and the TRL cross-check can feed TRL the same ones. With `num_generations` > 1 the step
    draws batch_size / num_generations prompts and repeats each that many times, next to each other (the
    groups of GRPO and RLOO; TRL's RepeatSampler)."""
    n_prompts = batch_size // num_generations
    orders = {}  # pass -> its shuffle; a batch that crosses the end of a pass continues into the next one's

    def drawn(position: int) -> dict:
        epoch, offset = divmod(position, len(prompts))
        if epoch not in orders:
            orders[epoch] = list(range(len(prompts)))
            random.Random(seed * 100003 + epoch).shuffle(orders[epoch])
        return prompts[orders[epoch][offset]]

    return [drawn(step * n_prompts + i) for i in range(n_prompts) for _ in range(num_generations)]


def split_records(records: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split by prompt text, so no prompt is in both halves."""
    if eval_fraction <= 0:
        return records, []
    keys = sorted({json.dumps(r["prompt"], sort_keys=True) for r in records})
    random.Random(seed).shuffle(keys)
    n_eval = max(1, round(len(keys) * eval_fraction))
    eval_keys = set(keys[:n_eval])
    train = [r for r in records if json.dumps(r["prompt"], sort_keys=True) not in eval_keys]
    held_out = [r for r in records if json.dumps(r["prompt"], sort_keys=True) in eval_keys]
    if not train:
        raise DataError(f"eval_fraction={eval_fraction} leaves no training records ({len(records)} in all)")
    return train, held_out
