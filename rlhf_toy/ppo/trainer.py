"""Stage 3: hand-written PPO with a per-token KL penalty and a length-penalized reward.

One file, read top to bottom (CleanRL's ppo.py is the model): config, models, then `train_ppo`,
whose loop is rollout -> score -> advantages -> several epochs of clipped updates -> log/save.
The math is in `rlhf_toy.ppo.core` (pure functions, unit-tested and cross-checked against TRL).

Each step:
  1. sample `batch_size` prompts; generate responses at temperature T with the KV cache, stop at EOS
  2. logprobs of the policy (from the generation logits, at T) and the reference (a forward pass, at T);
     values from the critic: a separate value model initialised from the reward model (TRL), or a
     scalar head on the policy's own trunk whose values come out of the sampling pass (lm-human-preferences)
  3. score = RM_norm − length_coef·max(0, n_tokens − length_target) − missing_eos_penalty·[no EOS]
  4. rewards = −β·KL per token + score on the last token; GAE; whitened advantages
  5. num_ppo_epochs × num_mini_batches clipped policy + value updates (gradient accumulation, clipping)
  6. β update (adaptive controller), metrics, samples, checkpoint
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf_toy import data, models, runlog, sampling, task
from rlhf_toy.config import CommonConfig, ConfigError, LoraFields
from rlhf_toy.ppo import core
from rlhf_toy.stages import setup_run


@dataclass
class PPOStageConfig(LoraFields, CommonConfig):
    output_dir: str = "runs/ppo"
    model_name_or_path: str = "runs/sft/final"      # policy init and the frozen reference
    reward_model_path: str = "runs/reward/final"    # the scorer, and the separate critic's init
    # "separate": the critic is its own model, initialised from the RM (TRL's PPOTrainer).
    # "shared": a zero-initialised scalar head on the policy's trunk (lm-human-preferences' policy.py,
    #   Model(scalar_heads=['value'])): one forward/backward per minibatch instead of two, values
    #   from the sampling pass, one model less in memory; the value loss also shapes the trunk.
    critic: str = "separate"
    prompts: str = "data/prompts_train.jsonl"
    eval_prompts: str = "data/prompts_eval.jsonl"
    num_eval_prompts: int = 64                      # sampled before and after training (0 = skip)
    # rollout
    total_episodes: int = 512
    batch_size: int = 16                            # episodes per PPO step (split across processes)
    response_length: int = 48
    max_prompt_length: int = 128
    temperature: float = 0.7                        # TRL's default; logprobs are taken at the same T
    # reward
    length_coef: float = 0.02
    length_target: int = 40
    missing_eos_penalty: float = 1.0
    score_clip: float = 10.0                        # OpenRLHF: clip the score to ±score_clip (0 = off)
    kl_coef: float = 0.05
    kl_target: float = 0.0                          # > 0: adaptive β (Ziegler et al.), else fixed
    kl_horizon: float = 10000.0
    kl_estimator: str = "k1"
    # PPO
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    gradient_accumulation_steps: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    learning_rate: float = 3e-6
    lr_scheduler_type: str = "linear"               # linear (decay to 0) or constant
    adam_eps: float = 1e-5                          # CleanRL's ppo.py; PyTorch's 1e-8 is too small for RL
    max_grad_norm: float = 1.0
    # output
    sample_every: int = 5                           # write samples.jsonl every N steps
    save_steps: int = 5

    def validate(self):
        if self.critic not in ("separate", "shared"):
            raise ConfigError(f"critic must be 'separate' or 'shared', got {self.critic!r}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.lr_scheduler_type not in ("linear", "constant"):
            raise ConfigError(f"lr_scheduler_type must be linear or constant, got {self.lr_scheduler_type!r}")
        per_minibatch = self.batch_size / self.num_mini_batches
        if self.batch_size % self.num_mini_batches or per_minibatch % self.gradient_accumulation_steps:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must split into num_mini_batches ({self.num_mini_batches}) "
                f"x gradient_accumulation_steps ({self.gradient_accumulation_steps}) equal micro-batches"
            )
        if self.total_episodes < self.batch_size:
            raise ConfigError(f"total_episodes ({self.total_episodes}) < batch_size ({self.batch_size})")

    @property
    def num_steps(self) -> int:
        return self.total_episodes // self.batch_size


class NonFiniteError(RuntimeError):
    """A NaN or Inf in a loss or a rollout quantity; the message names the quantity and the step."""


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
def forward_logits(model, input_ids, attention_mask, context_length: int, temperature: float,
                   value_head=None):
    """Logits of the response positions, divided by T (TRL: logits / (T + 1e-7)), policy and ref alike.
    With a shared critic's `value_head`, also the values V(s_t) from the same trunk: (logits, values)."""
    # left padding: position ids from the attention mask (lm-human-preferences), pad ids never attended
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    # logits_to_keep: the LM head (hidden × vocab, the largest matmul) and its backward run only on the
    # positions that predict response tokens; with a chat template the prompt is most of the sequence.
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=input_ids.shape[1] - context_length + 1, output_hidden_states=value_head is not None)
    logits = out.logits[:, :-1] / (temperature + 1e-7)
    if value_head is None:
        return logits
    # hidden_states[-1] is the trunk's output after the final norm, the input of the LM head
    return logits, value_head(out.hidden_states[-1][:, context_length - 1:-1]).squeeze(-1).float()


