"""Regenerate the toy task's data in data/ from the embedded model, with a fixed seed.

    python scripts/make_data.py [--model embedded:smollm2-135m-instruct] [--seed 0] [--out data]
    python scripts/make_data.py --relabel      # after a change of the gold judge: seconds, no model

Sampling (the costly part) writes prompts_{train,eval,test}.jsonl and samples.jsonl (every train prompt
answered n times). Labelling writes sft.jsonl (best-of-n demonstrations by gold), preferences.jsonl (pairs
labelled by a Bradley-Terry draw on gold: noisy, like real labelers), stats.json and data/README.md (the
data card, with counts and statistics).
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
from rlhf_toy.runlog import write_jsonl
from rlhf_toy.verify.gold_suite import ordered_by_kind, read_pairs, shares

SUITE_FILES = ("pairs.jsonl", "holdout_pairs.jsonl", "found_by_ppo.jsonl")
OLDER_JUDGES = ("v2", "v3")  # tests/adversarial/gold_<version>_ordered.json


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="data")
    parser.add_argument(
        "--relabel",
        action="store_true",
        help="skip sampling: relabel the stored samples (OUT/samples.jsonl) with the current gold judge",
    )
    parser.add_argument("--n_train", type=int, default=600)
    parser.add_argument("--n_eval", type=int, default=72)
    parser.add_argument("--n_test", type=int, default=128)
    parser.add_argument("--samples_per_prompt", type=int, default=4)
    parser.add_argument("--pairs_per_prompt", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="auto: bfloat16-mixed where the hardware has native bf16, float32 elsewhere",
    )
    # Labelers prefer the higher-gold response with probability sigmoid((g_a - g_b) / temperature).
    parser.add_argument("--label_temperature", type=float, default=0.1)
    args = parser.parse_args(argv)
    out = Path(args.out)
    command = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    if args.relabel:
        sampling = json.loads((out / "stats.json").read_text())["sampling"]
    else:
        sampling = sample(args, out)
    started = time.time()
    stats = label(
        out,
        seed=sampling["seed"],
        pairs_per_prompt=args.pairs_per_prompt,
        label_temperature=args.label_temperature,
    )
    stats = {
        "command": command,
        "sampling": sampling,
        **stats,
        "labelling_seconds": time.time() - started,
        "suite": suite_tables(),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_data_card(out, stats)
    print(json.dumps(stats, indent=2))


def sample(args, out: Path) -> dict:
    """Write the prompt files and samples.jsonl (every train prompt answered samples_per_prompt times):
    the costly part, stored so that a change of the gold judge only needs `--relabel`."""
    started = time.time()
    torch.manual_seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, eval_prompts, test_prompts = task.make_prompts(
        args.n_train, args.n_eval, args.n_test, args.seed
    )
    write_jsonl(out / "prompts_train.jsonl", train_prompts)
    write_jsonl(out / "prompts_eval.jsonl", eval_prompts)
    write_jsonl(out / "prompts_test.jsonl", test_prompts)

    tokenizer = models.load_tokenizer(args.model)
    precision = models.resolve_precision(args.dtype, models.pick_device("auto"))
    model = models.load_causal_lm(args.model, tokenizer, dtype=precision.name)
    repeated = [row for row in train_prompts for _ in range(args.samples_per_prompt)]
    samples = sequences.generate(
        model,
        tokenizer,
        [row["prompt"] for row in repeated],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
        progress="sampling train prompts",
        precision=precision,
    )
    write_jsonl(
        out / "samples.jsonl",
        [
            {
                "prompt": row["prompt"],
                "title": row["title"],
                "response": s.response,
                "has_eos": s.has_eos,
                "tokens": len(s.response_ids),
            }
            for row, s in zip(repeated, samples)
        ],
    )
    return {
        "model": args.model,
        "seed": args.seed,
        "dtype": precision.name,  # what ran, not what was asked
        "prompts_train": len(train_prompts),
        "prompts_eval": len(eval_prompts),
        "prompts_test": len(test_prompts),
        "samples_per_prompt": args.samples_per_prompt,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "batch_size": args.batch_size,
        "minutes": (time.time() - started) / 60,
    }


def label(out: Path, seed: int, pairs_per_prompt: int, label_temperature: float) -> dict:
    """sft.jsonl and preferences.jsonl from samples.jsonl, by the gold judge: best-of-n demonstrations
    and Bradley-Terry-drawn preference labels. Deterministic given the samples and the seed."""
    rows = [json.loads(line) for line in open(out / "samples.jsonl")]
    groups: dict[str, list[dict]] = {}
    for row in rows:  # samples of one prompt are consecutive; dicts keep that order
        groups.setdefault(json.dumps(row["prompt"]), []).append(row)
    rng = random.Random(seed)
    sft_rows, pref_rows, flips = [], [], 0
    all_parts, demo_parts = [], []
    cut_pairs = both_cut_pairs = unfinished_pairs = 0
    for group in groups.values():
        prompt, title = group[0]["prompt"], group[0]["title"]
        answers = [(task.shown_answer(s["response"], s["has_eos"]), not s["has_eos"]) for s in group]
        all_parts += [task.gold_parts(text, title, truncated=cut) for text, cut in answers]
        best = task.best_demonstration([(s["response"], s["has_eos"]) for s in group], title)
        if best is not None:
            demo_parts.append(task.gold_parts(best[1], title))
            sft_rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": best[1]}]})
        for chosen, rejected, gold_chosen, gold_rejected, chosen_cut, rejected_cut in task.label_pairs(
            answers, title, rng, pairs_per_prompt=pairs_per_prompt, label_temperature=label_temperature
        ):
            flips += gold_chosen < gold_rejected
            cut_pairs += chosen_cut or rejected_cut
            both_cut_pairs += chosen_cut and rejected_cut
            unfinished_pairs += any(not task.ends_a_sentence(t) for t in (chosen, rejected))
            pref_rows.append(
                {
                    "prompt": prompt,
                    "title": title,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "gold_chosen": round(gold_chosen, 4),
                    "gold_rejected": round(gold_rejected, 4),
                    "chosen_cut": chosen_cut,
                    "rejected_cut": rejected_cut,
                }
            )
    write_jsonl(out / "sft.jsonl", sft_rows)
    write_jsonl(out / "preferences.jsonl", pref_rows)
    return {
        "samples": len(rows),
        "sft_demonstrations": len(sft_rows),
        "preference_pairs": len(pref_rows),
        "pairs_per_prompt": pairs_per_prompt,
        "label_temperature": label_temperature,
        "label_noise_rate": flips / max(1, len(pref_rows)),
        "pairs_with_a_cut_side": cut_pairs / max(1, len(pref_rows)),
        "pairs_with_both_sides_cut": both_cut_pairs / max(1, len(pref_rows)),
        "pairs_with_a_side_ending_mid_sentence": unfinished_pairs / max(1, len(pref_rows)),
        "pair_gold_tie_rate": statistics.mean(r["gold_chosen"] == r["gold_rejected"] for r in pref_rows),
        "sample_gold_mean": statistics.mean(p["gold"] for p in all_parts),
        "sample_gold_std": statistics.pstdev(p["gold"] for p in all_parts),
        "demo_gold_mean": statistics.mean(p["gold"] for p in demo_parts),
        "sample_on_topic_rate": statistics.mean(bool(p["on_topic"]) for p in all_parts),
        "sample_flattery_rate": statistics.mean(bool(p["flattery_reason"]) for p in all_parts),
        "sample_junk_rate": statistics.mean(task.is_junk(p) for p in all_parts),
        "demo_junk_rate": statistics.mean(task.is_junk(p) for p in demo_parts),
        "sample_flag_rates": {
            flag: statistics.mean(flag in p["flags"] for p in all_parts)
            for flag in [*task.PENALTIES, "padding", "non_text"]
        },
        "demo_on_topic_rate": statistics.mean(bool(p["on_topic"]) for p in demo_parts),
        "demo_flattery_rate": statistics.mean(bool(p["flattery_reason"]) for p in demo_parts),
        "sample_eos_rate": sum(r["has_eos"] for r in rows) / len(rows),
        "sample_tokens_mean": statistics.mean(r["tokens"] for r in rows),
    }


def suite_tables() -> dict:
    """The gold judge on the adversarial suite (tests/adversarial/): per kind, the share of pairs it orders, for
    this judge and for the older ones (stored: measured once with their task.py, tests/adversarial/README.md)."""
    root = Path(__file__).resolve().parents[1] / "tests" / "adversarial"
    older = {
        version: json.loads((root / f"gold_{version}_ordered.json").read_text()) for version in OLDER_JUDGES
    }
    return {
        name: {
            "this": shares(ordered_by_kind(read_pairs(root / name))),
            **{version: shares_of.get(name, {}) for version, shares_of in older.items()},
        }
        for name in SUITE_FILES
    }


def write_data_card(out: Path, stats: dict) -> None:
    """data/README.md: provenance, counts, gold statistics and the judge's suite table, from stats.json."""
    t = task
    sampling = stats["sampling"]
    suite_rows = []
    share = lambda value: "-" if value is None else f"{100 * value:.0f}%"
    for name, table in stats["suite"].items():
        for kind, ours in table["this"].items():
            older = " | ".join(share(table[version].get(kind)) for version in OLDER_JUDGES)
            suite_rows.append(f"| {name} | {kind} | {older} | {share(ours)} |")
    flag_rates = ", ".join(
        f"{flag} {100 * rate:.1f}%" for flag, rate in stats["sample_flag_rates"].items() if rate
    )
    card = f"""# The toy task's data

Sampled by `python scripts/make_data.py` (model `{sampling["model"]}`, seed {sampling["seed"]}, {sampling["dtype"]}):
{sampling["minutes"]:.1f} minutes on a 2-core CPU{" (" + sampling["note"] + ")" if sampling.get("note") else ""}; labelled by `{stats["command"]}` in {stats["labelling_seconds"]:.1f} s with
gold judge v{t.GOLD_VERSION}. Regenerate everything with `make data`; after a change of the gold judge, `python scripts/make_data.py
--relabel` relabels the stored samples in seconds. Every file is JSONL in TRL's standard conversational formats.

| file | rows | what |
|---|---|---|
| `prompts_train.jsonl` | {sampling["prompts_train"]} | `{{"prompt": [{{"role": "user", ...}}], "title": ...}}`: {len(t.TRAIN_TEMPLATES)} templates x invented titles |
| `prompts_eval.jsonl` | {sampling["prompts_eval"]} | the same format; {len(t.EVAL_TEMPLATES)} other templates, other titles: for tuning configs |
| `prompts_test.jsonl` | {sampling["prompts_test"]} | the eval templates, titles of their own: never tuned on (the README's numbers) |
| `samples.jsonl` | {stats["samples"]} | every train prompt answered {sampling["samples_per_prompt"]} times: `prompt`, `title`, `response`, `has_eos`, `tokens` |
| `sft.jsonl` | {stats["sft_demonstrations"]} | `prompt` + `completion`: per train prompt the best of its samples by gold |
| `preferences.jsonl` | {stats["preference_pairs"]} | `prompt`, `title`, `chosen`, `rejected`, `gold_chosen`, `gold_rejected`, `chosen_cut`, `rejected_cut` (the sample ran out of tokens and was cut): up to {stats["pairs_per_prompt"]} pairs per train prompt |

## How it was made
- Titles are "The <adjective> <noun>" ({len(t.all_titles())} of them); a quarter of the titles are held out, half of
  them for eval and half for test. Every prompt record carries its `title`.
- The embedded model answered each train prompt {sampling["samples_per_prompt"]} times (temperature {sampling["temperature"]},
  top-p {sampling["top_p"]}, at most {sampling["max_new_tokens"]} new tokens): `samples.jsonl`. Only
  {100 * stats["sample_eos_rate"]:.1f}% of the samples reached their EOS within the limit.
- **What the demonstrator and the labeler see** (data v3): a sample that ran out of tokens is cut after its last
  complete sentence (`task.shown_answer`; one with no complete sentence stays as it is, visibly unfinished). The
  labeler knows it was cut: gold judges it with `truncated=True`, the `unfinished` penalty
  ({t.PENALTIES["unfinished"]}), so a cut answer never beats a finished one of similar quality. Before v3 the pairs
  held the raw samples: 71% of the chosen answers ended mid-sentence, and DPO learned to ramble into the limit.
- **Demonstrations** (`sft.jsonl`): per prompt the sample with the highest gold score, cut the same way (a
  demonstrator finishes the sentence; no `unfinished` penalty), among those that leave a complete sentence.
- **Preferences**: pairs of different answers for one prompt, labelled like a noisy human labeler would:
  answer a is chosen over b with probability `sigmoid((gold_a - gold_b) / {stats["label_temperature"]})`
  (Bradley-Terry on the gold scores). **Label noise**: in {100 * stats["label_noise_rate"]:.1f}% of the pairs the
  chosen answer has the lower gold score, and {100 * stats["pair_gold_tie_rate"]:.1f}% are gold ties (a coin flip);
  together they cap the held-out accuracy any reward model can reach (the reward stage reports that ceiling).
- Pairs with a side that was cut at the token limit: {100 * stats["pairs_with_a_cut_side"]:.1f}% (both sides cut:
  {100 * stats["pairs_with_both_sides_cut"]:.1f}%; DPO's `finished_pairs_only` trains on the other
  {100 - 100 * stats["pairs_with_a_cut_side"]:.1f}%, whose two answers ended on their own); with a side that still
  ends mid-sentence after the cut: {100 * stats["pairs_with_a_side_ending_mid_sentence"]:.1f}% (v2's data: 76% of the
  samples behind the pairs ended mid-sentence, and in 60% of the pairs both sides did).

## The gold judge v{t.GOLD_VERSION} (`rlhf_toy/task.py`; why each term exists: `docs/gold_judge.md`)
`gold = clip(quality - penalties, -1, 1)`, deterministic, offline, never a training reward:
- **positivity**: VADER's compound score of the answer without the film's title (its words, "Broken" or "Lonely",
  are not sentiment), in lower case, over {t.FULL_CREDIT_COMPOUND} = full credit: a clearly positive review scores 1
  and more superlatives add nothing. VADER's lexicon gains {len(t.CRITIC_PRAISE)} critics' words of praise ("taut",
  "assured", "poignant": quietly worded praise is praise) and loses {len(t.CONTENT_WORDS_NOT_VERDICTS)} words that
  describe a film's content, not its quality ("harrowing", "war", "grief").
- **substance**: distinct words that say something specific (not praise, not filler), {t.SPECIFIC_WORDS_FOR_FULL_CREDIT}
  for full credit; praise of nothing in particular earns {1 - t.SUBSTANCE_WEIGHT:.0%} of the credit.
- **penalties**, one per thing a labeler rejects: {", ".join(f"{flag} {value}" for flag, value in t.PENALTIES.items())};
  padding {t.PADDING_PER_REPEAT} per repeated word; repetition (word trigrams) as in v2; rambling {t.RAMBLING_PER_WORD} per
  word past {t.RAMBLING_AFTER_WORDS}; hedging {t.HEDGE_PENALTY} per hedge. Empty or non-text output scores {t.NON_TEXT_SCORE}.

**Against junk** (`python scripts/gold_suite.py`): hand-written (good, bad) pairs, written from descriptions of the
kinds of junk before v3 and without reading it (`tests/adversarial/README.md`); the share each judge orders
correctly. `holdout_pairs.jsonl` was kept from v3's development and read once at the end. `found_by_ppo.jsonl`:
the answers with which PPO (beta 0.001, `make overopt`) beat v3, each against a real review; v3.1 closes those holes.

| file | kind | {" | ".join(OLDER_JUDGES)} | v{t.GOLD_VERSION} |
|---|---|{"---|" * len(OLDER_JUDGES)}---|
{chr(10).join(suite_rows)}

## Statistics
| | value |
|---|---|
| samples | {stats["samples"]} |
| gold of the answers as shown: mean / std | {stats["sample_gold_mean"]:.3f} / {stats["sample_gold_std"]:.3f} |
| gold of the demonstrations: mean | {stats["demo_gold_mean"]:.3f} |
| answers that name the film / flattery or assistant-speak | {100 * stats["sample_on_topic_rate"]:.1f}% / {100 * stats["sample_flattery_rate"]:.1f}% |
| demonstrations that name the film / flattery or assistant-speak | {100 * stats["demo_on_topic_rate"]:.1f}% / {100 * stats["demo_flattery_rate"]:.1f}% |
| answers / demonstrations gold flags as junk of any kind | {100 * stats["sample_junk_rate"]:.1f}% / {100 * stats["demo_junk_rate"]:.1f}% |
| answers per flag | {flag_rates} |
| samples that ended with EOS | {100 * stats["sample_eos_rate"]:.1f}% |
| sample length: mean tokens | {stats["sample_tokens_mean"]:.1f} |
| label noise rate / gold ties | {100 * stats["label_noise_rate"]:.1f}% / {100 * stats["pair_gold_tie_rate"]:.1f}% |
"""
    (out / "README.md").write_text(card)


if __name__ == "__main__":
    main()
