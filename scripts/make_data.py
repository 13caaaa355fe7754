"""Regenerate the toy task's data in data/ from the embedded model, with a fixed seed.

    python scripts/make_data.py [--model embedded:smollm2-135m-instruct] [--seed 0] [--out data]

Writes prompts_train.jsonl, prompts_eval.jsonl, sft.jsonl (best-of-n demonstrations by gold),
preferences.jsonl (pairs labelled by a Bradley-Terry draw on gold: noisy, like real labelers) and
data/README.md (the data card, with counts and statistics).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from rlhf_toy import models, sequences, task
from rlhf_toy.config import DTYPES


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="data")
    parser.add_argument("--n_train", type=int, default=600)
    parser.add_argument("--n_eval", type=int, default=200)
    parser.add_argument("--samples_per_prompt", type=int, default=4)
    parser.add_argument("--pairs_per_prompt", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="auto: bfloat16-mixed where the hardware has native bf16, float32 elsewhere")
    # Labelers prefer the higher-gold response with probability sigmoid((g_a - g_b) / temperature).
    parser.add_argument("--label_temperature", type=float, default=0.1)
    args = parser.parse_args(argv)

    started = time.time()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, eval_prompts = task.make_prompts(args.n_train, args.n_eval, args.seed)
    write_jsonl(out / "prompts_train.jsonl", train_prompts)
    write_jsonl(out / "prompts_eval.jsonl", eval_prompts)

    tokenizer = models.load_tokenizer(args.model)
    precision = models.resolve_precision(args.dtype, models.pick_device("auto"))
    args.dtype = precision.name   # recorded in stats.json: what ran
    model = models.load_causal_lm(args.model, tokenizer, dtype=precision.name)
    repeated = [row["prompt"] for row in train_prompts for _ in range(args.samples_per_prompt)]
    samples = sequences.generate(
        model, tokenizer, repeated, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, batch_size=args.batch_size, seed=args.seed, progress="sampling train prompts",
        precision=precision,
    )
    rng = random.Random(args.seed)
    sft_rows, pref_rows, flips = [], [], 0
    all_gold, demo_gold = [], []
    for i, row in enumerate(train_prompts):
        group = samples[i * args.samples_per_prompt:(i + 1) * args.samples_per_prompt]
        all_gold += [task.gold_score(s.response) for s in group]
        best = task.best_demonstration([(s.response, s.has_eos) for s in group])
        if best is not None:
            demo_gold.append(best[0])
            sft_rows.append({"prompt": row["prompt"], "completion": [{"role": "assistant", "content": best[1]}]})
        for chosen, rejected, gold_chosen, gold_rejected in task.label_pairs(
                [s.response for s in group], rng, args.pairs_per_prompt, args.label_temperature):
            flips += gold_chosen < gold_rejected
            pref_rows.append({
                "prompt": row["prompt"],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "gold_chosen": round(gold_chosen, 4), "gold_rejected": round(gold_rejected, 4),
            })
    write_jsonl(out / "sft.jsonl", sft_rows)
    write_jsonl(out / "preferences.jsonl", pref_rows)

    stats = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "model": args.model, "seed": args.seed,
        "prompts_train": len(train_prompts), "prompts_eval": len(eval_prompts),
        "samples": len(samples), "sft_demonstrations": len(sft_rows), "preference_pairs": len(pref_rows),
        "label_noise_rate": flips / max(1, len(pref_rows)),
        "sample_gold_mean": statistics.mean(all_gold), "sample_gold_std": statistics.pstdev(all_gold),
        "demo_gold_mean": statistics.mean(demo_gold),
        "sample_eos_rate": sum(s.has_eos for s in samples) / len(samples),
        "sample_tokens_mean": statistics.mean(len(s.response_ids) for s in samples),
        "minutes": (time.time() - started) / 60,
        **{k: v for k, v in vars(args).items() if k not in ("out", "model", "seed")},
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_data_card(out, stats)
    print(json.dumps(stats, indent=2))


def write_data_card(out: Path, stats: dict) -> None:
    """data/README.md: provenance, counts and gold statistics, from stats.json."""
    from rlhf_toy import task as t

    card = f"""# The toy task's data

