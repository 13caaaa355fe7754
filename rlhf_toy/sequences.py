"""Tokens and sequences, one way for every stage: how a prompt becomes ids, how a response is sampled and
where it ends, and how log-probabilities are taken (one temperature convention, always in float32).

    prompt ids     encode_prompts     the tokenizer's chat template + generation prompt, left-padded
    sampling       generate           one response per prompt, seeded per batch (common random numbers)
    end of answer  truncate_at_eos    the first EOS, whatever the pad id
    log-probs      logprobs_from_logits(logits, tokens, T) = log_softmax(float32(logits) / (T + 1e-7))
                   response_logits / response_logprobs / sequence_logprobs: the same, from a forward pass

The temperature convention is TRL's (`logits / (temperature + 1e-7)`, policy and reference alike), and the
cast to float32 comes *before* the division, so a bf16 forward pass and `generate` (whose logits are cast
to float32 first) go through the same arithmetic.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

Tensor = torch.Tensor


@dataclass
class Sample:
    prompt: list  # the chat messages
    response: str  # decoded text, special tokens removed, stripped
    response_ids: list  # generated token ids up to and including the first EOS (nothing after it)
    has_eos: bool
    prompt_truncated: bool = False  # the prompt was longer than max_prompt_length and kept only its end


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------
def prompt_text(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, messages, max_prompt_length: int) -> list[int]:
    """A prompt's ids; a prompt longer than `max_prompt_length` keeps its end (the part the response
    continues from)."""
    return tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"][
        -max_prompt_length:
    ]


def encode_prompts(tokenizer, prompts, max_prompt_length: int, device=None):
    """Left-padded prompt ids (lm-human-preferences: every response starts at the same position).
    Returns (input_ids, attention_mask, truncated): `truncated[i]` says prompt i kept only its last
    max_prompt_length tokens."""
    full = [tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    truncated = [len(x) > max_prompt_length for x in full]
    ids = [x[-max_prompt_length:] for x in full]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, attention_mask, truncated


def pad_responses(response_ids: list[list[int]], pad_token_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Right-padded responses and their mask (True on real tokens). An empty response keeps one
    masked-out slot, so every row has a width."""
    width = max(1, max(len(r) for r in response_ids))
    responses = torch.tensor(
        [list(r) + [pad_token_id] * (width - len(r)) for r in response_ids], device=device
    )
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in response_ids], device=device)
    return responses, mask


