#!/usr/bin/env python
"""Sampling speed: transformers' `generate` against our decode loop (`sequences.sample_ids`), and this machine's bound.

    python scripts/bench_sampling.py [--model embedded:smollm2-135m-instruct] [--batches 8 32 100]
                                     [--max_new_tokens 48] [--repeats 3] [--precisions float32 bfloat16-mixed]
                                     [--frozen] [--profile] [--output reports/bench/sampling]

The same test prompts, settings and seed for both (temperature 0.7, no top-k or top-p, EOS on), alternating
generate / ours within each repeat so drifts in machine load hit both; the medians over repeats. Tokens/s counts
answer tokens up to and including each row's EOS (what a stage keeps). bfloat16-mixed is skipped on a CPU without
native bf16 (there it is emulated and slower than float32).

The bound is the time a perfect sampler would need for the same answers on these cores: the prompts' forward at the
measured matmul rate (their shared prefix counted once, as ours computes it), then per decode step the larger of
(reading every matmul weight once, at the measured memory bandwidth) and (2 x matmul parameters x the rows still
running, at the matmul rate), each rate the fastest of 7 timings; attention is left out (a few percent at these
lengths), so the bound is a little optimistic. `--profile` adds one torch-profiler run of ours at the middle batch
size in each precision and prints its top operators. `--frozen` samples from a model whose weights do not require
grad, as PPO's bottom blocks and reference are: under bf16 autocast `generate` casts each frozen weight again at
every step, ours once per call (`sequences.weights_cast_once`). Writes OUTPUT.md and OUTPUT.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rlhf_toy import data, models, sequences


def fastest_seconds(fn, repeats: int = 7) -> float:
    """The fastest of `repeats` calls (after one to warm up). The machine's rates take the best it showed, not the
    median: a bound must not credit the sampler with the machine's hiccups (a median of 5 once read 175 GFLOP/s
    for float32 where the next process, on the same idle machine, measured 256)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_bandwidth() -> float:
    """Bytes/s of reading a 400 MB float32 tensor (far past every cache)."""
    x = torch.ones(100_000_000)
    return x.numel() * 4 / fastest_seconds(lambda: x.sum())


def matmul_rate(dtype: torch.dtype, rows: int, hidden: int, inner: int, products: int = 20) -> float:
    """FLOP/s of a [rows, hidden] x [hidden, inner] product in `dtype`, the shape of the model's MLP. Each timing
    takes `products` of them: one lasts a fraction of a millisecond, and a hiccup of the machine during a few of
    five read 108 GFLOP/s for bf16 where the same process measured 1906 in the next run."""
    a, b = torch.randn(rows, hidden, dtype=dtype), torch.randn(hidden, inner, dtype=dtype)
    return products * 2 * rows * hidden * inner / fastest_seconds(lambda: [a @ b for _ in range(products)])


def matmul_parameters(model) -> int:
    """Parameters that take part in a matmul for every token: every Linear weight (GPT-2's Conv1D too), the (tied)
    LM head included."""
    linear = {
        id(m.weight): m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    }
    return sum(linear.values())


def rates_line(machine: dict, precisions: list[str], params: int) -> str:
    """The report's line of what this machine measured: memory bandwidth, matmul rates, matmul parameters."""
    rates = ", ".join(f"{p} {machine[f'matmul_{p}_GFLOP_s']:.0f} GFLOP/s" for p in precisions)
    return f"Memory read {machine['bandwidth_GB_s']:.1f} GB/s; matmul {rates}; {params / 1e6:.1f} M matmul parameters."


