"""Numeric cross-check of the critic-free estimators against TRL 1.12's own GRPOTrainer and RLOOTrainer, and of
the 2025 variants of their loss (clip-higher, GSPO's sequence-level ratio, DAPO's and CISPO's losses, the cut
answers left out).

What runs on the TRL side is TRL's code, unmodified, on a tiny random GPT-2 (``trl_numeric``'s models, built
locally): ``_generate_and_score_completions`` (rewards, the reference's and the policy's log-probs, RLOO's
sequence-level KL in the reward, the advantages) and ``_compute_loss`` (the clipped surrogate, GRPO's k3 KL
term, the loss aggregation), called on a crafted batch. Only the sampling is replaced: ``_generate`` returns
fixed completions (some stop at EOS, some run to the length limit), and a TRL-style reward function returns
fixed rewards from a dataset column, so both sides see the same rewards. ``_get_per_token_logps_and_entropies``
is wrapped by a pass-through that keeps the per-token log-probs TRL computed (policy and reference); the old
log-probs of the loss are set apart from the current ones (as after an earlier update), so the ratios and the
clipping are exercised.

On our side the same rewards and log-probs go through ``rlhf_toy.stages.ppo.core``
(``compute_critic_free_targets``, ``policy_loss`` / ``sequence_policy_loss``, ``kl_loss``), the current
log-probs from ``sequences.response_logprobs`` of the same model: advantages, loss and the loss's gradient
on every policy weight must equal TRL's within ``TOLERANCE``.

Where TRL's definition differs from the papers: docs/trl_differences.md (GRPO's std and epsilon, RLOO's
sequence-level ratio).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from typing import Any

import torch

from rlhf_toy import sequences
from rlhf_toy.stages.ppo import core
from rlhf_toy.verify.trl_numeric import EOS_ID, PAD_ID, TOLERANCE, _maxdiff, _trl_version, build_tiny_models

BASE: dict[str, Any] = {
    "seed": 0,
    "vocab_size": 100,
    "eos_prob": 0.08,  # only shapes the tiny policy (trl_numeric); the completions are crafted
    "num_prompts": 3,
    "num_generations": 4,
    "prompt_length": 4,  # every prompt the same length: TRL's GRPO/RLOO forward passes no position ids
    "max_completion_length": 8,
    "temperature": 0.7,
    "beta": 0.05,
    "epsilon": 0.2,
    "old_logprob_noise": 0.15,  # old log-probs = current + N(0, this): ratios away from 1, some clipped
}

SETTINGS: list[dict[str, Any]] = [
    # GRPO: (r - mean) / std per group, per-sequence token mean, k3 KL in the loss weighted by the ratio (TRL's default)
    {
        "name": "grpo",
        "trainer": "grpo",
        "loss_type": "grpo",
        "scale_rewards": True,
        "beta": 0.04,
        "use_bias_correction_kl": True,
    },
    # Dr. GRPO: no division by the std, the sum over tokens / (sequences x max length); the paper's plain k3 term
    {
        "name": "dr_grpo",
        "trainer": "grpo",
        "loss_type": "dr_grpo",
        "scale_rewards": False,
        "beta": 0.04,
        "seed": 1,
        "use_bias_correction_kl": False,
    },
    # GRPO advantages with the token mean over the batch (TRL PPOTrainer's and our default loss), no KL
    {
        "name": "grpo_bnpo_no_kl",
        "trainer": "grpo",
        "loss_type": "bnpo",
        "scale_rewards": True,
        "beta": 0.0,
        "seed": 2,
        "num_generations": 2,
        "num_prompts": 4,
    },
    # RLOO: leave-one-out baseline, the sequence-level k1 KL in the reward, one clipped ratio per sequence
    {"name": "rloo", "trainer": "rloo", "loss_type": "sequence", "beta": 0.05, "seed": 3},
    # DAPO's clip-higher: the ratio clipped to [1 - 0.2, 1 + 0.28] (Yu et al. 2025's values), GRPO's loss
    {
        "name": "clip_higher",
        "trainer": "grpo",
        "loss_type": "grpo",
        "scale_rewards": True,
        "beta": 0.04,
        "seed": 9,
        "epsilon_high": 0.28,
        "old_logprob_noise": 0.35,
    },
    # GSPO: one length-normalised ratio per sequence, clipped as a whole (a narrow range, as the paper's: some
    # sequences inside it, some out)
    {
        "name": "gspo",
        "trainer": "grpo",
        "loss_type": "grpo",
        "scale_rewards": True,
        "beta": 0.04,
        "seed": 5,
        "importance_sampling_level": "sequence",
        "epsilon": 0.03,
        "epsilon_high": 0.04,
    },
    # DAPO's loss: the token sum over the batch's tokens, with clip-higher, and the cut answers left out of it
    {
        "name": "dapo",
        "trainer": "grpo",
        "loss_type": "dapo",
        "scale_rewards": True,
        "beta": 0.0,
        "seed": 6,
        "epsilon_high": 0.28,
        "mask_truncated_completions": True,
        "old_logprob_noise": 0.35,
    },
    # CISPO: REINFORCE with the detached importance weight capped at epsilon_high, the k3 KL in the loss
    {
        "name": "cispo",
        "trainer": "grpo",
        "loss_type": "cispo",
        "scale_rewards": True,
        "beta": 0.04,
        "seed": 10,
        "epsilon_high": 1.1,
    },
    # the cut answers left out of GRPO's per-sequence mean
    {
        "name": "mask_truncated",
        "trainer": "grpo",
        "loss_type": "grpo",
        "scale_rewards": True,
        "beta": 0.04,
        "seed": 8,
        "mask_truncated_completions": True,
    },
]


def _crafted_batch(s: dict[str, Any]):
    """Prompts (equal length), completions (EOS-terminated or at the length limit) and rewards, seeded."""
    g = torch.Generator().manual_seed(2000 + s["seed"])
    n, group, length = s["num_prompts"], s["num_generations"], s["max_completion_length"]
    prompts = [
        (3 + torch.randint(0, s["vocab_size"] - 3, (s["prompt_length"],), generator=g)).tolist()
        for _ in range(n)
    ]
    completions = []
    for _ in range(n * group):
        ids = (3 + torch.randint(0, s["vocab_size"] - 3, (length,), generator=g)).tolist()
        stop = int(torch.randint(1, length + 2, (1,), generator=g))  # length + 1: no EOS, runs to the limit
        completions.append(ids[: stop - 1] + [EOS_ID] if stop <= length else ids)
    rewards = torch.randn(n * group, generator=g).tolist()
    return [p for p in prompts for _ in range(group)], completions, rewards


def _trainer(s: dict[str, Any], model_dir: str, *, out_dir: str, dataset, reward_function):
    """TRL's GRPOTrainer or RLOOTrainer on the saved tiny policy, configured as the setting says."""
    common = dict(
        output_dir=out_dir,
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=s["seed"],
        per_device_train_batch_size=s["num_prompts"] * s["num_generations"],
        num_generations=s["num_generations"],
        max_completion_length=s["max_completion_length"],
        temperature=s["temperature"],
        beta=s["beta"],
        epsilon=s["epsilon"],
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
    )
    if s["trainer"] == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(
            **common,
            loss_type=s["loss_type"],
            scale_rewards="group" if s["scale_rewards"] else "none",
            use_bias_correction_kl=s.get("use_bias_correction_kl", True),
            epsilon_high=s.get("epsilon_high"),
            importance_sampling_level=s.get("importance_sampling_level", "token"),
            mask_truncated_completions=s.get("mask_truncated_completions", False),
        )
        return GRPOTrainer(model=model_dir, reward_funcs=[reward_function], args=args, train_dataset=dataset)
    from trl import RLOOConfig, RLOOTrainer

    return RLOOTrainer(
        model=model_dir, reward_funcs=[reward_function], args=RLOOConfig(**common), train_dataset=dataset
    )