# ------------------------------------------------------------------------------------------------
# the end of a response
# ------------------------------------------------------------------------------------------------
def truncate_at_eos(responses: Tensor, eos_token_id: int, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Cut each response after its first EOS: ``(truncated_responses, mask)``.

    ``mask`` is True up to and including the first EOS (the whole row when there is none);
    positions after it are set to ``pad_token_id``.  The pad id plays no part in finding the end.
    """
    # TRL detail: truncate_response at the first stop token; ours keeps EOS in the mask even when pad == eos
    T = responses.shape[1]
    is_eos = responses == eos_token_id
    idx = torch.arange(T, device=responses.device).expand_as(responses)
    first_eos = torch.where(is_eos, idx, torch.full_like(idx, T)).min(dim=1).values  # T if none
    mask = idx <= first_eos.unsqueeze(1)
    truncated = torch.where(mask, responses, torch.full_like(responses, pad_token_id))
    return truncated, mask


# ------------------------------------------------------------------------------------------------
# log-probabilities and entropy (pure functions)
# ------------------------------------------------------------------------------------------------
def scale_logits(logits: Tensor, temperature: float) -> Tensor:
    """The one temperature convention: float32 first, then ``/ (T + 1e-7)`` (TRL's, policy and reference alike)."""
    return logits.float() / (temperature + 1e-7)


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-token ``log softmax(logits / (T + 1e-7))[token]``, float32.

    ``logits``: ``[B, T, V]`` (the logits that *predict* each token, i.e. already shifted by one);
    ``tokens``: ``[B, T]``.  Takes raw logits and the sampling temperature; for logits already scaled
    by ``scale_logits`` use ``logprobs_from_scaled`` (no second division).
    """
    z = scale_logits(logits, temperature)
    selected = torch.gather(z, -1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return selected - torch.logsumexp(z, dim=-1)


def logprobs_from_scaled(z: Tensor, tokens: Tensor) -> Tensor:
    """``log_softmax(z)[token]`` for logits already scaled by ``scale_logits`` (no second division)."""
    selected = torch.gather(z, -1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return selected - torch.logsumexp(z, dim=-1)


def exact_kl(z: Tensor, z_ref: Tensor, rows_at_once: int = 8) -> Tensor:
    """KL(π‖π_ref) = Σ_v π(v) (log π(v) − log π_ref(v)) at each position, over the whole vocabulary, ``[B, T]``
    float32, from scaled logits of both (``scale_logits``); a few rows at a time, to bound the memory of the
    [rows, T, V] temporaries. What the k1 and k3 estimators estimate from the one sampled token."""
    out = []
    for start in range(0, z.shape[0], rows_at_once):
        log_p = torch.log_softmax(z[start : start + rows_at_once].float(), dim=-1)
        log_q = torch.log_softmax(z_ref[start : start + rows_at_once].float(), dim=-1)
        out.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(out)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` per position: ``H = logsumexp(z) - sum_v softmax(z)_v z_v``.

    Pass scaled logits for the entropy of the sampling distribution (TRL logs it that way).
    """
    # TRL detail: entropy = logsumexp(logits) - sum(softmax(logits) * logits)
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - torch.sum(p * z, dim=-1)


# ------------------------------------------------------------------------------------------------
# log-probabilities from a forward pass
# ------------------------------------------------------------------------------------------------
def model_inputs(input_ids: Tensor, attention_mask: Tensor) -> dict:
    """A left-padded batch as the model sees it (lm-human-preferences / TRL's `forward`): position ids
    count real tokens only, and masked positions hold token 0 (never attended; only their own outputs,
    which no loss reads except TRL's one-past-the-end value, depend on it)."""
    return {
        "input_ids": input_ids.masked_fill(attention_mask == 0, 0),
        "attention_mask": attention_mask,
        "position_ids": attention_mask.cumsum(1) - attention_mask.long(),
    }


def response_logits(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    context_length: int,
    *,
    temperature: float,
    value_head=None,
):
    """Scaled float32 logits ``[B, T_resp, V]`` that predict each response token of ``input_ids``
    (prompt left-padded to ``context_length``, response after it). With a shared critic's
    ``value_head``, also the values V(s_t) from the same trunk: ``(logits, values)``."""
    # logits_to_keep: the LM head (hidden × vocab, the largest matmul) and its backward run only on the
    # positions that predict response tokens; with a chat template the prompt is most of the sequence.
    out = model(
        **model_inputs(input_ids, attention_mask),
        logits_to_keep=input_ids.shape[1] - context_length + 1,
        output_hidden_states=value_head is not None,
    )
    logits = scale_logits(out.logits[:, :-1], temperature)
    if value_head is None:
        return logits
    # hidden_states[-1] is the trunk's output after the final norm, the input of the LM head
    return logits, value_head(out.hidden_states[-1][:, context_length - 1 : -1]).squeeze(-1).float()


def response_logprobs(
    model, input_ids: Tensor, attention_mask: Tensor, context_length: int, *, temperature: float
) -> Tensor:
    """Per-token log-probs ``[B, T_resp]`` of the response part of ``input_ids`` (see ``response_logits``)."""
    logits = response_logits(model, input_ids, attention_mask, context_length, temperature=temperature)
    return logprobs_from_scaled(logits, input_ids[:, context_length:])


@torch.no_grad()
def sequence_logprobs(
    model,
    tokenizer,
    prompts,
    response_ids,
    *,
    temperature: float,
    max_prompt_length: int = 256,
    batch_size: int = 16,
    precision=None,
) -> list[float]:
    """Σ_t log π(y_t | x, y_<t) of each response (token ids) under ``model`` at temperature T
    (``precision``: a ``models.Precision`` whose autocast the forward passes run in; none: as loaded)."""
    return token_logprobs(
        model,
        tokenizer,
        prompts,
        response_ids,
        temperature=temperature,
        max_prompt_length=max_prompt_length,
        batch_size=batch_size,
        precision=precision,
    )[0]


@torch.no_grad()
def token_logprobs(
    model,
    tokenizer,
    prompts,
    response_ids,
    *,
    temperature: float,
    max_prompt_length: int = 256,
    batch_size: int = 16,
    precision=None,
) -> tuple[list[float], list[list[float]]]:
    """(Σ_t log π(y_t | x, y_<t) of each response, each response's log π(y_t | x, y_<t) token by token), from
    one forward pass per batch, as in ``sequence_logprobs``."""
    device = next(model.parameters()).device
    totals, per_token = [], []
    for start in range(0, len(prompts), batch_size):
        queries, query_mask, _ = encode_prompts(
            tokenizer, prompts[start : start + batch_size], max_prompt_length, device
        )
        responses, mask = pad_responses(
            response_ids[start : start + batch_size], tokenizer.pad_token_id, device
        )
        ids, attention = torch.cat([queries, responses], 1), torch.cat([query_mask, mask.long()], 1)
        with autocast(precision):
            logprobs = response_logprobs(model, ids, attention, queries.shape[1], temperature=temperature)
        totals += torch.where(mask, logprobs, torch.zeros((), device=device)).sum(1).tolist()
        per_token += [row[:n].tolist() for row, n in zip(logprobs.float(), mask.sum(1).tolist())]
    return totals, per_token


@torch.no_grad()
def token_view(
    model,
    ref,
    tokenizer,
    prompt,
    response_ids: list[int],
    *,
    temperature: float,
    max_prompt_length: int = 256,
    precision=None,
) -> list[dict]:
    """One answer token by token: {token, logp, ref_logp, k1 = logp − ref_logp (the KL penalty PPO's reward pays
    on that token), exact_kl (the full-vocabulary KL at that position)} under `model` and its reference `ref`
    (one tokenizer), at the sampling temperature."""
    device = next(model.parameters()).device
    queries, query_mask, _ = encode_prompts(tokenizer, [prompt], max_prompt_length, device)
    responses, mask = pad_responses([response_ids], tokenizer.pad_token_id, device)
    ids, attention = torch.cat([queries, responses], 1), torch.cat([query_mask, mask.long()], 1)
    with autocast(precision):
        z = response_logits(model, ids, attention, queries.shape[1], temperature=temperature)
        z_ref = response_logits(ref, ids, attention, queries.shape[1], temperature=temperature)
        logp, ref_logp = logprobs_from_scaled(z, responses)[0], logprobs_from_scaled(z_ref, responses)[0]
    exact = exact_kl(z, z_ref)[0]
    return [
        {
            "token": tokenizer.decode([token]),
            "logp": logp[t].item(),
            "ref_logp": ref_logp[t].item(),
            "k1": (logp[t] - ref_logp[t]).item(),
            "exact_kl": exact[t].item(),
        }
        for t, token in enumerate(response_ids)
    ]


def autocast(precision):
    """``precision.autocast()`` (bf16 compute under mixed precision), or nothing without a precision."""
    return precision.autocast() if precision is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts,
    *,
    max_new_tokens: int,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    max_prompt_length: int = 256,
    progress: str | None = None,
    precision=None,
    synced_gpus: bool = False,
) -> list[Sample]:
    """Sample one response per prompt. Same prompts, settings and seed give the same samples (on one kind
    of CPU or GPU: bf16 numerics differ between hardware). ``precision``: as in ``sequence_logprobs``.
    ``synced_gpus``: a model whose weights are sharded across processes (FSDP, ZeRO-3) generates in step with the
    others, each forward a collective (transformers' own flag)."""
    device = next(model.parameters()).device
    generator_seed = torch.Generator().manual_seed(seed)
    samples = []
    was_training = model.training
    model.eval()
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc=progress, disable=progress is None, unit="batch"):
        batch = prompts[start : start + batch_size]
        input_ids, attention_mask, truncated = encode_prompts(tokenizer, batch, max_prompt_length, device)
        # One seed per batch drawn from the run seed: a batch's samples do not depend on what ran before.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed)))
        with autocast(precision):
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=top_k,
                top_p=top_p,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=synced_gpus,
            )
        responses, mask = truncate_at_eos(
            out[:, input_ids.shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        for messages, row, n, cut in zip(batch, responses.tolist(), mask.sum(1).tolist(), truncated):
            ids = row[:n]  # up to the first EOS; a sampled pad token is part of the answer, not its end
            samples.append(
                Sample(
                    prompt=messages,
                    response=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    response_ids=ids,
                    has_eos=tokenizer.eos_token_id in ids,
                    prompt_truncated=cut,
                )
            )
    model.train(was_training)
    return samples