Generated by `{stats["command"]}` (model `{stats["model"]}`, seed {stats["seed"]}, {stats["minutes"]:.0f} minutes
on a 2-core CPU in {stats.get("dtype", "float32")}). Regenerate with `make data`. Every file is JSONL in TRL's standard conversational formats.

| file | rows | what |
|---|---|---|
| `prompts_train.jsonl` | {stats["prompts_train"]} | `{{"prompt": [{{"role": "user", ...}}]}}`: {len(t.TRAIN_TEMPLATES)} templates x invented titles |
| `prompts_eval.jsonl` | {stats["prompts_eval"]} | the same format; {len(t.EVAL_TEMPLATES)} other templates, other titles: no title and no template shared with train |
| `sft.jsonl` | {stats["sft_demonstrations"]} | `prompt` + `completion`: per train prompt the best of {stats["samples_per_prompt"]} samples by gold |
| `preferences.jsonl` | {stats["preference_pairs"]} | `prompt`, `chosen`, `rejected`, `gold_chosen`, `gold_rejected`: up to {stats["pairs_per_prompt"]} pairs per train prompt |

## How it was made
- Titles are "The <adjective> <noun>" ({len(t.all_titles())} of them); a quarter of the titles are kept for eval.
- The embedded model answered each train prompt {stats["samples_per_prompt"]} times (temperature {stats["temperature"]},
  top-p {stats["top_p"]}, at most {stats["max_new_tokens"]} new tokens).
- **Demonstrations** (`sft.jsonl`): the sample with the highest gold score. A sample that ran out of tokens
  before its EOS is first cut after its last complete sentence (a human demonstrator finishes sentences);
  a sample with no complete sentence is not a candidate.
- **Preferences**: pairs of different samples for one prompt, labelled like a noisy human labeler would:
  response a is chosen over b with probability `sigmoid((gold_a - gold_b) / {stats["label_temperature"]})`
  (Bradley-Terry on the gold scores). The responses are the raw samples, truncated ones included.
  **Label noise**: in {100 * stats["label_noise_rate"]:.1f}% of the pairs the chosen response has the lower gold
  score; that caps the held-out accuracy any reward model can reach (the reward stage reports that ceiling).

## The gold judge (`rlhf_toy/task.py`)
`gold = clip(vader_compound - repetition - rambling, -1, 1)`: VADER's compound sentiment of the response,
minus `{t.REPETITION_WEIGHT} x (1 - distinct word trigrams / word trigrams)`, minus `{t.RAMBLING_PER_WORD}` per word past
{t.RAMBLING_AFTER_WORDS} words (at most {t.RAMBLING_MAX}); an empty or non-text response (under half letters) scores {t.NON_TEXT_SCORE}.
It stands in for human labelers: it labels the pairs and scores evaluations, and is never a training reward.

## Statistics
| | value |
|---|---|
| samples | {stats["samples"]} |
| gold of the samples: mean / std | {stats["sample_gold_mean"]:.3f} / {stats["sample_gold_std"]:.3f} |
| gold of the demonstrations: mean | {stats["demo_gold_mean"]:.3f} |
| samples that ended with EOS | {100 * stats["sample_eos_rate"]:.1f}% |
| sample length: mean tokens | {stats["sample_tokens_mean"]:.1f} |
| label noise rate | {100 * stats["label_noise_rate"]:.1f}% |
"""
    (out / "README.md").write_text(card)


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--card_only"]:   # rewrite data/README.md from data/stats.json
        write_data_card(Path("data"), json.loads(Path("data/stats.json").read_text()))
    else:
        main()
