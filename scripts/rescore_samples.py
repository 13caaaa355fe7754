"""A compare report's stored answers rescored by the current gold judge, beside the gold they were stored with:
what a change of the judge does to a study without resampling it (the answers stay those the models wrote).

    python scripts/rescore_samples.py reports/overopt --prompts data/prompts_eval.jsonl [--bon 1 4 16 64]

One row per samples/LABEL.jsonl (mean KL, stored gold, gold now) and, with --bon, best-of-n re-picked from
samples/ref-candidates.jsonl by the stored RM scores (the RM did not change, so the pick is the report's).
"""

import argparse
import json
import math
import statistics
from pathlib import Path

from rlhf_toy import task
from rlhf_toy.data import load_prompt_records
from rlhf_toy.evaluation.compare import Entry, best_of_n_rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("report", type=Path, help="a compare report directory (with samples/)")
    parser.add_argument("--prompts", default="data/prompts_eval.jsonl", help="the file its prompt_ids index")
    parser.add_argument("--bon", type=int, nargs="*", default=[], help="best-of-n values to re-pick")
    args = parser.parse_args(argv)
    titles = [r.get("title") for r in load_prompt_records(args.prompts)]
    read = lambda path: [json.loads(line) for line in path.open()]

    def row(label: str, rows: list[dict]) -> str:
        now = statistics.mean(task.gold_score(r["response"], titles[r["prompt_id"]]) for r in rows)
        stored = statistics.mean(r["gold"] for r in rows)
        kl = statistics.mean(r["kl"] for r in rows if r.get("kl") is not None)
        return f"| {label} | {kl:.2f} | {stored:.3f} | {now:.3f} |"

    print(f"| model | KL | gold stored | gold v{task.GOLD_VERSION} |\n|---|---|---|---|")
    candidates = args.report / "samples" / "ref-candidates.jsonl"
    for n in args.bon:
        picked = best_of_n_rows(Entry(f"bon:{n}", "", f"bon:{n}", best_of=n), read(candidates), 1)
        print(row(f"bon:{n}", [{**r, "kl": math.log(n) - (n - 1) / n} for r in picked]))
    for path in sorted((args.report / "samples").glob("*.jsonl"), key=lambda p: (len(p.stem), p.stem)):
        if path.name != "ref-candidates.jsonl":
            print(row(path.stem, read(path)))


if __name__ == "__main__":
    main()
