#!/usr/bin/env python
"""Check the hand-written PPO (rlhf_toy.stages.ppo.core) against TRL 1.12's PPOTrainer.

    python scripts/crosscheck_trl.py --numeric [--settings trl_defaults,k3_whiten_rewards] [--json out.json]
    python scripts/crosscheck_trl.py --config configs/crosscheck.yaml [--output_dir reports/crosscheck] \\
        [--field value ...]

--numeric: run TRL's own PPOTrainer.train() for one iteration per setting on a tiny random GPT-2 (built
locally, no download), observe its tensors, feed the same inputs to our core functions and print max |ours -
TRL| per quantity per setting, including one PPO step through our trainer itself (`trainer step:` line: every
tensor, the gradients before each optimizer step and the updated weights), and where our defaults differ from
TRL by design. Then the critic-free estimators against TRL's GRPOTrainer (loss_type grpo, dr_grpo, bnpo) and
RLOOTrainer (rlhf_toy.verify.trl_critic_free): advantages, loss and its gradient from the same rewards and
log-probs. Exit status 1 if a tolerance fails.

Run level (any other invocation; fields of rlhf_toy.verify.trl_run.CrosscheckRunConfig as flags):
train our PPO and TRL's PPOTrainer with matched hyperparameters (length penalty off, same beta, batch,
minibatches, epochs, learning rate, generation settings, seed) on the same models and prompt batches,
and write crosscheck.md, crosscheck.png (reward, KL, entropy, clip fraction of both overlaid) and
crosscheck.json to --output_dir: final gold and RM means on the eval prompts, and throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--numeric" not in argv and "--list" not in argv:
        return run_level(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--numeric", action="store_true", help="numeric cross-check of the PPO math (the default mode)"
    )
    ap.add_argument("--settings", default=None, help="comma-separated setting names (default: all)")
    ap.add_argument("--list", action="store_true", help="list the settings and exit")
    ap.add_argument("--json", default=None, help="also write the full report to this JSON file")
    args = ap.parse_args(argv)

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from rlhf_toy.verify import trl_critic_free, trl_numeric

    if args.list:
        for s in trl_numeric.DEFAULT_SETTINGS + trl_critic_free.SETTINGS:
            print(s["name"], {k: v for k, v in s.items() if k != "name"})
        return 0
    ppo_settings, critic_free_settings = trl_numeric.DEFAULT_SETTINGS, trl_critic_free.SETTINGS
    if args.settings:
        names = [n.strip() for n in args.settings.split(",") if n.strip()]
        known = {s["name"] for s in ppo_settings + critic_free_settings}
        unknown = [n for n in names if n not in known]
        if unknown:
            ap.error(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        ppo_settings = [s for s in ppo_settings if s["name"] in names]
        critic_free_settings = [s for s in critic_free_settings if s["name"] in names]

    reports = {}
    if ppo_settings:
        reports["ppo"] = trl_numeric.numeric_crosscheck(ppo_settings)
        print(trl_numeric.format_report(reports["ppo"]))
    if critic_free_settings:
        reports["critic_free"] = trl_critic_free.crosscheck(critic_free_settings)
        print(("\n" if ppo_settings else "") + trl_critic_free.format_report(reports["critic_free"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=2, default=str)
    return 0 if all(r["passed"] for r in reports.values()) else 1


def run_level(argv: list[str]) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from rlhf_toy.cli import run_stage
    from rlhf_toy.verify.trl_run import CrosscheckRunConfig, run_crosscheck

    def stage(cfg):
        report = run_crosscheck(cfg)
        print((Path(cfg.output_dir) / "crosscheck.md").read_text())
        return Path(cfg.output_dir) / "crosscheck.md" if report else None

    run_stage(CrosscheckRunConfig, stage, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
