"""How often the gold judge orders hand-written (good, bad) answer pairs correctly, per kind of junk.

    python scripts/gold_suite.py                                  # tests/adversarial/pairs.jsonl, gold v3
    python scripts/gold_suite.py --pairs tests/adversarial/holdout_pairs.jsonl
    python scripts/gold_suite.py --judge /tmp/task_v2.py          # another judge: a task.py of an older commit
    python scripts/gold_suite.py --judge /tmp/task_v2.py --save tests/adversarial/gold_v2_ordered.json
    python scripts/gold_suite.py --show wrong_title               # a kind's pairs that it orders wrongly

A pair counts as ordered when gold(good) > gold(bad) strictly (tests/adversarial/README.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from rlhf_toy import task
from rlhf_toy.verify.gold_suite import ordered_by_kind, read_pairs, shares


def load_judge(path: str | None):
    if not path:
        return task
    spec = importlib.util.spec_from_file_location("judge_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", default="tests/adversarial/pairs.jsonl")
    parser.add_argument("--judge", default=None, help="a task.py to load instead of rlhf_toy.task")
    parser.add_argument(
        "--show", default=None, help="print the misordered pairs of this kind ('all': every kind)"
    )
    parser.add_argument(
        "--save", default=None, help="add the shares to this JSON file, under the pairs file's name"
    )
    args = parser.parse_args(argv)
    judge, pairs = load_judge(args.judge), read_pairs(args.pairs)
    table = ordered_by_kind(pairs, judge)
    print("| kind | pairs | ordered |\n|---|---|---|")
    for kind, share in shares(table).items():
        print(f"| {kind} | {len(table[kind])} | {share:.0%} |")
    if args.save:
        saved = json.loads(Path(args.save).read_text()) if Path(args.save).exists() else {}
        saved[Path(args.pairs).name] = shares(table)
        Path(args.save).write_text(json.dumps(saved, indent=1) + "\n")
    total = [ok for oks in table.values() for ok in oks]
    print(f"| all | {len(total)} | {sum(total) / len(total):.1%} |")
    for pair in pairs:
        if args.show in ("all", pair["kind"]):
            good, bad = (judge.gold_parts(pair[s], pair["title"]) for s in ("good", "bad"))
            if not good["gold"] > bad["gold"]:
                print(
                    f"\n[{pair['kind']}] {pair['title']}\n  good {good['gold']:+.3f} {good.get('flags')}: "
                    f"{pair['good']}\n  bad  {bad['gold']:+.3f} {bad.get('flags')}: {pair['bad']}"
                )


if __name__ == "__main__":
    main()