def forward_values(value_model, input_ids, attention_mask, context_length: int):
    """Per-token values V(s_t) for the state before each response token: the reward model's scalar
    head applied to every position's hidden state (TRL's get_reward), not only the last one."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    # Through PEFT, getattr(peft_model, "model") is Llama's whole seq-cls model, not its backbone:
    # go through the base model (whose LoRA layers and trainable score copy are still in place).
    base = value_model.get_base_model() if hasattr(value_model, "get_base_model") else value_model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return base.score(hidden).squeeze(-1)[:, context_length - 1:-1].float()


def values_from_generation(value_head, generated):
    """The shared critic's values from `generate(..., output_hidden_states=True)`: the trunk's last hidden
    state at each generation step is the state before that response token, as in a fresh forward."""
    return value_head(torch.stack([h[-1][:, -1] for h in generated.hidden_states], 1)).squeeze(-1).float()


def load_models(cfg, tokenizer, device, dtype):
    """Policy (optionally LoRA), reference (a frozen copy, or None with LoRA), critic (a value model,
    or with `critic: shared` a Linear(hidden, 1) value head on the policy's trunk)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy_path = models.resolve_model_path(cfg.model_name_or_path)
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype)
    models.align_with_tokenizer(policy, tokenizer)
    if cfg.critic == "shared":
        # Zero-initialised: V = 0 everywhere at first, so the first advantages are the plain returns
        # rather than a random head's noise; the value loss teaches it from the first update.
        value_model = torch.nn.Linear(policy.config.hidden_size, 1, dtype=dtype)
        torch.nn.init.zeros_(value_model.weight)
        torch.nn.init.zeros_(value_model.bias)
    else:
        value_model = AutoModelForSequenceClassification.from_pretrained(
            models.resolve_model_path(cfg.reward_model_path), num_labels=1, dtype=dtype)
        value_model.config.pad_token_id = tokenizer.pad_token_id
    reference = None
    if cfg.use_lora:
        # With LoRA the reference is the same weights with the adapter disabled: no second copy.
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM"))
        if cfg.critic == "separate":
            value_model = get_peft_model(value_model, LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=cfg.lora_target_modules, task_type="SEQ_CLS", modules_to_save=["score"]))
    else:
        reference = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype)
        models.align_with_tokenizer(reference, tokenizer)
        reference.requires_grad_(False)
        reference.eval().to(device)
    for model in (policy, value_model):
        # TRL / lm-human-preferences: dropout off, so the logprobs of the update match the rollout's
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.to(device)
    return policy, reference, value_model


def reference_logits(policy, reference, input_ids, attention_mask, context_length, temperature):
    if reference is not None:
        return forward_logits(reference, input_ids, attention_mask, context_length, temperature)
    with policy.disable_adapter():
        return forward_logits(policy, input_ids, attention_mask, context_length, temperature)


