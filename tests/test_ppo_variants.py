"""The 2025 variants of the policy-gradient loss (clip-higher, GSPO, DAPO, CISPO, overlong filtering and the
soft overlong penalty, dynamic sampling) and the diagnostics that explain them. TRL equivalence of the losses:
tests/test_crosscheck_critic_free.py."""

import json
import math

import pytest
import torch
from conftest import run_in_process, tiny_flags

from rlhf_toy import data, runlog, sequences
from rlhf_toy.config import ConfigError, parse_config
from rlhf_toy.evaluation.stats import distinct_n
from rlhf_toy.scoring import sequence_score
from rlhf_toy.stages.ppo import core, trainer
from rlhf_toy.stages.ppo.config import PPOStageConfig

GRPO = dict(advantage_estimator="grpo", num_generations=4, kl_in="loss", kl_estimator="k3", loss_type="grpo")


def gradient(loss_of, logprob: torch.Tensor) -> torch.Tensor:
    x = logprob.clone().requires_grad_(True)
    loss_of(x).backward()
    return x.grad


def test_clip_higher_lets_an_unlikely_good_token_grow_further():
    """A token 25% likelier than when sampled, with a positive advantage: clipped at 1 + 0.2, not at 1 + 0.28."""
    old, adv, mask = torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool)
    new = torch.full((1, 1), math.log(1.25))
    symmetric = gradient(lambda x: core.policy_loss(x, old, adv, mask, cliprange=0.2)[0], new)
    higher = gradient(
        lambda x: core.policy_loss(x, old, adv, mask, cliprange=0.2, cliprange_high=0.28)[0], new
    )
    assert symmetric.item() == 0 and higher.item() == pytest.approx(-1.25)
    assert core.policy_loss(new, old, adv, mask, cliprange=0.2)[1]["clipfrac_high"] == 1
    assert core.policy_loss(new, old, adv, mask, cliprange=0.2, cliprange_high=0.28)[1]["clipfrac_high"] == 0
    # the low side is the same: a token 25% less likely with a negative advantage is clipped either way
    low = torch.full((1, 1), math.log(0.75))
    _, stats = core.policy_loss(low, old, -adv, mask, cliprange=0.2, cliprange_high=0.28)
    assert stats["clipfrac_low"] == 1 and stats["clipfrac_high"] == 0


def test_gspo_clips_the_whole_sequence_by_its_length_normalised_ratio():
    """log-ratios 0.3 and -0.1: the sequence's ratio is exp(0.1) > 1.05, so with A > 0 neither token moves,
    though the second one's own ratio is below 1 (token level: the second one moves)."""
    new, old = torch.tensor([[0.3, -0.1]]), torch.zeros(1, 2)
    adv, mask = torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool)
    per_token = gradient(lambda x: core.policy_loss(x, old, adv, mask, cliprange=0.05)[0], new)
    per_sequence = gradient(
        lambda x: core.policy_loss(x, old, adv, mask, cliprange=0.05, importance_sampling_level="sequence")[
            0
        ],
        new,
    )
    assert per_token[0, 0] == 0 and per_token[0, 1] != 0
    assert torch.equal(per_sequence, torch.zeros(1, 2))
    inside = torch.tensor(
        [[0.03, -0.01]]
    )  # exp(0.01): inside the range, both tokens share the sequence's weight
    grad = gradient(
        lambda x: core.policy_loss(x, old, adv, mask, cliprange=0.05, importance_sampling_level="sequence")[
            0
        ],
        inside,
    )
    assert torch.allclose(
        grad, torch.full((1, 2), -math.exp(0.01) / 2)
    )  # the token mean of -exp(mean x), by x_i


