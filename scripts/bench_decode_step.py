#!/usr/bin/env python
"""One decode step of a Llama model (the embedded SmolLM2) taken apart: what the sampler's step costs, what its
matmuls alone cost through PyTorch's CPU kernels, what a hand-fused step and that step compiled would cost, and the
machine's bound for it. It says which part of the gap to the bound a faster decode loop could close.

    python scripts/bench_decode_step.py [--model embedded:smollm2-135m-instruct] [--batches 8 32]
                                        [--precisions float32 bfloat16-mixed] [--compile]
                                        [--output reports/bench/decode_step]

For B test prompts after their prefill, each row of the table times one decode step (medians of 15 calls in 3
rounds that take turns):
- sampler's step: the model's own forward as `sequences.sample_ids` calls it (preallocated cache, weights packed
  once for the loop: bf16 by oneDNN, float32 by MKL; bf16 casts of frozen weights made once);
- matmuls alone: every Linear of the model once on B rows, in the model's order, through the same modules (so the
  same kernels, packing and casts). No decode loop built on these kernels can be faster than this;
- fused step: the same step written out by hand, q/k/v in one matmul, gate/up in one, no module calls, weights
  packed once as the sampler packs them (the numerics of autocast kept: the same casts, a float32 residual stream);
- compiled (`--compile`): the fused step under `torch.compile` with weight freezing (inductor's own kernels and
  fusions; the compile's seconds are printed, it is paid again for every new batch size);
- bound: the larger of reading every matmul weight once at the measured memory bandwidth and the step's FLOPs at
  the measured matmul rate (as in bench_sampling.py).
The fused and compiled steps must give the sampler's logits (`check_same_logits`), or the
script stops with an error: a faster step that computes something else would prove nothing. Writes OUTPUT.md and
OUTPUT.json.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F
from bench_sampling import matmul_parameters, matmul_rate, memory_bandwidth, rates_line, write_report

from rlhf_toy import data, models, sequences


def check_same_logits(name: str, got, expected, compute: torch.dtype) -> None:
    """Float32: to 1e-4. bf16: to two bf16 roundings at the largest logit's magnitude (the LM head's output is
    rounded to bf16: one rounding there is 0.25 at a logit of 40, and summing in another order can cost one more)."""
    atol = 1e-4 if compute == torch.float32 else 2 * torch.finfo(compute).eps * float(expected.abs().max())
    try:
        torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    except AssertionError as error:
        raise SystemExit(f"the {name} step does not compute the model's step ({compute}): {error}") from None


def times_ms(fn, repeats: int) -> list[float]:
    fn(), fn()  # first calls allocate and (compiled) specialise
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


class FusedLlamaStep:
    """A Llama decode step by hand: one token per row at slot `length` of key/value buffers the caller owns.
    `packed`: weights packed as the sampler packs them (eager): bf16 in oneDNN's blocked layout, float32 by MKL for
    `rows` rows (by oneDNN on a CPU not made by Intel); otherwise plain weights for `F.linear` (what torch.compile
    traces). Under bf16 the float32 residual stream, norms and rotary of autocast are kept, and a matmul's input is
    cast to bf16 once (autocast casts it once per projection: three times for q, k and v)."""

    def __init__(self, model, compute: torch.dtype, packed: bool, rows: int):
        self.model, self.cfg = model.model, model.config
        self.dtype, self.heads = compute, self.cfg.num_attention_heads
        self.kv_heads, self.head_dim = self.cfg.num_key_value_heads, self.cfg.head_dim
        mkl_packed = packed and compute == torch.float32 and not sequences.float32_packs_with_onednn()

        def prepare(*linears):
            weight = torch.cat([linear.weight.detach() for linear in linears]).to(compute)
            if mkl_packed:
                return sequences.pack_float32(weight, rows), weight
            return sequences.pack_onednn(weight, compute) if packed else weight

        if mkl_packed:
            self.linear = lambda x, prepared: sequences.packed_linear_float32(
                x, *prepared, bias=None, rows=rows
            )
        else:
            self.linear = sequences.packed_linear if packed else F.linear
        self.layers = [
            (
                layer.input_layernorm.weight,
                prepare(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                prepare(layer.self_attn.o_proj),
                layer.post_attention_layernorm.weight,
                prepare(layer.mlp.gate_proj, layer.mlp.up_proj),
                prepare(layer.mlp.down_proj),
            )
            for layer in self.model.layers
        ]
        self.head = prepare(model.lm_head)

    def norm(self, x, weight):  # LlamaRMSNorm on a float32 stream
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps))

    def rotate(self, x, cos, sin):
        half = self.head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def __call__(self, tokens, positions, keys, values, length: int, attend):
        B, H, D = tokens.shape[0], self.heads, self.head_dim
        x = self.model.embed_tokens(tokens)
        cos, sin = (t.unsqueeze(1) for t in self.model.rotary_emb(x, positions))
        for (norm1, qkv, o, norm2, gate_up, down), k_cache, v_cache in zip(self.layers, keys, values):
            qkv_out = self.linear(self.norm(x, norm1).to(self.dtype), qkv)
            q = qkv_out[..., : H * D].view(B, 1, H, D).transpose(1, 2)
            k = qkv_out[..., H * D : (H + self.kv_heads) * D].view(B, 1, self.kv_heads, D).transpose(1, 2)
            v = qkv_out[..., (H + self.kv_heads) * D :].view(B, 1, self.kv_heads, D).transpose(1, 2)
            q, k = self.rotate(q, cos, sin).to(self.dtype), self.rotate(k, cos, sin)
            k_cache[:, :, length] = k[:, :, 0]
            v_cache[:, :, length] = v[:, :, 0]
            attention = F.scaled_dot_product_attention(
                q, k_cache[:, :, : length + 1], v_cache[:, :, : length + 1], attn_mask=attend, enable_gqa=True
            )
            x = x + self.linear(attention.transpose(1, 2).reshape(B, 1, H * D), o)
            g, u = self.linear(self.norm(x, norm2).to(self.dtype), gate_up).chunk(2, -1)
            x = x + self.linear(F.silu(g) * u, down)
        return self.linear(self.norm(x, self.model.norm.weight).to(self.dtype), self.head)[:, -1].float()


def time_the_sampler(model, queries, query_mask, precision, repeats: int, times: dict):
    """One round of the sampler's step and of the matmuls alone, under the sampler's settings (autocast, bf16
    weights cast and packed once); returns the first step's token inputs, the prompt's keys and values and logits."""
    batch, width, compute = *queries.shape, precision.compute
    new_tokens = 2 + repeats + 1  # the cache's room: the timed steps, their warm-up and the checked one
    mask = torch.cat([query_mask, query_mask.new_ones(batch, new_tokens)], 1)
    positions = query_mask.sum(1, keepdim=True)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(batch, m.in_features) for m in linears}
    with (
        sequences.autocast(precision),
        sequences.weights_cast_once(model, "cpu", sharded=False),
        sequences.linears_packed_once(model, "cpu", sharded=False, rows=batch),
    ):
        cache = sequences.preallocated_cache(model, width + new_tokens)
        prefill = model(
            **sequences.model_inputs(queries, query_mask), cache=cache, use_cache=True, logits_to_keep=1
        )
        tokens = prefill.logits[:, -1].argmax(-1, keepdim=True)
        # the fused step's own buffers: the prompt's keys and values, and a slot it rewrites at every call
        keys = [torch.cat([layer.keys, layer.keys[:, :, :1]], 2).to(compute) for layer in cache.layers]
        values = [torch.cat([layer.values, layer.values[:, :, :1]], 2).to(compute) for layer in cache.layers]
        step_width = [width]

        def sampler_step():  # the cache grows by one slot a call, as in a real loop
            step_width[0] += 1
            out = model(
                input_ids=tokens,
                attention_mask=mask[:, : step_width[0]],
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1].float()

        expected = sampler_step()  # the first decode step, the one the fused steps repeat
        times["sampler_step"] += times_ms(sampler_step, repeats)
        times["matmuls"] += times_ms(lambda: [m(inputs[m.in_features]) for m in linears], repeats)
    attend = mask[:, None, None, : width + 1].bool()  # left padding is not attended to
    return (tokens, positions, keys, values, width, attend), expected


def measure(
    model, tokenizer, prompts, batch: int, precision, args, rounds: int = 3, repeats: int = 5
) -> dict:
    """Each step's milliseconds (medians of `rounds` x `repeats` calls; the rounds take turns, so a drift in the
    machine's load reaches every step alike) and the fused steps' largest logit differences."""
    chosen = [prompts[i % len(prompts)] for i in range(batch)]
    queries, query_mask, _ = sequences.encode_prompts(tokenizer, chosen, args.max_prompt_length)
    compute = precision.compute
    times = {name: [] for name in ("sampler_step", "matmuls", "fused_step", "compiled_step")}
    row = {"batch": batch}
    with torch.no_grad():
        packed = sequences.packs_on_cpu(compute, batch)
        steps = {"fused": FusedLlamaStep(model, compute, packed=packed, rows=batch)}
        for round_ in range(rounds):
            step_inputs, expected = time_the_sampler(model, queries, query_mask, precision, repeats, times)
            if args.compile and round_ == 0:
                import torch._inductor.config as inductor

                plain = FusedLlamaStep(model, compute, packed=False, rows=batch)
                with inductor.patch(freezing=True):
                    steps["compiled"] = torch.compile(plain.__call__, dynamic=False)
                    start = time.perf_counter()
                    steps["compiled"](*step_inputs)
                    row["compile_s"] = time.perf_counter() - start
            for name, step in steps.items():
                if round_ == 0:
                    got = step(*step_inputs)
                    row[f"{name}_max_logit_diff"] = float((got - expected).abs().max())
                    check_same_logits(name, got, expected, compute)
                times[f"{name}_step"] += times_ms(functools.partial(step, *step_inputs), repeats)
    row.update({f"{name}_ms": statistics.median(t) for name, t in times.items() if t})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16-mixed"])
    parser.add_argument("--max_prompt_length", type=int, default=96)
    parser.add_argument("--prompts", default="data/prompts_test.jsonl")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--output", default="reports/bench/decode_step")
    args = parser.parse_args()

    native_bf16 = models.cpu_has_native_bf16()
    precisions = [p for p in args.precisions if p == "float32" or native_bf16]
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_causal_lm(args.model, tokenizer, device="cpu").eval()
    if type(model).__name__ != "LlamaForCausalLM":
        raise SystemExit(
            f"{args.model} is a {type(model).__name__}: the fused step is written for Llama models"
        )
    prompts = data.load_prompts(args.prompts)
    params = matmul_parameters(model)
    bandwidth = memory_bandwidth()
    machine = {
        "threads": torch.get_num_threads(),
        "native_bf16": native_bf16,
        "bandwidth_GB_s": bandwidth / 1e9,
    }
    print(f"threads {machine['threads']}, native bf16 {native_bf16}, memory read {bandwidth / 1e9:.1f} GB/s")
    rows = []
    for name in precisions:
        precision = models.resolve_precision(name, torch.device("cpu"))
        rate = matmul_rate(precision.compute, 256, model.config.hidden_size, model.config.intermediate_size)
        machine[f"matmul_{name}_GFLOP_s"] = rate / 1e9
        weight_bytes = params * torch.finfo(precision.compute).bits // 8
        for batch in args.batches:
            row = {"precision": name, **measure(model, tokenizer, prompts, batch, precision, args)}
            row["bound_ms"] = 1e3 * max(weight_bytes / bandwidth, 2 * params * batch / rate)
            rows.append(row)
            print(
                f"{name:15s} batch {batch:4d}: sampler's step {row['sampler_step_ms']:6.1f} ms, matmuls alone "
                f"{row['matmuls_ms']:6.1f}, fused {row['fused_step_ms']:6.1f}"
                + (f", compiled {row['compiled_step_ms']:6.1f}" if "compiled_step_ms" in row else "")
                + f", bound {row['bound_ms']:5.1f}",
                flush=True,
            )

    def cell(row, key):
        return f"{row[key]:.1f} ({row['sampler_step_ms'] / row[key]:.2f}x)" if key in row else "not run"

    lines = [
        f"# One decode step, taken apart ({args.model}, {machine['threads']} threads, native bf16: {native_bf16})",
        "",
        rates_line(machine, precisions, params)
        + " Milliseconds per step (in brackets: the sampler's step over it).",
        "",
        "| precision | batch | sampler's step | matmuls alone | fused step | fused, compiled | bound |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['precision']} | {r['batch']} | {r['sampler_step_ms']:.1f} | {cell(r, 'matmuls_ms')} | "
        f"{cell(r, 'fused_step_ms')} | {cell(r, 'compiled_step_ms')} | {cell(r, 'bound_ms')} |"
        for r in rows
    ]
    lines += [""] + [
        f"- {r['precision']}, batch {r['batch']}: largest logit difference from the sampler's step, fused "
        f"{r['fused_max_logit_diff']:.2g}"
        + (
            f", compiled {r['compiled_max_logit_diff']:.2g} (compiled in {r['compile_s']:.0f} s)"
            if "compile_s" in r
            else ""
        )
        for r in rows
    ]
    write_report(args.output, lines, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