def run_one(setting: dict[str, Any]) -> dict[str, Any]:
    """TRL's scoring and loss on the crafted batch, ours on the same inputs: max |ours − TRL| per quantity."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset

    s = {**BASE, **setting}
    tok, policy, ref, _, _ = build_tiny_models(s)
    prompts, completions, rewards = _crafted_batch(s)
    observed: dict[str, torch.Tensor] = {}

    def target_reward(prompts, completions, target, **kwargs):  # a TRL reward function: the crafted rewards
        return list(target)

    with (
        tempfile.TemporaryDirectory() as tmp,
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        policy.save_pretrained(f"{tmp}/policy")
        tok.save_pretrained(f"{tmp}/policy")
        texts = [" ".join(f"w{i - 3}" for i in p) for p in prompts]
        group = s["num_generations"]
        dataset = Dataset.from_dict({"prompt": texts[::group], "target": rewards[::group]})
        trainer = _trainer(
            s, f"{tmp}/policy", out_dir=f"{tmp}/out", dataset=dataset, reward_function=target_reward
        )
        trainer.ref_model = ref.eval()  # a reference that differs from the policy, so the KL is not ~0
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1

        decoded = tok.batch_decode(completions, skip_special_tokens=True)
        if s["trainer"] == "grpo":
            trainer._generate = lambda _: (prompts, completions, None, decoded, None, {}, None, [])
        else:
            trainer._generate = lambda _: (prompts, completions, decoded)
        logps_of = trainer._get_per_token_logps_and_entropies

        def observe(model, *args, **kwargs):  # pass-through: keep what TRL computed, return it unchanged
            out = logps_of(model, *args, **kwargs)
            if torch.is_grad_enabled():  # the loss's forward
                observed["current"] = out[0].detach().clone()
            else:  # scoring: the rollout's and the reference's
                observed["ref" if model is trainer.ref_model else "old"] = out[0].detach().clone()
            return out

        trainer._get_per_token_logps_and_entropies = observe
        inputs = [{"prompt": t, "target": r} for t, r in zip(texts, rewards)]
        scored = trainer._generate_and_score_completions(inputs)

        # the loss: TRL's _compute_loss on its own batch, with old log-probs set apart from the current ones
        mask = scored["completion_mask"].bool()
        query_responses = torch.cat([scored["prompt_ids"], scored["completion_ids"]], 1)
        attention = torch.cat([scored["prompt_mask"], scored["completion_mask"]], 1)
        context = scored["prompt_ids"].shape[1]
        with torch.no_grad():
            current = sequences.response_logprobs(
                trainer.model, query_responses, attention, context, temperature=s["temperature"]
            )
        g = torch.Generator().manual_seed(3000 + s["seed"])
        old = torch.where(
            mask, current + s["old_logprob_noise"] * torch.randn(current.shape, generator=g), 0.0
        )
        loss_inputs = dict(scored)
        if s["trainer"] == "grpo":
            loss_inputs["old_per_token_logps"] = old
        else:
            loss_inputs["old_logps"] = (old * mask).sum(1)
        trainer.model.zero_grad()
        trl_loss = trainer._compute_loss(trainer.model, loss_inputs)
        trl_loss.backward()
        trl_grads = {
            n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None
        }
        trainer.model.zero_grad()

        # ours: the same rewards and log-probs through core
        response_mask = sequences.truncate_at_eos(scored["completion_ids"], EOS_ID, PAD_ID)[1]
        our_mask = response_mask  # the loss's: the trainer's loss_mask (rollout_targets)
        if s.get("mask_truncated_completions"):
            our_mask = response_mask & (scored["completion_ids"] == EOS_ID).any(1, keepdim=True)
        ref_logprobs = observed.get("ref", torch.zeros_like(old))
        rollout_logprobs = observed.get(
            "old", current
        )  # RLOO's KL reads the rollout's; GRPO's none (KL in loss)
        targets = core.compute_critic_free_targets(
            s["trainer"],
            torch.tensor(rewards),
            rollout_logprobs,
            ref_logprobs,
            response_mask,
            kl_coef=s["beta"] if s["trainer"] == "rloo" else 0.0,
            kl_estimator="k1",
            num_generations=s["num_generations"],
            scale_rewards=s.get("scale_rewards", True),
        )
        new = sequences.response_logprobs(
            trainer.model, query_responses, attention, context, temperature=s["temperature"]
        )
        if s["loss_type"] == "sequence":
            loss, clip_stats = core.sequence_policy_loss(
                new, old, targets["sequence_advantages"], our_mask, cliprange=s["epsilon"]
            )
        else:
            loss, clip_stats = core.policy_loss(
                new,
                old,
                targets["advantages"],
                our_mask,
                cliprange=s["epsilon"],
                loss_type=s["loss_type"],
                max_len=s["max_completion_length"],
                cliprange_high=s.get("epsilon_high"),
                importance_sampling_level=s.get("importance_sampling_level", "token"),
            )
            if s["beta"]:
                loss = loss + s["beta"] * core.kl_loss(
                    new,
                    ref_logprobs,
                    our_mask,
                    loss_type=s["loss_type"],
                    max_len=s["max_completion_length"],
                    old_logprobs=old if s.get("use_bias_correction_kl", True) else None,
                    importance_sampling_level=s.get("importance_sampling_level", "token"),
                )
        loss.backward()
        grads = {
            n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None
        }

        largest = max(float(g_.abs().max()) for g_ in trl_grads.values())
        d = {
            "mask (count of differing positions)": float((our_mask != mask).sum()),
            # TRL divides the logits by T, we by T + 1e-7 (TRL PPOTrainer's): ~1e-6 apart
            "current logprobs (our forward vs TRL's loss forward)": _maxdiff(new, observed["current"], mask),
            "advantages": _maxdiff(targets["sequence_advantages"], scored["advantages"]),
            "loss": abs(float(loss) - float(trl_loss)),
            "loss gradient, relative (max |diff| / max |TRL's|)": max(
                _maxdiff(grads[n], trl_grads[n]) for n in trl_grads
            )
            / largest,
        }
        kl_effect = 0.0
        if s["trainer"] == "rloo":  # the sequence-level KL in the reward, as TRL logs it (mean per token)
            d["KL per token (TRL's logged kl)"] = abs(
                float(core.masked_mean(targets["kl"], our_mask)) - trainer._metrics["train"]["kl"][-1]
            )
            without = core.rloo_advantages(torch.tensor(rewards), s["num_generations"])
            kl_effect = _maxdiff(without, scored["advantages"])  # what the KL in the reward moved
        eos_rows = (scored["completion_ids"] == EOS_ID).any(1)
        return {
            "setting": s,
            "max_abs_diff": d,
            "trl_loss": float(trl_loss),
            "loss": float(loss),
            "gradient_norm": float(torch.sqrt(sum((g_**2).sum() for g_ in trl_grads.values()))),
            "rows_with_eos": int(eos_rows.sum()),
            "rows_truncated": int((~eos_rows).sum()),
            "clipped_low": float(clip_stats["clipfrac_low"]),
            "clipped_high": float(clip_stats["clipfrac_high"]),
            "kl_effect": kl_effect,
            "passed": all(v <= TOLERANCE for v in d.values()),
        }


def crosscheck(settings: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every setting (default ``SETTINGS``): ``{"tolerance", "passed", "results": {name: run_one(...)}}``."""
    from transformers.utils import logging as hf_logging

    n_threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # TRL saves and loads the tiny models: no bars in the report
    try:
        results = {st["name"]: run_one(st) for st in (SETTINGS if settings is None else settings)}
    finally:
        torch.set_num_threads(n_threads)
        if bars:
            hf_logging.enable_progress_bar()
    return {"tolerance": TOLERANCE, "passed": all(r["passed"] for r in results.values()), "results": results}