def assert_in_sync(parameters, accelerator) -> None:
    """Data parallelism is only correct while every process holds the same weights: check a checksum."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in parameters]).sum().reshape(1)
    gathered = accelerator.gather(checksum)
    if not torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=1e-6):
        raise RuntimeError(f"processes' weights diverged (checksums {gathered.tolist()})")


# ----------------------------------------------------------------------------------------------
# checkpoints: everything needed to continue as if never stopped
# ----------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, step: int, policy, value_model, tokenizer, optimizer, scheduler,
                    kl_ctl, accelerator, save_total_limit: int) -> None:
    checkpoints = run_dir / "checkpoints"
    partial = checkpoints / f"step-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Every process has its own RNG stream (its own rollouts): each saves it.
    partial.mkdir(parents=True, exist_ok=True)
    torch.save({"torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               partial / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    policy.save_pretrained(partial / "policy", safe_serialization=True)
    tokenizer.save_pretrained(partial / "policy")
    save_critic(value_model, partial / "value")
    torch.save({
        "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "kl_ctl": kl_ctl.state_dict(), "python_rng": random.getstate(),
    }, partial / "trainer_state.pt")
    partial.rename(checkpoints / f"step-{step}")   # atomic: a half-written checkpoint is never resumed
    for old in sorted(completed_checkpoints(checkpoints))[:-save_total_limit]:
        shutil.rmtree(old[1])
    accelerator.wait_for_everyone()


def save_critic(value_model, directory: Path) -> None:
    if isinstance(value_model, torch.nn.Linear):   # the shared critic's head: two tensors
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in value_model.state_dict().items()}, directory / "value_head.safetensors")
    else:
        value_model.save_pretrained(directory, safe_serialization=True)


def completed_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    if not checkpoints.is_dir():
        return []
    return [(int(p.name.split("-")[1]), p) for p in checkpoints.iterdir()
            if p.name.startswith("step-") and p.name.split("-")[1].isdigit() and (p / "trainer_state.pt").exists()]


def load_checkpoint(path: Path, policy, value_model, optimizer, scheduler, kl_ctl, device, process_index: int) -> int:
    from safetensors.torch import load_file

    def load_weights(model, directory):
        if (directory / "value_head.safetensors").exists():
            model.load_state_dict(load_file(directory / "value_head.safetensors", device=str(device)))
        elif (directory / "adapter_model.safetensors").exists():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors", device=str(device)))
        else:
            state = load_file(directory / "model.safetensors", device=str(device))
            missing, _ = model.load_state_dict(state, strict=False)
            # tied embeddings are saved once; anything else missing is a broken checkpoint
            if [k for k in missing if "lm_head" not in k]:
                raise RuntimeError(f"{directory}: checkpoint lacks {missing[:3]}")

    load_weights(policy, path / "policy")
    load_weights(value_model, path / "value")
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    kl_ctl.load_state_dict(state["kl_ctl"])
    rng = torch.load(path / f"rng-{process_index}.pt", weights_only=True)
    torch.set_rng_state(rng["torch_rng"])
    if rng["cuda_rng"]:
        torch.cuda.set_rng_state_all(rng["cuda_rng"])
    random.setstate(_as_tuple(state["python_rng"]))
    return state["step"]


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
def average_gradients(parameters, accelerator) -> None:
    """Data parallelism by hand: one all-reduce of all gradients, flattened, divided by the world size."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def check_finite(step: int, **quantities) -> None:
    for name, value in quantities.items():
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise NonFiniteError(f"{name} is NaN or Inf at step {step}")


