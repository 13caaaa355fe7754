"""The verifiable-reward tasks' prompts (`rlhf_toy/rlvr.py`), with a fixed seed.

    python scripts/make_rlvr_data.py [--low 1] [--high 19] [--n_eval 128] [--seed 0] [--out data]

Sums: OUT/rlvr/{train,eval}.jsonl, every (a, b) with low <= a, b <= high, split by pair. The word task:
OUT/rlvr_word/{train,eval}.jsonl, one prompt per film of the film task's train and test prompts
(OUT/prompts_train.jsonl, OUT/prompts_test.jsonl: titles never tuned on).
"""

import argparse
from pathlib import Path

from rlhf_toy import data, rlvr

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--low", type=int, default=1)
    parser.add_argument("--high", type=int, default=19)
    parser.add_argument("--n_eval", type=int, default=128, help="(a, b) pairs held out for evaluation")
    parser.add_argument("--word", default="brilliant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="data")
    args = parser.parse_args()
    out = Path(args.out)
    train, held_out = rlvr.make_prompts(args.low, args.high, args.n_eval, args.seed)
    sizes = rlvr.write_prompts(out / "rlvr", {"train": train, "eval": held_out})
    print(
        f"{out / 'rlvr'}: train {sizes['train']} prompts, eval {sizes['eval']} (a, b in {args.low}..{args.high})"
    )
    films = {
        split: data.load_prompt_records(str(out / f"prompts_{split}.jsonl")) for split in ("train", "test")
    }
    sizes = rlvr.write_prompts(
        out / "rlvr_word",
        {
            "train": rlvr.word_prompts(films["train"], args.word),
            "eval": rlvr.word_prompts(films["test"], args.word),
        },
    )
    print(
        f"{out / 'rlvr_word'}: train {sizes['train']} prompts, eval {sizes['eval']} (the word {args.word!r})"
    )
