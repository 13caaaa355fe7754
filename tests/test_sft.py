import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, kill_after_checkpoint, snapshot
from transformers import AutoModelForCausalLM

from rlhf_toy import data, models, rundir, runlog, task
from rlhf_toy.config import parse_config
from rlhf_toy.stages.sft import SFTStageConfig, drop_prompts_too_long, run_sft


def write_fixture(tmp_path, n=48):
    """Demonstrations the tiny word-level model can learn: one fixed positive answer per template."""
    train, evals, _ = task.make_prompts(n, 8, 0, seed=1)
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        "".join(
            json.dumps({**row, "completion": [{"role": "assistant", "content": "a wonderful film ."}]}) + "\n"
            for row in train
        )
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in evals))
    return sft, prompts


def tiny_args(tmp_path, out, **overrides):
    sft, prompts = write_fixture(tmp_path)
    args = {
        "config": ROOT / "configs/tiny/sft.yaml",
        "dataset": sft,
        "eval_prompts": prompts,
        "output_dir": out,
    }
    args.update(overrides)
    return [x for key, value in args.items() for x in (f"--{key}", value)]


def test_tiny_sft_loss_falls_and_final_reloads(tmp_path, run_script):
    out = tmp_path / "run"
    run_script("sft", *tiny_args(tmp_path, out, max_steps=20, learning_rate=1e-2, report_to="tensorboard"))
    losses = [r["loss"] for r in runlog.read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert {"before", "after", "tokens_per_s"} <= set(summary)
    assert summary["before"]["gold_mean"] is not None and summary["after"]["gold_mean"] is not None
    stages = [r["stage"] for r in runlog.read_jsonl(out / "samples.jsonl")]
    assert stages.count("before") == stages.count("after") == 8
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert (out / "config.yaml").exists() and list((out / "tensorboard").iterdir())


def test_tiny_sft_with_lora_saves_a_merged_model(tmp_path, run_script):
    out = tmp_path / "run"
    run_script("sft", *tiny_args(tmp_path, out, max_steps=4, use_lora="true", lora_r=4, num_eval_prompts=0))
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_sft_killed_and_resumed_loses_and_repeats_no_step(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "scripts/sft.py"),
        *map(
            str,
            tiny_args(
                tmp_path, out, max_steps=60, save_steps=5, num_eval_prompts=0, per_device_train_batch_size=2
            ),
        ),
    ]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after_checkpoint(process, out / "checkpoints", 10)
    killed_at = max(r["step"] for r in runlog.read_jsonl(out / "metrics.jsonl"))
    assert killed_at < 60

    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    steps = [r["step"] for r in runlog.read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 61))  # every step once: none lost, none repeated
    assert [r["step"] for r in runlog.read_jsonl(out / "metrics.jsonl") if "summary" in r] == [60]
    state = json.loads((out / "checkpoints/checkpoint-60/trainer_state.json").read_text())
    assert state["global_step"] == 60
    assert (out / "final/model.safetensors").exists()

    # The same command again: the run is finished; it says so, exits 0 and touches nothing.
    files = snapshot(out)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "is finished (60 steps); nothing to do" in again.stdout, again.stderr[
        -2000:
    ]
    assert snapshot(out) == files


def sft_in_process(tmp_path, out, **overrides):
    return run_sft(parse_config(SFTStageConfig, [str(x) for x in tiny_args(tmp_path, out, **overrides)]))


