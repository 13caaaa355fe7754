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
import functools
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf_toy import models
from rlhf_toy.models import cpu_has_native_bf16, cpu_vendor

Tensor = torch.Tensor


@dataclass
class Sample:
    prompt: list  # the chat messages
    response: str  # decoded text, special tokens removed, stripped
    response_ids: list  # generated token ids up to and including the first EOS (nothing after it)
    has_eos: bool
    prompt_truncated: bool = False  # the prompt was longer than max_prompt_length and kept only its end
    token_logprobs: list | None = (
        None  # `output_logprobs`: log π of each response id at the sampling temperature
    )


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
# preference pairs: each pair's prompt through the model once
# ------------------------------------------------------------------------------------------------
def pair_prefix_lengths(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``[B]``: for 2B right-padded rows, B chosen then B rejected (TRL's DPO and reward collators), how many first
    tokens row i and row B + i share (the prompt, and any words both answers start with), at most the shorter's
    length less one: each row keeps a token of its own (a reward model's score reads its last one)."""
    B = input_ids.shape[0] // 2
    real = attention_mask.bool()
    same = (input_ids[:B] == input_ids[B:]) & real[:B] & real[B:]
    shortest = torch.minimum(real[:B].sum(1), real[B:].sum(1))
    return torch.minimum(same.long().cumprod(1).sum(1), shortest - 1).clamp(min=0)


def forward_sharing_pair_prefixes(model, input_ids: Tensor, attention_mask: Tensor):
    """``model``'s output for 2B right-padded rows, chosen then rejected, computed with each pair's shared first
    tokens (`pair_prefix_lengths`) through the model once: the prompts, left-padded (positions count real tokens,
    as the sampler's), with grad when grad is on; their keys and values copied to both rows of the pair; then each
    row's own tokens on that cache. The same computation as one forward of the rows, in fewer token positions (the
    demo's prompts are about a third of each pair's tokens). A sequence classifier's scores come back as ``logits``,
    ``[2B, labels]`` (each row's last token); a causal LM's trunk output as ``last_hidden_state``, ``[2B, T, H]`` in
    the rows' layout (padding 0): the input of its LM head, which the caller runs where it reads logits
    (`answer_logits`), and as ``logits`` the forward's own, at each row's last token (``[2B, 1, V]``, the dtype the
    model's forward returns its logits in)."""
    from transformers import DynamicCache
    from transformers.modeling_outputs import ModelOutput

    B, T = input_ids.shape[0] // 2, input_ids.shape[1]
    device = input_ids.device
    head = model.get_output_embeddings()  # None for a sequence classifier
    trunk = {} if head is None else {"output_hidden_states": True, "logits_to_keep": 1}
    prefix = pair_prefix_lengths(input_ids, attention_mask)
    width = int(prefix.max())
    # the prefixes, left-padded to the longest
    columns = torch.arange(width, device=device)
    prefix_mask = (columns >= width - prefix[:, None]).long()
    prefix_ids = input_ids[:B].gather(1, (columns - (width - prefix[:, None])).clamp(min=0))
    cache = DynamicCache(config=model.config)
    prefix_out = model(**model_inputs(prefix_ids, prefix_mask), cache=cache, use_cache=True, **trunk)
    # rows in pairs (chosen i, rejected i) from here: the cache's rows repeated in place
    cache.batch_repeat_interleave(2)
    pairs = torch.stack([torch.arange(B, device=device), torch.arange(B, 2 * B, device=device)], 1).flatten()
    own_start = prefix.repeat_interleave(2)
    own_length = attention_mask[pairs].sum(1) - own_start
    own_columns = torch.arange(int(own_length.max()), device=device)
    own_mask = (own_columns < own_length[:, None]).long()
    own_ids = input_ids[pairs].gather(1, (own_start[:, None] + own_columns).clamp(max=T - 1))
    # the padding holds the pad id: a sequence classifier scores the last token that is not one
    own_ids = own_ids.masked_fill(own_mask == 0, model.config.pad_token_id or 0)
    own_out = model(
        input_ids=own_ids,
        attention_mask=torch.cat([prefix_mask.repeat_interleave(2, 0), own_mask], 1),
        position_ids=own_start[:, None] + own_columns,
        cache=cache,
        use_cache=True,
        **trunk,
    )
    unpair = torch.argsort(pairs)  # back to chosen then rejected
    if head is None:
        return ModelOutput(logits=own_out.logits[unpair])
    # each row's hidden states where its forward would have them, from one source of [positions, hidden] vectors
    prefix_hidden, own_hidden = prefix_out.hidden_states[-1], own_out.hidden_states[-1][unpair]
    hidden_size = own_hidden.shape[-1]
    source = torch.cat(
        [
            prefix_hidden.reshape(-1, hidden_size),
            own_hidden.reshape(-1, hidden_size),
            own_hidden.new_zeros(1, hidden_size),
        ]
    )
    row = torch.arange(2 * B, device=device)[:, None]
    position = torch.arange(T, device=device)[None, :]
    pair_prefix = prefix.repeat(2)[:, None]
    from_prefix = (row % B) * width + (width - pair_prefix) + position
    from_own = B * width + row * own_hidden.shape[1] + (position - pair_prefix)
    index = torch.where(position < pair_prefix, from_prefix, from_own)
    index = torch.where(attention_mask.bool(), index, source.shape[0] - 1)
    return ModelOutput(last_hidden_state=source[index], logits=own_out.logits[unpair])


@dataclass
class AnswerWindow:
    """Where the logits that predict answer tokens sit in right-padded rows whose answers are one run of tokens each
    (TRL's DPO `completion_mask`): row r's ``lengths[r]`` of them from position ``starts[r]`` (the token before its
    answer). The window of a row is its tokens from there to the answer's end, left-aligned, ``[rows, W]`` with W the
    longest answer + 1; as in the rows, the window's logit at column j predicts its token j + 1."""

    starts: Tensor  # [R]
    lengths: Tensor  # [R] answer tokens (0 for a row without one)

    @classmethod
    def of(cls, completion_mask: Tensor) -> AnswerWindow | None:
        """The window of each row, or None when a row's answer tokens are not one run."""
        predicts = torch.zeros_like(completion_mask, dtype=torch.bool)
        predicts[:, :-1] = completion_mask[:, 1:].bool()  # the logit at t predicts token t + 1
        window = cls(starts=predicts.long().argmax(1), lengths=predicts.sum(1))
        columns = torch.arange(completion_mask.shape[1], device=completion_mask.device)
        run = (columns >= window.starts[:, None]) & (columns < (window.starts + window.lengths)[:, None])
        return window if torch.equal(run, predicts) else None

    def columns(self) -> Tensor:
        return torch.arange(int(self.lengths.max()) + 1, device=self.lengths.device)

    def ids(self, input_ids: Tensor) -> Tensor:
        """``[R, W]``: each row's token before its answer, then the answer (then tokens no logit is read for)."""
        positions = (self.starts[:, None] + self.columns()).clamp(max=input_ids.shape[1] - 1)
        return input_ids.gather(1, positions)

    def completion_mask(self) -> Tensor:
        columns = self.columns()
        return ((columns >= 1) & (columns <= self.lengths[:, None])).long()


class FrozenBottom:
    """What a causal LM's lowest `n_blocks` transformer blocks output for each right-padded row it has seen, where they
    and the embeddings below them are frozen and run no dropout: DPO's reference pass goes through the whole model
    once before training, and each training step then starts at the first block that learns, not at the embeddings
    (the demo's DPO trains the top 10 of 30 blocks: the 20 below were most of a step's forward). A row's output is
    stored under its tokens (a right-padded row's positions are 0, 1, ... whatever its padding), and only rows seen
    whole are served: a batch with a row never seen runs the whole model. Up to `max_bytes` of outputs are kept."""

    def __init__(self, blocks: torch.nn.ModuleList, n_blocks: int, max_bytes: int):
        self.blocks, self.n_blocks, self.max_bytes, self.n_bytes = blocks, n_blocks, max_bytes, 0
        self.outputs: dict[bytes, Tensor] = {}

    @classmethod
    def of(cls, model, n_blocks: int, max_bytes: int = 2**30) -> FrozenBottom | None:
        """The cache, or None where the lowest blocks' output could change: blocks or embeddings that learn, dropout."""
        blocks = models.transformer_blocks(model)
        if n_blocks <= 0 or blocks is None or n_blocks > len(blocks):
            return None
        below = [*models.embeddings_below_blocks(model), *blocks[:n_blocks]]
        frozen = not any(p.requires_grad for m in below for p in m.parameters())
        dropout = getattr(model.config, "attention_dropout", 0) or any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for part in below for m in part.modules()
        )
        return cls(blocks, n_blocks, max_bytes) if frozen and not dropout else None

    @staticmethod
    def _row_keys(input_ids: Tensor, attention_mask: Tensor) -> list[tuple[bytes, int]] | None:
        input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()
        lengths = attention_mask.sum(1)
        if not torch.equal(attention_mask.bool(), torch.arange(input_ids.shape[1]) < lengths[:, None]):
            return None  # not right-padded
        return [(row[:n].numpy().tobytes(), n) for row, n in zip(input_ids, lengths.tolist())]

    @contextlib.contextmanager
    def recording(self, input_ids: Tensor, attention_mask: Tensor):
        """Keep each row's output of the lowest blocks in the forward passes of these rows inside the block."""
        keys = self._row_keys(input_ids, attention_mask)

        def keep(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            for i, (key, n) in enumerate(keys):
                if (
                    key not in self.outputs
                    and self.n_bytes + n * hidden[i].nbytes // len(hidden[i]) <= self.max_bytes
                ):
                    self.outputs[key] = hidden[i, :n].detach().clone()
                    self.n_bytes += self.outputs[key].nbytes

        handle = None if keys is None else self.blocks[self.n_blocks - 1].register_forward_hook(keep)
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def lookup(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
        """``[R, T, H]``: the rows' outputs of the lowest blocks (0 at padding), or None if a row was not seen."""
        keys = self._row_keys(input_ids, attention_mask)
        if keys is None or any(key not in self.outputs for key, _ in keys):
            return None
        first = self.outputs[keys[0][0]]
        hidden = first.new_zeros(len(keys), input_ids.shape[1], first.shape[-1])
        for i, (key, n) in enumerate(keys):
            hidden[i, :n] = self.outputs[key]
        return hidden.to(input_ids.device)

    @contextlib.contextmanager
    def skipped(self, hidden: Tensor):
        """The model's forward with the lowest blocks' output `hidden`: the first of them returns it, the others pass
        it on, so the model's own code (masks, positions) runs the blocks above as ever."""
        first, *rest = self.blocks[: self.n_blocks]
        first.forward = lambda *args, **kwargs: hidden
        for block in rest:
            block.forward = lambda hidden_states, *args, **kwargs: hidden_states
        try:
            yield
        finally:
            for block in self.blocks[: self.n_blocks]:
                del block.forward


def answer_logits(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    window: AnswerWindow,
    share_prompts: bool,
    frozen_bottom: FrozenBottom | None = None,
):
    """``[R, W, V]``: the logits of `window` (an `AnswerWindow` of the rows), from one forward of the right-padded rows
    (``share_prompts``: pairs of rows, chosen then rejected, with each pair's prompt through the trunk once,
    `forward_sharing_pair_prefixes`; `frozen_bottom`: from the lowest blocks' output for the rows, where it holds
    them all); the LM head runs only where a logit predicts an answer token, and the rest of the window is 0; in the
    dtype the model's forward returns its logits (float32 where accelerate's mixed precision wraps the forward, whose
    autocast the head then needs around it too)."""
    below = None if frozen_bottom is None else frozen_bottom.lookup(input_ids, attention_mask)
    if share_prompts and below is None:
        out = forward_sharing_pair_prefixes(model, input_ids, attention_mask)
        hidden = out.last_hidden_state
    else:  # hidden_states[-1] is the trunk's output after its final norm, the input of the LM head
        with contextlib.nullcontext() if below is None else frozen_bottom.skipped(below):
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                output_hidden_states=True,
                logits_to_keep=1,
            )
        hidden = out.hidden_states[-1]
    columns = window.columns()
    real = columns < window.lengths[:, None]
    rows, at = real.nonzero(as_tuple=True)
    needed = model.get_output_embeddings()(hidden[rows, window.starts[rows] + at]).to(out.logits.dtype)
    logits = needed.new_zeros(*real.shape, needed.shape[-1])
    logits[rows, at] = needed
    return logits


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------
@dataclass
class Sampled:
    """What `sample_ids` returns for a batch of B left-padded prompts and T ≤ max_new_tokens decode steps."""

    responses: Tensor  # [B, T] sampled ids, pad_token_id after each row's first EOS
    logits: Tensor | None = (
        None  # [B, T, V] raw float32 logits that predicted each token (0 after a row ended)
    )
    hidden: Tensor | None = (
        None  # [B, T, H] the trunk's last hidden state (after its final norm) before each token
    )
    logprobs: Tensor | None = (
        None  # [B, T] float32 log π(token) from `logits` at T (`scale_logits`), 0 after a row ended
    )


def next_token(
    logits: Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0, uniform: Tensor | None = None
) -> Tensor:
    """One token per row from float32 logits ``[B, V]``, from the distribution `generate` draws from: ``logits / T``,
    then top-k, then top-p (nucleus, the most likely token always kept), then softmax; ``temperature == 0``: argmax.
    The draw inverts the CDF with one uniform per row (`uniform`, ``[B, 1]`` float64; drawn from the global RNG when
    not given), where `torch.multinomial` draws an exponential per vocabulary entry: 49k random numbers a row, a
    tenth of a decode step on a CPU."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits / temperature
    if top_k > 0:  # transformers' TopKLogitsWarper
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if (
        top_p < 1.0
    ):  # transformers' TopPLogitsWarper: drop the tokens whose cumulative mass (ascending) ≤ 1 − p
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    cdf = scores.softmax(-1).double().cumsum(-1)  # float64: no rounding gap at the top of 49k summed entries
    if uniform is None:
        uniform = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device)
    u = uniform * cdf[:, -1:]
    # right=True: the first token whose cdf exceeds u, never one of zero mass (u = 0 included)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def preallocated_cache(model, max_length: int):
    """A KV cache whose buffers are sized at its first forward for `max_length` positions (the prompt's width plus
    the new tokens): each decode step writes its keys and values into the next slot, where transformers'
    DynamicCache copies the whole cache (`torch.cat`). A model with sliding-window layers gets transformers' own
    cache, which knows their rule."""
    from transformers import DynamicCache
    from transformers.cache_utils import Cache, DynamicLayer

    config = getattr(model, "config", None)
    if (
        config is None
        or getattr(config, "sliding_window", None)
        or "sliding" in str(getattr(config, "layer_types", ""))
    ):
        return DynamicCache(config=config)

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            # Under autocast, attention multiplies the keys and values in the autocast dtype, so they are stored in it:
            # the same rounding autocast applies, once per token. Stored as computed (Llama's rotary embedding gives
            # float32 keys), the whole cache was cast again by every layer at every step.
            if torch.is_autocast_enabled(key_states.device.type):
                dtype = torch.get_autocast_dtype(key_states.device.type)
                key_states, value_states = key_states.to(dtype), value_states.to(dtype)
            if not self.is_initialized:  # the prefill (or the prompts' shared prefix), and room for the rest
                self.is_initialized, self.device, self.length = True, key_states.device, key_states.shape[-2]
                shape = (*key_states.shape[:-2], max_length, key_states.shape[-1])
                self.key_buffer = key_states.new_empty(shape)
                self.value_buffer = value_states.new_empty(shape)
                self.key_buffer[..., : self.length, :] = key_states
                self.value_buffer[..., : self.length, :] = value_states
            else:
                n = key_states.shape[-2]
                self.key_buffer[..., self.length : self.length + n, :] = key_states
                self.value_buffer[..., self.length : self.length + n, :] = value_states
                self.length += n
            self.keys = self.key_buffer[..., : self.length, :]
            self.values = self.value_buffer[..., : self.length, :]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:  # one prefix's keys and values for every row of the batch
                self.key_buffer = self.key_buffer.repeat_interleave(repeats, 0)
                self.value_buffer = self.value_buffer.repeat_interleave(repeats, 0)
                self.keys = self.key_buffer[..., : self.length, :]
                self.values = self.value_buffer[..., : self.length, :]

        def batch_select_indices(self, indices: Tensor) -> None:
            if self.is_initialized:
                self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
                self.keys = self.key_buffer[..., : self.length, :]
                self.values = self.value_buffer[..., : self.length, :]

    return Cache(layer_class_to_replicate=PreallocatedLayer)


# The prompts' shared prefix goes through the model once when that saves at least this many token positions of the
# prefill: its own forward reads every weight once more, which costs about the FLOPs of 25 positions in float32 and
# 70 in bf16 on 2 cores (a weight read at 24 GB/s against a matmul at 300 and 1600 GFLOP/s).
SHARED_PREFIX_MIN_SAVED = 64


def shared_prefix_length(input_ids: Tensor, attention_mask: Tensor) -> int:
    """How many first real tokens every left-padded prompt of the batch has in common (a chat template's system
    prompt and turn markers), at most the shortest prompt's length less one: every row keeps a token of its own,
    whose logits give its first answer token."""
    lengths = attention_mask.sum(1)
    longest = int(lengths.min()) - 1
    if input_ids.shape[0] < 2 or longest < 1:
        return 0
    columns = (input_ids.shape[1] - lengths).unsqueeze(1) + torch.arange(longest, device=input_ids.device)
    tokens = input_ids.gather(1, columns)  # each row's first `longest` real tokens
    return int((tokens == tokens[:1]).all(0).long().cumprod(0).sum())


def prefix_to_share(input_ids: Tensor, attention_mask: Tensor) -> int:
    """The shared prefix `sample_ids` puts through the model once for these prompts (`shared_prefix_length`), or 0
    when that would save fewer than `SHARED_PREFIX_MIN_SAVED` token positions."""
    prefix = shared_prefix_length(input_ids, attention_mask)
    return prefix if prefix * (input_ids.shape[0] - 1) >= SHARED_PREFIX_MIN_SAVED else 0


def prefill_shared_prefix(
    model, cache, input_ids: Tensor, attention_mask: Tensor, prefix: int
) -> tuple[Tensor, Tensor]:
    """The prompts' first `prefix` tokens, the same in every row, through the model once, their keys and values then
    copied to every row of `cache`. Each row becomes prefix, left padding, the rest of its prompt: the positions count
    real tokens as before, so the model computes what it would from the whole prompt, and the rows' own tokens go
    through the model in the next forward. Returns that layout's ids and attention mask."""
    B, width = input_ids.shape
    shared = input_ids[:1, width - int(attention_mask[0].sum()) :][:, :prefix]
    model(
        input_ids=shared,
        attention_mask=attention_mask.new_ones(1, prefix),
        position_ids=torch.arange(prefix, device=input_ids.device).unsqueeze(0),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache.batch_repeat_interleave(B)
    # the pads of a row stay as many and go after the prefix: the first width − prefix columns of its mask
    # (the ids under a pad are not read: `model_inputs` zeroes them)
    ids = torch.cat([shared.expand(B, -1), input_ids[:, prefix:]], 1)
    return ids, torch.cat([attention_mask.new_ones(B, prefix), attention_mask[:, : width - prefix]], 1)


@contextlib.contextmanager
def weights_cast_once(model, device_type: str, sharded: bool):
    """Under autocast, each float32 weight's bf16 copy made once for a whole decode loop, not at every step.
    Autocast caches a weight's cast only for a leaf that requires grad; a frozen one (PPO's bottom blocks and
    tied embedding/LM head, a reference, a LoRA base) is cast again at every step, which made a bfloat16-mixed
    decode step 1.8x (batch 8) and 1.5x (batch 32) slower on 2 cores. Marking frozen weights for the loop, under
    no_grad (no graph is built), gives the same numbers; the marks are removed after. Sharded weights (FSDP,
    ZeRO-3) are gathered into other tensors for each forward: left alone."""
    frozen = []
    if torch.is_autocast_enabled(device_type) and not torch.is_grad_enabled() and not sharded:
        frozen = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def pack_onednn(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A Linear weight ``[out, in]`` in the blocked layout oneDNN's GEMM reads in ``dtype`` (`packed_linear`). The
    batch size given is only a hint for the layout; any number of rows multiplies by it (float32 on an AMD EPYC:
    the model's matmuls for 3, 8, 32 and 100 rows within 10% for hints of 8, 32 and 100)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), 8)


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` in the packed weight's dtype from a weight packed by `pack_onednn`."""
    return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, bias, "none", [], "")


# Up to here a float32 product is bound by reading its weight more than by its FLOPs on a 2-core CPU (about 24 rows at
# 280 GFLOP/s and 23 GB/s), so a second pass over the weight (MKL packing it at every call) is what it saves; at 100
# rows the packed loop was 1.08x and the demo's compare (batch 100) no faster, for twice the model's weights held.
FLOAT32_PACKED_MAX_ROWS = 32


def float32_packs_with_onednn() -> bool:
    """Whether float32 products in a decode loop go through oneDNN's packed kernel rather than MKL's: on an x86 CPU
    not made by Intel. MKL picks its kernels by the CPU's maker, and on an AMD EPYC (Zen 3, 2 cores, AVX2) the
    embedded model's float32 matmuls of one decode step took, MKL unpacked / MKL packed / oneDNN packed, 109 / 105 /
    60 ms at 8 rows, 180 / 176 / 117 at 32 and 311 / 302 / 242 at 100 (oneDNN's products within 1.3e-6 of MKL's,
    relative), and the whole loop ran 1.52x / 1.66x / 1.77x `generate` at batch 8 / 32 / 100 where with MKL's
    packing it ran 1.03x / 1.28x / 1.52x (`scripts/bench_sampling.py`, one run each); alternating in one process
    on the demo's DPO model, 48 tokens, the loop was 1.30x MKL's rule at batch 32 and 1.14x at 100. On Intel Xeons
    oneDNN's float32 kernel was the slower one (at batch 32 and 100)."""
    vendor = cpu_vendor()
    return torch.backends.mkldnn.is_available() and vendor is not None and vendor != "GenuineIntel"


def packs_on_cpu(compute: torch.dtype, rows: int) -> bool:
    """Whether `linears_packed_once` packs a CPU Linear that computes in ``compute`` for a loop of ``rows`` rows: bf16
    for oneDNN on a CPU with native bf16; float32 for oneDNN at any rows where `float32_packs_with_onednn`, else for
    MKL up to `FLOAT32_PACKED_MAX_ROWS` rows."""
    if compute == torch.bfloat16:
        return torch.backends.mkldnn.is_available() and cpu_has_native_bf16()
    if compute == torch.float32:
        if float32_packs_with_onednn():
            return True
        return torch.backends.mkl.is_available() and rows <= FLOAT32_PACKED_MAX_ROWS
    return False


def pack_float32(weight: Tensor, rows: int) -> Tensor:
    """A Linear weight ``[out, in]`` packed by MKL for products with exactly ``rows`` rows (`packed_linear_float32`)."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)


def packed_linear_float32(
    x: Tensor, packed: Tensor, weight: Tensor, bias: Tensor | None, rows: int
) -> Tensor:
    """``F.linear(x, weight, bias)`` in float32 from a weight packed by `pack_float32` for ``rows`` rows. MKL's packed
    product runs only at that row count, so fewer rows (a batch some of whose rows have ended) are padded with zeros
    up to it, down to three quarters of it. Below that the padded rows cost more than the packing gains, the more so
    past 32 rows, where a product's time grows with its rows (the embedded model's matmuls on 2 cores: packed for 8
    rows 24 ms, ``F.linear`` on 4 rows 27 ms and on 2 rows 18 ms; packed for 100 rows 73 ms, ``F.linear`` on 64
    rows 69 ms). Those calls, and more rows than packed for (the prefill), take ``F.linear``."""
    width = x.shape[-1]
    given = x.numel() // width
    if given > rows or 4 * given < 3 * rows:
        return torch.nn.functional.linear(x, weight, bias)
    flat = x.reshape(given, width)
    if given < rows:
        flat = torch.cat([flat, flat.new_zeros(rows - given, width)])
    out = torch.ops.mkl._mkl_linear(flat, packed, weight, bias, rows)
    return out[:given].reshape(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def linears_packed_once(model, device_type: str, sharded: bool, rows: int):
    """On a CPU, each ``nn.Linear`` weight reordered once per decode loop into the blocked layout the GEMM reads,
    where ``F.linear`` reorders it at every call: a decode step multiplies a few rows by every weight, so that
    reorder is a second pass over the weights at every step. Sharded weights (FSDP, ZeRO-3), other devices and other
    module types (GPT-2's Conv1D) are left as they are; the packed copies are dropped after the loop.

    - Computing in bfloat16 (autocast or bf16 weights) on a CPU with native bf16: oneDNN's bf16 layout, for any
      number of rows. 1.07-1.16x a whole decode step on 2 cores (batch 8-100). The products are those of
      ``F.linear`` bit for bit at most row counts; at some (a prefill of 96 or 480 rows on the embedded model) oneDNN
      blocks the sums another way and they differ by bf16 rounding, so answers drawn with it are not token for token
      those drawn without it (the test holds them to bf16's tolerance). Not on a CPU without native bf16 (there
      oneDNN emulates bf16, or has no bf16 kernel at all).
    - In float32, where PyTorch has MKL, for a batch of at most `FLOAT32_PACKED_MAX_ROWS` rows: MKL's packed layout
      for the batch's ``rows``, fewer rows padded up to it (`packed_linear_float32`). The whole loop 1.25x at batch
      8 and 1.11x at 32 (2 cores, the embedded model, 48 tokens, packing included); MKL's packed copies hold about
      twice the weights' bytes (1.07 GB for the embedded model) for the loop. The products differ from
      ``F.linear``'s by float32 rounding (MKL blocks the sums another way). oneDNN's packed float32 kernel was
      slower than MKL's unpacked one at batch 32 and 100 on Intel Xeons.
    - In float32 on an x86 CPU not made by Intel (`float32_packs_with_onednn`): oneDNN's float32 layout, for any
      number of rows, as bf16 above; its products differ from ``F.linear``'s (MKL's) by float32 rounding."""
    bf16_autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    any_autocast = torch.is_autocast_enabled("cpu")
    packs = device_type == "cpu" and not sharded
    bf16_packs = packs and packs_on_cpu(torch.bfloat16, rows)
    float32_packs = packs and not any_autocast and packs_on_cpu(torch.float32, rows)
    onednn_float32 = float32_packs and float32_packs_with_onednn()
    patched = []
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        if bf16_packs and (bf16_autocast or module.weight.dtype == torch.bfloat16):
            onednn_dtype = torch.bfloat16
        elif onednn_float32 and module.weight.dtype == torch.float32:
            onednn_dtype = torch.float32
        else:
            onednn_dtype = None
        if onednn_dtype is not None:
            bias = None if module.bias is None else module.bias.detach().to(onednn_dtype)
            packed = pack_onednn(module.weight, onednn_dtype)
            module.forward = functools.partial(packed_linear, packed=packed, bias=bias)
        elif float32_packs and module.weight.dtype == torch.float32:
            weight = module.weight.detach()
            bias = None if module.bias is None else module.bias.detach()
            packed = pack_float32(weight, rows)
            module.forward = functools.partial(
                packed_linear_float32, packed=packed, weight=weight, bias=bias, rows=rows
            )
        else:
            continue
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


@torch.no_grad()
def sample_ids(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int | None,
    pad_token_id: int,
    top_k: int = 0,
    top_p: float = 1.0,
    output_logits: bool = False,
    output_hidden_states: bool = False,
    output_logprobs: bool = False,
    synced_gpus: bool = False,
    generator: torch.Generator | None = None,
) -> Sampled:
    """Responses to left-padded prompts, one decode step at a time over the model's KV cache: the same model call
    the forward passes make (`model_inputs`: pad ids 0, positions counting real tokens), the next token drawn in
    float32 as `generate` draws it (`next_token`), and a row dropped from the batch, cache included, once it has
    sampled its EOS, so the last steps cost what the rows still running cost. Stops when every row has ended. The
    first tokens every prompt shares (a chat template's system prompt) go through the model once for the batch
    (`prefill_shared_prefix`).

    ``synced_gpus`` (weights sharded across processes): no row is dropped and every process steps until all of
    them have ended, because each forward gathers weights from all of them. ``generator``: where the draws come
    from (default: torch's global random stream, as PPO's rollouts, which a checkpoint saves and restores)."""
    with (
        weights_cast_once(model, input_ids.device.type, sharded=synced_gpus),
        linears_packed_once(model, input_ids.device.type, sharded=synced_gpus, rows=input_ids.shape[0]),
    ):
        B, device = input_ids.shape[0], input_ids.device
        responses = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        logits_out, hidden_out, logprobs_out = [], [], []
        positions = attention_mask.sum(1, keepdim=True) - 1  # of each row's last real token
        rows = torch.arange(B, device=device)  # the rows still sampling, as indices into the batch
        width = input_ids.shape[1]
        cache = preallocated_cache(model, width + max_new_tokens)
        # synced: every process must make the same forwards, and their prompts differ
        prefix = 0 if synced_gpus else prefix_to_share(input_ids, attention_mask)
        if prefix:
            input_ids, attention_mask = prefill_shared_prefix(model, cache, input_ids, attention_mask, prefix)
            step_inputs = {name: x[:, prefix:] for name, x in model_inputs(input_ids, attention_mask).items()}
            step_inputs["attention_mask"] = attention_mask  # the keys: the prefix's too
        else:
            step_inputs = model_inputs(input_ids, attention_mask)
        mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], 1)
        steps, local_done = 0, False
        for step in range(max_new_tokens):
            out = model(
                **step_inputs,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                output_hidden_states=output_hidden_states,
            )
            # synced and this process's answers complete: the forward keeps the collectives in step, but nothing is
            # drawn (as in `generate`), so the random stream is left where an unsynced process would leave it
            if local_done:
                tokens = torch.full_like(rows, pad_token_id)
            else:
                logits = out.logits[:, -1].float()
                # one uniform for every row of the batch, running or not: the answers do not depend on when rows leave
                uniform = (
                    torch.rand(B, 1, dtype=torch.float64, device=device, generator=generator)[rows]
                    if temperature > 0
                    else None
                )
                tokens = next_token(
                    logits, temperature=temperature, top_k=top_k, top_p=top_p, uniform=uniform
                )
                steps = step + 1
                if output_logits:
                    logits_out.append(logits.new_zeros(B, logits.shape[-1]).index_copy_(0, rows, logits))
                if output_hidden_states:
                    h = out.hidden_states[-1][:, -1]
                    hidden_out.append(h.new_zeros(B, h.shape[-1]).index_copy_(0, rows, h))
                if output_logprobs:  # `response_logprobs`' computation, on this step's logits
                    lp = logprobs_from_scaled(scale_logits(logits, temperature), tokens)
                    logprobs_out.append(lp.new_zeros(B).index_copy_(0, rows, lp))
                responses[rows, step] = tokens
            going = (
                torch.ones_like(tokens, dtype=torch.bool) if eos_token_id is None else tokens != eos_token_id
            )
            if synced_gpus:  # keep every row (they read pad after their EOS) until every process has ended
                if eos_token_id is not None:
                    ended = responses[:, : step + 1].eq(eos_token_id).any(1)
                    tokens, local_done = tokens.masked_fill(ended, pad_token_id), bool(ended.all())
                unfinished = torch.tensor(float(not local_done), device=device)
                torch.distributed.all_reduce(unfinished)
                if unfinished.item() == 0:
                    break
            elif not bool(going.all()):
                if not bool(going.any()):
                    break
                keep = going.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, tokens, positions = rows[keep], tokens[keep], positions[keep]
            width += 1
            positions = positions + 1
            step_inputs = {
                "input_ids": tokens.unsqueeze(1),
                "attention_mask": mask[rows, :width],
                "position_ids": positions,
            }
        if synced_gpus and eos_token_id is not None:  # the pad after each row's EOS, as when rows are dropped
            responses, _ = truncate_at_eos(responses, eos_token_id, pad_token_id)
        return Sampled(
            responses=responses[:, :steps],
            logits=torch.stack(logits_out, 1) if output_logits else None,
            hidden=torch.stack(hidden_out, 1) if output_hidden_states else None,
            logprobs=torch.stack(logprobs_out, 1) if output_logprobs else None,
        )


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
    output_logprobs: bool = False,
) -> list[Sample]:
    """Sample one response per prompt. Same prompts, settings and seed give the same samples (on one kind
    of CPU or GPU: bf16 numerics differ between hardware). ``precision``: as in ``sequence_logprobs``.
    ``synced_gpus``: a model whose weights are sharded across processes (FSDP, ZeRO-3) generates in step with the
    others, each forward a collective (transformers' own flag). ``output_logprobs``: each Sample's
    `token_logprobs`, from the decode's own logits (`sample_ids`)."""
    device = next(model.parameters()).device
    generator_seed = torch.Generator().manual_seed(seed)
    samples = []
    was_training = model.training
    model.eval()
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc=progress, disable=progress is None, unit="batch"):
        batch = prompts[start : start + batch_size]
        input_ids, attention_mask, truncated = encode_prompts(tokenizer, batch, max_prompt_length, device)
        # One seed per batch drawn from the run seed: a batch's samples do not depend on what ran before. Its own
        # generator, not torch's global one: an evaluation leaves the global random stream where it was, so a
        # training run draws the same rollouts whether or not it evaluated first.
        batch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed))
        generator = torch.Generator(device=device).manual_seed(batch_seed)
        with autocast(precision):
            out = sample_ids(
                model,
                input_ids,
                attention_mask,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                synced_gpus=synced_gpus,
                generator=generator,
                output_logprobs=output_logprobs,
            )
        responses, mask = truncate_at_eos(out.responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
        logprobs = out.logprobs.tolist() if output_logprobs else [None] * len(batch)
        for messages, row, n, cut, lps in zip(
            batch, responses.tolist(), mask.sum(1).tolist(), truncated, logprobs
        ):
            ids = row[:n]  # up to the first EOS; a sampled pad token is part of the answer, not its end
            samples.append(
                Sample(
                    prompt=messages,
                    response=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    response_ids=ids,
                    has_eos=tokenizer.eos_token_id in ids,
                    prompt_truncated=cut,
                    token_logprobs=None if lps is None else lps[:n],
                )
            )
    model.train(was_training)
    return samples