def format_report(report: dict[str, Any]) -> str:
    names = list(report["results"])
    quantities = list(dict.fromkeys(q for r in report["results"].values() for q in r["max_abs_diff"]))
    w0 = max(len(q) for q in quantities) + 2
    w = max(12, *(len(n) + 2 for n in names))
    lines = [
        f"Critic-free estimators vs TRL {_trl_version()} GRPOTrainer / RLOOTrainer, max |ours - TRL|, "
        f"tolerance {report['tolerance']:g}",
        "",
        "quantity".ljust(w0) + "".join(n.rjust(w) for n in names),
    ]
    for q in quantities:
        cells = [report["results"][n]["max_abs_diff"].get(q) for n in names]
        lines.append(q.ljust(w0) + "".join(("-" if c is None else f"{c:.2e}").rjust(w) for c in cells))
    for key, label in (
        ("trl_loss", "TRL's loss"),
        ("gradient_norm", "TRL's gradient norm"),
        ("clipped_low", "ratios clipped below (A < 0)"),
        ("clipped_high", "ratios clipped above (A > 0)"),
        ("kl_effect", "advantages moved by the KL in the reward"),
        ("rows_with_eos", "rows with EOS"),
        ("rows_truncated", "rows truncated"),
        ("passed", "passed"),
    ):
        values = [report["results"][n][key] for n in names]
        lines.append(
            label.ljust(w0)
            + "".join((f"{v:.3g}" if isinstance(v, float) else str(v)).rjust(w) for v in values)
        )
    lines.append("overall: " + ("PASSED" if report["passed"] else "FAILED"))
    return "\n".join(lines)


__all__ = ["SETTINGS", "crosscheck", "format_report", "run_one"]