def train_ppo(cfg: PPOStageConfig) -> Path:
    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    from rlhf_toy.reward import RewardScorer, sequence_score

    hf_logging.disable_progress_bar()   # one progress bar (PPO's), not one per checkpoint write

    # accelerate only starts the processes and gathers metrics; gradients are averaged by hand below.
    accelerator = Accelerator(cpu=cfg.device == "cpu")
    run_dir = setup_run(cfg, write_config=accelerator.is_main_process)
    device = accelerator.device if cfg.device == "auto" else torch.device(cfg.device)
    dtype = models.pick_dtype(cfg.dtype, device)
    if cfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must divide among {accelerator.num_processes} processes")
    local_batch = cfg.batch_size // accelerator.num_processes
    local_minibatch = local_batch // cfg.num_mini_batches
    micro_batch = local_minibatch // cfg.gradient_accumulation_steps

    prompts = data.load_prompts(cfg.prompts)
    eval_prompts = data.load_prompts(cfg.eval_prompts)[: cfg.num_eval_prompts] if cfg.num_eval_prompts else []
    tokenizer = models.load_tokenizer(cfg.model_name_or_path)
    scorer = RewardScorer(cfg.reward_model_path, device=str(device), dtype=cfg.dtype)
    policy, reference, value_model = load_models(cfg, tokenizer, device, dtype)
    shared_critic = cfg.critic == "shared"

    parameters = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    # One optimizer over policy and value parameters, as TRL's PolicyAndValueWrapper. The fused kernel
    # (TRL's Trainer default, adamw_torch_fused): the same update, without torch's Python loop over tensors.
    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, eps=cfg.adam_eps,
                                  fused=True if device.type in ("cpu", "cuda") else None)
    decay = (lambda s: max(0.0, 1.0 - s / cfg.num_steps)) if cfg.lr_scheduler_type == "linear" else (lambda s: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    kl_ctl = core.make_kl_controller(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon)

    start_step = 0
    checkpoints = completed_checkpoints(run_dir / "checkpoints") if cfg.resume else []
    if checkpoints:
        step_dir = max(checkpoints)[1]
        start_step = load_checkpoint(step_dir, policy, value_model, optimizer, scheduler, kl_ctl, device,
                                     accelerator.process_index)
        accelerator.print(f"resuming from {step_dir} (step {start_step} of {cfg.num_steps})")
    else:
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed + accelerator.process_index)
    logger = (runlog.MetricsLogger(run_dir, cfg.report_to == "tensorboard", resume_step=start_step)
              if accelerator.is_main_process else None)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if start_step and summary_path.exists() else {}
    if eval_prompts and "before" not in summary and accelerator.is_main_process:
        summary["before"] = evaluate(cfg, policy, reference, tokenizer, scorer, eval_prompts, "before")
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    # The prompt order is a pure function of (seed, step): a resumed run draws exactly the same batches.
    def prompts_for(step: int) -> list:
        epoch, offset = divmod(step * cfg.batch_size, len(prompts))
        order = list(range(len(prompts)))
        random.Random(cfg.seed * 100003 + epoch).shuffle(order)
        ids = [order[(offset + i) % len(order)] for i in range(cfg.batch_size)]
        return [prompts[i] for i in ids[accelerator.process_index * local_batch:][:local_batch]]

    progress = tqdm(range(start_step, cfg.num_steps), initial=start_step, total=cfg.num_steps,
                    desc="PPO", disable=not accelerator.is_local_main_process)
    step = start_step
    try:
        for step in progress:
            step_started = time.time()
            # ---- 1. rollout -------------------------------------------------------------------
            batch_prompts = prompts_for(step)
            queries, query_mask, _ = sampling.encode_prompts(tokenizer, batch_prompts, cfg.max_prompt_length, device)
            context_length = queries.shape[1]
            with torch.no_grad():
                policy.eval()
                tick = time.perf_counter()  # finer timers: where a step's rollout time goes
                generated = policy.generate(
                    input_ids=queries, attention_mask=query_mask, max_new_tokens=cfg.response_length,
                    do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    return_dict_in_generate=True, output_scores=True, output_hidden_states=shared_critic,
                )
                # generate stops when every row has its EOS: no compute spent on all-pad columns.
                responses, mask = core.truncate_at_eos(generated.sequences[:, context_length:],
                                                       tokenizer.eos_token_id, tokenizer.pad_token_id)
                # The sampling distribution's own logits (already divided by T): the old logprobs
                # need no extra forward pass. Only temperature is applied (top_k=0, top_p=1).
                logprobs = core.logprobs_from_logits(torch.stack(generated.scores, 1).float(), responses, 1.0)
                query_responses = torch.cat([queries, responses], 1)
                attention_mask = torch.cat([query_mask, mask.long()], 1)
                generation_s, tick = time.perf_counter() - tick, time.perf_counter()
                ref_logprobs = core.logprobs_from_logits(
                    reference_logits(policy, reference, query_responses, attention_mask, context_length,
                                     cfg.temperature).float(), responses, 1.0)
                ref_forward_s, tick = time.perf_counter() - tick, time.perf_counter()
                if shared_critic:   # lm-human-preferences: the values come out of the sampling pass
                    values = values_from_generation(value_model, generated)
                else:
                    values = forward_values(value_model, query_responses, attention_mask, context_length)
                del generated   # its per-step logits (batch × length × vocab) are not needed past here
                value_forward_s, tick = time.perf_counter() - tick, time.perf_counter()
                # ---- 2. score: RM_norm − length penalty − missing-EOS penalty ----------------------
                texts = [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(responses, mask)]
                n_tokens = mask.sum(1)
                has_eos = (responses == tokenizer.eos_token_id).any(1)
                parts = sequence_score(scorer.score(batch_prompts, texts).to(device), n_tokens, has_eos,
                                       cfg.length_coef, cfg.length_target, cfg.missing_eos_penalty)
                scores = parts["score"].clamp(-cfg.score_clip, cfg.score_clip) if cfg.score_clip else parts["score"]
                scoring_s = time.perf_counter() - tick
                check_finite(step + 1, **{"rollout logprobs": core.masked_mean(logprobs, mask),
                                      "reference logprobs": core.masked_mean(ref_logprobs, mask),
                                      "values": core.masked_mean(values, mask), "scores": scores})
                # ---- 3. rewards and advantages (core: -β·KL per token, score on the last token, GAE) --
                targets = core.compute_ppo_targets(
                    scores, logprobs, ref_logprobs, values, mask, kl_ctl.value, cfg.gamma, cfg.lam,
                    cfg.kl_estimator, cfg.whiten_rewards)
            rollout_s = time.time() - step_started

            # ---- 4. PPO epochs over shuffled minibatches ------------------------------------------
            update_started = time.time()
            policy.train()
            value_model.train()
            stats = {k: [] for k in ("pg_loss", "vf_loss", "approxkl", "pg_clipfrac", "vf_clipfrac", "ratio", "entropy")}
            for epoch in range(cfg.num_ppo_epochs):
                order = torch.randperm(local_batch, device=device)
                for mb_start in range(0, local_batch, local_minibatch):
                    optimizer.zero_grad(set_to_none=True)
                    for mc_start in range(mb_start, mb_start + local_minibatch, micro_batch):
                        idx = order[mc_start:mc_start + micro_batch]
                        mb_mask = mask[idx]
                        if shared_critic:   # one trunk, two heads: one forward and one backward
                            logits, new_values = forward_logits(policy, query_responses[idx], attention_mask[idx],
                                                                context_length, cfg.temperature, value_head=value_model)
                        else:
                            logits = forward_logits(policy, query_responses[idx], attention_mask[idx], context_length,
                                                    cfg.temperature)
                            new_values = forward_values(value_model, query_responses[idx], attention_mask[idx],
                                                        context_length)
                        logits = logits.float()
                        new_logprobs = core.logprobs_from_logits(logits, responses[idx], 1.0)
                        pg_loss, pg_stats = core.policy_loss(new_logprobs, logprobs[idx], targets["advantages"][idx],
                                                             mb_mask, cfg.cliprange)
                        vf_loss, vf_clipfrac = core.value_loss(new_values, targets["values"][idx],
                                                               targets["returns"][idx], mb_mask, cfg.cliprange_value)
                        loss = pg_loss + cfg.vf_coef * vf_loss
                        # Stop before a non-finite loss reaches the weights (they stay the last good ones).
                        check_finite(step + 1, **{"loss/policy": pg_loss, "loss/value": vf_loss})
                        (loss / cfg.gradient_accumulation_steps).backward()
                        with torch.no_grad():
                            stats["pg_loss"].append(pg_loss.item())
                            stats["vf_loss"].append(vf_loss.item())
                            stats["approxkl"].append(pg_stats["approxkl"].item())
                            stats["pg_clipfrac"].append(pg_stats["clipfrac"].item())
                            stats["ratio"].append(pg_stats["ratio_mean"].item())
                            stats["vf_clipfrac"].append(vf_clipfrac.item())
                            stats["entropy"].append(core.masked_mean(core.entropy_from_logits(logits), mb_mask).item())
                    average_gradients(parameters, accelerator)   # data parallel: each process saw its own rollouts
                    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.max_grad_norm)
                    check_finite(step + 1, **{"gradient norm": grad_norm})
                    optimizer.step()
            scheduler.step()
            update_s = time.time() - update_started

            # ---- 5. β update, metrics, samples, checkpoint ----------------------------------------
            with torch.no_grad():
                kl_per_seq = (targets["kl"]).sum(1)
                non_score = targets["non_score_reward"].sum(1)
                gold = torch.tensor([task.gold_score(t) for t in texts], device=device)  # logged only, never a reward
                gathered = accelerator.gather_for_metrics({
                    "kl": kl_per_seq, "entropy": core.masked_sum(-logprobs, mask, dim=1), "non_score": non_score,
                    "scores": scores, "rm": parts["rm"], "length_penalty": parts["length_penalty"],
                    "gold": gold, "length": n_tokens.float(), "eos": has_eos.float(),
                    "ev": core.explained_variance(targets["values"], targets["returns"], mask).reshape(1),
                })
                update_stats = accelerator.gather_for_metrics(
                    {k: torch.tensor([sum(v) / len(v)], device=device) for k, v in stats.items()})
            mean_kl = gathered["kl"].mean().item()
            metrics = {
                "objective/kl": mean_kl,
                "objective/entropy": gathered["entropy"].mean().item(),
                "objective/non_score_reward": gathered["non_score"].mean().item(),
                "objective/rlhf_reward": (gathered["scores"] + gathered["non_score"]).mean().item(),
                "objective/scores": gathered["scores"].mean().item(),
                "objective/kl_coef": kl_ctl.value,
                "policy/approxkl_avg": update_stats["approxkl"].mean().item(),
                "policy/clipfrac_avg": update_stats["pg_clipfrac"].mean().item(),
                "policy/entropy_avg": update_stats["entropy"].mean().item(),
                "loss/policy_avg": update_stats["pg_loss"].mean().item(),
                "loss/value_avg": update_stats["vf_loss"].mean().item(),
                "val/clipfrac_avg": update_stats["vf_clipfrac"].mean().item(),
                "val/ratio": update_stats["ratio"].mean().item(),
                "val/num_eos_tokens": gathered["eos"].sum().item(),
                "val/explained_variance": gathered["ev"].nanmean().item(),
                "score/rm": gathered["rm"].mean().item(),
                "score/gold": gathered["gold"].mean().item(),
                "score/length_penalty": gathered["length_penalty"].mean().item(),
                "response/length_mean": gathered["length"].mean().item(),
                "lr": scheduler.get_last_lr()[0],
                "episode": (step + 1) * cfg.batch_size,
                "time/rollout_s": rollout_s,
                "time/update_s": update_s,
                "time/generation_s": generation_s,
                "time/ref_forward_s": ref_forward_s,
                "time/value_forward_s": value_forward_s,
                "time/scoring_s": scoring_s,
                "perf/episodes_per_s": cfg.batch_size / (time.time() - step_started),
                "perf/tokens_per_s": gathered["length"].sum().item() / (time.time() - step_started),
            }
            kl_ctl.update(mean_kl, cfg.batch_size)
            if accelerator.is_main_process:
                logger.log(step + 1, metrics)
                if (step + 1) % cfg.sample_every == 0 or step + 1 == cfg.num_steps:
                    runlog.append_jsonl(run_dir / "samples.jsonl", [
                        {"step": step + 1, "prompt": p, "response": t, "score": s, "rm": r, "gold": g, "kl": k,
                         "n_tokens": n, "has_eos": e}
                        for p, t, s, r, g, k, n, e in zip(
                            batch_prompts, texts, scores.tolist(), parts["rm"].tolist(), gold.tolist(),
                            kl_per_seq.tolist(), n_tokens.tolist(), has_eos.tolist())])
            progress.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{mean_kl:.2f}",
                                 gold=f"{metrics['score/gold']:.3f}")
            if (step + 1) % cfg.save_steps == 0 or step + 1 == cfg.num_steps:
                assert_in_sync(parameters, accelerator)
                save_checkpoint(run_dir, step + 1, policy, value_model, tokenizer, optimizer, scheduler, kl_ctl,
                                accelerator, cfg.save_total_limit)
    except NonFiniteError as error:
        # Save what the last good step had (the weights never took the non-finite update).
        target = run_dir / "checkpoints" / f"nonfinite-at-step-{step + 1}"
        if accelerator.is_main_process:
            policy.save_pretrained(target / "policy", safe_serialization=True)
            save_critic(value_model, target / "value")
            logger.close()
        raise NonFiniteError(f"{error}; stopped, the last good weights are in {target}") from None

    if accelerator.is_main_process:
        if eval_prompts:
            summary["after"] = evaluate(cfg, policy, reference, tokenizer, scorer, eval_prompts, "after")
        final = run_dir / "final"
        model = policy.merge_and_unload() if cfg.use_lora else policy
        model.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        summary["wall_s_last_session"] = progress.format_dict["elapsed"]
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        logger.log(cfg.num_steps, {f"eval/{when}_{k}": v for when in ("before", "after")
                                   for k, v in summary.get(when, {}).items() if isinstance(v, (int, float))})
        logger.close()
    accelerator.wait_for_everyone()
    return run_dir