def test_cispo_keeps_the_gradient_of_a_token_past_its_cap():
    """Ratio 2 against a cap of 1.5: PPO's clip stops the token, CISPO weighs its log-prob gradient by the cap."""
    old, adv, mask = torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool)
    new = torch.full((1, 1), math.log(2.0))
    ppo = gradient(lambda x: core.policy_loss(x, old, adv, mask, cliprange=0.2, cliprange_high=0.5)[0], new)
    cispo = gradient(
        lambda x: core.policy_loss(x, old, adv, mask, cliprange=0.2, loss_type="cispo", cliprange_high=1.5)[
            0
        ],
        new,
    )
    assert ppo.item() == 0 and cispo.item() == pytest.approx(-1.5)
    loss, stats = core.policy_loss(new, old, adv, mask, cliprange=0.2, loss_type="cispo", cliprange_high=1.5)
    assert loss.item() == pytest.approx(-1.5 * math.log(2.0)) and stats["clipfrac_high"] == 1


def test_dapo_is_the_token_mean_over_the_batch():
    g = torch.Generator().manual_seed(0)
    new, old, adv = (torch.randn(3, 5, generator=g) * 0.1 for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    dapo = core.policy_loss(new, old, adv, mask, cliprange=0.2, loss_type="dapo")[0]
    assert dapo == core.policy_loss(new, old, adv, mask, cliprange=0.2, loss_type="bnpo")[0]
    assert (
        dapo != core.policy_loss(new, old, adv, mask, cliprange=0.2, loss_type="grpo")[0]
    )  # not per sequence


def test_soft_overlong_penalty_ramps_over_the_buffer():
    """DAPO eq. 13 with a limit of 12 and a buffer of 4: nothing up to 8 tokens, then linear to the full penalty."""
    n_tokens = torch.tensor([5, 8, 10, 12])
    parts = sequence_score(
        torch.zeros(4),
        n_tokens,
        torch.ones(4, dtype=torch.bool),
        length_coef=0.0,
        length_target=0,
        missing_eos_penalty=0.0,
        overlong_buffer=4,
        overlong_penalty=2.0,
        max_length=12,
    )
    assert parts["overlong_penalty"].tolist() == [0.0, 0.0, 1.0, 2.0]
    assert parts["score"].tolist() == [0.0, 0.0, -1.0, -2.0]
    assert "overlong_penalty" not in sequence_score(
        torch.zeros(4),
        n_tokens,
        torch.ones(4, dtype=torch.bool),
        length_coef=0.0,
        length_target=0,
        missing_eos_penalty=0.0,
    )


def test_config_refuses_variants_that_do_not_combine(pipeline, tmp_path):
    config = lambda **o: parse_config(PPOStageConfig, tiny_flags(pipeline, tmp_path / "x", **o))
    refused = [
        (
            dict(loss_type="cispo"),
            "loss_type: cispo caps the importance weight at epsilon_high, which must be >= 1",
        ),
        (dict(loss_type="cispo", epsilon_high=0.28), "must be >= 1"),
        (dict(epsilon_high=-0.1), "epsilon_high must be > 0"),
        (
            dict(importance_sampling_level="group"),
            "importance_sampling_level must be token or sequence, got 'group'",
        ),
        (
            dict(
                advantage_estimator="rloo",
                num_generations=4,
                loss_type="sequence",
                importance_sampling_level="sequence",
            ),
            "loss_type: sequence already takes one ratio per sequence",
        ),
        (
            dict(dynamic_sampling="true"),
            "dynamic_sampling drops groups .* advantage_estimator grpo or rloo, got gae",
        ),
        # TRL's update is the equivalence check's (`ppo_update(as_trl=True)`), not a user's setting
        (dict(trl_compat="true"), "unknown flag --trl_compat"),
        (dict(overlong_buffer=20), r"overlong_buffer \(20\) is longer than response_length \(12\)"),
        (dict(loss_type="ppo"), "loss_type must be one of bnpo, grpo, dr_grpo, dapo, cispo, sequence"),
    ]
    for overrides, message in refused:
        with pytest.raises(ConfigError, match=message):
            config(**overrides)
    cfg = config(
        **{
            **GRPO,
            "loss_type": "cispo",
            "epsilon_high": 5.0,
            "importance_sampling_level": "sequence",
            "mask_truncated_completions": "true",
            "overlong_buffer": 4,
            "dynamic_sampling": "true",
        }
    )
    assert cfg.loss_type == "cispo" and cfg.dynamic_sampling and cfg.overlong_buffer == 4


@pytest.fixture(scope="module")
def variant_run(pipeline, tmp_path_factory):
    """GRPO with clip-higher, GSPO's ratio, DAPO's loss, overlong filtering and the soft overlong penalty, 4 steps
    (samples every step)."""
    out = tmp_path_factory.mktemp("variants") / "run"
    run_in_process(
        pipeline,
        out,
        **GRPO,
        total_episodes=32,
        num_eval_prompts=0,
        sample_every=1,
        save_steps=2,
        epsilon_high=0.28,
        importance_sampling_level="sequence",
        mask_truncated_completions="true",
        overlong_buffer=4,
        overlong_penalty=0.5,
    )
    return out


def test_a_run_with_the_variants_logs_the_diagnostics_of_its_batches(variant_run):
    records = [r for r in runlog.read_jsonl(variant_run / "metrics.jsonl") if "objective/scores" in r]
    samples = list(runlog.read_jsonl(variant_run / "samples.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        rows = [s for s in samples if s["step"] == r["step"]]
        assert len(rows) == 8
        assert r["completions/clipped_ratio"] == pytest.approx(sum(not s["has_eos"] for s in rows) / 8)
        assert r["completions/pooled_distinct_2"] == pytest.approx(
            distinct_n([s["response"] for s in rows], 2)
        )
        groups = torch.tensor([s["score"] for s in rows]).view(2, 4)
        assert r["frac_reward_zero_std"] == pytest.approx(
            float(torch.isclose(groups.std(1), torch.zeros(2)).float().mean())
        )
        assert 0 <= r["clip_ratio/low_mean"] <= 1 and 0 <= r["clip_ratio/high_mean"] <= 1
        assert math.isfinite(r["loss/policy_avg"]) and r["policy/entropy_avg"] > 0
        # the soft overlong penalty: each answer's share of the ramp over the last 4 of 12 tokens
        expected = sum(0.5 * min(1.0, max(0.0, (s["n_tokens"] - 8) / 4)) for s in rows) / 8
        assert r["score/overlong_penalty"] == pytest.approx(expected)


def test_cut_answers_stay_in_their_group_but_leave_the_loss(pipeline, tmp_path):
    """The tiny random model never stops within the limit, so which answers count as cut is set by hand here
    (rollout_targets reads only has_eos): a cut answer keeps its advantage (it is in its group's statistics)
    and leaves the loss; a batch of cut answers only teaches nothing (the weights do not move)."""
    cfg = parse_config(
        PPOStageConfig,
        tiny_flags(pipeline, tmp_path / "m", **GRPO, num_eval_prompts=0, mask_truncated_completions="true"),
    )
    state, _, _ = trainer.build(cfg)
    prompts = data.load_prompt_records(str(pipeline / "prompts.jsonl"))
    batch, parts = trainer.sample_and_score_step(state, prompts, 1)
    parts["has_eos"] = torch.tensor([True, False] * 4)
    targets = trainer.rollout_targets(state, batch, parts)
    cut = ~parts["has_eos"]
    assert not targets["loss_mask"][cut].any() and torch.equal(targets["loss_mask"][~cut], batch.mask[~cut])
    assert torch.allclose(targets["sequence_advantages"], core.grpo_advantages(parts["score"], 4))
    before = [p.detach().clone() for p in state.parameters]
    parts["has_eos"] = torch.zeros(8, dtype=torch.bool)
    stats = trainer.ppo_update(state, batch, trainer.rollout_targets(state, batch, parts), 1)
    assert all(torch.equal(a, b) for a, b in zip(before, state.parameters)) and stats["pg_loss"] == [0.0] * 4
    parts["has_eos"] = torch.tensor([True, False] * 4)
    trainer.ppo_update(state, batch, trainer.rollout_targets(state, batch, parts), 1)
    assert not all(torch.equal(a, b) for a, b in zip(before, state.parameters))


def test_groups_sampled_apart_are_one_batch_with_the_same_log_probs(pipeline, tmp_path):
    """select_groups pads rollouts of different prompt and response widths into one: a forward over the merged
    batch gives every chosen answer the log-probs it was sampled with (positions do not move)."""
    cfg = parse_config(PPOStageConfig, tiny_flags(pipeline, tmp_path / "s", **GRPO, num_eval_prompts=0))
    state, _, _ = trainer.build(cfg)
    prompts = data.load_prompt_records(str(pipeline / "prompts.jsonl"))
    by_length = sorted(prompts, key=lambda r: len(json.dumps(r["prompt"])))
    short = [by_length[0]] * 4 + [by_length[1]] * 4
    long = [by_length[-1]] * 4 + [by_length[-2]] * 4
    pieces = [
        (b, trainer.score(state, b)) for b in (trainer.sample(state, short), trainer.sample(state, long))
    ]
    assert pieces[0][0].context_length != pieces[1][0].context_length
    batch, parts = trainer.select_groups(pieces, [(1, 1), (0, 0)], 4, state.tokenizer.pad_token_id)
    assert batch.texts == pieces[1][0].texts[4:] + pieces[0][0].texts[:4]
    assert torch.equal(parts["score"], torch.cat([pieces[1][1]["score"][4:], pieces[0][1]["score"][:4]]))
    with torch.no_grad():
        again = sequences.response_logprobs(
            state.policy,
            batch.query_responses,
            batch.attention_mask,
            batch.context_length,
            temperature=cfg.temperature,
        )
    assert (again - batch.logprobs)[batch.mask].abs().max() < 1e-5


def test_dynamic_sampling_replaces_groups_without_spread(pipeline, tmp_path):
    """A reward flat for half the films: without dynamic sampling those groups stay in the batch; with it they
    are replaced by other films' groups, up to the cap of extra rounds."""
    flags = dict(
        **GRPO,
        total_episodes=24,
        num_eval_prompts=0,
        sample_every=1,
        save_steps=3,
        rewards="reward_functions:flat_for_even_titles",
        length_coef=0.0,  # no length penalty: the even titles' groups stay flat
    )
    plain = run_in_process(pipeline, tmp_path / "plain", **flags)
    dynamic = run_in_process(
        pipeline, tmp_path / "dynamic", **flags, dynamic_sampling="true", max_resample_rounds=3
    )
    read = lambda run: [r for r in runlog.read_jsonl(run / "metrics.jsonl") if "objective/scores" in r]
    samples = lambda run, step: [s for s in runlog.read_jsonl(run / "samples.jsonl") if s["step"] == step]
    # step 1's first round is the same batch either way (same policy, prompts and seed): the share TRL logs is the
    # sampler's. Later steps start from policies trained on different groups, so their answers differ.
    assert read(plain)[0]["frac_reward_zero_std"] == read(dynamic)[0]["frac_reward_zero_std"]
    for d in read(dynamic):
        kept = [
            torch.tensor([s["score"] for s in samples(dynamic, d["step"])][g : g + 4]).std() == 0
            for g in (0, 4)
        ]
        assert d["rollout/zero_std_groups_kept"] == sum(map(bool, kept))
        assert d["rollout/resample_rounds"] <= 3
        if d["rollout/zero_std_groups_kept"]:
            assert d["rollout/resample_rounds"] == 3  # topped up only once the cap is reached
        # a round is sampled exactly when the first one has a group without spread
        assert (d["rollout/resample_rounds"] > 0) == (d["frac_reward_zero_std"] > 0)
    assert any(p["frac_reward_zero_std"] > 0 for p in read(plain))
    assert sum(d["rollout/zero_std_groups_kept"] for d in read(dynamic)) < sum(
        2 * p["frac_reward_zero_std"] for p in read(plain)
    )