def write_report(output: str, lines: list[str], payload: dict) -> None:
    """OUTPUT.md (the lines) and OUTPUT.json (the payload), the folder made if needed."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    output.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {output.with_suffix('.md')}")


def sample_once(kind: str, model, tokenizer, queries, query_mask, args, precision):
    torch.manual_seed(0)
    with torch.no_grad(), sequences.autocast(precision):
        if kind == "generate":
            out = model.generate(
                input_ids=queries,
                attention_mask=query_mask,
                max_new_tokens=args.max_new_tokens,
                do_sample=True,
                temperature=0.7,
                top_k=0,
                top_p=1.0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            responses = out[:, queries.shape[1] :]
        else:
            responses = sequences.sample_ids(
                model,
                queries,
                query_mask,
                max_new_tokens=args.max_new_tokens,
                temperature=0.7,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ).responses
    return sequences.truncate_at_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)[1]


def bound_seconds(
    mask, prompt_tokens: int, params: int, weight_bytes: int, rate: float, bandwidth: float
) -> float:
    """A perfect sampler's time for answers of these lengths (see the module docstring)."""
    lengths = mask.sum(1)
    seconds = 2 * params * prompt_tokens / rate  # the prefill, which also yields the first token
    for step in range(1, int(lengths.max())):
        running = int((lengths > step).sum())
        seconds += max(weight_bytes / bandwidth, 2 * params * running / rate)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 100])
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--max_prompt_length", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16-mixed"])
    parser.add_argument("--prompts", default="data/prompts_test.jsonl")
    parser.add_argument("--frozen", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--output", default="reports/bench/sampling")
    args = parser.parse_args()

    device = torch.device("cpu")
    native_bf16 = models.cpu_has_native_bf16()
    precisions = [p for p in args.precisions if p == "float32" or native_bf16]
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_causal_lm(args.model, tokenizer, device="cpu").eval().requires_grad_(not args.frozen)
    prompts = data.load_prompts(args.prompts)
    params = matmul_parameters(model)
    mlp = (
        model.config.intermediate_size
        if hasattr(model.config, "intermediate_size")
        else 4 * model.config.hidden_size
    )
    bandwidth = memory_bandwidth()
    machine = {
        "threads": torch.get_num_threads(),
        "native_bf16": native_bf16,
        "bandwidth_GB_s": bandwidth / 1e9,
        "matmul_params": params,
        "frozen": args.frozen,
    }
    print(f"threads {machine['threads']}, native bf16 {native_bf16}, memory read {bandwidth / 1e9:.1f} GB/s")
    rows = []
    for name in precisions:
        precision = models.resolve_precision(name, device)
        dtype = precision.compute
        machine[f"matmul_{name}_GFLOP_s"] = matmul_rate(dtype, 256, model.config.hidden_size, mlp) / 1e9
        rate = machine[f"matmul_{name}_GFLOP_s"] * 1e9
        weight_bytes = params * torch.finfo(dtype).bits // 8
        warm_up = sequences.encode_prompts(tokenizer, prompts[: min(args.batches)], args.max_prompt_length)[
            :2
        ]
        for kind in (
            "generate",
            "ours",
        ):  # first calls pay one-off costs (allocations, autocast's weight casts)
            sample_once(kind, model, tokenizer, *warm_up, args, precision)
        for batch in args.batches:
            chosen = [prompts[i % len(prompts)] for i in range(batch)]
            queries, query_mask, _ = sequences.encode_prompts(tokenizer, chosen, args.max_prompt_length)
            times, tokens = {"generate": [], "ours": []}, {}
            for _ in range(args.repeats):
                for kind in ("generate", "ours"):
                    start = time.perf_counter()
                    mask = sample_once(kind, model, tokenizer, queries, query_mask, args, precision)
                    times[kind].append(time.perf_counter() - start)
                    tokens[kind] = int(mask.sum())
                    if kind == "ours":
                        ours_mask = mask
            shared = sequences.prefix_to_share(queries, query_mask)  # computed once, as ours does
            prompt_tokens = int(query_mask.sum()) - shared * (batch - 1)
            bound = bound_seconds(ours_mask, prompt_tokens, params, weight_bytes, rate, bandwidth)
            row = {"precision": name, "batch": batch}
            for kind in ("generate", "ours"):
                row[f"{kind}_tokens_s"] = tokens[kind] / statistics.median(times[kind])
            row["bound_tokens_s"] = tokens["ours"] / bound
            row["speedup"] = row["ours_tokens_s"] / row["generate_tokens_s"]
            row["of_bound"] = row["ours_tokens_s"] / row["bound_tokens_s"]
            rows.append(row)
            print(
                f"{name:15s} batch {batch:4d}: generate {row['generate_tokens_s']:7.1f} tok/s, ours "
                f"{row['ours_tokens_s']:7.1f} ({row['speedup']:.2f}x), bound {row['bound_tokens_s']:7.1f} "
                f"(ours at {row['of_bound']:.0%} of it)",
                flush=True,
            )
    lines = [
        f"# Sampling speed ({args.model}, {args.max_new_tokens} new tokens, {machine['threads']} threads, "
        f"native bf16: {native_bf16}{', every weight frozen' if args.frozen else ''})",
        "",
        rates_line(machine, precisions, params),
        "",
        "| precision | batch | generate tok/s | ours tok/s | ours / generate | bound tok/s | ours / bound |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['precision']} | {r['batch']} | {r['generate_tokens_s']:.1f} | {r['ours_tokens_s']:.1f} | "
        f"{r['speedup']:.2f}x | {r['bound_tokens_s']:.1f} | {r['of_bound']:.0%} |"
        for r in rows
    ]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        batch = sorted(args.batches)[len(args.batches) // 2]
        chosen = [prompts[i % len(prompts)] for i in range(batch)]
        queries, query_mask, _ = sequences.encode_prompts(tokenizer, chosen, args.max_prompt_length)
        for name in precisions:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                sample_once(
                    "ours",
                    model,
                    tokenizer,
                    queries,
                    query_mask,
                    args,
                    models.resolve_precision(name, device),
                )
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            print(table)
            lines += ["", f"Profile of ours, {name}, batch {batch} (top operators by self time):", "", "```"]
            lines += [table.rstrip(), "```"]
    write_report(args.output, lines, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
