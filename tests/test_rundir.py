"""The run-directory rule (`rlhf_toy.rundir`) on hand-made run directories: no training (the stages'
own tests run it end to end)."""

import re
import shutil
import subprocess

import pytest
import torch
import yaml
from conftest import ROOT

from rlhf_toy import rundir, runlog
from rlhf_toy.config import ConfigError, parse_config, save_config
from rlhf_toy.stages.ppo.config import PPOStageConfig
from rlhf_toy.stages.sft import SFTStageConfig


def sft_cfg(out, *flags):
    return parse_config(
        SFTStageConfig,
        ["--config", str(ROOT / "configs/tiny/sft.yaml"), "--output_dir", str(out), *map(str, flags)],
    )


def fake_run(out, *flags, finished=True, step=12):
    """A run directory as a finished (or killed) tiny SFT run leaves it."""
    cfg = sft_cfg(out, *flags)
    save_config(cfg, out)
    (out / f"checkpoints/checkpoint-{step}").mkdir(parents=True)
    (out / f"checkpoints/checkpoint-{step}/trainer_state.json").write_text("{}")
    runlog.append_jsonl(out / "metrics.jsonl", [{"step": s, "loss": 1.0 / s} for s in range(1, step + 1)])
    if finished:
        runlog.append_jsonl(out / "metrics.jsonl", [{"step": step, "summary": 1}])
        rundir.mark_finished(out, step)
    return cfg


def test_new_and_empty_directories_start_a_run_and_nothing_is_written(tmp_path):
    assert rundir.prepare_run_dir(sft_cfg(tmp_path / "new")).action == "new"
    (tmp_path / "empty").mkdir()
    assert rundir.prepare_run_dir(sft_cfg(tmp_path / "empty")).action == "new"
    assert not (tmp_path / "new").exists() and not list((tmp_path / "empty").iterdir())
    (tmp_path / "other/notes.txt").parent.mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty and holds no run"):
        rundir.prepare_run_dir(sft_cfg(tmp_path / "other", "--overwrite_output_dir"))
    assert (tmp_path / "other/notes.txt").read_text() == "mine"


def test_same_config_finished_resumes_nothing_and_output_fields_may_change(tmp_path):
    out = tmp_path / "run"
    fake_run(out)
    start = rundir.prepare_run_dir(
        sft_cfg(
            out,
            "--logging_steps",
            5,
            "--save_steps",
            3,
            "--report_to",
            "tensorboard",
            "--num_threads",
            1,
            "--device",
            "cpu",
            "--eval_steps",
            4,
        )
    )
    assert start.finished and "is finished (12 steps); nothing to do" in start.message
    (out / rundir.FINISHED_FILE).unlink()  # killed before its end: resumed from its last checkpoint
    start = rundir.prepare_run_dir(sft_cfg(out))
    assert (start.action, start.step, start.checkpoint.name) == ("resume", 12, "checkpoint-12")


def test_other_config_resume_false_and_a_shorter_run_are_refused_naming_the_fields(tmp_path):
    out = tmp_path / "run"
    fake_run(out)
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError) as error:
        rundir.prepare_run_dir(sft_cfg(out, "--learning_rate", 5e-5, "--seed", 7))
    message = str(error.value)
    assert "seed 0 -> 7" in message and "learning_rate 0.001 -> 5e-05" in message
    assert "--overwrite_output_dir" in message and "\n" not in message
    with pytest.raises(ConfigError, match="max_steps 12 -> 6 \\(a run can be extended, not shortened\\)"):
        rundir.prepare_run_dir(sft_cfg(out, "--max_steps", 6))
    with pytest.raises(ConfigError, match="--resume false would mix two runs"):
        rundir.prepare_run_dir(sft_cfg(out, "--resume", "false"))
    assert (out / "config.yaml").read_text() == before


def test_a_longer_run_extends_and_begin_cuts_the_append_only_files_back(tmp_path):
    out = tmp_path / "run"
    fake_run(out, step=12)
    runlog.append_jsonl(out / "samples.jsonl", [{"stage": "before", "x": 1}, {"stage": "after", "x": 2}])
    # a killed session logged step 13 of the extension past its last checkpoint
    runlog.append_jsonl(out / "metrics.jsonl", [{"step": 13, "loss": 0.1}])
    cfg = sft_cfg(out, "--max_steps", 20)
    start = rundir.prepare_run_dir(cfg)
    assert (start.action, start.step) == ("extend", 12) and "max_steps 12 -> 20" in start.message
    start.begin(cfg)
    assert [r["step"] for r in runlog.read_jsonl(out / "metrics.jsonl")] == list(
        range(1, 13)
    )  # no summary, no 13
    assert [r["stage"] for r in runlog.read_jsonl(out / "samples.jsonl")] == ["before"]
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 20
    assert not (out / rundir.FINISHED_FILE).exists()


