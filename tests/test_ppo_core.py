"""rlhf_toy.ppo.core against small cases computed by hand."""

import math

import pytest
import torch

from rlhf_toy import sequences
from rlhf_toy.stages.ppo import core

F = torch.float32


def t(x, dtype=F):
    return torch.tensor(x, dtype=dtype)


# --------------------------------------------------------------------------------------------
# log-probs / entropy
# --------------------------------------------------------------------------------------------
def test_logprobs_from_logits_with_temperature():
    logits = t([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4] at T = 1
    tokens = torch.tensor([[1]])
    assert sequences.logprobs_from_logits(logits, tokens, 1.0).item() == pytest.approx(
        math.log(0.75), abs=1e-6
    )
    # T = 2: z = [0, log(3)/2] -> p(1) = sqrt(3) / (1 + sqrt(3)); TRL divides by T + 1e-7
    expect = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    assert sequences.logprobs_from_logits(logits, tokens, 2.0).item() == pytest.approx(expect, abs=1e-6)
    assert sequences.logprobs_from_logits(logits, torch.tensor([[0]]), 1.0).item() == pytest.approx(
        math.log(0.25), abs=1e-6
    )


def test_entropy_from_logits():
    assert sequences.entropy_from_logits(torch.zeros(1, 4)).item() == pytest.approx(math.log(4), abs=1e-6)
    peaked = t([[100.0, 0.0, 0.0]])
    assert sequences.entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.5, 0.25, 0.25])
    h = -(p * p.log()).sum().item()  # 1.0397
    assert sequences.entropy_from_logits(p.log()[None]).item() == pytest.approx(h, abs=1e-6)


# --------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------
def test_masked_mean_var_ignore_padding():
    mask = t([[1, 1, 1, 0]], torch.bool)
    for garbage in (4.0, 1e9, float("nan"), float("inf")):
        x = t([[1.0, 2.0, 3.0, garbage]])
        assert core.masked_mean(x, mask).item() == pytest.approx(2.0)
        assert core.masked_var(x, mask).item() == pytest.approx(1.0)  # (1 + 0 + 1) / (3 - 1)
        assert core.masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    x = t([[1.0, 3.0], [5.0, 100.0]])
    m = t([[1, 1], [1, 0]], torch.bool)
    assert core.masked_mean(x, m, dim=1).tolist() == pytest.approx([2.0, 5.0])
    assert core.masked_mean(x, m.float()).item() == pytest.approx(3.0)  # float masks work too


def test_masked_whiten_of_a_single_real_token_is_zero_not_nan():
    # a local batch of 1 whose response is an immediate EOS: one real token; TRL's unbiased variance is NaN
    x = torch.tensor([[2.5, 7.0, -1.0]])
    mask = torch.tensor([[True, False, False]])
    assert core.masked_whiten(x, mask).tolist() == [[0.0, 0.0, 0.0]]
    assert core.masked_whiten(x, mask, shift_mean=False).tolist() == [[2.5, 0.0, 0.0]]
    # and through compute_ppo_targets, where the run used to stop with a non-finite error
    targets = core.compute_ppo_targets(
        torch.tensor([1.0]),
        torch.tensor([[-0.5]]),
        torch.tensor([[-0.7]]),
        torch.tensor([[0.2]]),
        torch.tensor([[True]]),
        kl_coef=0.05,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=True,
    )
    assert all(torch.isfinite(v).all() for v in targets.values())


def test_masked_var_empty_mask_raises():
    with pytest.raises(ValueError):
        core.masked_var(torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.bool))


def test_masked_whiten_by_hand_and_padding_has_no_influence():
    mask = t([[1, 1, 1, 0]], torch.bool)
    ref = None
    for garbage in (0.0, -7.0, 1e9, float("nan")):
        x = t([[1.0, 2.0, 3.0, garbage]])
        w = core.masked_whiten(x, mask)
        # mean 2, unbiased var 1 -> (x - 2) / sqrt(1 + 1e-8)
        assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
        assert w[0, 3].item() == 0.0
        ws = core.masked_whiten(x, mask, shift_mean=False)
        assert ws[0, :3].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)
        if ref is None:
            ref = w
        assert torch.equal(w, ref)


