#!/usr/bin/env python
"""The hand-written PPO under each launch config against a plain run, and resumed from its own checkpoint
(docs/scaling_out.md). For a GPU machine: FSDP and DeepSpeed run on GPUs only.

    python scripts/check_engines.py [--engines fsdp zero3] [--num_processes 1] [--out /tmp/check_engines]

1. A tiny SFT model and reward model (the tiny random GPT-2, float32), plain.
2. PPO on them (configs/tiny/ppo.yaml, 4 steps, checkpoints every 2): plain, then under
   `accelerate launch --config_file configs/accelerate/ENGINE.yaml --num_processes N` for each engine.
3. Each engine's run copied with its step-4 checkpoint, final/ and finished mark removed (as a kill leaves it)
   and launched again: it must resume from step 2.
Prints, for each engine: the largest relative difference of any logged number (timings aside) from the plain
run, of the before/after evaluations, of the final weights, and the same between the resumed run and the run
never stopped. With N = 1 the numbers should equal the plain run's up to float32 rounding; with N > 1 the
processes draw their own rollouts, so only the resume comparison is exact (compare with ddp.yaml at the same
N instead). Also runs each engine once in bfloat16-mixed with the shared critic (reported, not compared).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list, log: Path) -> None:
    with log.open("w") as out:
        result = subprocess.run([str(a) for a in args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"failed ({log}):\n" + "".join(log.read_text().splitlines(keepends=True)[-30:]))


def steps(run_dir: Path) -> list[dict]:
    from rlhf_toy import runlog

    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))}
        for r in runlog.read_jsonl(run_dir / "metrics.jsonl")
        if "objective/scores" in r
    ]


def differences(run_dir: Path, reference: Path) -> dict:
    """Largest differences from `reference`: logged numbers (relative, over max(1, |x|)), evaluations, weights."""
    from safetensors.torch import load_file

    ours, theirs = steps(run_dir), steps(reference)
    assert len(ours) == len(theirs) and all(a.keys() == b.keys() for a, b in zip(ours, theirs)), (
        "different metrics"
    )
    metrics = max(abs(a[k] - b[k]) / max(1.0, abs(b[k])) for a, b in zip(ours, theirs) for k in b)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (run_dir, reference)]
    evaluations = max(
        abs(summaries[0][w][k] - summaries[1][w][k])
        for w in ("before", "after")
        for k, v in summaries[1][w].items()
        if isinstance(v, (int, float))
    )
    weights = [load_file(d / "final/model.safetensors") for d in (run_dir, reference)]
    assert weights[0].keys() == weights[1].keys(), "final/ holds different tensors"
    final = max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[1])
    return {"metrics": metrics, "evaluations": evaluations, "final_weights": final}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--engines", nargs="+", default=["fsdp", "zero3"], help="configs/accelerate/ENGINE.yaml"
    )
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/check_engines"))
    args = parser.parse_args()
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    python = [sys.executable]
    run(
        python
        + [
            "scripts/sft.py",
            "--config",
            "configs/tiny/sft.yaml",
            "--output_dir",
            out / "sft",
            "--num_eval_prompts",
            "0",
            "--max_steps",
            "12",
        ],
        out / "sft.log",
    )
    run(
        python
        + [
            "scripts/train_reward.py",
            "--config",
            "configs/tiny/reward.yaml",
            "--output_dir",
            out / "reward",
            "--model_name_or_path",
            out / "sft/final",
            "--policy_model",
            out / "sft/final",
            "--num_eval_prompts",
            "0",
        ],
        out / "reward.log",
    )
    ppo = [
        "scripts/ppo.py",
        "--config",
        "configs/tiny/ppo.yaml",
        "--model_name_or_path",
        out / "sft/final",
        "--reward_model_path",
        out / "reward/final",
        "--prompts",
        "data/prompts_train.jsonl",
        "--eval_prompts",
        "data/prompts_eval.jsonl",
        "--total_episodes",
        32,
        "--save_steps",
        2,
    ]
    run(python + ppo + ["--output_dir", out / "plain"], out / "plain.log")
    report = {}
    for engine in args.engines:
        launch = python + [
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            f"configs/accelerate/{engine}.yaml",
            "--num_processes",
            args.num_processes,
        ]
        whole, killed = out / engine, out / f"{engine}-killed"
        run(launch + ppo + ["--output_dir", whole], out / f"{engine}.log")
        shutil.copytree(whole, killed)
        for name in ("checkpoints/step-4", "final", "finished.json"):
            path = killed / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        run(launch + ppo + ["--output_dir", killed], out / f"{engine}-killed.log")
        resumed = "resuming from" in (out / f"{engine}-killed.log").read_text()
        bf16 = out / f"{engine}-bf16-shared-critic"
        run(
            launch + ppo + ["--output_dir", bf16, "--dtype", "bfloat16-mixed", "--critic", "shared"],
            out / f"{bf16.name}.log",
        )
        shards = whole / "checkpoints/step-4/engine"  # DDP has none: rank 0 saves the one copy
        report[engine] = {
            "checkpoint_engine_files": sorted(p.name for p in shards.iterdir()) if shards.exists() else [],
            "vs_plain": differences(whole, out / "plain"),
            "resumed_from_step_2": resumed,
            "resumed_vs_never_stopped": differences(killed, whole),
            "bf16_shared_critic_last_step": {
                k: steps(bf16)[-1][k] for k in ("objective/scores", "objective/kl")
            },
        }
    print(json.dumps(report, indent=2))
    (out / "check_engines.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
