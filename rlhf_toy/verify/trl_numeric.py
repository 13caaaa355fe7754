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
  TRL's masks must equal TRL's numbers to float32 round-off (``TOLERANCE``).
* ``design`` quantities: our defaults (score on the last real token, value loss over the response
  mask, masked approx-KL) next to TRL's, to show where and how much they differ by design.
* ``update``: one full PPO iteration replayed from the same initial weights on the same batch
  (same micro-batch order), with our forward pass, our losses and ``torch.optim.AdamW`` with
  TRL's hyperparameters; the updated weights must agree (relative difference of the weight
  change < ``UPDATE_TOLERANCE``).

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

from rlhf_toy import sequences
from rlhf_toy.stages.ppo import core

TOLERANCE = 1e-5  # max abs diff, float32
UPDATE_TOLERANCE = 1e-4  # relative difference of the weight change after one PPO iteration

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
    "learning_rate": 3e-3,
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
            per_device_train_batch_size=s["batch_size"],
            gradient_accumulation_steps=1,
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
            "fused": bool(groups[0].get("fused") or False),  # transformers >= 5 on torch >= 2.8: adamw_torch_fused
        }
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
        cap["trl_train_s"] = time.time() - t0
        wrapper = trainer.accelerator.unwrap_model(trainer.model)
        cap["final"] = {
            "policy": {k: v.detach().clone() for k, v in wrapper.policy.state_dict().items()},
            "value": {k: v.detach().clone() for k, v in wrapper.value_model.state_dict().items()},
        }
        cap["metrics"] = logged[0] if logged else {}
        cap["args"] = args
    return cap


# --------------------------------------------------------------------------------------------
# our side
# --------------------------------------------------------------------------------------------
def _forward(model, query_responses: torch.Tensor, pad_token_id: int):
    """Model input conventions of lm-human-preferences / TRL: pad -> id 0 and masked out,
    position ids counted over real tokens only (left-padded prompts)."""
    attention_mask = query_responses != pad_token_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    return attention_mask, position_ids, input_ids


def policy_logits(policy, query_responses, context_length, pad_token_id=PAD_ID):
    am, pos, ids = _forward(policy, query_responses, pad_token_id)
    out = policy(input_ids=ids, attention_mask=am, position_ids=pos, return_dict=True)
    return out.logits[:, context_length - 1 : -1]