def test_masked_whiten_matches_trl_numerics():
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl.experimental.ppo.ppo_trainer as M

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g) * 3 + 1
    mask = torch.arange(7)[None] < torch.tensor([[7], [3], [5], [1]])
    ours = core.masked_whiten(x, mask)
    theirs = M.masked_whiten(x, mask)
    assert torch.equal(ours[mask], theirs[mask])
    assert torch.equal(core.masked_var(x, mask), M.masked_var(x, mask))
    assert torch.equal(core.masked_mean(x, mask), M.masked_mean(x, mask))


# --------------------------------------------------------------------------------------------
# KL estimators and controllers
# --------------------------------------------------------------------------------------------
def test_kl_estimators_by_hand():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert core.kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2), abs=1e-6)  # 0.6931
    # r = p_ref / p = 0.5 -> (r - 1) - log r = -0.5 + log 2 = 0.1931
    assert core.kl_penalty(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2), abs=1e-6)
    assert core.kl_penalty(ref, logp, "k3").item() == pytest.approx(1.0 - math.log(2), abs=1e-6)  # r = 2
    with pytest.raises(ValueError):
        core.kl_penalty(logp, ref, "k2")


def test_kl_estimators_are_unbiased_and_k3_nonnegative():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.4, 0.1], dtype=torch.float64)
    kl = (p * (p / q).log()).sum()
    for est in ("k1", "k3"):  # exact expectation under p of the estimator = KL(p || q)
        e = (p * core.kl_penalty(p.log(), q.log(), est)).sum()
        assert e.item() == pytest.approx(kl.item(), abs=1e-12)
    assert (core.kl_penalty(p.log(), q.log(), "k3") >= 0).all()
    assert (core.kl_penalty(p.log(), q.log(), "k1") < 0).any()


def test_adaptive_kl_controller_by_hand():
    c = core.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9: error clip(9/6 - 1 = 0.5) = 0.2 -> beta * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512
    assert c.update(9.0, 256) == pytest.approx(0.100512, rel=1e-12)
    # KL 3: error clip(-0.5) = -0.2 -> * 0.99488
    assert c.update(3.0, 256) == pytest.approx(0.100512 * 0.99488, rel=1e-12)
    # KL 6.6: error 0.1 (inside the clip) -> * (1 + 0.1 * 100 / 10000) = * 1.001
    assert c.update(6.6, 100) == pytest.approx(0.100512 * 0.99488 * 1.001, rel=1e-12)
    assert c.value == pytest.approx(0.100512 * 0.99488 * 1.001, rel=1e-12)
    # checkpointing
    state = c.state_dict()
    c2 = core.AdaptiveKLController(0.5, target=1.0, horizon=1.0)
    c2.load_state_dict(state)
    assert (c2.value, c2.target, c2.horizon) == (c.value, 6.0, 10000.0)
    assert c2.update(12.0, 10) == pytest.approx(c.update(12.0, 10))


def test_fixed_kl_controller_and_factory():
    f = core.FixedKLController(0.05)
    assert f.update(100.0, 1000) == 0.05 and f.value == 0.05
    g = core.FixedKLController(1.0)
    g.load_state_dict(f.state_dict())
    assert g.value == 0.05
    assert isinstance(core.make_kl_controller(0.05), core.FixedKLController)
    a = core.make_kl_controller(0.05, target=6.0)
    assert isinstance(a, core.AdaptiveKLController) and a.horizon == 10000.0


# --------------------------------------------------------------------------------------------
# masks and rewards
# --------------------------------------------------------------------------------------------
def test_truncate_at_eos_and_masks():
    EOS, PAD = 1, 0
    resp = torch.tensor([[5, 1, 7, 8], [5, 6, 7, 8], [5, 6, 7, 1], [1, 1, 9, 9]])
    trunc, mask = sequences.truncate_at_eos(resp, EOS, PAD)
    assert trunc.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8], [5, 6, 7, 1], [1, 0, 0, 0]]
    assert mask.sum(1).tolist() == [2, 4, 4, 1]  # EOS included
    assert core.last_token_index(mask).tolist() == [1, 3, 3, 0]
    assert core.extend_mask_by_one(mask).sum(1).tolist() == [3, 4, 4, 2]  # TRL's ~padding_mask_p1
    # pad == eos: ours still keeps the EOS in the mask
    _, mask2 = sequences.truncate_at_eos(resp, EOS, EOS)
    assert torch.equal(mask2, mask)


