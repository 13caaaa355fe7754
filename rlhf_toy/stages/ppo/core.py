"""The PPO math of rlhf_toy: pure torch functions, no I/O, no models (CleanRL style).

Everything works on right-padded response tensors ``[B, T]``; a *mask* is True on the real response
tokens (up to and including the EOS, or the whole row when the response ran to the length limit).
Padded values may be anything (NaN, inf): every function selects with ``torch.where`` rather than
multiplying by the mask, and returns 0 at padded positions. One PPO iteration::

    kl            = kl_penalty(logprobs, ref_logprobs, "k1")            # per token
    rewards, nsr  = compute_rewards(scores, kl, mask, beta)             # -beta*kl + score at the end
    adv, returns  = gae(rewards, values, mask, gamma, lam)
    adv           = masked_whiten(adv, mask)                            # (compute_ppo_targets does all four)
    pg_loss, st   = policy_loss(new_logprobs, logprobs, adv, mask, cliprange)
    vf_loss, vclip = value_loss(new_values, values, returns, mask, cliprange_value)

The critic-free estimators replace GAE and the value loss (``compute_critic_free_targets``): ``grpo`` and
``rloo`` give each sequence one advantage from its group of ``num_generations`` samples of the same prompt
(``grpo_advantages``, ``rloo_advantages``), ``reinforce_pp`` whitens the reward-to-go over the batch
(``discounted_returns``). ``kl_in: loss`` moves the KL from the reward into the loss (``kl_loss``);
``aggregate_loss`` is how a per-token loss becomes one number (TRL's ``loss_type``), and
``sequence_policy_loss`` is TRL RLOOTrainer's one-ratio-per-sequence surrogate.

Where and why ours differs from TRL 1.12's ``PPOTrainer`` (score position, value mask, statistics over
padding, end-of-response detection), and the arguments with which ``rlhf_toy/verify`` reproduces TRL exactly
(``trl_compat``, ``stats_over_padding``; no config sets them): ``docs/trl_differences.md``. Log-probs and
EOS truncation are in ``rlhf_toy.sequences``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "kl_penalty",
    "last_token_index",
    "extend_mask_by_one",
    "compute_rewards",
    "gae",
    "compute_ppo_targets",
    "sequence_rewards",
    "grpo_advantages",
    "rloo_advantages",
    "discounted_returns",
    "compute_critic_free_targets",
    "aggregate_loss",
    "policy_loss",
    "sequence_policy_loss",
    "kl_loss",
    "value_loss",
    "explained_variance",
    "AdaptiveKLController",
    "FixedKLController",
    "make_kl_controller",
]

Tensor = torch.Tensor
SumAcross = Callable[[Tensor], Tensor]  # a tensor summed over the data-parallel processes (an all-reduce)


def _bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


# --------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------
def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum_{mask} x`` over all elements (``dim=None``) or along ``dim``; padding ignored."""
    m = _bool(mask)
    xz = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return xz.sum() if dim is None else xz.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum_{mask} x / sum(mask)``, over everything (``dim=None``) or along ``dim``.

    Same numerics as TRL's ``masked_mean`` (sum of the selected values divided by the count),
    but padded values are selected away, not multiplied by 0, so NaN/inf padding is harmless, and the mean of
    nothing is 0, not NaN (a micro-batch whose rows `mask_truncated_completions` all masked).
    """
    # TRL detail: masked_mean = (values * mask).sum() / mask.sum()
    m = _bool(mask)
    if dim is None:
        return masked_sum(x, m) / m.sum().clamp(min=1)
    return masked_sum(x, m, dim) / m.sum(dim=dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, sum_across: SumAcross | None = None) -> Tensor:
    """Variance of the real entries: ``mean_mask((x - mean_mask(x))^2) * n/(n-1)`` (if unbiased).

    ``n = sum(mask)``.  Raises when the mask is empty (as TRL does); with ``n == 1`` and
    ``unbiased`` the result is NaN (0 · n/(n-1); TRL behaves the same; ``masked_whiten`` handles it).
    ``sum_across`` sums a tensor over the data-parallel processes (an all-reduce): the sums, the squared
    deviations and ``n`` are then every process's together, so several processes get the variance one
    process holding the whole batch would (None: this batch alone).
    """
    return _masked_moments(x, _bool(mask), unbiased, sum_across)[2]


def _masked_moments(
    x: Tensor, m: Tensor, unbiased: bool, sum_across: SumAcross | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(n, mean, variance) of the real entries (``masked_var``): three sums, each all-reduced with ``sum_across``."""
    # TRL detail: masked_var with Bessel correction mask_sum / (mask_sum - 1)
    total = sum_across or (lambda t: t)
    mask_sum = total(m.sum())
    mean = total(masked_sum(x, m)) / mask_sum
    variance = total(masked_sum((x - mean) ** 2, m)) / mask_sum
    if unbiased:
        if mask_sum == 0:
            raise ValueError("masked_var: the mask is empty (no real tokens in this batch)")
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return mask_sum, mean, variance


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, sum_across: SumAcross | None = None
) -> Tensor:
    """Whiten the real entries: ``(x - mu) * rsqrt(var + 1e-8)`` (``+ mu`` back if not shift_mean).

    ``mu`` and ``var`` (unbiased) are taken over the mask only, and over every process's batch with
    ``sum_across`` (``masked_var``).  Padded positions come back as 0
    (TRL returns whitened garbage there and masks it afterwards; on real positions the two agree).
    A single real entry has no spread: it comes back as 0 (``mu`` if not shift_mean), where TRL's
    unbiased variance divides by zero and returns NaN.
    """
    # TRL detail: masked_whiten, rsqrt(var + 1e-8), unbiased variance; lm-human-preferences whitens advantages
    m = _bool(mask)
    count, mean, variance = _masked_moments(x, m, True, sum_across)
    if count == 1:
        whitened = torch.zeros_like(x)
    else:
        whitened = (x - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


# --------------------------------------------------------------------------------------------
# KL estimators, response masks, rewards
# --------------------------------------------------------------------------------------------
def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.

    * ``"k1"``: ``log pi - log pi_ref`` (unbiased, can be negative, high variance).
    * ``"k3"``: ``(r - 1) - log r`` with ``r = pi_ref / pi = exp(log pi_ref - log pi)``
      (unbiased, always >= 0, lower variance).
    """
    # Schulman, "Approximating KL Divergence" (joschu.net/blog/kl-approx.html); TRL's kl_estimator
    logr = ref_logprobs - logprobs
    if estimator == "k1":
        return -logr
    if estimator == "k3":
        return (logr.exp() - 1) - logr
    raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1' or 'k3'")


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last True position of each row of a (prefix) mask, ``[B]`` (long)."""
    m = _bool(mask)
    T = m.shape[1]
    idx = torch.arange(T, device=m.device).expand_as(m)
    return torch.where(m, idx, torch.full_like(idx, -1)).max(dim=1).values


def extend_mask_by_one(mask: Tensor) -> Tensor:
    """TRL's ``~padding_mask_p1``: the mask plus the one position after each row's last real token
    (when that position exists).  Only for reproducing TRL; see the module docstring."""
    # TRL detail: padding_mask_p1 = response_idxs > sequence_lengths + 1
    m = _bool(mask)
    idx = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return idx <= (last_token_index(m) + 1).unsqueeze(1)


def compute_rewards(
    scores: Tensor, kl: Tensor, mask: Tensor, *, kl_coef: float | Tensor, score_index: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token rewards ``r_t = -beta * kl_t  (+ score on the last real token)``.

    Returns ``(rewards, non_score_reward)``, both ``[B, T]`` and 0 on padding, where
    ``non_score_reward = -beta * kl`` on real tokens.  ``scores``: ``[B]``.  By default the score
    is added on ``last_token_index(mask)`` (the EOS when the response stopped, the last token when
    it was truncated).  ``score_index`` overrides the position; TRL's choice is
    ``last_token_index(extend_mask_by_one(mask))`` (one past the last real token when it fits).
    """
    # Ziegler et al. / lm-human-preferences: R = score - beta*KL, score on the final token (TRL: at sequence_length+1)
    m = _bool(mask)
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    non_score_reward = torch.where(m, -kl_coef * kl, zero)
    rewards = non_score_reward.clone()
    if score_index is None:
        score_index = last_token_index(m)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, score_index] += scores.to(rewards.dtype)
    return rewards, non_score_reward


# --------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------
def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation over right-padded sequences: ``(advantages, returns)``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``;  ``A_t = delta_t + gamma * lam * A_{t+1}``;
    ``returns_t = A_t + V_t``.  Values and rewards past the mask are treated as 0, so the state
    after the last real token is terminal (``V = 0``).  Both outputs are 0 on padding.
    Advantages are *not* whitened here (see ``masked_whiten``).
    """
    # Schulman et al. 2016 (GAE); same backwards recursion as TRL's train() step 6
    m = _bool(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(m, values, zero)
    rewards = torch.where(m, rewards.to(values.dtype), zero)
    T = rewards.shape[1]
    lastgaelam = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return torch.where(m, advantages, zero), torch.where(m, returns, zero)


def compute_ppo_targets(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    gamma: float,
    lam: float,
    kl_estimator: str = "k1",
    whiten_rewards: bool = False,
    trl_compat: bool = False,
    sum_across: SumAcross | None = None,
) -> dict[str, Tensor]:
    """The rollout post-processing of one PPO iteration, in one call.

    ``kl = kl_penalty(logprobs, ref_logprobs)``; ``rewards = -beta*kl (+score at the end)``;
    optionally ``rewards = whiten(rewards, shift_mean=False)``;
    ``advantages, returns = gae(rewards, values)``; ``advantages = whiten(advantages)``.

    Returns a dict: ``kl``, ``non_score_reward``, ``rewards``, ``advantages`` (whitened),
    ``returns``, ``values`` (0 past the value mask) and ``value_mask`` (the mask the value loss
    must use: ``mask``, or TRL's one-longer mask when ``trl_compat``).  Padding is 0 everywhere.
    With ``trl_compat=True`` every quantity equals TRL 1.12's (score one past the last token,
    rewards whitened and values kept over ``extend_mask_by_one(mask)``).
    ``sum_across`` (an all-reduce sum): whiten over every data-parallel process's rollouts together, so
    that a batch split across processes gets the advantages it would get in one (``masked_var``).
    """
    # TRL PPOTrainer.train() steps 4-6; lm-human-preferences: advantages always whitened
    m = _bool(mask)
    value_mask = extend_mask_by_one(m) if trl_compat else m
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(m, kl_penalty(logprobs, ref_logprobs, kl_estimator), zero)
    score_index = last_token_index(value_mask)
    rewards, non_score_reward = compute_rewards(scores, kl, m, kl_coef=kl_coef, score_index=score_index)
    if whiten_rewards:
        rewards = masked_whiten(rewards, value_mask, shift_mean=False, sum_across=sum_across)
    values = torch.where(value_mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    advantages, returns = gae(rewards, values, value_mask, gamma=gamma, lam=lam)
    advantages = masked_whiten(advantages, m, sum_across=sum_across)
    return {
        "kl": kl,
        "non_score_reward": non_score_reward,
        "rewards": rewards,
        "advantages": advantages,
        "returns": returns,
        "values": values,
        "value_mask": value_mask,
    }


# --------------------------------------------------------------------------------------------
# critic-free advantages
# --------------------------------------------------------------------------------------------
def sequence_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """One reward per sequence, ``R = sum_t r_t = score - beta * sum_t kl_t`` (``[B]``): the return of the
    whole response with gamma = 1, what the group estimators compare between samples."""
    # TRL RLOOTrainer: rewards = rewards - beta * (per_token_kl * completion_mask).sum(-1)
    return masked_sum(rewards, mask, dim=1)


def _groups(rewards: Tensor, num_generations: int) -> Tensor:
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}"
        )
    return rewards.view(-1, num_generations)


def grpo_advantages(
    rewards: Tensor, num_generations: int, scale_rewards: bool = True, eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, eq. 3): ``A_i = (r_i - mean_g r) / (std_g r + eps)``.

    ``rewards``: ``[B]``, each prompt's ``num_generations`` samples next to each other. ``std`` is the unbiased
    (Bessel-corrected) standard deviation of the group and ``eps = 1e-4``: TRL 1.12 GRPOTrainer's choices (the
    paper names neither). ``scale_rewards=False`` is Dr. GRPO (Liu et al. 2025): no division, ``A_i = r_i - mean``.
    """
    # TRL grpo_trainer.py: advantages = rewards - mean_grouped_rewards; advantages / (std_rewards + 1e-4)
    grouped = _groups(rewards, num_generations)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def rloo_advantages(rewards: Tensor, num_generations: int) -> Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024): ``A_i = r_i - mean_{j != i} r_j``,
    the mean of the other samples of the same prompt as the baseline (unbiased: it does not depend on
    ``y_i``). Equal to ``G/(G-1) * (r_i - mean_g r)``. ``rewards``: ``[B]``, groups next to each other."""
    # TRL rloo_trainer.py: baselines = (grouped_sum - grouped_rewards) / (num_generations - 1)
    grouped = _groups(rewards, num_generations)
    if num_generations < 2:
        raise ValueError("rloo needs num_generations >= 2: a sample has no others to compare with")
    baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
    return (grouped - baselines).reshape(-1)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go ``G_t = sum_{k >= t} gamma^(k-t) r_k`` of each token (``[B, T]``, 0 on padding): GAE with
    ``lam = 1`` and no value function."""
    # REINFORCE++ (Hu 2025), OpenRLHF's get_cumulative_returns
    m = _bool(mask)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(m, rewards, zero)
    running = torch.zeros_like(rewards[:, 0])
    returns = []
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns.append(running)
    return torch.where(m, torch.stack(returns[::-1], dim=1), zero)


CRITIC_FREE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS = (
    "grpo",
    "rloo",
)  # a baseline from the prompt's other answers: they need num_generations >= 2


def compute_critic_free_targets(
    estimator: str,
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    gamma: float = 1.0,
    kl_estimator: str = "k1",
    num_generations: int = 1,
    scale_rewards: bool = True,
    whiten_rewards: bool = False,
    sum_across: SumAcross | None = None,
) -> dict[str, Tensor]:
    """The rollout post-processing without a critic: per-token rewards as for GAE (``-beta*kl``, the score on the
    last token; pass ``kl_coef=0`` when the KL goes into the loss), then

    * ``grpo`` / ``rloo``: one reward per sequence (``sequence_rewards``), ``grpo_advantages`` /
      ``rloo_advantages`` over each group, the same advantage on every token of the sequence;
    * ``reinforce_pp``: ``discounted_returns`` (gamma) of the rewards, whitened over the batch's real tokens
      (REINFORCE++, Hu 2025: the batch mean is the baseline).

    Returns ``kl``, ``non_score_reward``, ``rewards`` (``[B, T]``), ``advantages`` (``[B, T]``, 0 on padding),
    ``sequence_advantages`` (``[B]``, group estimators only) and ``returns`` (reinforce_pp only).
    The whitening is over every process's rollouts with ``sum_across`` (as in ``compute_ppo_targets``); a
    group is always whole within one process.
    """
    m = _bool(mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(m, kl_penalty(logprobs, ref_logprobs, kl_estimator), zero)
    rewards, non_score_reward = compute_rewards(scores, kl, m, kl_coef=kl_coef)
    if whiten_rewards:
        rewards = masked_whiten(rewards, m, shift_mean=False, sum_across=sum_across)
    out = {"kl": kl, "non_score_reward": non_score_reward, "rewards": rewards}
    if estimator in ("grpo", "rloo"):
        per_sequence = sequence_rewards(rewards, m)
        advantages = (
            grpo_advantages(per_sequence, num_generations, scale_rewards)
            if estimator == "grpo"
            else rloo_advantages(per_sequence, num_generations)
        )
        out["sequence_advantages"] = advantages
        out["advantages"] = torch.where(m, advantages.unsqueeze(1).to(rewards.dtype), zero)
    elif estimator == "reinforce_pp":
        out["returns"] = discounted_returns(rewards, m, gamma)
        out["advantages"] = masked_whiten(out["returns"], m, sum_across=sum_across)
    else:
        raise ValueError(
            f"unknown critic-free estimator {estimator!r}: use one of {', '.join(CRITIC_FREE_ESTIMATORS)}"
        )
    return out


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
LOSS_TYPES = ("bnpo", "grpo", "dr_grpo", "dapo", "cispo", "sequence")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "bnpo",
    max_len: int | None = None,
    num_tokens: Tensor | None = None,
) -> Tensor:
    """One number from a per-token loss ``[B, T]`` (TRL GRPOTrainer's ``loss_type``):

    * ``bnpo``: mean over every real token of the batch (TRL PPOTrainer's ``masked_mean``; the default).
      ``num_tokens`` replaces the batch's own count of real tokens as the divisor: the trainer passes the
      minibatch's, so that the micro-batches' losses add up to the minibatch's token mean (a mean of
      per-micro-batch means weighs a short micro-batch's tokens more; TRL takes that mean);
    * ``dapo`` and ``cispo``: the same token mean over the minibatch: DAPO's token-level loss (Yu et al. 2025,
      eq. 8), which TRL divides by the generation batch's tokens per optimizer step (docs/trl_differences.md);
    * ``grpo``: mean over each sequence's tokens, then over sequences (GRPO paper eq. 3: a long response's
      tokens weigh less each);
    * ``dr_grpo``: sum over real tokens / (``B * max_len``), a constant (Dr. GRPO: no length bias);
      ``max_len`` is the response-length limit, not the trimmed width.
    """
    # TRL grpo_trainer.py _compute_loss: the "grpo", "bnpo", "dr_grpo" and "dapo"/"cispo" branches
    m = _bool(mask)
    if loss_type in ("bnpo", "dapo", "cispo"):
        return masked_mean(per_token, m) if num_tokens is None else masked_sum(per_token, m) / num_tokens
    if loss_type == "grpo":
        return (masked_sum(per_token, m, dim=1) / m.sum(1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        if max_len is None:
            raise ValueError("aggregate_loss: dr_grpo needs max_len (the response-length limit)")
        return masked_sum(per_token, m) / (per_token.shape[0] * max_len)
    raise ValueError(f"unknown loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES[:-1])}")


def policy_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    cliprange: float,
    stats_over_padding: bool = False,
    loss_type: str = "bnpo",
    max_len: int | None = None,
    num_tokens: Tensor | None = None,
    cliprange_high: float | None = None,
    importance_sampling_level: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate: ``L = mean_mask( max(-A*rho, -A*clip(rho, 1-eps_low, 1+eps_high)) )``, the mean
    taken as ``loss_type`` says (``aggregate_loss``; ``bnpo``, a mean over every real token (of ``num_tokens``),
    by default).

    * ``rho = exp(log pi_new - log pi_old)`` per token; with ``importance_sampling_level="sequence"`` (GSPO,
      Zheng et al. 2025) one ratio per sequence, ``exp(mean_t log rho_t)`` (length-normalised), on all its tokens.
    * ``eps_low = cliprange``, ``eps_high = cliprange_high`` (None: ``cliprange``). A larger ``eps_high`` is DAPO's
      clip-higher (Yu et al. 2025): an unlikely token with a positive advantage may grow further before its
      gradient stops, which keeps the policy's entropy from collapsing.
    * ``loss_type="cispo"`` (MiniMax-M1, 2025): no clipped surrogate but REINFORCE with a clipped, detached
      importance weight, ``-sg(min(rho, cliprange_high)) * A * log pi``: every token keeps its gradient, and
      ``cliprange_high`` is the weight's cap itself (TRL's meaning; the paper's cap is ``1 + eps_high``).

    Returns ``(loss, stats)`` with detached stats ``approxkl = 0.5 * mean(log rho ^ 2)`` (per token),
    ``clipfrac = mean_mask[clipped term is the larger]`` (strictly larger: a ratio exactly on the boundary is not
    counted as clipped), ``clipfrac_low`` / ``clipfrac_high`` (TRL's ``clip_ratio/low_mean`` and
    ``high_mean``: rho < 1 - eps_low where A < 0, rho above the upper bound where A > 0) and ``ratio_mean``.
    With ``stats_over_padding`` approxkl / ratio_mean average over all ``[B,T]`` positions, padding counted as
    log-ratio 0 (TRL's logging); the loss is always a masked mean.
    """
    # Schulman et al. 2017 (PPO-clip); TRL's pg_losses / pg_clipfrac / approxkl = 0.5*mean(logratio^2);
    # TRL grpo_trainer.py _compute_loss: log_importance_weights, coef_1, coef_2, the cispo branch
    m = _bool(mask)
    high = cliprange if cliprange_high is None else cliprange_high
    zero = torch.zeros((), dtype=new_logprobs.dtype, device=new_logprobs.device)
    new = torch.where(m, new_logprobs, zero)
    logratio = torch.where(m, new - old_logprobs, zero)
    if importance_sampling_level == "sequence":
        log_weights = (
            (masked_sum(logratio, m, dim=1) / m.sum(1).clamp(min=1)).unsqueeze(1).expand_as(logratio)
        )
    elif importance_sampling_level == "token":
        log_weights = logratio
    else:
        raise ValueError(
            f"unknown importance_sampling_level {importance_sampling_level!r}: use token or sequence"
        )
    ratio = torch.exp(log_weights)
    adv = torch.where(m, advantages.to(ratio.dtype), zero)
    if loss_type == "cispo":
        weight = torch.clamp(ratio, max=high).detach()
        per_token = -weight * adv * new
        clipped_high = (ratio > high) & (adv > 0)
        clipped_low = torch.zeros_like(clipped_high)
        clipped = clipped_high
    else:
        pg_losses = -adv * ratio
        pg_losses2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)
        per_token = torch.max(pg_losses, pg_losses2)
        clipped = pg_losses2 > pg_losses
        clipped_low, clipped_high = (ratio < 1.0 - cliprange) & (adv < 0), (ratio > 1.0 + high) & (adv > 0)
    loss = aggregate_loss(per_token, m, loss_type=loss_type, max_len=max_len, num_tokens=num_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(clipped.float(), m),
            "clipfrac_low": masked_mean(clipped_low.float(), m),
            "clipfrac_high": masked_mean(clipped_high.float(), m),
        }
        if stats_over_padding:
            stats.update(approxkl=0.5 * (logratio**2).mean(), ratio_mean=ratio.mean())
        else:
            stats.update(approxkl=0.5 * masked_mean(logratio**2, m), ratio_mean=masked_mean(ratio, m))
    return loss, {k: v.detach() for k, v in stats.items()}