def test_ppo_samples_are_cut_back_to_the_resumed_step(tmp_path):
    cfg = parse_config(
        PPOStageConfig, ["--config", str(ROOT / "configs/tiny/ppo.yaml"), "--output_dir", str(tmp_path)]
    )
    save_config(cfg, tmp_path)
    (tmp_path / "checkpoints/step-4").mkdir(parents=True)
    torch.save({"step": 4}, tmp_path / "checkpoints/step-4/trainer_state.pt")  # loadable: a zip file
    runlog.append_jsonl(tmp_path / "samples.jsonl", [{"step": s, "prompt": "p"} for s in (2, 2, 4, 4, 6, 6)])
    start = rundir.prepare_run_dir(cfg)
    assert (start.action, start.step) == ("resume", 4)
    start.begin(cfg)
    assert [r["step"] for r in runlog.read_jsonl(tmp_path / "samples.jsonl")] == [2, 2, 4, 4]


def test_overwrite_starts_clean(tmp_path):
    out = tmp_path / "run"
    fake_run(out)
    cfg = sft_cfg(out, "--learning_rate", 5e-5, "--overwrite_output_dir")
    start = rundir.prepare_run_dir(cfg)
    assert start.action == "overwrite" and start.checkpoint is None
    assert (out / "checkpoints").exists()  # nothing deleted before the stage's inputs are checked
    start.begin(cfg)
    assert sorted(p.name for p in out.iterdir()) == [
        rundir.LOCK_FILE,
        "config.yaml",
    ]  # the lock: this process's


def test_an_unwritable_output_dir_is_named(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(
        ConfigError, match=r"output_dir .*file\.txt/run: .*file\.txt is a file, not a directory"
    ):
        rundir.prepare_run_dir(sft_cfg(tmp_path / "file.txt/run"))
    assert (tmp_path / "file.txt").read_text() == "x"


def test_tensorboard_is_cut_back_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = runlog.MetricsLogger(tmp_path, tensorboard=True, resume_step=0)
    for step in range(1, 6):
        logger.log(step, {"x": float(step)})
    logger.close()
    logger = runlog.MetricsLogger(tmp_path, tensorboard=True, resume_step=3)  # resumed from step 3
    for step in range(4, 7):
        logger.log(step, {"x": 10.0 + step})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("x")] == [
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 14),
        (5, 15),
        (6, 16),
    ]
    assert [r["step"] for r in runlog.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_redoes_a_stage_whose_config_changed(tmp_path):
    """`make -n`: with every stage done, an edited reward config redoes reward (clean) and what starts from it."""
    import os
    import time

    configs, runs, report = tmp_path / "configs", tmp_path / "runs", tmp_path / "report"
    shutil.copytree(ROOT / "configs/tiny", configs)
    time.sleep(0.05)
    for stage in ("sft", "reward", "ppo", "dpo"):
        (runs / stage / "final").mkdir(parents=True)
        (runs / stage / "final/config.json").write_text("{}")
        time.sleep(0.02)
    report.mkdir()
    (report / "report.html").write_text("")
    argv = [
        "make",
        "-n",
        "-C",
        str(ROOT),
        "demo",
        f"CONFIGS={configs}",
        f"RUNS={runs}",
        f"REPORT={report}",
        "SETUP_STAMP=Makefile",
    ]

    def stages():  # the stages `make demo` would run, in order, and whether each starts clean
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.replace("\\\n", " ")
        return [
            re.search(r"' stage (\w+)", line).group(1)
            + (" overwrite" if "--overwrite_output_dir" in line else "")
            for line in out.splitlines()
            if "' stage " in line
        ]

    assert stages() == []
    later = time.time() + 2
    os.utime(configs / "reward.yaml", (later, later))
    assert stages() == ["reward overwrite", "ppo overwrite", "dpo overwrite", "compare"]
    shutil.rmtree(runs / "sft/final")  # never finished (killed): redone without overwriting, to resume
    assert stages()[0] == "sft"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_skips_the_stage_evals_compare_repeats(tmp_path):
    """`make -n`: the demo's SFT, PPO and DPO skip their before/after sampling, reward keeps its samples;
    STAGE_EVAL= brings them back and STAGE_FLAGS reaches every stage and compare."""

    def flags(*overrides):  # stage -> its command line, as `make demo` would run it from nothing
        argv = ["make", "-n", "-C", str(ROOT), "demo", "CONFIGS=configs/tiny", f"RUNS={tmp_path / 'runs'}"]
        argv += [f"REPORT={tmp_path / 'report'}", "SETUP_STAMP=Makefile", *overrides]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.replace("\\\n", " ")
        return {
            re.search(r"' stage (\w+)", line).group(1): line
            for line in out.splitlines()
            if "' stage " in line
        }

    demo = flags()
    assert list(demo) == ["sft", "reward", "ppo", "dpo", "compare"]
    assert [s for s, line in demo.items() if "--num_eval_prompts 0" in line] == ["sft", "ppo", "dpo"]
    assert not any("--num_eval_prompts" in line for line in flags("STAGE_EVAL=").values())
    assert all("--dtype float32" in line for line in flags("STAGE_FLAGS=--dtype float32").values())
    # compare draws two answers a prompt from every model (one: DPO's gain over SFT is about its interval's width)
    assert "--samples_per_prompt 2 " in demo["compare"]
    assert "--samples_per_prompt 1 " in flags("COMPARE_SAMPLES=1")["compare"]
