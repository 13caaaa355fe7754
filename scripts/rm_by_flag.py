"""Where a reward model disagrees with the gold judge: held-out preference pairs grouped by the kind of junk
that gold flags on one side only, and how often the RM orders those pairs as gold does.

    python scripts/rm_by_flag.py runs/reward/final [--dataset data/preferences.jsonl] [--eval_fraction 0.1]
                                 [--plot reports/rm_calibration.png]

The held-out pairs are the reward stage's own (the same split by prompt, the same seed); gold ties are
left out. Cut samples are judged as the labeler judged them (`truncated=True`, from data/samples.jsonl).
Then the RM's calibration on the same pairs (all of them): its expected calibration error, and with --plot its
reliability diagram beside gold's own Bradley–Terry probability (as the reward stage writes rm_calibration.png).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from rlhf_toy import data, task
from rlhf_toy.scoring import RewardScorer, response_text
from rlhf_toy.stages.reward import clean_pairs, held_out_calibration


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("reward_model")
    parser.add_argument("--dataset", default="data/preferences.jsonl")
    parser.add_argument(
        "--samples", default="data/samples.jsonl", help="which answers were cut at the token limit"
    )
    parser.add_argument("--eval_fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="write the reliability diagram here (a .png)")
    args = parser.parse_args(argv)
    records = data.load_records(args.dataset, data.PREFERENCE_FIELDS)
    pairs, _ = clean_pairs(records, args.dataset)
    _, held_out = data.split_records(pairs, args.eval_fraction, args.seed)
    cut = {
        task.shown_answer(s["response"], s["has_eos"]): not s["has_eos"]
        for s in map(json.loads, Path(args.samples).read_text().splitlines())
    }
    scorer = RewardScorer(args.reward_model)
    prompts = [p["prompt"] for p in held_out]
    raw_chosen = scorer.score_raw(prompts, [p["chosen"] for p in held_out])
    raw_rejected = scorer.score_raw(prompts, [p["rejected"] for p in held_out])
    chosen_rm = (raw_chosen * scorer.gain + scorer.bias).tolist()  # = scorer.score
    rejected_rm = (raw_rejected * scorer.gain + scorer.bias).tolist()
    title_of = {
        json.dumps(r["prompt"]): r.get("title") for r in records
    }  # clean_pairs keeps only what TRL reads
    groups, n_pairs = defaultdict(list), 0
    for pair, rm_c, rm_r in zip(held_out, chosen_rm, rejected_rm):
        if pair["gold_chosen"] == pair["gold_rejected"]:
            continue
        n_pairs += 1
        title = title_of.get(json.dumps(pair["prompt"]))
        texts = [response_text(pair[side]) for side in ("chosen", "rejected")]
        flags = [set(task.gold_parts(t, title, truncated=cut.get(t, False))["flags"]) for t in texts]
        agrees = (rm_c > rm_r) == (pair["gold_chosen"] > pair["gold_rejected"])
        for kind in (flags[0] ^ flags[1]) or {"(same flags)"}:
            groups[kind].append(agrees)
    print("| what differs between the two answers | pairs | RM orders as gold |\n|---|---|---|")
    for kind, agree in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"| {kind} | {len(agree)} | {sum(agree) / len(agree):.2f} |")
    print(f"\n{n_pairs} held-out pairs without a gold tie; a pair counts under each flag it differs in.")
    calibration = held_out_calibration(
        raw_chosen.tolist(), raw_rejected.tolist(), pairs=held_out, dataset=args.dataset, plot_path=args.plot
    )
    print(
        f"\ncalibration on all {len(held_out)} held-out pairs (both orders): ECE {calibration['ece']:.3f}\n"
    )
    print("| RM's P(a ≻ b) | pairs | mean P | labels chose a | gold's P |\n|---|---|---|---|---|")
    for b in calibration["bins"]:
        print(
            f"| {b['low']:.1f}-{b['high']:.1f} | {b['n']} | {b['confidence']:.3f} | {b['frequency']:.3f} | "
            f"{b.get('reference', float('nan')):.3f} |"
        )


if __name__ == "__main__":
    main()