def value_predictions(value_model, query_responses, context_length, pad_token_id=PAD_ID):
    am, pos, ids = _forward(value_model, query_responses, pad_token_id)
    backbone = getattr(value_model, value_model.base_model_prefix)
    h = backbone(input_ids=ids, attention_mask=am, position_ids=pos, return_dict=True).last_hidden_state
    return value_model.score(h)[:, context_length - 1 : -1].squeeze(-1)


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
    ctx = cap["context_length"]
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

    # ---- rollout log-probs and values: our forward + logprobs_from_logits vs TRL's sampling-time ones
    pol, vm = _fresh_models(s, cap["init"])
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_config(_gpt2_config(s["vocab_size"]))
    ref.load_state_dict(cap["init"]["ref"])
    with torch.no_grad():
        qr = cap["query_responses"]
        lp = sequences.logprobs_from_logits(policy_logits(pol, qr, ctx), responses, s["temperature"])
        rlp = sequences.logprobs_from_logits(policy_logits(ref, qr, ctx), responses, s["temperature"])
        val = value_predictions(vm, qr, ctx)
    d["logprobs"] = _maxdiff(lp, cap["logprobs"], mask)
    d["ref_logprobs"] = _maxdiff(rlp, cap["ref_logprobs"], mask)
    d["values"] = _maxdiff(val, cap["values"], trl_mask_p1)

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
    per_mb = {"policy_loss": [], "value_loss": [], "approxkl": [], "clipfrac": [], "vf_clipfrac": [], "ratio_mean": []}
    ours_stats = {k: [] for k in per_mb}
    for mb in mbs:
        e, m_i, inds = mb["epoch"], mb["minibatch"], mb["inds"]
        pg, st = core.policy_loss(
            mb["new_logprobs"], mb["mb_logprobs"], mb["mb_advantage"], mask[inds], s["cliprange"], stats_over_padding=True
        )
        vf, vf_clip = core.value_loss(mb["vpred"], mb["mb_values"], mb["mb_return"], value_mask_compat[inds], s["cliprange_value"])
        got = {
            "policy_loss": pg, "value_loss": vf, "approxkl": st["approxkl"], "clipfrac": st["clipfrac"],
            "vf_clipfrac": vf_clip, "ratio_mean": st["ratio_mean"],
        }  # fmt: skip
        trl = {
            "policy_loss": cap["pg_loss_stats"][e, m_i, 0], "value_loss": cap["vf_loss_stats"][e, m_i, 0],
            "approxkl": cap["approxkl_stats"][e, m_i, 0], "clipfrac": cap["pg_clipfrac_stats"][e, m_i, 0],
            "vf_clipfrac": cap["vf_clipfrac_stats"][e, m_i, 0], "ratio_mean": cap["ratio_stats"][e, m_i, 0],
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
        "policy/approxkl_avg": sum(ours_stats["approxkl"]) / len(mbs),
        "policy/clipfrac_avg": sum(ours_stats["clipfrac"]) / len(mbs),
        "loss/policy_avg": sum(ours_stats["policy_loss"]) / len(mbs),
        "loss/value_avg": sum(ours_stats["value_loss"]) / len(mbs),
        "val/clipfrac_avg": sum(ours_stats["vf_clipfrac"]) / len(mbs),
        "val/ratio": sum(ours_stats["ratio_mean"]) / len(mbs),
    }
    d["logged metrics"] = max(abs(our_metrics[k] - float(met[k])) for k in our_metrics)

    # ---- one full update replayed with our forward, our losses, torch AdamW
    upd = replay_update(cap, ours, mask, value_mask_compat)
    for k in ("policy_loss", "value_loss", "approxkl", "clipfrac", "vf_clipfrac"):
        trl_vals = {"policy_loss": "pg_loss_stats", "value_loss": "vf_loss_stats", "approxkl": "approxkl_stats",
                    "clipfrac": "pg_clipfrac_stats", "vf_clipfrac": "vf_clipfrac_stats"}[k]  # fmt: skip
        d[f"replay {k}"] = max(
            abs(r[k] - float(cap[trl_vals][mb["epoch"], mb["minibatch"], 0])) for r, mb in zip(upd["per_mb"], mbs)
        )

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
            _maxdiff(default["rewards"][~moved], cap["rewards"][~moved]) if not s["whiten_rewards"] else float("nan")
        ),
        "advantages max|ours-TRL|": _maxdiff(default["advantages"], cap["advantages"]),
        "returns max|ours-TRL| (on response mask)": _maxdiff(default["returns"], cap["returns"], mask),
    }
    mb0 = mbs[0]
    vf_ours, _ = core.value_loss(mb0["vpred"], mb0["mb_values"], mb0["mb_return"], mask[mb0["inds"]], s["cliprange_value"])
    design["value_loss(first mb): ours mask vs TRL p1 mask"] = (float(vf_ours), float(cap["vf_loss_stats"][0, 0, 0]))
    _, st_masked = core.policy_loss(
        mb0["new_logprobs"], mb0["mb_logprobs"], mb0["mb_advantage"], mask[mb0["inds"]], s["cliprange"]
    )
    design["approxkl(first mb): ours masked vs TRL over padding"] = (
        float(st_masked["approxkl"]),
        float(cap["approxkl_stats"][0, 0, 0]),
    )

    eos_rows = (responses == EOS_ID).any(1) if s["stop_token"] == "eos" else torch.zeros(len(responses), dtype=torch.bool)
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
        "update": {k: v for k, v in upd.items() if k != "per_mb"},
        "design": design,
        "trl_metrics": {k: float(v) for k, v in met.items() if isinstance(v, (int, float))},
        "our_metrics": our_metrics,
        "trl_train_s": cap["trl_train_s"],
    }


