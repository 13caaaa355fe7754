#!/usr/bin/env python
"""Benchmark our PPO against TRL 1.12's PPOTrainer at matched settings, in one run.

    python scripts/bench_ppo.py --config configs/crosscheck.yaml [--total_episodes 24] [--repeats 2]
                                [--dtypes float32,bfloat16-mixed] [--speedups] [--lora] [--shared_critic]
                                [--profile] [--bench_dir reports/bench] [--field value ...]

Settings are `rlhf_toy.verify.trl_run.CrosscheckRunConfig` (the PPO config plus the cross-check's output, so both
trainers are matched exactly as there). Each trainer phase runs in a fresh subprocess (peak RSS only
grows within a process), alternating ours / TRL / ours / TRL ..., so machine load drifts hit both.
Per phase: episodes/s and response tokens/s over the steps after the first (warm-up), the time
split (generation, scoring, reference forward, value forward, update), and peak RSS (VmHWM, read at
the end of every PPO step, so checkpoint writing after training is not counted). Reported: medians
over repeats, and the ratios ours/TRL. `--lora` adds a LoRA phase per trainer (reference = the same
weights with the adapter disabled) and reports the memory saved. `--shared_critic` adds, in every
repeat, a phase of ours with `critic: shared` (value head on the policy's trunk, lm-human-preferences'
architecture: NOT matched to TRL's separate critic, reported as its own row). `--profile` adds one torch-profiler
run of our PPO (step 2 of 2) and writes the top operators to `profile_ours.txt`.
`--dtypes`: every repeat runs both trainers in each precision (TRL's mixed precision is its `bf16=True`
with float32 weights). `--speedups` adds, in the last precision, phases of ours with one speed-up changed at a
time: `trim_padding: false` (each repeat) and `compile: true` (torch.compile of the update's forward and
backward; one phase, whose first two steps pay the compilation and are not timed), each gain reported alone.
Model FLOPs utilisation of our update: 6 x non-embedding parameters (policy + critic) x the token positions the
update ran on, per second of update, against a large matmul of the same dtype measured on the same cores.
Writes bench.md and bench.json to --bench_dir and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

SPLIT = ("generation", "scoring", "ref_forward", "value_forward", "update")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# child: one trainer phase
# ----------------------------------------------------------------------------------------------
def child(kind: str, cfg_json: str, out_json: str, profile_dir: str | None) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from rlhf_toy.verify import trl_run as X

    cfg = X.CrosscheckRunConfig(**json.loads(Path(cfg_json).read_text()))
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    rss_per_step: list[float] = []
    work = Path(cfg.work_dir) / f"bench_{kind}"
    if kind == "ours":
        prof = None
        if profile_dir:
            from torch.profiler import ProfilerActivity, profile, schedule

            prof = profile(
                activities=[ProfilerActivity.CPU],
                schedule=schedule(wait=1, warmup=0, active=1),
                record_shapes=True,
            )
            prof.start()

        def on_step_end(step, metrics):
            # Peak RSS at the end of each step, before its checkpoint (serialisation buffers are not training memory).
            rss_per_step.append(peak_rss_mb())
            if prof is not None:
                prof.step()

        res = X.run_ours(cfg, work, num_eval_prompts=0, on_step_end=on_step_end)
        if prof is not None:
            prof.stop()
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
            ka = prof.key_averages()
            text = [
                "# torch.profiler, one PPO step of ours (step 2), CPU",
                "",
                "## by self CPU time",
                ka.table(sort_by="self_cpu_time_total", row_limit=30),
                "",
                "## by total CPU time (includes children)",
                ka.table(sort_by="cpu_time_total", row_limit=40),
            ]
            (Path(profile_dir) / "profile_ours.txt").write_text("\n".join(text) + "\n")
    else:
        from transformers import TrainerCallback

        class RSS(TrainerCallback):
            def on_step_end(self, *a, **k):
                rss_per_step.append(peak_rss_mb())

        res = X.run_trl(cfg, work, evaluate_after=False, callbacks=[RSS()])
    warmup = 2 if cfg.compile else 1  # compile: the first steps compile (new shapes); time the rest
    res["steps"] = res["steps"][warmup - 1 :]
    tp = X.throughput(res, cfg.batch_size)
    steps = res["steps"][1:] or res["steps"]
    split = {k: statistics.median(s.get(f"time/{k}_s") or 0.0 for s in steps) for k in SPLIT}
    update = {
        "update_tokens": sum(s.get("perf/update_tokens") or 0 for s in steps),
        "update_s": sum(s.get("time/update_s") or 0.0 for s in steps),
    }
    Path(out_json).write_text(
        json.dumps(
            {
                "kind": kind,
                "lora": cfg.use_lora,
                "dtype": cfg.dtype,
                **tp,
                "split_median_s": split,
                **update,
                "peak_rss_mb": max(rss_per_step) if rss_per_step else peak_rss_mb(),
                "step_s": [s["step_s"] for s in res["steps"]],
                "num_threads": torch.get_num_threads(),
            }
        )
    )


# ----------------------------------------------------------------------------------------------
# parent: alternate phases, summarise
# ----------------------------------------------------------------------------------------------
def run_phase(kind: str, cfg, tmp: Path, profile_dir: str | None = None) -> dict:
    cfg_path = tmp / f"cfg_{kind}_{time.time_ns()}.json"
    out = cfg_path.with_suffix(".out.json")
    cfg_path.write_text(json.dumps(asdict(cfg)))
    cmd = [sys.executable, __file__, "--child", kind, "--cfg_json", str(cfg_path), "--out_json", str(out)]
    if profile_dir:
        cmd += ["--profile_dir", profile_dir]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # report it and go on: the other phases still measure something
        print(f"  {kind} phase (lora={cfg.use_lora}) FAILED:\n{proc.stderr[-2000:]}", flush=True)
        return None
    res = json.loads(out.read_text())
    res["phase_wall_s"] = time.time() - started
    print(
        f"  {kind:4s} {cfg.dtype:14s} lora={cfg.use_lora!s:5s} critic={cfg.critic:8s} trim={cfg.trim_padding!s:5s} "
        f"compile={cfg.compile!s:5s} {res['episodes_per_s']:.3f} episodes/s, "
        f"{res['tokens_per_s']:.1f} tokens/s, peak RSS {res['peak_rss_mb']:.0f} MB "
        f"({res['phase_wall_s']:.0f} s)",
        flush=True,
    )
    return res


def med(rows, key):
    return statistics.median(r[key] for r in rows)


def summarise(rows: list[dict]) -> dict:
    return {
        "episodes_per_s": med(rows, "episodes_per_s"),
        "tokens_per_s": med(rows, "tokens_per_s"),
        "step_s_median": med(rows, "step_s_median"),
        "peak_rss_mb": med(rows, "peak_rss_mb"),
        "split_median_s": {k: statistics.median(r["split_median_s"][k] for r in rows) for k in SPLIT},
        "update_tokens_per_s": sum(r.get("update_tokens", 0) for r in rows)
        / max(sum(r.get("update_s", 0) for r in rows), 1e-9),
        "runs": len(rows),
    }


def nonembedding_parameters(path: str, head: str) -> int:
    """Parameters a token's forward pass multiplies by, embeddings and LM head excluded (Kaplan et al.'s N)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_toy import models

    config = AutoConfig.from_pretrained(models.resolve_model_path(path), num_labels=1)
    with torch.device("meta"):
        model = (
            AutoModelForCausalLM if head == "causal" else AutoModelForSequenceClassification
        ).from_config(config)
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    if head == "causal":
        embeddings |= {id(p) for p in model.get_output_embeddings().parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def format_table(summary: dict) -> str:
    head = (
        "| phase | episodes/s | tokens/s | s/step | generation | scoring | ref fwd | value fwd | update+rest "
        "| peak RSS MB | runs |"
    )
    lines = [head, "|" + "---|" * 11]
    for name, s in summary.items():
        sp = s["split_median_s"]
        lines.append(
            f"| {name} | {s['episodes_per_s']:.3f} | {s['tokens_per_s']:.1f} | {s['step_s_median']:.2f} | "
            + " | ".join(f"{sp[k]:.2f}" for k in SPLIT)
            + f" | {s['peak_rss_mb']:.0f} | {s['runs']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="phases per trainer (alternating)")
    ap.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated precisions to run both trainers in "
        "(default: the config's dtype), e.g. float32,bfloat16-mixed",
    )
    ap.add_argument(
        "--speedups",
        action="store_true",
        help="also ours without trimming, and ours compiled (in the last precision)",
    )
    ap.add_argument("--lora", action="store_true", help="also one LoRA phase per trainer")
    ap.add_argument(
        "--shared_critic",
        action="store_true",
        help="also a phase of ours with critic=shared in every repeat (not matched to TRL)",
    )
    ap.add_argument("--profile", action="store_true", help="also profile one PPO step of ours")
    ap.add_argument("--bench_dir", default="reports/bench")
    ap.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--cfg_json", help=argparse.SUPPRESS)
    ap.add_argument("--out_json", help=argparse.SUPPRESS)
    ap.add_argument("--profile_dir", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.child:
        child(args.child, args.cfg_json, args.out_json, args.profile_dir)
        return 0

    from rlhf_toy.config import parse_config
    from rlhf_toy.verify.trl_run import CrosscheckRunConfig

    cfg = parse_config(CrosscheckRunConfig, rest)
    bench_dir = Path(args.bench_dir)
    bench_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"bench: {cfg.model_name_or_path} (RM {cfg.reward_model_path}), {cfg.num_steps} steps of {cfg.batch_size}, "
        f"{cfg.num_ppo_epochs} epochs x {cfg.num_mini_batches} minibatches, {cfg.response_length} new tokens, "
        f"{args.repeats} alternating phases per trainer",
        flush=True,
    )
    from dataclasses import replace

    dtypes = args.dtypes.split(",") if args.dtypes else [cfg.dtype]
    last = dtypes[-1]
    phases: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for repeat in range(args.repeats):
            for dtype in dtypes:
                dcfg = replace(cfg, dtype=dtype)
                phases.setdefault(f"ours {dtype}", []).append(run_phase("ours", dcfg, tmp))
                phases.setdefault(f"TRL {dtype}", []).append(run_phase("trl", dcfg, tmp))
                if args.shared_critic:
                    phases.setdefault(f"ours {dtype} shared critic", []).append(
                        run_phase("ours", replace(dcfg, critic="shared"), tmp)
                    )
            if args.speedups:
                phases.setdefault(f"ours {last} no trimming", []).append(
                    run_phase("ours", replace(cfg, dtype=last, trim_padding=False), tmp)
                )
                if repeat == 0:  # one compiled phase: it pays minutes of compilation on a CPU
                    phases.setdefault(f"ours {last} compiled", []).append(
                        run_phase("ours", replace(cfg, dtype=last, compile=True), tmp)
                    )
        if args.lora:
            lcfg = replace(cfg, dtype=last, use_lora=True)
            phases[f"ours {last} LoRA"] = [run_phase("ours", lcfg, tmp)]
            phases[f"TRL {last} LoRA"] = [run_phase("trl", lcfg, tmp)]
        if args.profile:
            run_phase(
                "ours",
                replace(cfg, dtype=last, total_episodes=2 * cfg.batch_size),
                tmp,
                profile_dir=str(bench_dir),
            )
        import torch

        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        from check_device import matmul_flops  # the sibling script's: one matmul-peak measurement

        from rlhf_toy import models

        cpu = torch.device("cpu")  # after the phases: the machine alone
        peaks = {dtype: matmul_flops(cpu, models.resolve_precision(dtype, cpu).compute) for dtype in dtypes}
    phases = {k: [r for r in v if r is not None] for k, v in phases.items()}
    summary = {k: summarise(v) for k, v in phases.items() if v}
    if not any(k.startswith("ours") for k in summary) or not any(k.startswith("TRL") for k in summary):
        print(f"no complete ours/TRL pair of phases; profile (if asked) in {bench_dir / 'profile_ours.txt'}")
        return 0
    eps = {k: v["episodes_per_s"] for k, v in summary.items()}
    ratios = {}
    for dtype in dtypes:
        if f"ours {dtype}" in eps and f"TRL {dtype}" in eps:
            ratios[f"episodes/s ours/TRL, {dtype}"] = eps[f"ours {dtype}"] / eps[f"TRL {dtype}"]
            ratios[f"peak RSS ours/TRL, {dtype}"] = (
                summary[f"ours {dtype}"]["peak_rss_mb"] / summary[f"TRL {dtype}"]["peak_rss_mb"]
            )
    if len(dtypes) > 1:
        for who in ("ours", "TRL"):
            if f"{who} {dtypes[0]}" in eps and f"{who} {last}" in eps:
                ratios[f"episodes/s {who}, {last}/{dtypes[0]}"] = (
                    eps[f"{who} {last}"] / eps[f"{who} {dtypes[0]}"]
                )
    for name, label in (
        (f"ours {last} no trimming", "trimming padding"),
        (f"ours {last} compiled", "torch.compile"),
    ):
        if name in eps and f"ours {last}" in eps:
            with_it, without = (
                (eps[f"ours {last}"], eps[name])
                if label == "trimming padding"
                else (eps[name], eps[f"ours {last}"])
            )
            ratios[f"episodes/s gained by {label} alone, {last}"] = with_it / without
            update_with, update_without = (
                (summary[f"ours {last}"], summary[name])
                if label == "trimming padding"
                else (summary[name], summary[f"ours {last}"])
            )
            ratios[f"update s/step with/without {label}, {last}"] = (
                update_with["split_median_s"]["update"] / update_without["split_median_s"]["update"]
            )
    if f"ours {last} shared critic" in eps:
        ratios[f"episodes/s ours shared critic/TRL (not matched), {last}"] = (
            eps[f"ours {last} shared critic"] / eps[f"TRL {last}"]
        )
    if f"ours {last} LoRA" in summary and f"TRL {last} LoRA" in summary:
        ratios[f"peak RSS saved by LoRA, ours (MB), {last}"] = (
            summary[f"ours {last}"]["peak_rss_mb"] - summary[f"ours {last} LoRA"]["peak_rss_mb"]
        )
        ratios[f"peak RSS saved by LoRA, TRL (MB), {last}"] = (
            summary[f"TRL {last}"]["peak_rss_mb"] - summary[f"TRL {last} LoRA"]["peak_rss_mb"]
        )
    n_params = nonembedding_parameters(cfg.model_name_or_path, "causal") + (
        0 if cfg.critic == "shared" else nonembedding_parameters(cfg.reward_model_path, "value")
    )
    mfu = {}
    for name, s_ in summary.items():
        dtype = next(d for d in dtypes if f" {d}" in f" {name} ")
        if (
            name.startswith("ours")
            and "shared" not in name
            and "LoRA" not in name
            and s_["update_tokens_per_s"]
        ):
            achieved = 6 * n_params * s_["update_tokens_per_s"]
            mfu[name] = {
                "update_gflops": achieved / 1e9,
                "peak_gflops": peaks[dtype] / 1e9,
                "mfu": achieved / peaks[dtype],
            }
    table = format_table(summary)
    from rlhf_toy import models, runlog

    environment = runlog.environment(models.resolve_precision(last, models.pick_device(cfg.device)))
    mfu_lines = [
        f"- {name}: update at **{m['update_gflops']:.1f} GFLOP/s** of model FLOPs vs a {m['peak_gflops']:.0f} "
        f"GFLOP/s matmul peak in its compute dtype: **MFU {100 * m['mfu']:.0f}%**"
        for name, m in mfu.items()
    ]
    md = "\n".join(
        [
            "# PPO benchmark: ours vs TRL `PPOTrainer`, matched settings",
            "",
            f"Command: `python scripts/bench_ppo.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
            "",
            f"Policy/ref `{cfg.model_name_or_path}`, RM/value init `{cfg.reward_model_path}`, on {cfg.device}, "
            f"torch threads {next(iter(phases.values()))[0]['num_threads']}. {cfg.num_steps} PPO steps of "
            f"{cfg.batch_size} episodes per phase ({cfg.num_ppo_epochs} epochs x {cfg.num_mini_batches} minibatches, "
            f"up to {cfg.response_length} new tokens, T={cfg.temperature}); the first step of each phase "
            "is warm-up and "
            "not timed (the first two with compile). Each phase is a fresh process; phases alternate. Medians over "
            "phases. Time split: median seconds per step; 'update+rest' is the step time minus the four rollout parts "
            "(PPO epochs, GAE, logging). Peak RSS: VmHWM at the end of the last step (model loading "
            "included, checkpoint "
            "writing not).",
            "",
            table,
            "",
            *[f"- {k}: **{v:.2f}**" + ("" if "MB" in k else "x") for k, v in ratios.items()],
            "",
            "Model FLOPs utilisation of our update (6 x N x positions; N = non-embedding parameters of "
            "policy + critic = "
            f"{n_params / 1e6:.1f} M; the LM head and attention scores are not counted, so this is a lower bound):",
            "",
            *mfu_lines,
            "",
            runlog.environment_line(environment),
            "",
        ]
    )
    (bench_dir / "bench.md").write_text(md)
    (bench_dir / "bench.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "summary": summary,
                "ratios": ratios,
                "mfu": mfu,
                "environment": environment,
                "phases": phases,
            },
            indent=2,
        )
        + "\n"
    )
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