def test_finished_run_is_not_trained_again_nor_past_its_last_step(tmp_path, capsys):
    out = tmp_path / "run"
    short = dict(max_steps=4, save_steps=2, num_eval_prompts=2, max_new_tokens=4)  # step 4 ends mid-epoch
    sft_in_process(tmp_path, out, **short)
    summary = json.loads((out / "summary.json").read_text())
    files = snapshot(out)
    sft_in_process(tmp_path, out, **short)
    assert "is finished (4 steps); nothing to do" in capsys.readouterr().out
    assert snapshot(out) == files
    # Killed after its last checkpoint, before the end: the resumed run trains no step past max_steps
    # (HF's resume would, the last step ending mid-epoch) and writes the end once.
    (out / rundir.FINISHED_FILE).unlink()
    shutil.rmtree(out / "final")
    sft_in_process(tmp_path, out, **short)
    assert [r["step"] for r in runlog.read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in runlog.read_jsonl(out / "metrics.jsonl") if "summary" in r] == [4]
    assert [r["stage"] for r in runlog.read_jsonl(out / "samples.jsonl")] == ["before"] * 2 + ["after"] * 2
    resumed = json.loads((out / "summary.json").read_text())
    assert (
        resumed["train_loss"] == summary["train_loss"] and resumed["train_tokens"] == summary["train_tokens"]
    )
    # Raising max_steps extends it from checkpoint-4.
    sft_in_process(tmp_path, out, **{**short, "max_steps": 6})
    assert [r["step"] for r in runlog.read_jsonl(out / "metrics.jsonl") if "loss" in r] == list(range(1, 7))
    assert json.loads((out / rundir.FINISHED_FILE).read_text()) == {"step": 6}


def test_prompts_that_fill_max_length_are_dropped_and_counted(tmp_path):
    tokenizer = models.load_tokenizer(models.TINY_MODEL)
    long = [{"role": "user", "content": " ".join(["film"] * 40)}]
    short = [{"role": "user", "content": "Review it ."}]
    records = [
        {"prompt": p, "completion": [{"role": "assistant", "content": "good ."}]}
        for p in (short, long, short)
    ]
    kept, dropped, longest = drop_prompts_too_long(records, tokenizer, 32)
    assert kept == [records[0], records[2]] and dropped == 1 and longest > 40
    # None left: one line naming max_length, before anything is written.
    out = tmp_path / "run"
    with pytest.raises(data.DataError, match=r"every training example's prompt fills max_length=8 tokens"):
        sft_in_process(tmp_path, out, max_length=8, num_eval_prompts=0)
    assert not out.exists()


def test_mixed_precision_sft_trains_float32_master_weights_in_bf16_and_records_what_ran(
    tmp_path, monkeypatch
):
    """`dtype: auto` on a CPU with native bf16 is bfloat16-mixed: the HF Trainer's bf16 autocast over float32
    weights (AdamW state float32 too); the loss falls; config.yaml says what ran, not `auto`."""
    import torch
    import yaml
    from transformers import Trainer

    from rlhf_toy.stages import common

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    seen = {}
    original_step = Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):  # the precision the Trainer really trains in
        block = self.accelerator.unwrap_model(model).transformer.h[0].mlp.c_fc  # GPT-2's first MLP matmul
        hook = block.register_forward_hook(lambda m, i, out: seen.update(matmul=out.dtype))
        try:
            return original_step(self, model, inputs, *args, **kwargs)
        finally:
            hook.remove()
            seen["weights"] = block.weight.dtype
            seen["adam"] = {s["exp_avg"].dtype for s in self.optimizer.state.values() if "exp_avg" in s}

    monkeypatch.setattr(Trainer, "training_step", training_step)
    out = tmp_path / "run"
    cfg = parse_config(
        SFTStageConfig,
        list(
            map(
                str,
                tiny_args(tmp_path, out, dtype="auto", max_steps=20, learning_rate=1e-2, num_eval_prompts=2),
            )
        ),
    )
    assert common.trainer_precision(cfg)["bf16"]
    run_sft(cfg)
    assert yaml.safe_load((out / "config.yaml").read_text())["dtype"] == "bfloat16-mixed"
    assert (
        seen["matmul"] == torch.bfloat16
        and seen["weights"] == torch.float32
        and seen["adam"] <= {torch.float32}
    )
    losses = [r["loss"] for r in runlog.read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0]
    assert AutoModelForCausalLM.from_pretrained(out / "final").lm_head.weight.dtype == torch.float32