def replay_update(cap, targets, mask, value_mask) -> dict[str, Any]:
    """Our PPO update for the observed batch: same initial weights, same micro-batch order, our
    forward, ``core.policy_loss`` + ``vf_coef * core.value_loss``, torch AdamW with TRL's
    hyperparameters (no gradient clipping, as TRL's PPO loop)."""
    s = cap["setting"]
    args = cap["args"]
    pol, vm = _fresh_models(s, cap["init"])
    pol.train()
    vm.train()
    params = list(pol.parameters()) + list(vm.parameters())
    opt = torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        fused=cap["optimizer"]["fused"] or None,  # the same AdamW kernel as TRL's Trainer picked
    )
    ctx = cap["context_length"]
    qr, responses = cap["query_responses"], cap["responses"]
    old_logprobs = cap["logprobs"]
    per_mb = []
    for mb in cap["micro_batches"]:
        inds = mb["inds"]
        logits = policy_logits(pol, qr[inds], ctx)
        new_lp = sequences.logprobs_from_logits(logits, responses[inds], s["temperature"])
        vpred = value_predictions(vm, qr[inds], ctx)
        pg, st = core.policy_loss(
            new_lp, old_logprobs[inds], targets["advantages"][inds], mask[inds], s["cliprange"], stats_over_padding=True
        )
        vf, vf_clip = core.value_loss(
            vpred, targets["values"][inds], targets["returns"][inds], value_mask[inds], s["cliprange_value"]
        )
        loss = pg + s["vf_coef"] * vf
        loss.backward()
        opt.step()
        opt.zero_grad()
        per_mb.append(
            {"policy_loss": pg.item(), "value_loss": vf.item(), "approxkl": float(st["approxkl"]),
             "clipfrac": float(st["clipfrac"]), "vf_clipfrac": float(vf_clip)}  # fmt: skip
        )
    # compare the weight change with TRL's
    num = den = 0.0
    max_abs = 0.0
    worst_tensor_rel = 0.0
    for prefix, model in (("policy", pol), ("value", vm)):
        for k, v in model.state_dict().items():
            v0 = cap["init"][prefix][k]
            v_trl = cap["final"][prefix][k]
            dt = (v_trl - v0).double()
            do = (v - v0).double()
            num += float(((do - dt) ** 2).sum())
            den += float((dt**2).sum())
            max_abs = max(max_abs, float((v.double() - v_trl.double()).abs().max()))
            if float(dt.norm()) > 0:
                worst_tensor_rel = max(worst_tensor_rel, float((do - dt).norm() / dt.norm()))
    return {
        "per_mb": per_mb,
        "weights_rel_diff": math.sqrt(num / den) if den > 0 else 0.0,
        "weights_worst_tensor_rel_diff": worst_tensor_rel,
        "weights_max_abs_diff": max_abs,
        "weight_change_norm": math.sqrt(den),
        "optimizer_steps": len(per_mb),
    }


def numeric_crosscheck(settings: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run TRL's PPOTrainer for one iteration per setting and compare with ``rlhf_toy.stages.ppo.core``.

    ``settings``: list of dicts overriding ``BASE_SETTING`` (default ``DEFAULT_SETTINGS``).
    Returns ``{"tolerance", "update_tolerance", "passed", "results": {name: {...}}}``; each result
    holds ``max_abs_diff`` (quantity -> max |ours - TRL|, TRL-compat mode), ``update`` (weights
    after one replayed iteration), ``design`` (our defaults vs TRL), ``batch`` (what was sampled).
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
            ok_num = all(v <= TOLERANCE for v in res["max_abs_diff"].values())
            ok_upd = res["update"]["weights_rel_diff"] < UPDATE_TOLERANCE
            res["passed"] = bool(ok_num and ok_upd)
            passed = passed and res["passed"]
            results[res["setting"]["name"]] = res
    finally:
        torch.set_num_threads(n_threads)
    return {"tolerance": TOLERANCE, "update_tolerance": UPDATE_TOLERANCE, "passed": passed, "results": results}


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: quantities (rows) x settings (columns) of max |ours - TRL|."""
    names = list(report["results"])
    quantities = list(next(iter(report["results"].values()))["max_abs_diff"])
    w0 = max(len(q) for q in quantities + ["weights: rel. diff of the change"]) + 2
    w = max(12, *(len(n) + 2 for n in names))
    lines = [
        f"Numeric cross-check vs TRL {_trl_version()} PPOTrainer (TRL-compat mode), max |ours - TRL|, "
        f"tolerance {report['tolerance']:g}; weights after one update: relative tolerance {report['update_tolerance']:g}",
        "",
        "quantity".ljust(w0) + "".join(n.rjust(w) for n in names),
    ]
    for q in quantities:
        lines.append(q.ljust(w0) + "".join(f"{report['results'][n]['max_abs_diff'][q]:.2e}".rjust(w) for n in names))
    for key, label in (
        ("weights_rel_diff", "weights: rel. diff of the change"),
        ("weights_max_abs_diff", "weights: max abs diff"),
        ("optimizer_steps", "optimizer steps"),
    ):
        fmt = (lambda v: str(v)) if key == "optimizer_steps" else (lambda v: f"{v:.2e}")
        lines.append(label.ljust(w0) + "".join(fmt(report["results"][n]["update"][key]).rjust(w) for n in names))
    for key, label in (("rows_with_eos", "batch: rows with EOS"), ("rows_truncated", "batch: rows truncated"),
                       ("padded_positions", "batch: padded positions")):  # fmt: skip
        lines.append(label.ljust(w0) + "".join(str(report["results"][n]["batch"][key]).rjust(w) for n in names))
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
    lines.append("overall: " + ("PASSED" if report["passed"] else "FAILED"))
    return "\n".join(lines)


def _trl_version() -> str:
    try:
        import trl

        return trl.__version__
    except Exception:  # pragma: no cover
        return "?"
