#!/usr/bin/env python
"""One process against several on this machine, at the same global batch: seconds per PPO step (rollout and
update) and per SFT step, each stage launched as a user launches it.

    python scripts/bench_scale.py [--processes 1 2] [--hidden 512 --layers 6] [--out DIR]

Starts from the tiny random GPT-2, or with --hidden/--layers from a wider random GPT-2 on the same tokenizer (a
step of the tiny one is mostly fixed costs, which hide what the extra processes buy). Builds an SFT model and
a reward model from it once (the tiny configs), then runs PPO and SFT with each process count:
one process plainly, several through `accelerate launch --config_file configs/accelerate/ddp.yaml` (on a
machine without GPUs, a gloo group on the CPU). The machine's cores are shared out: each of N processes gets
cores / N threads, so every row uses the whole machine. Medians over the steps after the first. Prints a
markdown table and writes --out/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rlhf_toy import runlog

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(args: list, processes: int, threads: int) -> float:
    """Run a stage script with `processes` processes; returns its wall seconds."""
    launcher = (
        [PY]
        if processes == 1
        else [
            PY,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "configs/accelerate/ddp.yaml"),
            "--num_processes",
            str(processes),
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.time()
    result = subprocess.run(
        [*launcher, *map(str, args), "--num_threads", str(threads)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, args))}\n{result.stderr[-3000:]}")
    return time.time() - start


def wide_model(directory: Path, hidden: int, layers: int) -> Path:
    """A random GPT-2 of the given width and depth on the tiny model's tokenizer (so the tiny configs' data fit)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from rlhf_toy import models

    tiny = models.resolve_model_path(models.TINY_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = GPT2Config.from_pretrained(tiny)
    config.update({"n_embd": hidden, "n_layer": layers, "n_head": max(1, hidden // 64)})
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def parameters(model) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_toy import models

    return sum(
        p.numel()
        for p in AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(models.resolve_model_path(str(model)))
        ).parameters()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--hidden", type=int, default=0, help="width of a random GPT-2 to start from (0: the tiny one)"
    )
    parser.add_argument("--layers", type=int, default=6, help="its blocks (with --hidden)")
    parser.add_argument("--batch_size", type=int, default=16, help="PPO's and SFT's global batch")
    parser.add_argument("--steps", type=int, default=10, help="PPO and SFT steps per run")
    parser.add_argument("--work", default="runs/bench_scale")
    parser.add_argument("--out", default=None, help="where bench_scale.json goes (default: --work)")
    parser.add_argument("--name", default="bench_scale", help="the JSON file's name (without .json)")
    args = parser.parse_args()
    work, cores = ROOT / args.work, os.cpu_count()
    tiny = ROOT / "configs/tiny"
    common = ["--overwrite_output_dir", "true", "--report_to", "none"]
    base = wide_model(work / "base", args.hidden, args.layers) if args.hidden else "tiny-random-gpt2"

    # the models PPO starts from (one process, not timed)
    run(
        [
            ROOT / "scripts/sft.py",
            "--config",
            tiny / "sft.yaml",
            "--model_name_or_path",
            base,
            "--output_dir",
            work / "sft",
            "--max_steps",
            8,
            "--num_eval_prompts",
            0,
            *common,
        ],
        1,
        cores,
    )
    run(
        [
            ROOT / "scripts/train_reward.py",
            "--config",
            tiny / "reward.yaml",
            "--model_name_or_path",
            work / "sft/final",
            "--policy_model",
            work / "sft/final",
            "--output_dir",
            work / "rm",
            "--max_steps",
            8,
            "--num_eval_prompts",
            0,
            "--num_norm_samples",
            16,
            *common,
        ],
        1,
        cores,
    )

    rows = []
    for n in args.processes:
        threads = max(1, cores // n)
        ppo = work / f"ppo_{n}"
        wall = run(
            [
                ROOT / "scripts/ppo.py",
                "--config",
                tiny / "ppo.yaml",
                "--model_name_or_path",
                work / "sft/final",
                "--reward_model_path",
                work / "rm/final",
                "--output_dir",
                ppo,
                "--batch_size",
                args.batch_size,
                "--total_episodes",
                args.batch_size * args.steps,
                "--num_eval_prompts",
                0,
                "--save_steps",
                10**6,
                *common,
            ],
            n,
            threads,
        )
        steps = [r for r in runlog.read_jsonl(ppo / "metrics.jsonl") if "time/update_s" in r][1:]
        median = lambda key: statistics.median(r[key] for r in steps)  # noqa: B023 (used in this iteration)
        rows.append(
            {
                "stage": "ppo",
                "processes": n,
                "threads_each": threads,
                "wall_s": round(wall, 1),
                "step_s": round(args.batch_size / median("perf/episodes_per_s"), 4),
                "rollout_s": round(median("time/rollout_s"), 4),
                "update_s": round(median("time/update_s"), 4),
            }
        )
        sft = work / f"sft_{n}"
        wall = run(
            [
                ROOT / "scripts/sft.py",
                "--config",
                tiny / "sft.yaml",
                "--model_name_or_path",
                base,
                "--output_dir",
                sft,
                "--max_steps",
                args.steps,
                "--num_eval_prompts",
                0,
                "--per_device_train_batch_size",
                args.batch_size // n,
                "--save_steps",
                10**6,
                *common,
            ],
            n,
            threads,
        )
        runtime = next(r for r in runlog.read_jsonl(sft / "metrics.jsonl") if "train_runtime" in r)
        rows.append(
            {
                "stage": "sft",
                "processes": n,
                "threads_each": threads,
                "wall_s": round(wall, 1),
                "step_s": round(runtime["train_runtime"] / args.steps, 4),
            }
        )

    label = f"random GPT-2, hidden {args.hidden}, {args.layers} blocks" if args.hidden else "tiny-random-gpt2"
    print(f"{label}: {parameters(base) / 1e6:.2f}M parameters, global batch {args.batch_size}, {cores} cores")
    print("| stage | processes x threads | s/step | rollout s | update s | wall s (launch included) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['processes']} x {r['threads_each']} | {r['step_s']} | {r.get('rollout_s', '')} "
            f"| {r.get('update_s', '')} | {r['wall_s']} |"
        )
    out = Path(args.out) if args.out else work
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(
        json.dumps(
            {
                "model": label,
                "parameters": parameters(base),
                "global_batch": args.batch_size,
                "steps": args.steps,
                "cores": cores,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