def test_compute_rewards_score_on_last_real_token():
    scores = t([2.0, 3.0])
    kl = torch.full((2, 4), 0.5)
    mask = t([[1, 1, 0, 0], [1, 1, 1, 1]], torch.bool)
    rewards, nsr = core.compute_rewards(scores, kl, mask, kl_coef=0.1)
    assert rewards.tolist() == [
        pytest.approx([-0.05, 1.95, 0, 0]),
        pytest.approx([-0.05, -0.05, -0.05, 2.95]),
    ]
    assert nsr.tolist() == [pytest.approx([-0.05, -0.05, 0, 0]), pytest.approx([-0.05] * 4)]
    # TRL's position: one past the last real token when it fits (row 0 -> index 2), else the last (row 1)
    trl_idx = core.last_token_index(core.extend_mask_by_one(mask))
    assert trl_idx.tolist() == [2, 3]
    r_trl, _ = core.compute_rewards(scores, kl, mask, kl_coef=0.1, score_index=trl_idx)
    assert r_trl.tolist() == [
        pytest.approx([-0.05, -0.05, 2.0, 0]),
        pytest.approx([-0.05, -0.05, -0.05, 2.95]),
    ]
    # garbage KL on padding changes nothing
    kl_g = kl.clone()
    kl_g[0, 2:] = float("nan")
    assert torch.equal(core.compute_rewards(scores, kl_g, mask, kl_coef=0.1)[0], rewards)


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------
def test_gae_three_tokens_by_hand():
    # gamma 0.9, lam 0.8 (gamma*lam = 0.72); r = [0.1, -0.2, 1.0], V = [0.5, 0.4, 0.3], V_3 = 0 (terminal)
    # delta_2 = 1.0 + 0.9*0      - 0.3 =  0.7
    # delta_1 = -0.2 + 0.9*0.3   - 0.4 = -0.33
    # delta_0 = 0.1 + 0.9*0.4    - 0.5 = -0.04
    # A_2 = 0.7;  A_1 = -0.33 + 0.72*0.7 = 0.174;  A_0 = -0.04 + 0.72*0.174 = 0.08528
    # returns = A + V = [0.58528, 0.574, 1.0]
    rewards = t([[0.1, -0.2, 1.0]])
    values = t([[0.5, 0.4, 0.3]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = core.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx([0.08528, 0.174, 0.7], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.58528, 0.574, 1.0], abs=1e-6)
    # the same episode padded to 5 tokens with garbage after it: identical on the real tokens, 0 after
    rewards_p = t([[0.1, -0.2, 1.0, 123.0, float("nan")]])
    values_p = t([[0.5, 0.4, 0.3, -50.0, float("inf")]])
    mask_p = t([[1, 1, 1, 0, 0]], torch.bool)
    adv_p, ret_p = core.gae(rewards_p, values_p, mask_p, gamma=0.9, lam=0.8)
    assert torch.equal(adv_p[:, :3], adv) and torch.equal(ret_p[:, :3], ret)
    assert adv_p[0, 3:].tolist() == [0.0, 0.0] and ret_p[0, 3:].tolist() == [0.0, 0.0]


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = t([[1.0, 2.0, 3.0]])
    values = t([[0.5, 0.5, 0.5]])
    adv, ret = core.gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    assert ret[0].tolist() == pytest.approx([6.0, 5.0, 3.0])
    assert adv[0].tolist() == pytest.approx([5.5, 4.5, 2.5])


def test_gae_equals_the_explicit_sum_of_discounted_deltas():
    """GAE's recursion against its closed form A_t = sum_k (gamma*lam)^k delta_{t+k}, computed term by term
    (an independent formulation; TRL's own recursion is compared in test_crosscheck_numeric)."""
    g = torch.Generator().manual_seed(1)
    B, T, gamma, lam = 3, 6, 0.95, 0.9
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = [6, 4, 1]
    mask = torch.arange(T).expand(B, T) < torch.tensor(lengths)[:, None]
    adv, ret = core.gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        v = values[b, :n].tolist() + [0.0]  # the state after the last real token is terminal
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expect = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert adv[b, t].item() == pytest.approx(expect, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(expect + v[t], abs=1e-5)
        assert adv[b, n:].abs().sum() == 0


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
def test_policy_loss_by_hand():
    mask = torch.ones(1, 1, dtype=torch.bool)
    old = t([[0.0]])
    new = t([[math.log(1.5)]])  # ratio 1.5
    # A = +1: max(-1.5, -clip(1.5) = -1.2) = -1.2, clipped
    loss, st = core.policy_loss(new, old, t([[1.0]]), mask, cliprange=0.2)
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)
    assert st["clipfrac"].item() == 1.0
    assert st["approxkl"].item() == pytest.approx(0.5 * math.log(1.5) ** 2, abs=1e-7)
    assert st["ratio_mean"].item() == pytest.approx(1.5, abs=1e-6)
    # A = -1: max(1.5, 1.2) = 1.5, the pessimistic term is the unclipped one
    loss, st = core.policy_loss(new, old, t([[-1.0]]), mask, cliprange=0.2)
    assert loss.item() == pytest.approx(1.5, abs=1e-6)
    assert st["clipfrac"].item() == 0.0


def test_policy_loss_clipping_exactly_at_the_boundary():
    mask = torch.ones(1, 1, dtype=torch.bool)
    old = t([[0.0]])
    new_at = torch.log(t([[1.25]]))
    r = torch.exp(new_at).item()  # the float32 ratio the function will see
    eps = r - 1.0  # exact in float64, so 1 + eps == r: the ratio sits exactly on the boundary
    adv = t([[2.0]])
    new = new_at.clone().requires_grad_(True)
    loss, st = core.policy_loss(new, old, adv, mask, cliprange=eps)
    assert st["clipfrac"].item() == 0.0  # on the boundary: not clipped (strict >, as TRL)
    assert loss.item() == pytest.approx(-2.0 * r, abs=1e-6)
    loss.backward()
    assert new.grad.item() != 0.0  # still inside the trust region: gradient flows
    # a hair beyond the boundary (ratio 1.25 * (1 + 1e-6), ~10 float32 ulps): clipped, no gradient
    beyond = (new_at + 1e-6).requires_grad_(True)
    assert torch.exp(beyond).item() > r
    loss2, st2 = core.policy_loss(beyond, old, adv, mask, cliprange=eps)
    assert st2["clipfrac"].item() == 1.0
    loss2.backward()
    assert beyond.grad.item() == 0.0
    # lower boundary with negative advantage
    new_lo = torch.log(t([[0.75]]))
    r_lo = torch.exp(new_lo).item()
    _, st3 = core.policy_loss(new_lo, old, t([[-1.0]]), mask, cliprange=1.0 - r_lo)
    assert st3["clipfrac"].item() == 0.0


def test_value_loss_by_hand():
    mask = torch.ones(1, 1, dtype=torch.bool)
    # V = 1.0, V_old = 0.5, R = 2, eps 0.2: clipped V = 0.7; max((1-2)^2 = 1, (0.7-2)^2 = 1.69) -> 0.5 * 1.69
    loss, cf = core.value_loss(t([[1.0]]), t([[0.5]]), t([[2.0]]), mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.845, abs=1e-6) and cf.item() == 1.0
    # V = 0.6 inside the clip range: 0.5 * (0.6 - 2)^2 = 0.98, not clipped
    loss, cf = core.value_loss(t([[0.6]]), t([[0.5]]), t([[2.0]]), mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.98, abs=1e-6) and cf.item() == 0.0
    # V = 3.0 moved past the return: clipped V = 0.7 is further from R -> the clipped term wins
    loss, cf = core.value_loss(t([[3.0]]), t([[0.5]]), t([[2.0]]), mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.845, abs=1e-6) and cf.item() == 1.0


def test_explained_variance():
    ret = t([[1.0, 2.0, 3.0, 99.0]])
    mask = t([[1, 1, 1, 0]], torch.bool)
    assert core.explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert core.explained_variance(torch.zeros_like(ret), ret, mask).item() == pytest.approx(0.0)
    # residual [0, 0, 1]: biased var 2/9; var(returns [1, 2, 3]) = 2/3 -> 1 - (2/9) / (2/3) = 2/3
    assert core.explained_variance(t([[1.0, 2.0, 2.0, 0.0]]), ret, mask).item() == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------
# padding changes nothing, end to end
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trl_compat", [False, True])
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_padding_garbage_changes_nothing(trl_compat, whiten_rewards):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    lengths = torch.tensor([6, 2, 4, 1])
    mask = torch.arange(T)[None] < lengths[:, None]
    scores = torch.randn(B, generator=g)
    logp = -torch.rand(B, T, generator=g) * 3
    ref = -torch.rand(B, T, generator=g) * 3
    values = torch.randn(B, T, generator=g)
    new_logp = logp + 0.1 * torch.randn(B, T, generator=g)
    new_values = values + 0.3 * torch.randn(B, T, generator=g)

    def run(lp, rf, v, nlp, nv):
        out = core.compute_ppo_targets(
            scores, lp, rf, v, mask, kl_coef=0.1, gamma=0.99, lam=0.95, kl_estimator="k3",
            whiten_rewards=whiten_rewards, trl_compat=trl_compat,
        )  # fmt: skip
        nlp = nlp.clone().requires_grad_(True)
        pg, st = core.policy_loss(nlp, lp, out["advantages"], mask, cliprange=0.2)
        vf, vcf = core.value_loss(nv, out["values"], out["returns"], out["value_mask"], cliprange_value=0.2)
        pg.backward()
        return out, pg, st, vf, vcf, nlp.grad

    clean = run(logp, ref, values, new_logp, new_values)
    pad = ~mask
    # garbage on every padded position (TRL-compat keeps values on one extra position: keep those real)
    vmask = core.extend_mask_by_one(mask) if trl_compat else mask

    def dirty(x, m, fill):
        return torch.where(m, x, torch.full_like(x, fill))

    for fill in (float("nan"), 1e6, -3.0):
        got = run(dirty(logp, mask, fill), dirty(ref, mask, fill), dirty(values, vmask, fill),
                  dirty(new_logp, mask, fill), dirty(new_values, vmask, fill))  # fmt: skip
        for k in ("kl", "rewards", "advantages", "returns", "non_score_reward"):
            assert torch.equal(got[0][k], clean[0][k]), k
        for a, b in zip(got[1:4], clean[1:4]):
            if isinstance(a, dict):
                assert all(torch.equal(a[k], b[k]) for k in a)
            else:
                assert torch.equal(a, b)
        assert torch.equal(got[4], clean[4])
        assert torch.equal(got[5], clean[5])  # gradients equal ...
        assert (got[5][pad] == 0).all()  # ... and zero on padding


# --------------------------------------------------------------------------------------------
# critic-free estimators: a group of 4 rewards by hand
# --------------------------------------------------------------------------------------------
GROUP = [1.0, 2.0, 3.0, 6.0]  # mean 3, deviations -2 -1 0 3, unbiased variance 14/3


def test_grpo_advantages_of_a_group_of_four_by_hand():
    std = math.sqrt(14 / 3)
    expect = [d / (std + 1e-4) for d in (-2, -1, 0, 3)]
    assert core.grpo_advantages(t(GROUP), 4).tolist() == pytest.approx(expect, abs=1e-6)
    # Dr. GRPO: no division by the std
    assert core.grpo_advantages(t(GROUP), 4, scale_rewards=False).tolist() == pytest.approx(
        [-2, -1, 0, 3], abs=1e-6
    )
    # two groups of two are normalised each on its own: (r - mean) / (std + eps), std of a pair = |a - b| / sqrt 2
    two = core.grpo_advantages(t(GROUP), 2).tolist()
    s1, s2 = 1 / math.sqrt(2), 3 / math.sqrt(2)
    assert two == pytest.approx(
        [-0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), -1.5 / (s2 + 1e-4), 1.5 / (s2 + 1e-4)], abs=1e-6
    )
    # a group whose samples all scored the same has nothing to learn: advantage 0, not NaN
    assert core.grpo_advantages(t([2.0, 2.0, 2.0, 2.0]), 4).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="do not split into groups of num_generations=3"):
        core.grpo_advantages(t(GROUP), 3)


