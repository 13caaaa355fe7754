"""Sample prompts and score the answers: the one implementation every stage's before/after evaluation and
compare use, with one row shape and one summary shape (`stats.summarize`: gold_mean, rm_mean, score_mean,
kl_to_ref, length_mean, eos_rate, distinct_2, ...)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields

from rlhf_toy import sequences
from rlhf_toy.evaluation.stats import summarize
from rlhf_toy.rewards import call_reward_function
from rlhf_toy.scoring import Judge


@dataclass(frozen=True)
class Sampling:
    """How an evaluation samples: `sequences.generate`'s settings. `precision` (a `models.Precision`): the
    autocast sampling and log-probs run in; `synced_gpus`: as in `sequences.generate`."""

    max_new_tokens: int
    temperature: float
    batch_size: int
    seed: int
    max_prompt_length: int = 256
    precision: object = None
    synced_gpus: bool = False


def sample_and_score(
    model,
    tokenizer,
    prompts,
    sampling: Sampling,
    *,
    judge: Judge,
    titles: list | None = None,
    ref=None,
    ref_tokenizer=None,
    progress: str | None = None,
    records: list[dict] | None = None,
    reward_functions: list = (),
    keep_ids: bool = False,
) -> tuple[dict, list[dict]]:
    """Sample one answer per prompt (`sequences.generate`, seeded per batch), judge it (gold; RM and the
    penalised score when the judge has a reward model) and, given a reference model, its sequence
    KL(π‖π_ref) = Σ_t log π(y_t) − log π_ref(y_t) at the sampling temperature. `titles`: each prompt's film, for
    the gold judge's on-topic term (None: unknown). `reward_functions` (`rewards.load_reward_functions`'s, the
    reward model's `rm` entry skipped: the judge has it) score each answer from the prompt `records`' columns, as
    in PPO's training: row["rewards"][name]. `keep_ids`: each row also holds its `response_ids`. Returns
    (summary, rows)."""
    settings = {
        f.name: getattr(sampling, f.name) for f in fields(sampling)
    }  # not asdict: it would unpack precision
    # The KL needs log π of each sampled token: the sampler's own, from the logits it drew the token from, so only the
    # reference runs a forward pass. In float32 they are a forward pass's (within 1e-5); under bf16 they differ by its
    # rounding, too much for PPO's ratio (`Precision.decode_matches_forward`) but not for an estimate of the KL: on
    # 100 answers of the demo's PPO and of its DPO model, by 0.23 and 0.24 nats an answer (sd) and +0.001 and -0.024
    # on average, where the answers' KL spreads by 3.2 and 2.6 (docs/performance.md). The policy's forward pass was
    # over a quarter of compare's time for each model under bf16.
    logprobs_from_sampling = ref is not None
    samples = sequences.generate(
        model, tokenizer, prompts, **settings, progress=progress, output_logprobs=logprobs_from_sampling
    )
    max_prompt_length = sampling.max_prompt_length
    n_tokens = [len(s.response_ids) for s in samples]
    n_cut = sum(s.prompt_truncated for s in samples)
    if n_cut:
        print(
            f"note: {n_cut} of {len(samples)} prompts are longer than max_prompt_length={max_prompt_length} tokens "
            "and were answered from their last ones (counted as prompts_truncated)",
            file=sys.stderr,
        )
    scores = judge.score(
        [s.prompt for s in samples],
        [s.response for s in samples],
        n_tokens,
        [s.has_eos for s in samples],
        titles=titles,
    )
    logps = ref_logps = kls = [None] * len(samples)
    if ref is not None:
        ids = [s.response_ids or [tokenizer.eos_token_id] for s in samples]  # an empty answer is its EOS
        settings = dict(
            temperature=sampling.temperature,
            max_prompt_length=max_prompt_length,
            batch_size=sampling.batch_size,
            precision=sampling.precision,
        )
        if logprobs_from_sampling:
            token_logps = [s.token_logprobs for s in samples]
            logps = [sum(lps) for lps in token_logps]
        else:
            logps, token_logps = sequences.token_logprobs(model, tokenizer, prompts, ids, **settings)
        ref_logps, ref_token_logps = sequences.token_logprobs(
            ref, ref_tokenizer or tokenizer, prompts, ids, **settings
        )
        kls = [a - b for a, b in zip(logps, ref_logps)]
        # The per-token view (report.html, inspect_samples --tokens): each token and k1 = log π − log π_ref at it,
        # the KL penalty PPO's reward pays there.
        token_views = [
            {
                "token_view": {
                    "token": [tokenizer.decode([t]) for t in s.response_ids],
                    "k1": [round(a - b, 4) for a, b in zip(lp, rlp)][: len(s.response_ids)],
                }
            }
            for s, lp, rlp in zip(samples, token_logps, ref_token_logps)
        ]
    else:
        token_views = [{}] * len(samples)
    rows = [
        {
            "prompt": s.prompt,
            "response": s.response,
            "n_tokens": n,
            "n_words": len(s.response.split()),
            "has_eos": s.has_eos,
            **sc,
            "logp": lp,
            "ref_logp": rlp,
            "kl": kl,
            **({"prompt_truncated": True} if s.prompt_truncated else {}),
            **({"response_ids": s.response_ids} if keep_ids else {}),
            **view,
        }
        for s, n, sc, lp, rlp, kl, view in zip(samples, n_tokens, scores, logps, ref_logps, kls, token_views)
    ]
    functions = [(entry, name, f) for entry, name, f in reward_functions if f is not None]
    for entry, name, function in functions:
        values = call_reward_function(
            entry,
            function,
            records,
            [s.response for s in samples],
            [s.response_ids for s in samples],
            step=0,
            max_steps=0,
            log_metric=lambda *_: None,
        )
        for row, value in zip(rows, values.tolist()):
            row.setdefault("rewards", {})[name] = (
                None if value != value else value
            )  # NaN: the function's None
    return summarize(rows), rows


def as_training_metrics(summary: dict) -> dict:
    """An evaluation summary under PPO's metric names, so compare can overlay it on training curves."""
    names = {
        "gold_mean": "score/gold",
        "rm_mean": "score/rm",
        "kl_to_ref": "objective/kl",
        "length_mean": "response/length_mean",
        "eos_rate": "val/eos_rate",
    }
    return {name: summary[key] for key, name in names.items() if summary.get(key) is not None}
