"""Bad input, round three (issue #29): impossible values, models of the wrong kind or tokenizer, two processes on
one run directory, a damaged run directory, long prompts, and malformed records. Each is refused in one line
that names the key, file or process at fault, before anything is written, or survived and said."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ROOT, run_in_process, tiny_flags
from test_compare import SAMPLING, tiny_copy
from test_dpo import make_tiny_reward_model, tiny_args

from rlhf_toy import data, models, rundir, runlog
from rlhf_toy.config import ConfigError, parse_config
from rlhf_toy.evaluation import compare
from rlhf_toy.scoring import RewardScorer
from rlhf_toy.stages.dpo import DPOStageConfig, run_dpo
from rlhf_toy.stages.ppo import trainer
from rlhf_toy.stages.ppo.config import PPOStageConfig
from rlhf_toy.stages.sft import SFTStageConfig, run_sft

PPO_TINY = ["--config", str(ROOT / "configs/tiny/ppo.yaml")]


# ----------------------------------------------------------------------------------------------------------------
# Impossible values: refused when the config is parsed, in one line naming the key and its range.
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--cliprange", "-0.2"], r"^cliprange must be > 0, got -0\.2$"),
        (["--cliprange_value", "0"], r"^cliprange_value must be > 0, got 0\.0$"),
        (["--gamma", "2"], r"^gamma must be in \[0, 1\], got 2\.0$"),
        (["--lam", "-1"], r"^lam must be in \[0, 1\], got -1\.0$"),
        (["--vf_coef", "-1"], r"^vf_coef must be >= 0, got -1\.0$"),
        (["--temperature", "inf"], r"^temperature must be a finite number, got inf$"),
        (["--temperature", "0"], r"^temperature must be > 0, got 0\.0$"),
        (["--kl_coef", "nan"], r"^kl_coef must be a finite number, got nan$"),
        (["--reward_weights", "1,nan"], r"^reward_weights must be finite numbers, got \[1\.0, nan\]$"),
        (["--learning_rate", "nan"], r"^learning_rate must be a finite number, got nan$"),
        (["--adam_eps", "-1"], r"^adam_eps must be > 0, got -1\.0$"),
        (["--kl_horizon", "0"], r"^kl_horizon must be > 0, got 0\.0$"),
        (["--max_grad_norm", "-1"], r"^max_grad_norm must be >= 0, got -1\.0$"),
        (["--length_target", "-3"], r"^length_target must be >= 0, got -3$"),
    ],
)
def test_impossible_ppo_values_are_refused_naming_the_key_and_range(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(PPOStageConfig, PPO_TINY + flags)


@pytest.mark.parametrize(
    "config_class, flags, message",
    [
        (SFTStageConfig, ["--learning_rate", "nan"], "learning_rate must be a finite number, got nan"),
        (SFTStageConfig, ["--temperature", "-1"], "temperature must be > 0, got -1.0"),
        (DPOStageConfig, ["--beta", "inf"], "beta must be a finite number, got inf"),
        (DPOStageConfig, ["--label_smoothing", "0.7"], r"label_smoothing must be in \[0, 0.5\], got 0.7"),
    ],
)
def test_impossible_values_are_refused_in_every_stage(config_class, flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(config_class, flags)


def test_a_yaml_bool_is_not_an_int_and_max_grad_norm_null_means_no_clipping(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("num_mini_batches: true\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: num_mini_batches must be int, got True"):
        parse_config(PPOStageConfig, ["--config", str(config)])
    config.write_text("max_grad_norm: null\n")
    assert parse_config(PPOStageConfig, ["--config", str(config)]).max_grad_norm is None


def test_a_bad_value_on_the_command_line_is_one_line_and_writes_nothing(run_script, tmp_path):
    # SFT's learning_rate nan used to fail only after config.yaml, summary.json and checkpoints/ were written,
    # and the corrected command was then refused.
    # (The others are parse_config's, above: the same code path as the command line's.)
    result = run_script(
        "sft",
        "--config",
        ROOT / "configs/tiny/sft.yaml",
        "--learning_rate",
        "nan",
        "--output_dir",
        tmp_path / "x",
        check=False,
    )
    assert (
        result.returncode == 2 and result.stderr == "error: learning_rate must be a finite number, got nan\n"
    )
    assert not (tmp_path / "x").exists()


def test_a_run_directory_holding_nan_compares_equal_to_the_same_config():
    # A config.yaml written before NaN was refused holds `.nan`: the same command must not be refused as a change.
    cfg = parse_config(PPOStageConfig, PPO_TINY)
    cfg.kl_coef, cfg.reward_weights = float("nan"), [1.0, float("nan")]
    old = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    assert rundir.compare_configs(old, cfg) == ([], [])
    cfg.kl_coef = 0.1
    assert rundir.compare_configs(old, cfg)[0] == ["kl_coef nan -> 0.1"]


def test_max_grad_norm_zero_trains_unclipped(pipeline, tmp_path):
    # HF's meaning: 0 is "no clipping". It used to clip every gradient to zero (final weights = the SFT model's).
    out = tmp_path / "ppo"
    run_in_process(pipeline, out, total_episodes=8, num_eval_prompts=0, max_grad_norm=0)
    from safetensors.torch import load_file

    before, after = (
        load_file(pipeline / "sft/final/model.safetensors"),
        load_file(out / "final/model.safetensors"),
    )
    changed = [name for name in after if name in before and not torch.equal(before[name], after[name])]
    assert len(changed) > len(after) // 2, changed
    assert yaml.safe_load((out / "config.yaml").read_text())["max_grad_norm"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Models of the wrong kind, and a critic that would read the policy's ids through another tokenizer.
def test_a_reward_model_where_a_causal_lm_is_expected_is_refused_by_every_stage_and_compare(
    pipeline, tmp_path, capsys
):
    rm = pipeline / "rm/final"
    with pytest.raises(
        models.ModelKindError,
        match=r"rm/final is a reward model \(GPT2ForSequenceClassification\), "
        r"not a causal language model",
    ):
        run_in_process(pipeline, tmp_path / "ppo", model_name_or_path=rm)
    with pytest.raises(models.ModelKindError, match="is a reward model"):
        run_sft(
            parse_config(
                SFTStageConfig,
                [
                    "--config",
                    str(ROOT / "configs/tiny/sft.yaml"),
                    "--model_name_or_path",
                    str(rm),
                    "--output_dir",
                    str(tmp_path / "sft"),
                ],
            )
        )
    with pytest.raises(models.ModelKindError, match="is a reward model"):
        run_dpo(
            parse_config(
                DPOStageConfig, [str(a) for a in tiny_args(tmp_path, tmp_path / "dpo", model_name_or_path=rm)]
            )
        )
    prompts = pipeline / "prompts.jsonl"
    # A run directory (the issue's `compare --ref runs/reward`) is read for its final/ model.
    for argv in (["--runs", str(pipeline / "sft/final"), "--ref", str(pipeline / "rm")], ["--runs", str(rm)]):
        with pytest.raises(SystemExit) as exit_info:
            compare.main(argv + ["--prompts", str(prompts), "--output_dir", str(tmp_path / "r"), *SAMPLING])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "is a reward model" in err and err.count("\n") == 1, err
    assert not any((tmp_path / name).exists() for name in ("ppo", "sft", "dpo", "r"))


def test_a_causal_lm_where_a_reward_model_is_expected_is_refused(pipeline, tmp_path, capsys):
    sft = pipeline / "sft/final"
    with pytest.raises(
        models.ModelKindError,
        match=r"sft/final is a causal language model \(GPT2LMHeadModel\), "
        r"not a reward model",
    ):
        run_in_process(pipeline, tmp_path / "ppo", reward_model_path=sft)
    with pytest.raises(models.ModelKindError, match="is a causal language model"):
        run_dpo(
            parse_config(
                DPOStageConfig, [str(a) for a in tiny_args(tmp_path, tmp_path / "dpo", reward_model=sft)]
            )
        )
    with pytest.raises(SystemExit) as exit_info:
        compare.main(
            [
                "--runs",
                str(sft),
                "--reward_model",
                str(sft),
                "--prompts",
                str(pipeline / "prompts.jsonl"),
                "--output_dir",
                str(tmp_path / "r"),
                *SAMPLING,
            ]
        )
    assert exit_info.value.code == 2 and "is a causal language model" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("ppo", "dpo", "r"))


def reward_model_with_vocabulary(pipeline, path, change):
    """A copy of the pipeline's reward model whose tokenizer.json vocabulary `change` edits in place."""
    shutil.copytree(pipeline / "rm/final", path)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    change(tokenizer["model"]["vocab"])
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    return path