def test_rloo_advantages_of_a_group_of_four_by_hand():
    # each reward minus the mean of the other three: 1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2
    assert core.rloo_advantages(t(GROUP), 4).tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0], abs=1e-6)
    # = G/(G-1) (r - mean)
    assert core.rloo_advantages(t(GROUP), 4).tolist() == pytest.approx(
        [4 / 3 * d for d in (-2, -1, 0, 3)], abs=1e-6
    )
    assert core.rloo_advantages(t(GROUP), 2).tolist() == pytest.approx([-1.0, 1.0, -3.0, 3.0], abs=1e-6)


def test_discounted_returns_and_reinforce_pp_by_hand():
    rewards = t([[0.0, 0.0, 1.0, 99.0], [1.0, 1.0, 1.0, 1.0]])  # 99 is padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    returns = core.discounted_returns(rewards, mask, 0.5)
    torch.testing.assert_close(returns, t([[0.25, 0.5, 1.0, 0.0], [1.875, 1.75, 1.5, 1.0]]))
    # reinforce_pp: per-token rewards (-beta*kl, the score on the last token), their reward-to-go, whitened over
    # the batch's real tokens
    logprobs, ref = (
        t([[-1.0, -1.0, -1.0, 0.0], [-1.0, -1.0, -1.0, -1.0]]),
        t([[-1.5, -1.0, -1.0, 0.0], [-1.0] * 4]),
    )
    out = core.compute_critic_free_targets(
        "reinforce_pp", t([1.0, 4.0]), logprobs, ref, mask, kl_coef=0.2, gamma=0.5
    )
    by_hand = t([[-0.1, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 4.0]])  # kl 0.5 on row 0 token 0
    torch.testing.assert_close(out["rewards"], by_hand)
    g = [[-0.1 + 0.5 * 0.5, 0.5, 1.0], [0.5, 1.0, 2.0, 4.0]]
    flat = t(g[0] + g[1])
    whitened = (flat - flat.mean()) / torch.sqrt(flat.var() + 1e-8)
    assert out["returns"][mask].tolist() == pytest.approx(flat.tolist(), abs=1e-6)
    assert out["advantages"][mask].tolist() == pytest.approx(whitened.tolist(), abs=1e-5)
    assert out["advantages"][0, 3] == 0 and "sequence_advantages" not in out


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_compare_sequence_returns_kl_included(estimator):
    """R = score - beta * sum_t kl_t per sequence (TRL RLOOTrainer's sequence-level KL), one advantage per
    sequence, the same on each of its tokens, 0 on padding."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]).bool()
    logprobs = t([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0], [-0.5, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = logprobs - t(
        [[0.5, 0.5, 7.0], [0.0, 1.0, 0.0], [2.0, 7.0, 7.0], [0.0, 0.0, 0.0]]
    )  # k1 = logp - ref
    scores = t(GROUP)
    out = core.compute_critic_free_targets(
        estimator, scores, logprobs, ref, mask, kl_coef=0.5, num_generations=4
    )
    sequence_kl = [1.0, 1.0, 2.0, 0.0]
    returns = t([s - 0.5 * k for s, k in zip(GROUP, sequence_kl)])  # 0.5, 1.5, 2.0, 6.0
    assert core.sequence_rewards(out["rewards"], mask).tolist() == pytest.approx(returns.tolist(), abs=1e-6)
    expect = core.grpo_advantages(returns, 4) if estimator == "grpo" else core.rloo_advantages(returns, 4)
    assert out["sequence_advantages"].tolist() == pytest.approx(expect.tolist(), abs=1e-6)
    assert torch.equal(out["advantages"], torch.where(mask, expect.unsqueeze(1), torch.zeros(())))


def test_loss_aggregation_by_hand():
    per_token = t([[1.0, 3.0, 50.0], [2.0, 2.0, 2.0]])  # 50 is padding
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    assert core.aggregate_loss(per_token, mask, loss_type="bnpo").item() == pytest.approx(
        10 / 5
    )  # token mean
    assert core.aggregate_loss(per_token, mask, loss_type="grpo").item() == pytest.approx(
        (2 + 2) / 2
    )  # sequence means
    per_token = t([[1.0, 5.0, 50.0], [2.0, 2.0, 2.0]])
    assert core.aggregate_loss(per_token, mask, loss_type="grpo").item() == pytest.approx((3 + 2) / 2)
    assert core.aggregate_loss(per_token, mask, loss_type="dr_grpo", max_len=4).item() == pytest.approx(
        12 / (2 * 4)
    )
    with pytest.raises(ValueError, match="dr_grpo needs max_len"):
        core.aggregate_loss(per_token, mask, loss_type="dr_grpo")


@pytest.mark.parametrize("fill", [float("nan"), -200.0, 200.0])
@pytest.mark.parametrize("corrected", [False, True])
def test_kl_loss_padding_garbage_changes_nothing(fill, corrected):
    """k3 and the ratio exponentiate log-probs: garbage on padding (NaN, or -200 whose exp overflows) must not
    reach the loss or its gradient, where a mask applied after the exp leaves 0 * inf = NaN."""
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(5)[None] < torch.tensor([5, 2, 3])[:, None]
    logp, ref, old = (-torch.rand(3, 5, generator=g) * 3 for _ in range(3))
    dirty = lambda x, value: torch.where(mask, x, torch.full_like(x, value))

    def loss_and_grad(lp, rf, ol):
        lp = lp.clone().requires_grad_(True)
        loss = core.kl_loss(lp, rf, mask, old_logprobs=ol if corrected else None)
        loss.backward()
        return loss, lp.grad

    clean_loss, clean_grad = loss_and_grad(logp, ref, old)
    # the current policy's padding garbage, the others' 0 (what a padded forward may give): exp(0 - 200) overflows
    loss, grad = loss_and_grad(dirty(logp, fill), dirty(ref, 0.0), dirty(old, 0.0))
    assert torch.equal(loss, clean_loss) and torch.equal(grad, clean_grad)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()


def test_sequence_policy_loss_and_kl_loss_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    old = t([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    new = old + t([[0.1, 0.2, 9.0], [0.0, -0.05, 0.0]])  # sequence log-ratios 0.3 and -0.05 (padding ignored)
    adv = t([1.0, -2.0])
    loss, stats = core.sequence_policy_loss(new, old, adv, mask, cliprange=0.2)
    r0, r1 = math.exp(0.3), math.exp(-0.05)
    # row 0: A > 0, ratio 1.35 > 1.2: clipped at 1.2; row 1: A < 0, ratio 0.95 inside the range
    assert loss.item() == pytest.approx((-1.0 * 1.2 + 2.0 * r1) / 2, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx((r0 + r1) / 2, abs=1e-6)
    # the KL term: k3 of the current policy, its gradient pulls toward the reference
    ref = t([[-1.0, -1.0, 0.0], [-2.0, -1.0, -1.0]])
    logp = old.clone().requires_grad_(True)
    kl = core.kl_loss(logp, ref, mask)
    k3 = math.exp(-1.0) + 1.0 - 1.0  # row 1 token 0: logr = -1
    assert kl.item() == pytest.approx(k3 / 5, abs=1e-6)
    kl.backward()
    assert (
        logp.grad[1, 0] > 0 and logp.grad[0].abs().sum() == 0
    )  # lower log pi where pi > pi_ref; none where equal
    # d k3 / d log pi = 1 - pi_ref/pi = 1 - e^-1 on that token; weighted by the ratio pi/pi_old (1 in value here),
    # the gradient gains k3 * d log(ratio) = e^-1: 1 in all, the reverse KL's gradient (TRL's use_bias_correction_kl)
    assert logp.grad[1, 0].item() == pytest.approx((1 - math.exp(-1)) / 5, abs=1e-6)
    logp.grad = None
    corrected = core.kl_loss(logp, ref, mask, old_logprobs=old)
    assert corrected.item() == pytest.approx(kl.item(), abs=1e-7)
    corrected.backward()
    assert logp.grad[1, 0].item() == pytest.approx(1 / 5, abs=1e-6)


def test_exact_kl_is_the_full_vocabulary_sum_by_hand():
    from rlhf_toy import sequences

    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.5, 0.25, 0.25])
    by_hand = sum(float(a) * math.log(float(a) / float(b)) for a, b in zip(p, q))  # 0.0920...
    z, z_ref = p.log().reshape(1, 1, 3) + 3.0, q.log().reshape(1, 1, 3) - 1.0  # logits: any shift
    kl = sequences.exact_kl(z.expand(10, 2, 3), z_ref.expand(10, 2, 3), rows_at_once=3)
    assert kl.shape == (10, 2) and torch.allclose(kl, torch.full((10, 2), by_hand), atol=1e-6)
    assert sequences.exact_kl(z, z)[0, 0].item() == pytest.approx(0, abs=1e-7)