@torch.no_grad()
def evaluate(cfg, policy, reference, tokenizer, scorer, eval_prompts, label) -> dict:
    """Gold mean, RM mean and mean sequence KL to the reference on the eval prompts."""
    samples = sampling.generate(policy, tokenizer, eval_prompts, max_new_tokens=cfg.response_length,
                                temperature=cfg.temperature, batch_size=32, seed=cfg.seed + 1,
                                max_prompt_length=cfg.max_prompt_length, progress=f"eval ({label})")
    rm = scorer.score(eval_prompts, [s.response for s in samples])
    kls = []
    device = next(policy.parameters()).device
    for start in range(0, len(samples), 16):
        chunk = samples[start:start + 16]
        queries, query_mask, _ = sampling.encode_prompts(tokenizer, [s.prompt for s in chunk], cfg.max_prompt_length, device)
        width = max(1, max(len(s.response_ids) for s in chunk))
        responses = torch.full((len(chunk), width), tokenizer.pad_token_id, device=device)
        mask = torch.zeros_like(responses, dtype=torch.bool)
        for i, s in enumerate(chunk):
            responses[i, :len(s.response_ids)] = torch.tensor(s.response_ids, device=device)
            mask[i, :len(s.response_ids)] = True
        ids = torch.cat([queries, responses], 1)
        attn = torch.cat([query_mask, mask.long()], 1)
        ctx = queries.shape[1]
        logp = core.logprobs_from_logits(forward_logits(policy, ids, attn, ctx, cfg.temperature).float(), responses, 1.0)
        ref_logp = core.logprobs_from_logits(
            reference_logits(policy, reference, ids, attn, ctx, cfg.temperature).float(), responses, 1.0)
        kls += core.masked_sum(logp - ref_logp, mask, dim=1).tolist()
    golds = [task.gold_score(s.response) for s in samples]
    return {"gold_mean": sum(golds) / len(golds), "rm_mean": rm.mean().item(), "kl_mean": sum(kls) / len(kls),
            "length_mean": sum(len(s.response_ids) for s in samples) / len(samples),
            "eos_rate": sum(s.has_eos for s in samples) / len(samples)}