def test_a_critic_whose_tokenizer_differs_from_the_policys_is_refused_before_anything_is_written(
    pipeline, tmp_path
):
    def swap_two_words(
        vocab,
    ):  # the same words under other ids: the critic would read the wrong words silently
        a, b = "wonderful", "terrible"
        vocab[a], vocab[b] = vocab[b], vocab[a]

    def drop_a_word(vocab):  # fewer words: the critic's embedding lookup would index past its table
        del vocab["wonderful"]

    for name, change, how in (
        ("swapped", swap_two_words, "the same tokens under other ids"),
        ("smaller", drop_a_word, "'wonderful' only in the policy"),
    ):
        rm = reward_model_with_vocabulary(pipeline, tmp_path / name, change)
        with pytest.raises(
            ConfigError,
            match=f"the critic starts from reward_model_path .*{name}, whose tokenizer "
            f"differs from the policy's .*{how}",
        ):
            run_in_process(pipeline, tmp_path / f"ppo_{name}", reward_model_path=rm)
        assert not (tmp_path / f"ppo_{name}").exists()
    # Without a critic the reward model only scores decoded text, through its own tokenizer: that is allowed.
    cfg = parse_config(
        PPOStageConfig,
        tiny_flags(
            pipeline,
            tmp_path / "grpo",
            reward_model_path=tmp_path / "smaller",
            advantage_estimator="grpo",
            num_generations=2,
        ),
    )
    trainer.check_models(cfg, models.load_tokenizer(cfg.model_name_or_path))


