#!/usr/bin/env python
"""The attention the SFT, reward and DPO stages train with (`models.with_training_attention`: PyTorch's math
backend where a bf16 backward runs through it, on a CPU) against transformers' SDPA as it comes (the flash kernel).

    python scripts/bench_attention.py [--model embedded:smollm2-135m-instruct] [--batches 4] [--repeats 3]
                                      [--precisions float32 bfloat16-mixed]

First the kernel alone, at the embedded model's shapes (9 query heads, 3 key/value heads of 64, rows of 120 tokens,
a padding mask), forward without grad and forward + backward, in milliseconds (medians of 20 calls). Then a
training step of each stage as the demo's configs shape it, on the demo's data: SFT (all 30 blocks trained, 8
examples of data/sft.jsonl, the next-token loss), reward and DPO (`scripts/bench_pairs.py`'s steps, each pair's
rows whole). Each repeat times all batches with SDPA, then all with ours; the medians over repeats of those sums.
bfloat16-mixed is skipped on a CPU without native bf16. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F
from bench_pairs import demo_shaped_models, dpo_step, padded_pairs, reward_step
from torch.nn.attention import SDPBackend, sdpa_kernel

from rlhf_toy import models
from rlhf_toy.stages.dpo import finished_pairs


def kernel_ms(rows: int, backend, dtype, grad: bool) -> float:
    torch.manual_seed(0)
    tokens, heads, kv_heads, dim = 120, 9, 3, 64
    q = torch.randn(rows, heads, tokens, dim, dtype=dtype, requires_grad=grad)
    k = torch.randn(rows, kv_heads, tokens, dim, dtype=dtype, requires_grad=grad)
    v = torch.randn(rows, kv_heads, tokens, dim, dtype=dtype, requires_grad=grad)
    mask = torch.ones(tokens, tokens, dtype=torch.bool).tril().expand(rows, 1, tokens, tokens).clone()
    mask[: rows // 2, :, :, tokens - 30 :] = False  # half the rows right-padded by 30
    mask |= torch.eye(tokens, dtype=torch.bool)
    times = []
    for _ in range(23):
        start = time.perf_counter()
        with torch.set_grad_enabled(grad), sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            if grad:
                out.float().square().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:]) * 1e3


def sft_batches(tokenizer, path: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    records = [json.loads(line) for line in open(path)][: 8 * n]
    batches = []
    for i in range(0, len(records), 8):
        rows = [
            tokenizer.apply_chat_template(r["prompt"] + r["completion"], return_dict=True)["input_ids"]
            for r in records[i : i + 8]
        ]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        batches.append((ids, torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])))
    return batches


def sft_step(model, ids, mask) -> None:
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    model.zero_grad(set_to_none=True)


def timed(step, model, batches, precision) -> float:
    start = time.perf_counter()
    with precision.autocast():
        for batch in batches:
            step(model, *batch)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16-mixed"])
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    precisions = [p for p in args.precisions if p == "float32" or models.has_native_bf16(device)]
    for skipped in set(args.precisions) - set(precisions):
        print(f"{skipped}: skipped, no native bf16 on this CPU")

    print("\n| precision | rows | pass | flash (ms) | math (ms) | flash / math |\n|---|---|---|---|---|---|")
    for name in precisions:
        dtype = models.resolve_precision(name, device).compute
        for rows in (8, 16):
            for grad, label in ((False, "forward"), (True, "forward + backward")):
                flash = kernel_ms(rows, SDPBackend.FLASH_ATTENTION, dtype, grad)
                math = kernel_ms(rows, SDPBackend.MATH, dtype, grad)
                print(
                    f"| {name} | {rows} | {label} | {flash:.2f} | {math:.2f} | {flash / math:.2f}x |",
                    flush=True,
                )

    tokenizer = models.load_tokenizer(args.model)
    pairs = [json.loads(line) for line in open("data/preferences.jsonl")]
    finished = finished_pairs(pairs, "data/preferences.jsonl")
    random.Random(0).shuffle(finished)
    dpo_batches = [padded_pairs(tokenizer, finished[i : i + 8]) for i in range(0, 8 * args.batches, 8)]
    reward_batches = [padded_pairs(tokenizer, pairs[i : i + 8]) for i in range(0, 8 * args.batches, 8)]
    sft = sft_batches(tokenizer, "data/sft.jsonl", args.batches)
    print(f"\n{args.batches} batches of 8 a step\n")
    print("| precision | step | SDPA (s) | ours (s) | speed-up |\n|---|---|---|---|---|")
    for name in precisions:
        precision = models.resolve_precision(name, device)
        policy = models.load_causal_lm(args.model, tokenizer, "cpu", precision.name)  # SFT trains every block
        dpo_policy, reward_model = demo_shaped_models(args.model, tokenizer, precision.name)
        stages = [
            ("SFT", sft_step, policy, sft),
            ("reward", lambda *b: reward_step(*b, shared=False), reward_model, reward_batches),
            ("DPO", lambda *b: dpo_step(*b, True, False), dpo_policy, dpo_batches),
        ]
        for label, step, model, batches in stages:
            timed(step, model, batches[:1], precision)  # warm-up
            times = {"sdpa": [], models.TRAINING_ATTENTION: []}
            for _ in range(args.repeats):
                for attention in times:
                    if attention == "sdpa":
                        model.set_attn_implementation("sdpa")
                    else:
                        models.with_training_attention(model)
                    times[attention].append(timed(step, model, batches, precision))
            sdpa, ours = (statistics.median(t) for t in times.values())
            print(
                f"| {precision.name} | {label} | {sdpa:.2f} | {ours:.2f} | {sdpa / ours:.2f}x |", flush=True
            )


if __name__ == "__main__":
    main()
