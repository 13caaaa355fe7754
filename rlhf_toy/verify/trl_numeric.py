"""Numeric cross-check of ``rlhf_toy.stages.ppo.core`` against TRL's own PPOTrainer (trl 1.12.0).

What runs on the TRL side is TRL's code, unmodified: ``trl.experimental.ppo.PPOTrainer.train()``
for exactly one PPO iteration on a tiny random GPT-2 (policy, reference, reward model, value
model, and a WordLevel tokenizer, all built locally: no download).  We only *observe* it: the
module-level ``masked_whiten`` and ``masked_mean`` of ``trl.experimental.ppo.ppo_trainer`` are
wrapped by pass-through functions that, when called from ``train()``, read ``train()``'s local
variables (responses, logprobs, ref_logprobs, values, scores, sequence lengths, rewards,
advantages, returns, and per micro-batch the new logprobs / value predictions) and keep
references to its statistics tensors.  The return values are TRL's own, unchanged.

On our side the same inputs go through ``rlhf_toy.stages.ppo.core``:

* ``compat`` quantities: ``compute_ppo_targets(..., trl_compat=True)`` and the loss functions with
  TRL's masks must equal TRL's numbers exactly (``tolerance``: 0, but for the ``ROUND_OFF_QUANTITIES``).
* ``design`` quantities: our defaults (score on the last real token, value loss over the response
  mask, masked approx-KL) next to TRL's, to show where and how much they differ by design.
* ``trainer``: one PPO step through the trainer users run (``rlhf_toy.stages.ppo.trainer``: its forward passes,
  ``ppo_update``'s minibatch and accumulation loop, ``make_optimizer``'s AdamW and gradient clipping) with
  TRL's update (``ppo_update(as_trl=True)``), from TRL's rollout and in TRL's minibatch order: every
  intermediate tensor, the accumulated gradients before each optimizer step and the updated policy and value
  weights must equal TRL's bit for bit (``tolerance``).

``numeric_crosscheck(settings)`` returns a report dict; ``format_report`` renders it as a table.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import tempfile
import time
from typing import Any

import torch

from rlhf_toy import models, sequences
from rlhf_toy.stages.ppo import core
from rlhf_toy.stages.ppo import trainer as T
from rlhf_toy.stages.ppo.config import PPOStageConfig
from rlhf_toy.stages.ppo.models import disable_dropout, forward_values

TOLERANCE = 1e-5  # float32 round-off: where ours and TRL's compute a quantity in different ways
# Every quantity of the TRL-compat check is computed from the same inputs by the same operations as TRL's, so it
# must be bit-identical (tolerance 0), except these, whose computation differs by design:
ROUND_OFF_QUANTITIES = {
    "logged metrics": "TRL averages its statistics tensors; ours are Python sums of the per-micro-batch floats",
    "trainer: rollout logprobs (forward vs TRL's sampling pass)": "a full forward pass against generate's KV cache",
}


def tolerance(quantity: str) -> float:
    """The largest |ours − TRL| the check accepts for `quantity`: 0, or float32 round-off (ROUND_OFF_QUANTITIES)."""
    return TOLERANCE if quantity in ROUND_OFF_QUANTITIES else 0.0


PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

BASE_SETTING: dict[str, Any] = {
    "name": "trl_defaults",
    "seed": 0,
    "vocab_size": 100,
    "batch_size": 8,
    "response_length": 12,
    "eos_prob": 0.08,  # per-token probability of EOS under the tiny policy
    "stop_token": "eos",  # None: no truncation at EOS (every response runs to the length limit)
    "temperature": 0.7,
    "kl_coef": 0.05,
    "kl_estimator": "k1",
    "gamma": 1.0,
    "lam": 0.95,
    "cliprange": 0.2,
    "cliprange_value": 0.2,
    "vf_coef": 0.1,
    "whiten_rewards": False,
    "missing_eos_penalty": None,
    "num_ppo_epochs": 1,
    "num_mini_batches": 1,
    "gradient_accumulation_steps": 1,  # TRL's: batch_size = per-device batch × this
    "learning_rate": 3e-3,
    "adam_epsilon": 1e-8,  # TRL's (HF TrainingArguments') default
}

DEFAULT_SETTINGS: list[dict[str, Any]] = [
    {"name": "trl_defaults"},
    {
        "name": "k3_whiten_rewards",
        "seed": 1,
        "kl_estimator": "k3",
        "kl_coef": 0.2,
        "gamma": 0.99,
        "lam": 0.9,
        "whiten_rewards": True,
    },
    {"name": "no_eos_truncation", "seed": 2, "stop_token": None, "kl_coef": 0.1, "gamma": 0.95, "lam": 0.95},
    {
        "name": "tight_clip_2_epochs",
        "seed": 3,
        "cliprange": 0.05,
        "cliprange_value": 0.01,
        "num_ppo_epochs": 2,
        "learning_rate": 1e-2,
        "missing_eos_penalty": 1.0,
    },
    {
        "name": "2_minibatches_mostly_eos",
        "seed": 4,
        "num_mini_batches": 2,
        "num_ppo_epochs": 2,
        "eos_prob": 0.25,
        "temperature": 1.0,
        "gamma": 1.0,
        "lam": 1.0,
        "kl_coef": 0.5,
        "cliprange": 0.1,
        "cliprange_value": 0.05,
    },
    {  # TRL's accumulation spans its minibatches: 2 minibatches x 2 micro-batches, one optimizer step an epoch
        "name": "accumulate_2x2_k1",
        "seed": 5,
        "gradient_accumulation_steps": 4,
        "num_mini_batches": 2,
        "num_ppo_epochs": 2,
        "eos_prob": 0.06,
        "learning_rate": 1e-3,
        "adam_epsilon": 1e-5,
        "missing_eos_penalty": 1.0,
    },
    {
        "name": "accumulate_2x2_k3",
        "seed": 6,
        "batch_size": 16,  # TRL refuses to whiten rewards over minibatches of fewer than 8
        "gradient_accumulation_steps": 4,
        "num_mini_batches": 2,
        "num_ppo_epochs": 2,
        "eos_prob": 0.06,
        "kl_estimator": "k3",
        "kl_coef": 0.2,
        "learning_rate": 1e-3,
        "adam_epsilon": 1e-5,
        "whiten_rewards": True,
    },
]


# --------------------------------------------------------------------------------------------
# tiny local models
# --------------------------------------------------------------------------------------------
def build_tokenizer(vocab_size: int = 100):
    """A WordLevel tokenizer with ``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2, ``w0`` ... (left padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<unk>": UNK_ID}
    for i in range(vocab_size - 3):
        vocab[f"w{i}"] = i + 3
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def _gpt2_config(vocab_size: int, num_labels: int | None = None):
    """Tiny GPT-2 (2 layers, 2 heads, width 32), dropout off, untied input/output embeddings."""
    from transformers import GPT2Config

    kw = dict(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=64,
        vocab_size=vocab_size,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
    )
    if num_labels is not None:
        kw["num_labels"] = num_labels
    return GPT2Config(**kw)


@torch.no_grad()
def _shape_policy(model, eos_prob: float, temperature: float) -> None:
    """Make a random GPT-2 a usable toy policy: non-uniform next-token distributions, EOS with a
    controllable probability, and PAD / UNK practically never sampled.

    The final LayerNorm's channel 0 is pinned to 1 (weight 0, bias 1), so column 0 of the (untied)
    output embedding acts as a per-token logit bias."""
    head = model.lm_head.weight
    head.mul_(15.0)  # logits with std ~1.7 instead of ~0.1
    model.transformer.ln_f.weight[0] = 0.0
    model.transformer.ln_f.bias[0] = 1.0
    head[:, 0] = 0.0
    for tok_id in (EOS_ID, PAD_ID, UNK_ID):
        head[tok_id, 1:] *= 0.02
    # E[exp(z/T)] of a N(0, s2) logit is exp(s2 / 2T^2): pick EOS's bias so that its share is ~eos_prob
    n_other = head.shape[0] - 3
    s2 = float((head[3:, 1:] ** 2).sum(1).mean())
    others = n_other * math.exp(s2 / (2 * temperature**2))
    head[EOS_ID, 0] = temperature * math.log(eos_prob * others / (1.0 - eos_prob))
    head[PAD_ID, 0] = -12.0
    head[UNK_ID, 0] = -12.0


def build_tiny_models(setting: dict[str, Any]):
    """(tokenizer, policy, ref_policy, reward_model, value_model), deterministic in ``seed``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    V = setting["vocab_size"]
    tok = build_tokenizer(V)
    torch.manual_seed(setting["seed"])
    policy = AutoModelForCausalLM.from_config(_gpt2_config(V))
    _shape_policy(policy, setting["eos_prob"], setting["temperature"])
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # the reference differs from the policy, so the KL is not ~0
        for name, p_ in ref.named_parameters():
            if "ln_f" not in name:
                p_.add_(0.1 * p_.std() * torch.randn_like(p_))
        ref.lm_head.weight[:, 0] = policy.lm_head.weight[:, 0]  # same EOS / PAD / UNK biases
    reward_model = AutoModelForSequenceClassification.from_config(_gpt2_config(V, num_labels=1))
    value_model = AutoModelForSequenceClassification.from_config(_gpt2_config(V, num_labels=1))
    with torch.no_grad():  # scores and values of order 1
        reward_model.score.weight.mul_(10.0)
        value_model.score.weight.mul_(10.0)
    return tok, policy, ref, reward_model, value_model


def _prompts(n: int, vocab_size: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1000 + seed)
    out = []
    for i in range(n):
        length = 2 + i % 4  # different lengths -> left padding in the batch
        out.append((3 + torch.randint(0, vocab_size - 3, (length,), generator=g)).tolist())
    return out


# --------------------------------------------------------------------------------------------
# running TRL and observing it
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _observe_trl_train(cap: dict[str, Any]):
    """Wrap ``masked_whiten`` / ``masked_mean`` of TRL's ppo_trainer module with pass-throughs
    that read ``PPOTrainer.train``'s locals."""
    import trl.experimental.ppo.ppo_trainer as M

    train_code = M.PPOTrainer.train.__code__
    orig_whiten, orig_mean = M.masked_whiten, M.masked_mean
    rollout_keys = (
        "queries", "query_responses", "responses", "postprocessed_responses", "context_length",
        "logprobs", "ref_logprobs", "values", "scores", "sequence_lengths", "padding_mask",
        "padding_mask_p1", "kl", "non_score_reward", "rewards",
    )  # fmt: skip
    stats_keys = (
        "approxkl_stats", "pg_clipfrac_stats", "pg_loss_stats", "vf_loss_stats",
        "vf_clipfrac_stats", "entropy_stats", "ratio_stats",
    )  # fmt: skip

    def whiten(values, mask, shift_mean=True):
        out = orig_whiten(values, mask, shift_mean)
        f = sys._getframe(1)
        if f.f_code is train_code:
            loc = f.f_locals
            if not shift_mean:  # step 5: whitening of the rewards
                cap["rewards_before_whitening"] = values.detach().clone()
            else:  # step 6: whitening of the advantages; everything of the rollout is known now
                for k in rollout_keys:
                    v = loc[k]
                    cap[k] = v.detach().clone() if torch.is_tensor(v) else v
                cap["advantages_unwhitened"] = values.detach().clone()
                cap["returns"] = loc["returns"].detach().clone()
        return out

    def mean(values, mask, axis=None):
        out = orig_mean(values, mask, axis)
        f = sys._getframe(1)
        if f.f_code is train_code:
            loc = f.f_locals
            if "advantages" not in cap:
                cap["advantages"] = loc["advantages"].detach().clone()  # whitened, padding filled
                for k in stats_keys:
                    cap[k] = loc[k]  # the tensors themselves: TRL fills them in place
            if "vf_loss_max" in loc and values is loc["vf_loss_max"]:  # first masked_mean of a micro-batch
                cap.setdefault("micro_batches", []).append(
                    {
                        "epoch": loc["ppo_epoch_idx"],
                        "minibatch": loc["minibatch_idx"],
                        "inds": torch.as_tensor(loc["micro_batch_inds"]).clone(),
                        "new_logprobs": loc["new_logprobs"].detach().clone(),
                        "vpred": loc["vpred"].detach().clone(),
                        "mb_values": loc["mb_values"].detach().clone(),
                        "mb_return": loc["mb_return"].detach().clone(),
                        "mb_advantage": loc["mb_advantage"].detach().clone(),
                        "mb_logprobs": loc["mb_logprobs"].detach().clone(),
                    }
                )
        return out

    M.masked_whiten, M.masked_mean = whiten, mean
    try:
        yield
    finally:
        M.masked_whiten, M.masked_mean = orig_whiten, orig_mean


def run_trl_one_update(setting: dict[str, Any]) -> dict[str, Any]:
    """Build the tiny models, run TRL's ``PPOTrainer.train()`` for one iteration, return what we
    observed plus the initial and the updated weights."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import warnings

    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = {**BASE_SETTING, **setting}
    tok, policy, ref, reward_model, value_model = build_tiny_models(s)
    init = {
        "policy": copy.deepcopy(policy.state_dict()),
        "value": copy.deepcopy(value_model.state_dict()),
        "ref": copy.deepcopy(ref.state_dict()),
    }
    ds = Dataset.from_dict({"input_ids": _prompts(2 * s["batch_size"], s["vocab_size"], s["seed"])})
    cap: dict[str, Any] = {"setting": s, "init": init}
    with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = PPOConfig(
            output_dir=out_dir,
            report_to=[],
            seed=s["seed"],
            per_device_train_batch_size=s["batch_size"] // s["gradient_accumulation_steps"],
            gradient_accumulation_steps=s["gradient_accumulation_steps"],
            local_rollout_forward_batch_size=s["batch_size"],
            total_episodes=s["batch_size"],  # exactly one PPO iteration
            num_ppo_epochs=s["num_ppo_epochs"],
            num_mini_batches=s["num_mini_batches"],
            response_length=s["response_length"],
            stop_token=s["stop_token"],
            temperature=s["temperature"],
            kl_coef=s["kl_coef"],
            kl_estimator=s["kl_estimator"],
            gamma=s["gamma"],
            lam=s["lam"],
            cliprange=s["cliprange"],
            cliprange_value=s["cliprange_value"],
            vf_coef=s["vf_coef"],
            whiten_rewards=s["whiten_rewards"],
            missing_eos_penalty=s["missing_eos_penalty"],
            learning_rate=s["learning_rate"],
            adam_epsilon=s["adam_epsilon"],
            num_sample_generations=0,
            save_strategy="no",
            logging_steps=1,
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = PPOTrainer(
            args=args,
            processing_class=tok,
            model=policy,
            ref_model=ref,
            reward_model=reward_model,
            train_dataset=ds,
            value_model=value_model,
        )
        logged: list[dict[str, float]] = []
        orig_log = trainer.log

        def log(logs, *a, **k):
            logged.append(dict(logs))
            return orig_log(logs, *a, **k)

        trainer.log = log
        opt = trainer.optimizer
        groups = getattr(opt, "optimizer", opt).param_groups
        cap["optimizer"] = {
            "class": type(getattr(opt, "optimizer", opt)).__name__,
            "lr": [g["lr"] for g in groups],
            "betas": [tuple(g["betas"]) for g in groups],
            "eps": [g["eps"] for g in groups],
            "weight_decay": [g["weight_decay"] for g in groups],
            "fused": bool(
                groups[0].get("fused") or False
            ),  # transformers >= 5 on torch >= 2.8: adamw_torch_fused
        }
        # TRL's accumulated gradients, as its optimizer is about to step with them (AdamW's first step hardly
        # depends on their scale, so the weights alone would hide a wrongly scaled gradient)
        cap["gradients"] = []
        wrapper = trainer.accelerator.unwrap_model(trainer.model)
        recorder = getattr(opt, "optimizer", opt).register_step_pre_hook(
            _gradient_recorder(list(wrapper.named_parameters()), cap["gradients"])
        )
        t0 = time.time()
        import io

        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:  # TRL prints its metrics (PrinterCallback); keep our report readable
            with _observe_trl_train(cap), contextlib.redirect_stdout(io.StringIO()):
                trainer.train()
        finally:
            transformers.logging.set_verbosity(verbosity)
            recorder.remove()
        cap["trl_train_s"] = time.time() - t0
        cap["final"] = {
            "policy": {k: v.detach().clone() for k, v in wrapper.policy.state_dict().items()},
            "value": {k: v.detach().clone() for k, v in wrapper.value_model.state_dict().items()},
        }
        cap["metrics"] = logged[0] if logged else {}
        cap["args"] = args
    return cap


def _gradient_recorder(named_parameters: list, store: list):
    """An optimizer step pre-hook that appends {name: gradient} (copies) to `store` before every step."""

    def record(optimizer, args, kwargs):
        store.append({name: p.grad.detach().clone() for name, p in named_parameters if p.grad is not None})

    return record


# --------------------------------------------------------------------------------------------
# our side: the trainer's own functions
# --------------------------------------------------------------------------------------------
def _maxdiff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    a, b = a.detach().double(), b.detach().double()
    if mask is not None:
        a, b = a[mask], b[mask]
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max())


def _fresh_models(s: dict[str, Any], init: dict[str, Any]):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    pol = AutoModelForCausalLM.from_config(_gpt2_config(s["vocab_size"]))
    pol.load_state_dict(init["policy"])
    vm = AutoModelForSequenceClassification.from_config(_gpt2_config(s["vocab_size"], num_labels=1))
    vm.load_state_dict(init["value"])
    return pol, vm


def compare_one(cap: dict[str, Any]) -> dict[str, Any]:
    """Compare one observed TRL iteration with ``rlhf_toy.stages.ppo.core`` (see module docstring)."""
    s = cap["setting"]
    T_resp = cap["responses"].shape[1]
    responses = cap["responses"]
    d: dict[str, float] = {}

    # ---- which tokens are real: ours from the EOS position, TRL's from the first pad token
    if s["stop_token"] == "eos":
        _, mask = sequences.truncate_at_eos(responses, EOS_ID, PAD_ID)
    else:
        mask = torch.ones_like(responses, dtype=torch.bool)
    trl_mask = ~cap["padding_mask"]
    trl_mask_p1 = ~cap["padding_mask_p1"]
    d["mask (count of differing positions)"] = float((mask != trl_mask).sum())
    value_mask_compat = core.extend_mask_by_one(mask)
    d["mask_p1 (count of differing positions)"] = float((value_mask_compat != trl_mask_p1).sum())

    # ---- rollout targets from TRL's own inputs, TRL-compat mode: must be equal
    common = dict(
        kl_coef=s["kl_coef"],
        gamma=s["gamma"],
        lam=s["lam"],
        kl_estimator=s["kl_estimator"],
        whiten_rewards=s["whiten_rewards"],
    )
    inputs = (cap["scores"], cap["logprobs"], cap["ref_logprobs"], cap["values"], mask)
    ours = core.compute_ppo_targets(*inputs, trl_compat=True, **common)
    d["kl"] = _maxdiff(ours["kl"], cap["kl"])
    d["non_score_reward"] = _maxdiff(ours["non_score_reward"], cap["non_score_reward"])
    d["rewards"] = _maxdiff(ours["rewards"], cap["rewards"])
    d["advantages"] = _maxdiff(ours["advantages"], cap["advantages"])
    d["returns"] = _maxdiff(ours["returns"], cap["returns"])

    # ---- losses and statistics per micro-batch, on TRL's own inputs
    mbs = cap["micro_batches"]
    per_mb = {
        "policy_loss": [],
        "value_loss": [],
        "approxkl": [],
        "clipfrac": [],
        "vf_clipfrac": [],
        "ratio_mean": [],
    }
    ours_stats = {k: [] for k in per_mb}
    accumulation_index: dict = {}
    for mb in mbs:
        e, m_i, inds = mb["epoch"], mb["minibatch"], mb["inds"]
        g = accumulation_index[(e, m_i)] = accumulation_index.get((e, m_i), -1) + 1
        pg, st = core.policy_loss(
            mb["new_logprobs"],
            mb["mb_logprobs"],
            mb["mb_advantage"],
            mask[inds],
            cliprange=s["cliprange"],
            stats_over_padding=True,
        )
        vf, vf_clip = core.value_loss(
            mb["vpred"],
            mb["mb_values"],
            mb["mb_return"],
            value_mask_compat[inds],
            cliprange_value=s["cliprange_value"],
        )
        got = {
            "policy_loss": pg, "value_loss": vf, "approxkl": st["approxkl"], "clipfrac": st["clipfrac"],
            "vf_clipfrac": vf_clip, "ratio_mean": st["ratio_mean"],
        }  # fmt: skip
        trl = {
            "policy_loss": cap["pg_loss_stats"][e, m_i, g], "value_loss": cap["vf_loss_stats"][e, m_i, g],
            "approxkl": cap["approxkl_stats"][e, m_i, g], "clipfrac": cap["pg_clipfrac_stats"][e, m_i, g],
            "vf_clipfrac": cap["vf_clipfrac_stats"][e, m_i, g], "ratio_mean": cap["ratio_stats"][e, m_i, g],
        }  # fmt: skip
        for k in per_mb:
            per_mb[k].append(abs(float(got[k]) - float(trl[k])))
            ours_stats[k].append(float(got[k]))
    for k, v in per_mb.items():
        d[k] = max(v)

    # ---- logged metrics recomputed with core functions
    met = cap["metrics"]
    kl_seq = core.masked_sum(ours["kl"], mask, dim=1)
    nsr_seq = core.masked_sum(ours["non_score_reward"], mask, dim=1)
    our_metrics = {
        "objective/kl": float(kl_seq.mean()),
        "objective/non_score_reward": float(nsr_seq.mean()),
        "objective/rlhf_reward": float(nsr_seq.mean() + cap["scores"].mean()),
        "objective/scores": float(cap["scores"].mean()),
        "objective/entropy": float(core.masked_sum(-cap["logprobs"], mask, dim=1).mean()),
        # TRL averages over every slot of its (epochs, minibatches, gradient_accumulation_steps) stats array;
        # with gradient_accumulation_steps > 1 only some slots are filled, the rest count as 0 (see design)
        **{
            name: sum(ours_stats[key]) / cap["approxkl_stats"].numel()
            for name, key in (
                ("policy/approxkl_avg", "approxkl"),
                ("policy/clipfrac_avg", "clipfrac"),
                ("loss/policy_avg", "policy_loss"),
                ("loss/value_avg", "value_loss"),
                ("val/clipfrac_avg", "vf_clipfrac"),
                ("val/ratio", "ratio_mean"),
            )
        },
    }
    d["logged metrics"] = max(abs(our_metrics[k] - float(met[k])) for k in our_metrics)

    # ---- one PPO step through the trainer itself (its forward passes, minibatch/accumulation loop,
    # optimizer, clipping), from TRL's rollout: every intermediate tensor and the updated weights
    upd = trainer_step(cap, mask)
    d.update(upd.pop("max_abs_diff"))

    # ---- our defaults next to TRL: the differences by design
    default = core.compute_ppo_targets(*inputs, trl_compat=False, **common)
    trl_score_idx = core.last_token_index(trl_mask_p1)
    our_score_idx = core.last_token_index(mask)
    moved = trl_score_idx != our_score_idx
    design = {
        "rows_score_moved": int(moved.sum()),
        "rows": int(mask.shape[0]),
        "rewards max|ours-TRL|": _maxdiff(default["rewards"], cap["rewards"]),
        "rewards max|ours-TRL| on rows with the same score position": (
            _maxdiff(default["rewards"][~moved], cap["rewards"][~moved])
            if not s["whiten_rewards"]
            else float("nan")
        ),
        "advantages max|ours-TRL|": _maxdiff(default["advantages"], cap["advantages"]),
        "returns max|ours-TRL| (on response mask)": _maxdiff(default["returns"], cap["returns"], mask),
    }
    mb0 = mbs[0]
    vf_ours, _ = core.value_loss(
        mb0["vpred"],
        mb0["mb_values"],
        mb0["mb_return"],
        mask[mb0["inds"]],
        cliprange_value=s["cliprange_value"],
    )
    design["value_loss(first mb): ours mask vs TRL p1 mask"] = (
        float(vf_ours),
        float(cap["vf_loss_stats"][0, 0, 0]),
    )
    _, st_masked = core.policy_loss(
        mb0["new_logprobs"],
        mb0["mb_logprobs"],
        mb0["mb_advantage"],
        mask[mb0["inds"]],
        cliprange=s["cliprange"],
    )
    design["approxkl(first mb): ours masked vs TRL over padding"] = (
        float(st_masked["approxkl"]),
        float(cap["approxkl_stats"][0, 0, 0]),
    )
    # TRL's logged update statistics: micro-batches run / slots averaged over (1 = no dilution)
    design["TRL logged update stats: filled share of its stats slots"] = (
        len(mbs) / cap["approxkl_stats"].numel()
    )
    # TRL's average over every position = ours over real tokens × (real tokens / all positions)
    mb0_mask = mask[mb0["inds"]]
    design["approxkl(first mb): real-token share"] = float(mb0_mask.sum()) / mb0_mask.numel()

    eos_rows = (
        (responses == EOS_ID).any(1)
        if s["stop_token"] == "eos"
        else torch.zeros(len(responses), dtype=torch.bool)
    )
    lengths = mask.sum(1)
    return {
        "setting": {k: v for k, v in s.items()},
        "batch": {
            "lengths": lengths.tolist(),
            "rows_with_eos": int(eos_rows.sum()),
            "rows_truncated": int((~eos_rows).sum()),
            "padded_positions": int((~mask).sum()),
            "response_length": T_resp,
            "micro_batches": len(mbs),
        },
        "max_abs_diff": d,
        "update": upd,
        "design": design,
        "trl_metrics": {k: float(v) for k, v in met.items() if isinstance(v, (int, float))},
        "our_metrics": our_metrics,
        "trl_train_s": cap["trl_train_s"],
    }


def trainer_step(cap: dict[str, Any], mask: torch.Tensor) -> dict[str, Any]:
    """One PPO step of our trainer from TRL's rollout (same prompts, responses, initial models, scores and
    sampling log-probs), with TRL's update (`ppo_update(as_trl=True)`) and TRL's hyperparameters: the
    reference log-probs and values from the trainer's forward passes, the targets from
    `core.compute_ppo_targets`, then `trainer.ppo_update` (its micro-batch and accumulation loop,
    `make_optimizer`'s AdamW, gradient clipping at a norm never reached, as TRL has none) over TRL's own
    minibatch order. Returns max |ours − TRL| per quantity and the weight agreement."""

    s, args = cap["setting"], cap["args"]
    batch_size, gas = s["batch_size"], s["gradient_accumulation_steps"]
    # TRL's gradient_accumulation_steps spans its minibatches (accelerate counts micro-batches across them):
    # with gas > 1 it takes one optimizer step per epoch, over all gas micro-batches; with gas = 1 one per
    # minibatch. Ours: num_mini_batches optimizer steps per epoch, each over gradient_accumulation_steps.
    num_mini_batches, accumulation = (1, gas) if gas > 1 else (s["num_mini_batches"], 1)
    cfg = PPOStageConfig(
        batch_size=batch_size,
        total_episodes=batch_size,
        num_mini_batches=num_mini_batches,
        gradient_accumulation_steps=accumulation,
        num_ppo_epochs=s["num_ppo_epochs"],
        temperature=s["temperature"],
        kl_coef=s["kl_coef"],
        kl_estimator=s["kl_estimator"],
        gamma=s["gamma"],
        lam=s["lam"],
        cliprange=s["cliprange"],
        cliprange_value=s["cliprange_value"],
        vf_coef=s["vf_coef"],
        whiten_rewards=s["whiten_rewards"],
        learning_rate=args.learning_rate,
        adam_eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        lr_scheduler_type="linear",
        max_grad_norm=1e9,
        device="cpu",
        dtype="float32",
    )
    policy, value_model = _fresh_models(s, cap["init"])
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_config(_gpt2_config(s["vocab_size"]))
    reference.load_state_dict(cap["init"]["ref"])
    for model in (policy, value_model, reference):
        disable_dropout(model)
    parameters = list(policy.parameters()) + list(value_model.parameters())
    optimizer = T.make_optimizer(cfg, parameters, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, T.lr_decay(cfg))
    state = T.PPOState(
        cfg,
        T.make_accelerator(cfg),
        torch.device("cpu"),
        tokenizer=None,
        scorer=None,
        policy=policy,
        reference=reference,
        value_model=value_model,
        optimizer=optimizer,
        scheduler=scheduler,
        kl_ctl=core.FixedKLController(cfg.kl_coef),
        eval_prompts=[],
        prompts=[],
        local_batch=batch_size,
        micro_batch=batch_size // num_mini_batches // accumulation,
        precision=models.resolve_precision("float32", torch.device("cpu")),
        logprobs_from_forward=False,
    )
    T.prepare_engine(state)  # one process: the models and optimizer come back as they were

    ctx, query_responses, responses = cap["context_length"], cap["query_responses"], cap["responses"]
    attention = (query_responses != PAD_ID).long()  # what TRL's forward attends to
    with torch.no_grad():
        policy.eval(), reference.eval(), value_model.eval()
        logprobs = sequences.response_logprobs(
            policy, query_responses, attention, ctx, temperature=cfg.temperature
        )
        ref_logprobs = sequences.response_logprobs(
            reference, query_responses, attention, ctx, temperature=cfg.temperature
        )
        values = forward_values(value_model, query_responses, attention, ctx)
    value_mask = core.extend_mask_by_one(mask)
    d = {
        "trainer: rollout logprobs (forward vs TRL's sampling pass)": _maxdiff(
            logprobs, cap["logprobs"], mask
        ),
        "trainer: ref_logprobs": _maxdiff(ref_logprobs, cap["ref_logprobs"], mask),
        "trainer: values": _maxdiff(values, cap["values"], value_mask),
    }
    targets = core.compute_ppo_targets(
        cap["scores"],
        cap["logprobs"],
        ref_logprobs,
        values,
        mask,
        kl_coef=cfg.kl_coef,
        gamma=cfg.gamma,
        lam=cfg.lam,
        kl_estimator=cfg.kl_estimator,
        whiten_rewards=cfg.whiten_rewards,
        trl_compat=True,
    )
    for name in ("kl", "rewards", "advantages", "returns"):
        d[f"trainer: {name}"] = _maxdiff(targets[name], cap[name])

    batch = T.Rollout(
        [], query_responses, attention, ctx, responses, mask, cap["logprobs"], ref_logprobs, values, []
    )
    micro_batches = cap["micro_batches"]
    orders = {}
    for mb in micro_batches:  # TRL's permutation of each epoch, as its micro-batches took it
        orders.setdefault(mb["epoch"], []).append(mb["inds"])
    gradients: list = []
    named = [
        (f"{prefix}.{n}", p)
        for prefix, m in (("policy", policy), ("value_model", value_model))
        for n, p in m.named_parameters()
    ]  # TRL's PolicyAndValueWrapper's names
    recorder = optimizer.register_step_pre_hook(_gradient_recorder(named, gradients))
    stats = T.ppo_update(
        state, batch, targets, step=1, permutation=lambda epoch: torch.cat(orders[epoch]), as_trl=True
    )
    recorder.remove()
    if len(gradients) != len(cap["gradients"]) or any(
        a.keys() != b.keys() for a, b in zip(gradients, cap["gradients"])
    ):
        raise AssertionError(
            f"the optimizer steps differ: ours {len(gradients)} over "
            f"{len(gradients[0]) if gradients else 0} tensors, TRL's {len(cap['gradients'])}"
        )
    d["trainer: gradients before each optimizer step"] = max(
        _maxdiff(ours[name], theirs[name])
        for ours, theirs in zip(gradients, cap["gradients"])
        for name in ours
    )
    trl_stats = {
        "pg_loss": "pg_loss_stats",
        "vf_loss": "vf_loss_stats",
        "approxkl": "approxkl_stats",
        "pg_clipfrac": "pg_clipfrac_stats",
        "vf_clipfrac": "vf_clipfrac_stats",
        "ratio": "ratio_stats",
    }
    position: dict = {}
    for i, mb in enumerate(micro_batches):
        e, m = mb["epoch"], mb["minibatch"]
        g = position[(e, m)] = position.get((e, m), -1) + 1
        for ours, theirs in trl_stats.items():
            key = f"trainer: {ours} (per micro-batch)"
            d[key] = max(d.get(key, 0.0), abs(stats[ours][i] - float(cap[theirs][e, m, g])))
    # the updated weights
    max_abs, num, den = 0.0, 0.0, 0.0
    for prefix, model in (("policy", policy), ("value", value_model)):
        for k, v in model.state_dict().items():
            v0, v_trl = cap["init"][prefix][k], cap["final"][prefix][k]
            max_abs = max(max_abs, float((v.double() - v_trl.double()).abs().max()))
            num += float(((v - v0).double() - (v_trl - v0).double()).pow(2).sum())
            den += float((v_trl - v0).double().pow(2).sum())
    d["trainer: updated weights"] = max_abs
    return {
        "max_abs_diff": d,
        "weights_max_abs_diff": max_abs,
        "weights_rel_diff": math.sqrt(num / den) if den else 0.0,
        "weight_change_norm": math.sqrt(den),
        "micro_batches": len(micro_batches),
        "optimizer_steps": int(optimizer.state[parameters[0]]["step"]),
        "learning_rate": args.learning_rate,
        "adam_epsilon": args.adam_epsilon,
    }


def numeric_crosscheck(settings: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run TRL's PPOTrainer for one iteration per setting and compare with ``rlhf_toy.stages.ppo.core``.

    ``settings``: list of dicts overriding ``BASE_SETTING`` (default ``DEFAULT_SETTINGS``).
    Returns ``{"tolerance", "passed", "results": {name: {...}}}``; each result
    holds ``max_abs_diff`` (quantity -> max |ours - TRL|, TRL-compat mode), ``update`` (the trainer
    step's weights and its optimizer steps), ``design`` (our defaults vs TRL), ``batch`` (what was sampled).
    """
    settings = DEFAULT_SETTINGS if settings is None else settings
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a busy 2-core machine
    results = {}
    passed = True
    try:
        for st in settings:
            cap = run_trl_one_update(st)
            res = compare_one(cap)
            res["passed"] = all(v <= tolerance(k) for k, v in res["max_abs_diff"].items())
            passed = passed and res["passed"]
            results[res["setting"]["name"]] = res
    finally:
        torch.set_num_threads(n_threads)
    return {"tolerance": TOLERANCE, "passed": passed, "results": results}


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: quantities (rows) x settings (columns) of max |ours - TRL|, then one
    `trainer step:` line with the largest difference of the trainer-level check over all settings."""
    names = list(report["results"])
    quantities = list(next(iter(report["results"].values()))["max_abs_diff"])
    w0 = max(len(q) for q in quantities) + 2
    w = max(12, *(len(n) + 2 for n in names))
    lines = [
        f"Numeric cross-check vs TRL {_trl_version()} PPOTrainer (TRL-compat mode), max |ours - TRL|, "
        f"tolerance 0 ({', '.join(ROUND_OFF_QUANTITIES)}: {report['tolerance']:g})",
        "",
        "quantity".ljust(w0) + "".join(n.rjust(w) for n in names),
    ]
    for q in quantities:
        lines.append(
            q.ljust(w0) + "".join(f"{report['results'][n]['max_abs_diff'][q]:.2e}".rjust(w) for n in names)
        )
    rows = (
        ("micro_batches", "micro-batches"),
        ("optimizer_steps", "optimizer steps"),
        ("learning_rate", "learning rate"),
        ("adam_epsilon", "Adam epsilon"),
        ("weights_rel_diff", "weights: rel. diff of the change"),
    )
    for key, label in rows:
        lines.append(
            label.ljust(w0) + "".join(f"{report['results'][n]['update'][key]:.3g}".rjust(w) for n in names)
        )
    for key, label in (("rows_with_eos", "batch: rows with EOS"), ("rows_truncated", "batch: rows truncated"),
                       ("padded_positions", "batch: padded positions")):  # fmt: skip
        lines.append(
            label.ljust(w0) + "".join(str(report["results"][n]["batch"][key]).rjust(w) for n in names)
        )
    lines.append("passed".ljust(w0) + "".join(str(report["results"][n]["passed"]).rjust(w) for n in names))
    lines += ["", "Differences by design (our defaults vs TRL, same inputs):"]
    for n in names:
        dsg = report["results"][n]["design"]
        parts = []
        for k, v in dsg.items():
            if isinstance(v, tuple):
                parts.append(f"{k} = {v[0]:.4g} / {v[1]:.4g}")
            elif isinstance(v, float):
                parts.append(f"{k} = {v:.3g}")
            else:
                parts.append(f"{k} = {v}")
        lines.append(f"  {n}: " + "; ".join(parts))
    lines.append("")
    trainer = {
        n: max(v for k, v in r["max_abs_diff"].items() if k.startswith("trainer:"))
        for n, r in report["results"].items()
    }
    worst = max(trainer, key=trainer.get)
    lines.append(
        f"trainer step: largest |ours - TRL| {trainer[worst]:.2e} over {len(trainer)} settings "
        f"(every tensor, the gradients and the updated weights; worst: {worst})"
    )
    lines.append("overall: " + ("PASSED" if report["passed"] else "FAILED"))
    return "\n".join(lines)


def _trl_version() -> str:
    try:
        import trl

        return trl.__version__
    except Exception:  # pragma: no cover
        return "?"