def sequence_policy_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    cliprange: float,
    cliprange_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate with one importance ratio per sequence, ``rho = exp(sum_t log pi_new - log pi_old)``
    (the whole response is one action, as in RLOO's REINFORCE), ``L = mean_seq max(-A*rho, -A*clip(rho))``,
    clipped to ``[1 - cliprange, 1 + cliprange_high]`` (None: ``cliprange``). ``advantages``: ``[B]``. TRL
    RLOOTrainer's loss (there ``epsilon`` and ``epsilon_high``); stats as ``policy_loss``'s, per sequence."""
    # TRL rloo_trainer.py _compute_loss: logps = (per_token_logps * completion_mask).sum(1);
    # coef_1 = exp(logps - old_logps); per_sequence_loss = -min(coef_1 * A, clamp(coef_1) * A); loss = mean
    m = _bool(mask)
    log_ratio = masked_sum(new_logprobs - old_logprobs, m, dim=1)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio.dtype)
    losses = -adv * ratio
    high = cliprange if cliprange_high is None else cliprange_high
    losses2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)
    loss = torch.max(losses, losses2).mean()
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": (losses2 > losses).float().mean(),
            "clipfrac_low": ((ratio < 1.0 - cliprange) & (adv < 0)).float().mean(),
            "clipfrac_high": ((ratio > 1.0 + high) & (adv > 0)).float().mean(),
            "ratio_mean": ratio.mean(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def kl_loss(
    new_logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "bnpo",
    max_len: int | None = None,
    old_logprobs: Tensor | None = None,
    num_tokens: Tensor | None = None,
    importance_sampling_level: str = "token",
) -> Tensor:
    """The KL penalty as a loss term (``kl_in: loss``; multiply by beta): the k3 estimator
    ``exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1`` of the *current* policy's log-probs, averaged as
    the policy loss is (``aggregate_loss``). GRPO (Shao et al. 2024, eq. 4).

    Its gradient alone, on tokens sampled from pi, is ``(1 - pi_ref/pi) grad log pi``: in expectation the
    gradient of the *forward* KL(pi_ref || pi). Given ``old_logprobs`` (the sampling policy's), each token's k3
    is weighted by the importance ratio ``pi/pi_old`` (1 in value on-policy, not in gradient), which makes the
    gradient that of the reverse KL(pi || pi_ref) the penalty means (DeepSeek-V3.2; TRL 1.12 GRPOTrainer's
    ``use_bias_correction_kl``, its default); with ``importance_sampling_level="sequence"`` the weight is the
    sequence's GSPO ratio, as in TRL. k1 would not do at all: its gradient is zero in expectation."""
    # TRL grpo_trainer.py: per_token_kl = exp(ref - logp) - (ref - logp) - 1; if use_bias_correction_kl: *= coef_1
    # Padding's log-probs are garbage (NaN, or -200 whose exp overflows): zero them before any exp, since a
    # mask applied afterwards leaves 0 * inf = NaN in the gradient.
    m = _bool(mask)
    zero = torch.zeros((), dtype=new_logprobs.dtype, device=new_logprobs.device)
    new = torch.where(m, new_logprobs, zero)
    per_token = kl_penalty(new, torch.where(m, ref_logprobs.to(new.dtype), zero), "k3")
    if old_logprobs is not None:
        logratio = torch.where(m, new - old_logprobs.to(new.dtype), zero)
        if importance_sampling_level == "sequence":
            logratio = (masked_sum(logratio, m, dim=1) / m.sum(1).clamp(min=1)).unsqueeze(1)
        per_token = per_token * torch.exp(logratio)
    return aggregate_loss(per_token, mask, loss_type=loss_type, max_len=max_len, num_tokens=num_tokens)


def value_loss(
    new_values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    cliprange_value: float,
    num_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Clipped value loss: ``0.5 * mean_mask( max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2) )``, the mean's
    divisor ``num_tokens`` when given (the minibatch's count, as ``aggregate_loss``'s ``bnpo``).

    Returns ``(loss, clipfrac)``; ``clipfrac`` = fraction of real tokens where the clipped term is
    strictly larger.  Pass TRL's one-longer mask (``compute_ppo_targets(...)["value_mask"]``) to
    reproduce TRL.
    """
    # lm-human-preferences / TRL: vf_loss = 0.5 * masked_mean(max(vf_losses1, vf_losses2))
    m = _bool(mask)
    zero = torch.zeros((), dtype=new_values.dtype, device=new_values.device)
    vpred = torch.where(m, new_values, zero)
    old = torch.where(m, old_values.to(vpred.dtype), zero)
    ret = torch.where(m, returns.to(vpred.dtype), zero)
    vpredclipped = torch.clamp(vpred, old - cliprange_value, old + cliprange_value)
    vf_losses1 = torch.square(vpred - ret)
    vf_losses2 = torch.square(vpredclipped - ret)
    loss = 0.5 * aggregate_loss(torch.max(vf_losses1, vf_losses2), m, loss_type="bnpo", num_tokens=num_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), m)
    return loss, clipfrac


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var_mask(returns - values) / Var_mask(returns)`` (biased variances; NaN if Var(returns)=0).

    1 = the value head predicts the returns perfectly, 0 = no better than a constant, < 0 = worse.
    """
    # CleanRL / stable-baselines explained_variance, restricted to real tokens
    m = _bool(mask)
    with torch.no_grad():
        var_y = masked_var(returns, m, unbiased=False)
        var_res = masked_var(returns - values, m, unbiased=False)
        if var_y == 0:
            return torch.tensor(float("nan"))
        return 1.0 - var_res / var_y


# --------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------
class AdaptiveKLController:
    """Ziegler et al. (2019) adaptive KL coefficient.

    ``e = clip(KL / target - 1, -0.2, 0.2)``;  ``beta <- beta * (1 + e * n_steps / horizon)``.
    ``current_kl`` is the mean per-sequence KL (sum over tokens) of the last batch; ``n_steps``
    the number of episodes in it.  lm-human-preferences uses target 6, horizon 10000.
    """

    # Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2
    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController: target and horizon must be > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"type": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value:.6g}, target={self.target}, horizon={self.horizon})"


class FixedKLController:
    """Constant KL coefficient with the same interface as ``AdaptiveKLController``."""

    # TRL PPOTrainer: fixed kl_coef
    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"type": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value:.6g})"


def make_kl_controller(
    kl_coef: float, target: float | None = None, horizon: float | None = None
) -> AdaptiveKLController | FixedKLController:
    """Adaptive controller when ``target`` is given (``horizon`` defaults to 10000), else fixed."""
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, 10000.0 if horizon is None else horizon)
