"""Batched sampling shared by every stage: prompt formatting, left-truncation, generation, EOS handling.

One source of truth for how a prompt becomes tokens (the tokenizer's chat template, with the
generation prompt) and how a response ends (at the first EOS, which it keeps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf_toy.ppo import core


@dataclass
class Sample:
    prompt: list            # the chat messages
    response: str           # decoded text, special tokens removed
    response_ids: list      # generated token ids up to and including the first EOS
    has_eos: bool


def prompt_text(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts, max_prompt_length: int, device=None):
    """Left-padded prompt ids; a prompt longer than `max_prompt_length` keeps its end (the part the
    response continues from). Returns (input_ids, attention_mask, n_truncated)."""
    ids = [tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    n_truncated = sum(len(x) > max_prompt_length for x in ids)
    ids = [x[-max_prompt_length:] for x in ids]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, attention_mask, n_truncated


@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens: int, temperature: float = 0.7,
             top_k: int = 0, top_p: float = 1.0, batch_size: int = 16, seed: int = 0,
             max_prompt_length: int = 256, progress: str | None = None) -> list[Sample]:
    """Sample one response per prompt. Same prompts, settings and seed give the same samples."""
    device = next(model.parameters()).device
    generator_seed = torch.Generator().manual_seed(seed)
    samples = []
    was_training = model.training
    model.eval()
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc=progress, disable=progress is None, unit="batch"):
        batch = prompts[start:start + batch_size]
        input_ids, attention_mask, _ = encode_prompts(tokenizer, batch, max_prompt_length, device)
        # One seed per batch drawn from the run seed: a batch's samples do not depend on what ran before.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed)))
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
            top_k=top_k, top_p=top_p, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        responses, _ = core.truncate_at_eos(out[:, input_ids.shape[1]:], tokenizer.eos_token_id, tokenizer.pad_token_id)
        for messages, row in zip(batch, responses.tolist()):
            ids = [t for t in row if t != tokenizer.pad_token_id]
            samples.append(Sample(
                prompt=messages, response=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                response_ids=ids, has_eos=tokenizer.eos_token_id in ids,
            ))
    model.train(was_training)
    return samples
