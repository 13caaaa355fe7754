import json
from pathlib import Path

import pandas as pd
import pytest

from rlhf_toy import data, task
from rlhf_toy.data import DataError, load_records

GOOD = {
    "prompt": [{"role": "user", "content": "Review X"}],
    "completion": [{"role": "assistant", "content": "Fine."}],
}


def write_lines(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loads_jsonl_json_and_parquet(tmp_path):
    jsonl = write_lines(tmp_path, [json.dumps(GOOD)] * 3)
    assert len(load_records(str(jsonl), data.SFT_FIELDS)) == 3
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps([GOOD, GOOD]))
    assert len(load_records(str(as_json), data.SFT_FIELDS)) == 2
    parquet = tmp_path / "d.parquet"
    pd.DataFrame([{"prompt": "plain text prompt", "completion": "plain answer"}]).to_parquet(parquet)
    assert load_records(str(parquet), data.SFT_FIELDS)[0]["completion"] == "plain answer"


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), '{"prompt": oops}'])
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        load_records(str(path), data.SFT_FIELDS)


def test_missing_field_names_field_and_line(tmp_path):
    path = write_lines(tmp_path, [json.dumps(GOOD), json.dumps({"prompt": "only a prompt"})])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'completion'"):
        load_records(str(path), data.SFT_FIELDS)


def test_wrong_shape_of_field(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"prompt": [{"text": "no role"}], "completion": "x"})])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'prompt' must be a string or a list"):
        load_records(str(path), data.SFT_FIELDS)


def test_empty_dataset_and_missing_file(tmp_path):
    path = write_lines(tmp_path, ["", "  "])
    with pytest.raises(DataError, match="empty"):
        load_records(str(path))
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_hub_name_offline_is_a_clear_error():
    with pytest.raises(DataError, match="no hub is reachable"):
        load_records("someone/some-preferences")


def test_split_by_prompt_is_disjoint_and_seeded():
    records = [{"prompt": f"p{i % 10}", "completion": str(i)} for i in range(40)]
    train, held_out = data.split_records(records, 0.2, seed=3)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held_out})
    assert len({r["prompt"] for r in held_out}) == 2
    assert data.split_records(records, 0.2, seed=3) == (train, held_out)


def test_shipped_data_matches_the_design(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "data"
    splits = {
        name: load_records(str(root / f"prompts_{name}.jsonl"), data.PROMPT_FIELDS)
        for name in ("train", "eval", "test")
    }
    assert (
        len(splits["train"]) >= 600
        and len(splits["eval"]) + len(splits["test"]) >= 200
        and len(splits["test"]) >= 128
    )
    titles = {name: {r["title"] for r in rows} for name, rows in splits.items()}
    assert (
        not titles["train"] & titles["eval"]
        and not titles["train"] & titles["test"]
        and not titles["eval"] & titles["test"]
    )
    assert len(load_records(str(root / "sft.jsonl"), data.SFT_FIELDS)) >= 600
    prefs = load_records(str(root / "preferences.jsonl"), data.PREFERENCE_FIELDS)
    assert len(prefs) >= 2000
    assert all(r["chosen"] != r["rejected"] for r in prefs)
    # labelled by the gold judge in the code: relabelling the stored samples reproduces the shipped files
    import shutil
    import subprocess
    import sys

    for name in ("samples.jsonl", "stats.json"):
        shutil.copy(root / name, tmp_path / name)
    subprocess.run(
        [sys.executable, str(root.parent / "scripts/make_data.py"), "--relabel", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        cwd=root.parent,
    )
    for name in ("sft.jsonl", "preferences.jsonl"):
        assert (tmp_path / name).read_text() == (root / name).read_text(), (
            f"{name} is not what the judge labels"
        )


def test_shipped_pairs_show_finished_answers_and_cut_ones_lose():
    """Data v3: the pairs hold answers cut at their last complete sentence (hardly any side ends mid-sentence),
    and a side that was cut at the token limit is judged unfinished, so it is the chosen one far less often."""
    root = Path(__file__).resolve().parents[1] / "data"
    samples = [json.loads(line) for line in open(root / "samples.jsonl")]
    cut = {task.shown_answer(s["response"], s["has_eos"]): not s["has_eos"] for s in samples}
    prefs = [json.loads(line) for line in open(root / "preferences.jsonl")]
    sides = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in prefs]
    assert sum(not task.ends_a_sentence(t) for pair in sides for t in pair) < 0.05 * 2 * len(sides)
    mixed = [(cut[c], cut[r]) for c, r in sides if cut[c] != cut[r]]
    assert len(mixed) > 200 and sum(c for c, _ in mixed) < 0.35 * len(mixed)  # the finished side wins mostly


def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_records(str(path), data.SFT_FIELDS)
    as_json = tmp_path / "d.json"
    as_json.write_bytes(b'[\n  {"prompt": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=r"d\.json:2: not UTF-8 text \(byte 0xe9 at column 18\)"):
        load_records(str(as_json))


def test_json_error_message_says_at_once(tmp_path):
    # json's own message for a raw control character ends in "at": the error must not read "at at".
    path = write_lines(tmp_path, ['{"prompt": "a\tb", "completion": "x"}'])
    with pytest.raises(
        DataError, match=r"d\.jsonl:1: not valid JSON \(Invalid control character at column 14\)"
    ) as error:
        load_records(str(path), data.SFT_FIELDS)
    assert "at at" not in str(error.value)


@pytest.mark.parametrize("batch_size, num_generations", [(3, 1), (4, 1), (6, 2)])
def test_prompt_batches_draw_each_prompt_once_per_pass_across_the_boundary(batch_size, num_generations):
    # 10 prompts in batches that do not divide 10: some batch crosses the end of each pass. Over k whole passes
    # every prompt is drawn exactly k times (each pass its own shuffle), however the passes fall across batches.
    prompts = [{"prompt": f"p{i}"} for i in range(10)]
    per_step = batch_size // num_generations
    steps = 30 // per_step + 1
    drawn = [
        r["prompt"]
        for step in range(steps)
        for r in data.prompt_batch(
            prompts, step, batch_size=batch_size, seed=3, num_generations=num_generations
        )
    ][::num_generations]
    for passes in (1, 2, 3):
        first = drawn[: 10 * passes]
        assert sorted(first) == sorted(f"p{i}" for i in range(10) for _ in range(passes)), passes
    # The second pass is a new shuffle, not the first one again
    assert drawn[10:20] != drawn[:10]
