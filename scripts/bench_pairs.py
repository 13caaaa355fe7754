#!/usr/bin/env python
"""Preference pairs with each prompt through the model once (`sequences.forward_sharing_pair_prefixes`), against one
forward of the padded rows as TRL runs it: a DPO step, DPO's reference pass and a reward-model step, as the demo's
configs shape them, on the demo's own pairs.

    python scripts/bench_pairs.py [--model embedded:smollm2-135m-instruct] [--batches 6] [--repeats 3]
                                  [--precisions float32 bfloat16-mixed]

DPO: the policy with its lowest 20 of 30 blocks frozen (configs/dpo.yaml), batches of 8 of the pairs whose two
answers ended (DPO's `finished_pairs`), shuffled with seed 0; a step is the forward, the log-probs of each answer's
tokens over the whole vocabulary (TRL's `selective_log_softmax`) in each row's answer window, the LM head only where
a logit predicts an answer token (`sequences.answer_logits`, as in the stage), and the backward; the reference pass
the same forward without grad.
Reward: the lowest 12 blocks with 4 frozen and a score head (configs/reward.yaml), batches of
8 of the first pairs; a step is the forward, the Bradley-Terry loss and the backward. Each pair is its chat
template's ids, chosen then rejected, right-padded (TRL's collators). Each repeat times all batches plain, then all
shared; the medians over repeats of those sums. bfloat16-mixed is skipped on a CPU without
native bf16. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from trl.trainer.utils import selective_log_softmax

from rlhf_toy import models, sequences
from rlhf_toy.scoring import load_reward_model
from rlhf_toy.stages.common import freeze_bottom
from rlhf_toy.stages.dpo import finished_pairs


def padded_pairs(tokenizer, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, completion mask: 1 on answer tokens) as TRL's DPO collator lays the pairs out."""

    def ids_of(messages, **kwargs) -> list[int]:
        return tokenizer.apply_chat_template(messages, return_dict=True, **kwargs)["input_ids"]

    rows = [ids_of(p["prompt"] + p[side]) for side in ("chosen", "rejected") for p in pairs]
    prompts = [len(ids_of(p["prompt"], add_generation_prompt=True)) for p in pairs] * 2
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    completion_mask = torch.tensor(
        [[int(prompt <= t < len(r)) for t in range(width)] for r, prompt in zip(rows, prompts)]
    )
    return ids, mask, completion_mask


def dpo_step(model, ids, mask, completion_mask, grad: bool, shared: bool):
    window = sequences.AnswerWindow.of(completion_mask)
    with torch.set_grad_enabled(grad):
        # the logits of each answer only (stages.common.DPOAnswerWindows), from the rows or with prompts once
        logits = sequences.answer_logits(model, ids, mask, window, shared)
        # what TRL's DPO sums: each answer token's log-prob (TRL's completion_mask)
        window_ids = window.ids(ids)
        logps = (
            selective_log_softmax(logits[:, :-1].float(), window_ids[:, 1:]) * window.completion_mask()[:, 1:]
        ).sum(1)
        if grad:
            logps.sum().backward()
            model.zero_grad(set_to_none=True)


def reward_step(model, ids, mask, completion_mask, shared: bool):
    if shared:
        scores = sequences.forward_sharing_pair_prefixes(model, ids, mask).logits
    else:
        scores = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    chosen, rejected = scores.squeeze(-1).float().chunk(2)
    torch.nn.functional.logsigmoid(chosen - rejected).mean().neg().backward()
    model.zero_grad(set_to_none=True)


def demo_shaped_models(model_name: str, tokenizer, precision: str):
    """The DPO policy (its lowest 20 of 30 blocks frozen) and the reward model (the lowest 12 blocks, 4 of them
    frozen, and a score head), as the demo's configs shape them."""
    policy = models.load_causal_lm(model_name, tokenizer, "cpu", precision)
    freeze_bottom(policy, 20)
    reward_model = load_reward_model(model_name, "cpu", precision, num_hidden_layers=12)
    models.align_with_tokenizer(reward_model, tokenizer)  # the pad id its score reads past
    freeze_bottom(reward_model, 4)
    return policy, reward_model


def timed(step, model, batches, precision, shared: bool) -> float:
    start = time.perf_counter()
    with precision.autocast():
        for ids, mask, completion_mask in batches:
            step(model, ids, mask, completion_mask, shared=shared)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--pairs", default="data/preferences.jsonl")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16-mixed"])
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    tokenizer = models.load_tokenizer(args.model)
    records = [json.loads(line) for line in open(args.pairs)]
    finished = finished_pairs(records, args.pairs)
    random.Random(0).shuffle(finished)
    dpo_batches = [padded_pairs(tokenizer, finished[i : i + 8]) for i in range(0, 8 * args.batches, 8)]
    reward_batches = [padded_pairs(tokenizer, records[i : i + 8]) for i in range(0, 8 * args.batches, 8)]
    for name, batches in (("DPO", dpo_batches), ("reward", reward_batches)):
        ids, mask = torch.cat([b[0].flatten() for b in batches]), torch.cat([b[1].flatten() for b in batches])
        shared = sum(int(sequences.pair_prefix_lengths(*b[:2]).sum()) for b in batches)
        print(
            f"{name}: {len(batches)} batches of 8 pairs, {int(mask.sum())} real tokens in {ids.numel()} padded "
            f"positions, {shared} of them in a prefix the pair shares"
        )

    print(
        "\n| precision | pass | one forward of the rows (s) | prompts once (s) | speed-up |\n|---|---|---|---|---|"
    )
    for name in args.precisions:
        if name != "float32" and not models.has_native_bf16(device):
            print(f"| {name} | skipped: no native bf16 on this CPU | | | |")
            continue
        precision = models.resolve_precision(name, device)
        policy, reward_model = demo_shaped_models(args.model, tokenizer, precision.name)
        passes = [
            ("DPO step", lambda *batch, shared: dpo_step(*batch, True, shared), policy, dpo_batches),
            ("DPO reference", lambda *batch, shared: dpo_step(*batch, False, shared), policy, dpo_batches),
            ("reward step", reward_step, reward_model, reward_batches),
        ]
        for label, step, model, batches in passes:
            timed(step, model, batches[:1], precision, False)  # warm-up
            plain, shared = [], []
            for _ in range(args.repeats):
                plain.append(timed(step, model, batches, precision, False))
                shared.append(timed(step, model, batches, precision, True))
            a, b = statistics.median(plain), statistics.median(shared)
            print(f"| {precision.name} | {label} | {a:.2f} | {b:.2f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
