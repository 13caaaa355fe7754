"""Overlay PPO runs' training curves: RM score, gold, response length and KL per step.

python scripts/plot_runs.py runs/ppo runs/ppo_hack --output reports/hacking/curves.png
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlhf_toy.runlog import read_jsonl  # noqa: E402

PANELS = [
    ("score/rm", "RM score (normalised)"),
    ("score/gold", "gold (never a reward)"),
    ("response/length_mean", "response length (tokens)"),
    ("objective/kl", "KL to reference (nats)"),
]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run directories, or LABEL=DIR")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4))
    for spec in args.runs:
        label, _, path = spec.rpartition("=")
        path = Path(path)
        records = [r for r in read_jsonl(path / "metrics.jsonl") if "score/rm" in r]
        if not records:
            raise SystemExit(f"error: {path}/metrics.jsonl has no PPO steps")
        for ax, (key, title) in zip(axes, PANELS):
            ax.plot(
                [r["step"] for r in records], [r[key] for r in records], marker=".", label=label or path.name
            )
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("PPO step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
