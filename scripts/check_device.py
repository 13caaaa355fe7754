#!/usr/bin/env python
"""Check this machine's accelerator path and time the PPO update on it, without the embedded model.

    python scripts/check_device.py [--steps 4] [--out DIR]

1. What `dtype: auto` resolves to here (bfloat16-mixed where the device has native bf16, else float32).
2. The pipeline on the tiny random GPT-2 with `dtype: auto` on the default device: SFT -> reward -> PPO -> DPO
   (a few steps each). Checks each run's config.yaml names the resolved dtype, the saved weights are float32
   under mixed precision, and PPO's rollout/update approx-KL stays below 1e-3.
3. The update's forward + backward + AdamW step (`trainer.update_forward`, the PPO update's own code) on a
   randomly initialised model of SmolLM2-135M's architecture (policy) and its 12-block critic, one minibatch
   of 32 x (96 prompt + 40 response) tokens, float32 vs bfloat16-mixed: seconds per step, model FLOP/s and
   their fraction of a large matmul's FLOP/s in the same dtype (MFU). Speed depends on shapes, not weights.
Prints a JSON report (and writes it to --out/check_device.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# SmolLM2-135M's architecture (its config.json), with random weights: no download, the same FLOPs.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def tiny_pipeline(work: Path) -> dict:
    import yaml
    from safetensors import safe_open

    from rlhf_toy import runlog
    from rlhf_toy.config import parse_config
    from rlhf_toy.stages.dpo import DPOStageConfig, run_dpo
    from rlhf_toy.stages.ppo.config import PPOStageConfig
    from rlhf_toy.stages.ppo.trainer import train_ppo
    from rlhf_toy.stages.reward import RewardStageConfig, train_reward
    from rlhf_toy.stages.sft import SFTStageConfig, run_sft

    def flags(name, **extra):
        values = {
            "config": ROOT / f"configs/tiny/{name}.yaml",
            "output_dir": work / name,
            "dtype": "auto",
            "device": "auto",
            **extra,
        }
        return [x for k, v in values.items() for x in (f"--{k}", str(v))]

    data = {"dataset": ROOT / "data/sft.jsonl", "eval_prompts": ROOT / "data/prompts_eval.jsonl"}
    timings, result = {}, {}
    for name, cls, run, extra in (
        ("sft", SFTStageConfig, run_sft, {"max_steps": 8, **data}),
        (
            "reward",
            RewardStageConfig,
            train_reward,
            {"model_name_or_path": work / "sft/final", "max_steps": 8, "policy_model": work / "sft/final"},
        ),
        (
            "ppo",
            PPOStageConfig,
            train_ppo,
            {
                "model_name_or_path": work / "sft/final",
                "total_episodes": 32,
                "reward_model_path": work / "reward/final",
            },
        ),
        (
            "dpo",
            DPOStageConfig,
            run_dpo,
            {"model_name_or_path": work / "sft/final", "max_steps": 8, "reward_model": work / "reward/final"},
        ),
    ):
        tick = time.time()
        run(parse_config(cls, flags(name, **extra)))
        timings[name] = round(time.time() - tick, 1)
        final = work / name / "final" / "model.safetensors"
        with safe_open(str(final), "pt") as f:
            dtypes = sorted({str(f.get_tensor(k).dtype) for k in f.keys()})
        result[name] = {
            "dtype": yaml.safe_load((work / name / "config.yaml").read_text())["dtype"],
            "saved_weights": dtypes,
            "wall_s": timings[name],
        }
    ppo_metrics = [
        r for r in runlog.read_jsonl(work / "ppo/metrics.jsonl") if "policy/approxkl_first_minibatch" in r
    ]
    result["ppo"]["approxkl_first_minibatch_max"] = max(
        r["policy/approxkl_first_minibatch"] for r in ppo_metrics
    )
    return result


def update_speed(
    device: torch.device,
    dtype_name: str,
    *,
    steps: int,
    batch: int = 32,
    prompt: int = 96,
    response: int = 40,
) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf_toy import models
    from rlhf_toy.stages.ppo.trainer import update_forward

    precision = models.resolve_precision(dtype_name, device)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(device, precision.weights)
    critic = LlamaForSequenceClassification(
        LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": 12}, num_labels=1, pad_token_id=0)
    ).to(device, precision.weights)
    parameters = [p for m in (policy, critic) for p in m.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-6, fused=device.type in ("cpu", "cuda"))
    ids = torch.randint(1, 49152, (batch, prompt + response), device=device)
    attention = torch.ones_like(ids)
    times = []
    for _ in range(steps + 1):  # the first is warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        with precision.autocast():
            logprobs, entropy, values = update_forward(policy, critic, ids, attention, prompt, 0.7, False)
        (-logprobs.mean() + values.pow(2).mean() - 0.0 * entropy.mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    step_s = statistics.median(times[1:])
    nonembedding = sum(p.numel() for n, p in policy.named_parameters() if "embed" not in n) + sum(
        p.numel() for n, p in critic.named_parameters() if "embed" not in n and "score" not in n
    )
    flops = 6 * nonembedding * ids.numel()
    peak = matmul_flops(device, precision.compute)
    del policy, critic, optimizer
    return {
        "dtype": precision.name,
        "step_s": round(step_s, 4),
        "model_tflops": round(flops / step_s / 1e12, 2),
        "matmul_peak_tflops": round(peak / 1e12, 1),
        "mfu": round(flops / step_s / peak, 3),
    }


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device` (median of 5 after a warm-up, this process's torch
    threads): the practical limit the update's model FLOP/s are measured against (here and in bench_ppo)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    return 2 * n**3 / statistics.median(times[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="timed update steps per precision")
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip_pipeline", action="store_true")
    args = parser.parse_args(argv)
    from rlhf_toy import models, runlog

    device = models.pick_device("auto")
    auto = models.resolve_precision("auto", device)
    report = {"environment": runlog.environment(auto), "auto_resolves_to": auto.name}
    if not args.skip_pipeline:
        with tempfile.TemporaryDirectory() as work:
            report["tiny_pipeline"] = tiny_pipeline(Path(work))
    report["update_speed"] = [
        update_speed(device, name, steps=args.steps) for name in ("float32", "bfloat16-mixed")
    ]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "check_device.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
