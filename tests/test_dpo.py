import json
import math
import subprocess
import sys

from conftest import ROOT, kill_after_checkpoint
from transformers import AutoModelForCausalLM

from rlhf_toy import models, runlog, task

GOOD, BAD = "a wonderful film .", "a terrible boring film ."


def write_preferences(tmp_path, n=64):
    """Pairs the tiny word-level model can learn: a fixed positive answer preferred to a negative one."""
    train, evals, _ = task.make_prompts(n, 8, 0, seed=1)
    prefs = tmp_path / "preferences.jsonl"
    prefs.write_text(
        "".join(
            json.dumps(
                {
                    **row,
                    "chosen": [{"role": "assistant", "content": GOOD}],
                    "rejected": [{"role": "assistant", "content": BAD}],
                    "gold_chosen": task.gold_score(GOOD),
                    "gold_rejected": task.gold_score(BAD),
                }
            )
            + "\n"
            for row in train
        )
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in evals))
    return prefs, prompts


def make_tiny_reward_model(path):
    """A random tiny GPT-2 reward model (num_labels=1) with the normalisation file RewardScorer needs."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GPT2ForSequenceClassification

    source = models.resolve_model_path(models.TINY_MODEL)
    config = AutoConfig.from_pretrained(source)
    config.num_labels = 1
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    (path / "reward_normalization.json").write_text(json.dumps({"gain": 1.0, "bias": 0.0}))
    return path


def tiny_args(tmp_path, out, **overrides):
    prefs, prompts = write_preferences(tmp_path)
    args = {
        "config": ROOT / "configs/tiny/dpo.yaml",
        "dataset": prefs,
        "eval_prompts": prompts,
        "output_dir": out,
        "reward_model": "none",
    }
    args.update(overrides)
    return [x for key, value in args.items() for x in (f"--{key}", value)]


def test_tiny_dpo_margin_grows_and_samples_are_scored(tmp_path, run_script):
    out = tmp_path / "run"
    rm = make_tiny_reward_model(tmp_path / "rm")
    run_script("dpo", *tiny_args(tmp_path, out, reward_model=rm, report_to="tensorboard"))
    records = runlog.read_jsonl(out / "metrics.jsonl")
    margins = [r["rewards/margins"] for r in records if "rewards/margins" in r]
    assert len(margins) == 12
    # The implicit reward β·(log π/π_ref) separates chosen from rejected more and more.
    assert margins[0] < 0.05 and sum(margins[-3:]) / 3 > margins[0] + 0.1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_after"]["rewards/margins"] > summary["eval_before"]["rewards/margins"]
    assert summary["pairs_identical_dropped"] == 0 and summary["pairs_truncated"] == 0
    assert summary["after"]["kl_to_ref"] > 0 and summary["before"]["kl_to_ref"] == 0
    # Before/after samples with gold and RM scores, and PPO-named points compare.py can overlay.
    rows = runlog.read_jsonl(out / "samples.jsonl")
    assert [r["stage"] for r in rows].count("before") == [r["stage"] for r in rows].count("after") == 8
    # gold is the judge's verdict on each answer to its own film; the RM read the answers (they score differently)
    title_of = {json.dumps(r["prompt"]): r["title"] for r in runlog.read_jsonl(tmp_path / "prompts.jsonl")}
    for r in rows:
        title = title_of[json.dumps(r["prompt"])]
        assert r["gold"] == task.gold_parts(r["response"], title)["gold"], r
    assert len({r["rm"] for r in rows}) > 1 and all(math.isfinite(r["rm"]) for r in rows)
    points = [r for r in records if "sample_stage" in r]
    assert [r["step"] for r in points] == [0, 12] and all(
        "score/gold" in r and "score/rm" in r for r in points
    )
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert (out / "config.yaml").exists() and list((out / "tensorboard").iterdir())


def test_tiny_dpo_ipo_with_lora_saves_a_merged_model(tmp_path, run_script):
    out = tmp_path / "run"
    run_script(
        "dpo",
        *tiny_args(
            tmp_path,
            out,
            max_steps=4,
            loss_type="ipo",
            beta=0.5,
            use_lora="true",
            lora_r=4,
            num_eval_prompts=0,
        ),
    )
    assert "loss_type: ipo" in (out / "config.yaml").read_text()
    assert len([r for r in runlog.read_jsonl(out / "metrics.jsonl") if "loss" in r]) == 4
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_dpo_bad_loss_type_names_the_nearest():
    import pytest

    from rlhf_toy.config import ConfigError, parse_config
    from rlhf_toy.stages.dpo import DPOStageConfig

    with pytest.raises(ConfigError, match="did you mean 'sigmoid'"):
        parse_config(
            DPOStageConfig, ["--config", str(ROOT / "configs/tiny/dpo.yaml"), "--loss_type", "sigmod"]
        )
    assert parse_config(DPOStageConfig, ["--loss_type", "sigmoid,sft"]).loss_types == ["sigmoid", "sft"]


def test_dpo_killed_and_resumed_loses_and_repeats_no_step(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "scripts/dpo.py"),
        *map(
            str,
            tiny_args(
                tmp_path, out, max_steps=24, save_steps=5, num_eval_prompts=0, per_device_train_batch_size=2
            ),
        ),
    ]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after_checkpoint(process, out / "checkpoints", 10)
    assert max(r["step"] for r in runlog.read_jsonl(out / "metrics.jsonl")) < 24

    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    steps = [r["step"] for r in runlog.read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 25))  # every step once: none lost, none repeated
    assert (out / "final/model.safetensors").exists()


def test_pairs_without_a_preference_are_dropped_and_counted(tmp_path):
    import pytest

    from rlhf_toy.config import parse_config
    from rlhf_toy.data import DataError
    from rlhf_toy.stages.dpo import DPOStageConfig, load_pairs, run_dpo

    prefs, _ = write_preferences(tmp_path)
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    same = [{**r, "rejected": r["chosen"]} for r in rows]
    mixed, all_same = tmp_path / "mixed.jsonl", tmp_path / "same.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in same[:3] + rows[3:]))
    all_same.write_text("".join(json.dumps(r) + "\n" for r in same))
    out = tmp_path / "run"
    train, held_out, stats = load_pairs(
        parse_config(DPOStageConfig, [*map(str, tiny_args(tmp_path, out, dataset=mixed))])
    )
    assert stats["pairs_identical_dropped"] == 3 and len(train) + len(held_out) == len(rows) - 3
    assert all(p["chosen"] != p["rejected"] for p in train + held_out)
    # All of them: DPO's loss would sit at log 2 throughout; a one-line error instead, nothing written.
    with pytest.raises(
        DataError, match=rf"same\.jsonl: no usable pairs \(all {len(rows)} have chosen == rejected\)"
    ):
        run_dpo(parse_config(DPOStageConfig, [*map(str, tiny_args(tmp_path, out, dataset=all_same))]))
    assert not out.exists()


def test_dpo_with_frozen_bottom_layers_trains_only_the_blocks_above(tmp_path):
    import torch
    from safetensors.torch import load_file

    from rlhf_toy import models
    from rlhf_toy.config import parse_config
    from rlhf_toy.stages.dpo import DPOStageConfig, run_dpo

    out = tmp_path / "run"
    run_dpo(
        parse_config(
            DPOStageConfig,
            list(map(str, tiny_args(tmp_path, out, max_steps=2, num_eval_prompts=0, freeze_bottom_layers=1))),
        )
    )
    before = load_file(f"{models.resolve_model_path('tiny-random-gpt2')}/model.safetensors")
    after = load_file(out / "final/model.safetensors")
    for frozen in ("transformer.h.0.attn.c_attn.weight", "transformer.wpe.weight"):
        assert torch.equal(before[frozen], after[frozen])
    assert not torch.equal(
        before["transformer.h.1.attn.c_attn.weight"], after["transformer.h.1.attn.c_attn.weight"]
    )


def test_finished_pairs_only_drops_pairs_with_a_cut_answer_and_says_what_is_missing(tmp_path):
    import pytest

    from rlhf_toy.config import parse_config
    from rlhf_toy.data import DataError
    from rlhf_toy.stages.dpo import DPOStageConfig, load_pairs, run_dpo

    prefs, _ = write_preferences(tmp_path)
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    cuts = [(False, False), (True, False), (False, True), (True, True)]  # one of four pairs has no cut answer
    flagged = [
        {**r, "chosen_cut": cuts[i % 4][0], "rejected_cut": cuts[i % 4][1]} for i, r in enumerate(rows)
    ]
    for r in flagged[::4]:  # the finished pairs' chosen answer tells them apart
        r["chosen"] = [{"role": "assistant", "content": "a finished film ."}]
    with_flags = tmp_path / "flagged.jsonl"
    with_flags.write_text("".join(json.dumps(r) + "\n" for r in flagged))
    out = tmp_path / "run"

    def pairs(**overrides):
        return load_pairs(parse_config(DPOStageConfig, [*map(str, tiny_args(tmp_path, out, **overrides))]))

    train, held_out, stats = pairs(dataset=with_flags, finished_pairs_only="true")
    finished = [r for r in flagged if not r["chosen_cut"] and not r["rejected_cut"]]
    assert len(train) + len(held_out) == len(finished) == len(rows) // 4
    assert all(p["chosen"][0]["content"] == "a finished film ." for p in train + held_out)
    assert stats["pairs_with_a_cut_answer_dropped"] == len(rows) - len(finished)
    # off (the default), every pair is kept
    train, held_out, stats = pairs(dataset=with_flags)
    assert len(train) + len(held_out) == len(rows) and stats["pairs_with_a_cut_answer_dropped"] == 0

    # a file without the flags (made before them), or with a flag that is not true/false: the line and field named
    with pytest.raises(
        DataError, match=r"preferences\.jsonl:1: finished_pairs_only needs field 'chosen_cut'"
    ):
        pairs(finished_pairs_only="true")
    flagged[2]["rejected_cut"] = "no"
    with_flags.write_text("".join(json.dumps(r) + "\n" for r in flagged))
    with pytest.raises(
        DataError, match=r"flagged\.jsonl:3: .*field 'rejected_cut', true or false .* got 'no'"
    ):
        pairs(dataset=with_flags, finished_pairs_only="true")
    # every pair cut: one line, and nothing written
    every_cut = tmp_path / "every_cut.jsonl"
    every_cut.write_text(
        "".join(json.dumps({**r, "chosen_cut": True, "rejected_cut": False}) + "\n" for r in rows)
    )
    with pytest.raises(DataError, match=r"every_cut\.jsonl: finished_pairs_only left no pair"):
        run_dpo(
            parse_config(
                DPOStageConfig,
                [*map(str, tiny_args(tmp_path, out, dataset=every_cut, finished_pairs_only="true"))],
            )
        )
    assert not out.exists()