# ----------------------------------------------------------------------------------------------------------------
# Two processes on one run directory: an OS lock that names its holder and goes with it.
# Another process holding a run directory's lock as `rundir.lock` takes it (flock on .lock, its pid inside);
# plain Python, so the holder starts in a blink.
HOLD_LOCK = """
import fcntl, os, sys, time
handle = open(os.path.join(sys.argv[1], ".lock"), "a+")
fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
handle.truncate(0); handle.write(f"{os.getpid()}\\n"); handle.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_lets_go(tmp_path):
    from test_rundir import fake_run, sft_cfg

    out = tmp_path / "run"
    fake_run(out, finished=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"run is in use: process {holder.pid} is training in it"):
            rundir.prepare_run_dir(sft_cfg(out))
    finally:
        holder.kill()
        holder.wait()
    start = rundir.prepare_run_dir(sft_cfg(out))  # the OS let go of a killed process's lock
    assert start.action == "resume"
    # Taken between this process's check and its first write: `begin` refuses too, and writes nothing.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        config_before = (out / "config.yaml").read_text()
        with pytest.raises(ConfigError, match=rf"process {holder.pid} is training in it"):
            start.begin(sft_cfg(out))
        assert (out / "config.yaml").read_text() == config_before
    finally:
        holder.kill()
        holder.wait()


def test_two_ppo_processes_on_one_output_dir(pipeline, tmp_path, run_script):
    out, gate = tmp_path / "ppo", tmp_path / "gate"
    flags = tiny_flags(
        pipeline,
        out,
        total_episodes=48,
        save_steps=2,
        num_eval_prompts=0,
        rewards="rm,reward_functions:gated",
    )  # the first run waits in step 1 until the gate opens
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "RLHF_TOY_TEST_GATE": str(gate)}
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/ppo.py"), *flags],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock, deadline = out / rundir.LOCK_FILE, time.time() + 120
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):  # past its first write
            assert time.time() < deadline and first.poll() is None, "the first run never took the lock"
            time.sleep(0.05)
        second = run_script("ppo", *flags, check=False)
    finally:
        gate.touch()
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"is in use: process {first.pid} is training in it" in second.stderr
    assert [r["step"] for r in runlog.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6, 6]  # once each
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]


# ----------------------------------------------------------------------------------------------------------------
# A damaged run directory: a checkpoint cut short is passed over for the one before it; a torn last line dropped.
def test_a_damaged_last_checkpoint_and_a_torn_metrics_line_resume_from_the_checkpoint_before(
    pipeline, tmp_path, capsys
):
    from test_ppo_trainer import WHOLE

    whole = tmp_path / "whole"
    run_in_process(pipeline, whole, **WHOLE)
    killed = tmp_path / "killed"
    shutil.copytree(whole, killed)
    shutil.rmtree(killed / "final")
    (killed / rundir.FINISHED_FILE).unlink()
    weights = killed / "checkpoints/step-12/policy/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a kill or a full disk mid-write
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "objective/sco')  # torn: no newline, not JSON
    capsys.readouterr()
    run_in_process(pipeline, killed, **WHOLE)
    out = capsys.readouterr().out
    assert "checkpoint step-12 cannot be loaded (policy/model.safetensors: " in out
    assert "continues from step-10" in out
    assert [r["step"] for r in runlog.read_jsonl(killed / "metrics.jsonl")] == list(range(1, 13)) + [12]
    # Steps 11 and 12 trained again from step 10 give what the run gave the first time (resume is exact).
    from safetensors.torch import load_file

    a, b = load_file(whole / "final/model.safetensors"), load_file(killed / "final/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_read_jsonl_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert runlog.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(data.DataError, match=r"metrics\.jsonl:2: not valid JSON"):
        runlog.read_jsonl(path)


# ----------------------------------------------------------------------------------------------------------------
# Long prompts: the reward model reads at most its positions; every truncation is counted.
LONG_PROMPT = {"prompt": [{"role": "user", "content": " ".join(["the film was a wonderful film ."] * 100)}]}


def test_the_reward_model_truncates_a_long_prompt_to_its_positions(pipeline):
    scorer = RewardScorer(str(pipeline / "rm/final"), device="cpu")
    assert scorer.max_length == 256  # the tiny GPT-2's n_positions, below the default 512
    scores = scorer.score(
        [LONG_PROMPT["prompt"], [{"role": "user", "content": "a film"}]], ["a good film ."] * 2
    )
    assert torch.isfinite(scores).all() and scorer.n_truncated == 1


def test_ppo_counts_every_truncated_prompt_and_says_so(pipeline, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = runlog.read_jsonl(pipeline / "prompts.jsonl")
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [LONG_PROMPT] + rows[1:]))  # 16 prompts, 1 long
    out = tmp_path / "ppo"
    run_in_process(pipeline, out, prompts=prompts, total_episodes=16, num_eval_prompts=0, max_prompt_length=2)
    assert "note: 16 of 16 prompts in" in capsys.readouterr().out
    metrics = [r for r in runlog.read_jsonl(out / "metrics.jsonl") if "objective/scores" in r]
    assert [r["rollout/prompts_truncated"] for r in metrics] == [8, 8]  # max_prompt_length 2 cuts them all
    # The long one, drawn once in the pass over 16 prompts, is more than the reward model's 256 positions.
    assert sum(r["rollout/rm_prompts_truncated"] for r in metrics) == 1


def test_compare_scores_a_prompt_longer_than_the_reward_models_positions(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(LONG_PROMPT) + "\n" + json.dumps({"prompt": "a film", "title": "x"}) + "\n")
    out = tmp_path / "report"
    compare.main(
        [
            "--runs",
            str(tiny_copy(tmp_path / "sft_final")),
            "--prompts",
            str(prompts),
            "--output_dir",
            str(out),
            "--reward_model",
            str(make_tiny_reward_model(tmp_path / "rm")),
            "--max_prompt_length",
            "64",
            *SAMPLING,
        ]
    )
    report = json.loads((out / "compare.json").read_text())["runs"]["sft_final"]
    assert report["rm_mean"] is not None and report["prompts_truncated"] == 1


# ----------------------------------------------------------------------------------------------------------------
# Malformed records and paths.
def test_a_directory_named_like_a_dataset_and_an_empty_or_mistyped_field_are_named(tmp_path):
    (tmp_path / "x.jsonl").mkdir()
    with pytest.raises(data.DataError, match=r"x\.jsonl is a directory, not a dataset file"):
        data.load_records(str(tmp_path / "x.jsonl"), data.PROMPT_FIELDS)
    path = tmp_path / "p.jsonl"
    for record, message in (
        ({"prompt": [], "title": "t"}, r"p\.jsonl:1: field 'prompt' is empty \(\[\]\)"),
        ({"prompt": None}, r"p\.jsonl:1: field 'prompt' is empty \(null\)"),
        ({"prompt": [{"role": "user", "content": 5}]}, r"p\.jsonl:1: field 'prompt' must be a string"),
        ({"prompt": 3}, r"p\.jsonl:1: field 'prompt' must be a string"),
    ):
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(data.DataError, match=message):
            data.load_records(str(path), data.PROMPT_FIELDS)


def test_dpo_counts_the_pairs_trl_will_cut_to_max_length():
    from rlhf_toy.stages.dpo import pairs_longer_than

    tokenizer = models.load_tokenizer(models.TINY_MODEL)
    answer = lambda text: [{"role": "assistant", "content": text}]
    pairs = [
        {"prompt": LONG_PROMPT["prompt"], "chosen": answer("a good film ."), "rejected": answer("bad .")},
        {"prompt": "a film", "chosen": answer("a good film ."), "rejected": answer(" ".join(["film"] * 300))},
        {"prompt": "a film", "chosen": answer("a good film ."), "rejected": answer("bad .")},
    ]
    assert pairs_longer_than(pairs, tokenizer, 192) == 2
