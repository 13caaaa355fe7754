"""Stage 3: hand-written PPO with a per-token KL penalty and a length-penalized reward (or GRPO, RLOO,
REINFORCE++: the same loop without a critic, `advantage_estimator`).

    python scripts/ppo.py --config configs/ppo.yaml [--field value ...]

`train_ppo` is the loop, one screen, in the six steps of every PPO iteration; each step is a function
below it, in the same order (CleanRL's ppo.py is the model). The math is in `core` (pure functions,
unit-tested and cross-checked against TRL), the models in `models`, checkpoints in `checkpoint`.

  1. sample     `batch_size` prompts (each `num_generations` times), responses at temperature T (KV cache, stop
                at EOS); the policy's log-probs from the sampling logits, the reference's and the critic's from
                forward passes
  2. score      Σ_k w_k·reward_k (RM_norm and/or reward functions, `rewards`)
                − length_coef·max(0, n_tokens − length_target) − missing_eos_penalty·[no EOS]
  3. rewards    −β·KL per token (unless `kl_in: loss`), plus the score on the last token
  4. advantages GAE(γ, λ), whitened; or critic-free: grpo, rloo, reinforce_pp  (`targets`: core)
  5. update     num_ppo_epochs × num_mini_batches clipped policy (+ value, + KL) updates
  6. log, save  metrics, samples, β update (adaptive controller); checkpoint
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from rlhf_toy import data, models, rundir, runlog, sequences, task
from rlhf_toy.config import ConfigError
from rlhf_toy.evaluation.sample_and_score import Sampling, sample_and_score
from rlhf_toy.evaluation.stats import distinct_n
from rlhf_toy.rewards import call_reward_function, combine, load_reward_functions
from rlhf_toy.scoring import Judge, RewardScorer, reward_model_dir, sequence_score
from rlhf_toy.stages.common import resolve_run_precision, setup_run, shards_weights
from rlhf_toy.stages.ppo import core
from rlhf_toy.stages.ppo.checkpoint import load_checkpoint, save_checkpoint, save_critic, whole_state_dicts
from rlhf_toy.stages.ppo.config import PPOStageConfig, split_batch
from rlhf_toy.stages.ppo.models import assert_in_sync, forward_values, load_models


class NonFiniteError(RuntimeError):
    """A NaN or Inf in a loss or a rollout quantity; the message names the quantity and the step.
    `weights_stepped`: seen only after the weights took the update (DeepSpeed's gradient norm)."""

    def __init__(self, message: str, weights_stepped: bool = False):
        super().__init__(message)
        self.weights_stepped = weights_stepped


@dataclass
class PPOState:
    """Everything one PPO run holds: its config, models, optimizer and the per-step timers."""

    cfg: PPOStageConfig
    accelerator: object
    device: torch.device
    tokenizer: object
    scorer: RewardScorer | None  # the reward model, when `rewards` lists rm
    policy: torch.nn.Module
    reference: object  # a frozen copy, or with LoRA the policy with its adapter disabled
    value_model: (
        torch.nn.Module | None
    )  # the critic: a value model, the shared critic's head, or None (critic-free)
    optimizer: torch.optim.Optimizer  # after `prepare_engine`: accelerate's wrapper of it
    scheduler: object
    kl_ctl: object
    eval_prompts: list  # sampled before and after training
    prompts: list  # the training prompt records (the prompt and its other columns)
    local_batch: int  # episodes per process per step
    micro_batch: int  # episodes per forward/backward
    precision: models.Precision  # float32 weights and AdamW state; bf16 matmuls under autocast when mixed
    logprobs_from_forward: bool  # rollout log-probs from a forward pass rather than generate's logits
    timers: dict = field(default_factory=dict)  # seconds per phase of the current step (time/*_s)
    update_forward: Callable = None  # `update_forward`, or its torch.compile'd version (`compile: true`)
    eval_titles: list = field(default_factory=list)  # each eval prompt's film, for gold's on-topic term
    eval_records: list = field(
        default_factory=list
    )  # the eval prompts' records: the reward functions' columns
    reward_functions: list = field(default_factory=lambda: [("rm", "rm", None)])  # (entry, name, function)
    engine: torch.nn.Module = (
        None  # PolicyAndCritic as accelerate's engine wraps it (`prepare_engine`): the update's
    )
    # forward goes through it, and under FSDP and ZeRO-3 the rollout's (`engine_run`)

    def __post_init__(self):
        if self.update_forward is None:
            self.update_forward = (
                torch.compile(update_forward, dynamic=True) if self.cfg.compile else update_forward
            )

    @property
    def parameters(self) -> list:
        return trainable_parameters(self.policy, self.value_model)

    @property
    def shared_critic(self) -> bool:
        return self.cfg.critic == "shared"

    def sum_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over the data-parallel processes (an all-reduce; one process: the tensor itself)."""
        return (
            self.accelerator.reduce(tensor, reduction="sum") if self.accelerator.num_processes > 1 else tensor
        )

    @contextmanager
    def timer(self, name: str):
        """Adds the block's wall time to `timers[name]` (logged as `time/{name}_s`)."""
        tick = time.perf_counter()
        yield
        self.timers[name] = self.timers.get(name, 0.0) + time.perf_counter() - tick


@dataclass
class Rollout:
    """One batch of episodes (this process's share): everything the update needs."""

    prompts: list  # as messages (what the policy and the reward model read)
    query_responses: torch.Tensor  # [B, context_length + T] prompt (left-padded) + response
    attention_mask: torch.Tensor
    context_length: int
    responses: torch.Tensor  # [B, T], pad after each row's first EOS
    mask: torch.Tensor  # [B, T] True on real response tokens (EOS included)
    logprobs: torch.Tensor  # log π_old(y_t) at temperature T, from the sampling pass
    ref_logprobs: torch.Tensor  # log π_ref(y_t) at the same T
    values: torch.Tensor | None  # V(s_t) before each response token (None without a critic)
    texts: list  # decoded responses (what the reward model and gold judge read)
    records: list = field(
        default_factory=list
    )  # the prompt records (their other columns go to reward functions)
    prompts_truncated: int = 0  # prompts longer than max_prompt_length: the policy read only their end
    exact_kl: torch.Tensor | None = None  # [B, T] KL(π_old‖π_ref) over the whole vocabulary at each position
    update_ratio: torch.Tensor | None = None  # [B, T] π/π_old at each token's pass in the update's last epoch


@rundir.releases_lock
def train_ppo(cfg: PPOStageConfig, on_step_end: Callable[[int, dict], None] | None = None) -> Path:
    """Train, evaluate before and after, save `final/`. `on_step_end(step, metrics)` is called after each
    step's metrics are logged and before its checkpoint (the benchmark reads peak memory and steps its
    profiler there); `metrics["time/*_s"]` time the step's phases."""
    state, run_dir, start_step = build(cfg)
    if state is None:  # a finished run: nothing to do
        return run_dir
    logger, summary = start_logs(state, run_dir, start_step)
    progress = tqdm(
        range(start_step + 1, cfg.num_steps + 1),  # step N: the Nth update, as logged and saved
        initial=start_step,
        total=cfg.num_steps,
        desc="PPO",
        disable=not state.accelerator.is_local_main_process,
    )
    for step in progress:
        state.timers = {}
        with stop_on_nonfinite(state, run_dir, logger, step):
            with state.timer("rollout"):
                batch, parts = sample_and_score_step(state, state.prompts, step)  # 1-2 sample, score
                check_rollout_finite(step, batch, parts)
                targets = rollout_targets(state, batch, parts)  # 3-4 per-token rewards, advantages
            with state.timer("update"):
                stats = ppo_update(state, batch, targets, step)  # 5 epochs x minibatches of the clipped loss
        episodes = episode_values(state, batch, parts, targets)  # each episode's KL, gold, length
        metrics = step_metrics(
            state, step, batch=batch, parts=parts, targets=targets, stats=stats, episodes=episodes
        )
        state.kl_ctl.update(metrics["objective/kl"], cfg.batch_size)  # 6 β, from the KL this step measured
        if state.accelerator.is_main_process:
            logger.log(step, metrics)
        if step % cfg.sample_every == 0 or step == cfg.num_steps:
            write_samples(state, run_dir, step, batch=batch, parts=parts, targets=targets, episodes=episodes)
        progress.set_postfix(
            score=f"{metrics['objective/scores']:.3f}",
            kl=f"{metrics['objective/kl']:.2f}",
            gold=f"{metrics['score/gold']:.3f}",
        )
        if on_step_end is not None:
            on_step_end(step, metrics)
        state.scheduler.step()  # after the step's metrics: `lr` is the rate this step's updates used (TRL's)
        save_step(state, run_dir, step)  # 7 a checkpoint every save_steps
    finish(state, run_dir, logger, summary=summary, elapsed_s=progress.format_dict["elapsed"])
    return run_dir


@contextmanager
def stop_on_nonfinite(state: PPOState, run_dir: Path, logger, step: int):
    """A NaN or Inf (`check_finite`) stops the run with the last good weights saved: the weights never took the
    non-finite update, except where they did (DeepSpeed steps inside the backward, before its gradient norm can
    be read) or are sharded (gathering them is a collective the other processes may not reach): there the last
    checkpoint is the last good."""
    try:
        yield
    except NonFiniteError as error:
        if error.weights_stepped:
            raise NonFiniteError(
                f"{error}; stopped. DeepSpeed had already stepped the weights with that gradient, "
                f"so they are not saved: the last good weights are the last checkpoint's, in "
                f"{run_dir / 'checkpoints'}"
            ) from None
        if shards_weights(state.accelerator):
            raise NonFiniteError(
                f"{error}; stopped (the last checkpoint holds the last saved weights)"
            ) from None
        target = run_dir / "checkpoints" / f"nonfinite-at-step-{step}"
        if state.accelerator.is_main_process:
            state.policy.save_pretrained(target / "policy", safe_serialization=True)
            if state.value_model is not None:
                save_critic(state.value_model, target / "value")
            logger.close()
        raise NonFiniteError(f"{error}; stopped, the last good weights are in {target}") from None


# ----------------------------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------------------------
def build(cfg: PPOStageConfig) -> tuple[PPOState | None, Path, int]:
    """Processes, models, optimizer, scheduler, KL controller; resumed from the last checkpoint if any
    (`rundir`'s rule; no state for a finished run)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar (PPO's), not one per checkpoint write
    accelerator = make_accelerator(cfg)
    precision = resolve_run_precision(cfg)  # `auto` -> what this machine runs (recorded in config.yaml)
    start = rundir.prepare_run_dir(cfg)  # every process reads the same directory and decides alike
    if start.message:
        accelerator.print(start.message)
    if start.finished:
        return None, start.run_dir, start.step
    run_dir = setup_run(cfg)
    device = accelerator.device if cfg.device == "auto" else torch.device(cfg.device)
    local_batch, micro_batch = split_batch(
        cfg.batch_size,
        num_processes=accelerator.num_processes,
        num_mini_batches=cfg.num_mini_batches,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_generations=cfg.num_generations,
    )

    reward_functions = load_reward_functions(cfg.rewards)  # a missing module or function stops here
    eval_records = data.load_prompt_records(cfg.eval_prompts)[: cfg.num_eval_prompts]
    eval_prompts, eval_titles = data.prompts_and_titles(eval_records, cfg.eval_prompts)
    prompts = data.load_prompt_records(cfg.prompts)
    tokenizer = models.load_tokenizer(cfg.model_name_or_path)
    check_models(cfg, tokenizer)
    note_long_prompts(
        prompts,
        tokenizer,
        max_prompt_length=cfg.max_prompt_length,
        source=cfg.prompts,
        accelerator=accelerator,
    )
    scorer = (
        RewardScorer(
            cfg.reward_model_path, device=str(device), dtype=cfg.dtype
        )  # runs under its own autocast
        if "rm" in cfg.rewards
        else None
    )
    policy, reference, value_model = load_models(cfg, tokenizer, device, precision.weights)
    optimizer = make_optimizer(cfg, trainable_parameters(policy, value_model), device)
    decay = lr_decay(cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    kl_ctl = core.make_kl_controller(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon)
    # Outside float32 the sampler's logits drift from a full forward pass's: take the rollout's log-probs from the
    # same forward as the update's.
    logprobs_from_forward = cfg.rollout_logprobs == "forward" or (
        cfg.rollout_logprobs == "auto" and not precision.decode_matches_forward
    )
    state = PPOState(
        cfg,
        accelerator,
        device,
        tokenizer,
        scorer,
        policy,
        reference,
        value_model,
        optimizer,
        scheduler,
        kl_ctl,
        eval_prompts,
        prompts,
        local_batch,
        micro_batch,
        precision,
        logprobs_from_forward,
        eval_titles=eval_titles,
        eval_records=eval_records,
        reward_functions=reward_functions,
    )
    prepare_engine(state)
    # The first write, once the inputs are valid; every process waits for it (and has read the directory).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        start.begin(cfg)
    accelerator.wait_for_everyone()

    start_step = 0
    last = start.checkpoint
    if last is not None:
        start_step = load_checkpoint(last, state)
        # The checkpoint's optimizer carries the lr of the schedule it was saved under; a run extended (more
        # steps) continues on the decay of its new length, as a fresh run of that length would.
        for group, base_lr in zip(state.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * decay(start_step)
        scheduler._last_lr = [group["lr"] for group in state.optimizer.param_groups]
        accelerator.print(f"resuming from {last} (step {start_step} of {cfg.num_steps})")
    else:
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed + accelerator.process_index)
    return state, run_dir, start_step


def lr_decay(cfg: PPOStageConfig) -> Callable[[int], float]:
    """The learning rate's factor at each PPO step: linear to 0 over the run (TRL's default), or constant."""
    if cfg.lr_scheduler_type == "linear":
        return lambda step: max(0.0, 1.0 - step / cfg.num_steps)
    return lambda step: 1.0


def check_models(cfg: PPOStageConfig, tokenizer) -> None:
    """Before anything loads: the policy (and so its reference, the same weights) is a causal LM, and a separate
    critic, which starts from the reward model and reads the policy's token ids, is a reward model sharing the
    policy's tokenizer. (The reward model as scorer reads decoded text through its own tokenizer, as TRL's
    GRPOTrainer's reward_processing_classes: it may have another; `RewardScorer` checks its kind.)"""
    models.check_kind(cfg.model_name_or_path, models.CAUSAL_LM)
    if cfg.critic != "separate":
        return
    critic_init = str(reward_model_dir(cfg.reward_model_path))
    models.check_kind(critic_init, models.REWARD_MODEL)
    difference = models.tokenizer_difference(tokenizer, models.load_tokenizer(critic_init))
    if difference is not None:
        raise ConfigError(
            f"the critic starts from reward_model_path {cfg.reward_model_path}, whose tokenizer differs "
            f"from the policy's ({cfg.model_name_or_path}; {difference.replace('the first', 'the policy')}"
            "): the critic reads the policy's token ids, so the two need one tokenizer. Train the reward "
            "model from the policy's SFT model, or use critic: shared"
        )


def note_long_prompts(records: list, tokenizer, *, max_prompt_length: int, source: str, accelerator) -> None:
    """Say once, at the start, how many training prompts the policy will read only the end of."""
    texts = [sequences.prompt_text(tokenizer, data.as_messages(r["prompt"], "user")) for r in records]
    n_long = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) > max_prompt_length for t in texts)
    if n_long:
        accelerator.print(
            f"note: {n_long} of {len(texts)} prompts in {source} are longer than max_prompt_length="
            f"{max_prompt_length} tokens: the policy reads the last {max_prompt_length} of each "
            "(rollout/prompts_truncated counts them per step)"
        )


def make_accelerator(cfg: PPOStageConfig):
    """accelerate starts the processes and runs the engine the launch config names (`prepare_engine`). cpu=True
    whenever the run is on the CPU: only then do several launched processes form a (gloo) group. Our own autocast
    (`dtype`) is the one mixed-precision layer, so accelerate adds none. Accumulation: accelerate counts micro-batches,
    and each minibatch is exactly gradient_accumulation_steps of them (no dataloader whose end would cut one short)."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    return Accelerator(
        cpu=models.pick_device(cfg.device).type == "cpu",
        mixed_precision="no",
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
    )


def trainable_parameters(policy, value_model) -> list:
    """What the optimizer updates, policy first: with LoRA only the adapters (and the value head)."""
    return [p for m in (policy, value_model) if m is not None for p in m.parameters() if p.requires_grad]


def make_optimizer(cfg: PPOStageConfig, parameters: list, device: torch.device) -> torch.optim.Optimizer:
    """One AdamW over policy and value parameters, as TRL's PolicyAndValueWrapper. Weight decay only on
    weight matrices (HF Trainer's rule: never biases or norm gains). The fused kernel (TRL's Trainer default,
    adamw_torch_fused): the same update, without torch's Python loop over tensors."""
    groups = [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.learning_rate,
        eps=cfg.adam_eps,
        fused=True if device.type in ("cpu", "cuda") else None,
    )


class PolicyAndCritic(torch.nn.Module):
    """The trainable models as one module, what accelerate's engine wraps: DeepSpeed takes one model per engine, and
    DDP syncs gradients only of a backward whose forward went through its wrapper (the critic's forward calls its
    backbone and head directly). Its forward runs any computation on the two models, `compute(policy, value_model,
    *args)`: the update's forward, and under FSDP and ZeRO-3 everything else that reads their weights (`engine_run`)."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model
        # FSDP's auto-wrap policy shards one unit per transformer block of the classes named here
        self._no_split_modules = sorted(
            {name for m in (policy, value_model) for name in getattr(m, "_no_split_modules", None) or []}
        )

    def forward(self, compute: Callable, *args):
        return compute(self.policy, self.value_model, *args)


def engine_run(state: PPOState, compute: Callable, *args):
    """`compute(policy, value_model, *args)` where the trainable models' weights are whole. DDP and ZeRO-1/2 keep them
    whole on every process: it runs directly. FSDP and ZeRO-3 hold a shard on each: it runs inside the engine's
    forward, whose hooks gather each block's weights as the computation reaches it (the same way as in the update), so
    every process must call it, the same number of times (`synced_gpus` keeps their sampling loops in step)."""
    if shards_weights(state.accelerator):
        return state.engine(compute, *args)
    return compute(state.policy, state.value_model, *args)


def synced_generation(accelerator) -> bool:
    """Whether sampling must keep a process that has finished its answers stepping with the others: under FSDP and
    ZeRO-3 every forward gathers weights from all the processes, so each must run as many as the others."""
    return shards_weights(accelerator) and accelerator.num_processes > 1


def prepare_engine(state: PPOState) -> None:
    """Hand the trainable models and the optimizer to accelerate (`state.engine`, `state.optimizer`): with one
    process they come back as they were; under `accelerate launch` the launch config's engine wraps them (DDP:
    gradients averaged in buckets during the backward pass; DeepSpeed ZeRO-1/2: optimizer state and gradients
    sharded across processes; FSDP2 and ZeRO-3: the weights too, each block gathered for its forward and backward
    and freed after). The frozen reference and the reward model stay outside: inference only, no gradient to sync;
    whole on every process, but under ZeRO-3 sharded as well. The rollout and evaluation read the trainable weights
    through `engine_run`, the saves through `whole_state_dicts`."""
    from accelerate.utils import DistributedType

    cfg, accelerator = state.cfg, state.accelerator
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed accumulates, clips and steps inside its engine: it takes those numbers from our config.
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=state.micro_batch,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            gradient_clipping=cfg.max_grad_norm or 0.0,
        )  # DeepSpeed's 0: no clipping
    module = PolicyAndCritic(state.policy, state.value_model)
    # The models are already on the run's device (`--device`, which need not be accelerate's default); DeepSpeed
    # places them itself.
    placement = None if accelerator.distributed_type == DistributedType.DEEPSPEED else [False, False]
    state.engine, state.optimizer = accelerator.prepare(module, state.optimizer, device_placement=placement)
    if shards_weights(accelerator) and accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Under ZeRO-3 transformers loads every model already sharded (DeepSpeed's zero.Init): the frozen ones get
        # DeepSpeed's inference engine, whose hooks gather each block's weights for its forward (as TRL's PPO)
        from trl.models.utils import prepare_deepspeed

        state.reference = prepare_deepspeed(state.reference, accelerator)
        if state.scorer is not None:
            state.scorer.model = prepare_deepspeed(state.scorer.model, accelerator)


def start_logs(state: PPOState, run_dir: Path, start_step: int):
    """The metrics logger (cut back to the resumed step) and the summary with its "before" evaluation."""
    cfg, accelerator = state.cfg, state.accelerator
    logger = (
        runlog.MetricsLogger(run_dir, cfg.report_to == "tensorboard", resume_step=start_step)
        if accelerator.is_main_process
        else None
    )
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if start_step and summary_path.exists() else {}
    if state.eval_prompts and "before" not in summary:
        before = evaluate_policy(state, "before")
        if accelerator.is_main_process:
            summary["before"] = before
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return logger, summary


def local_share(state: PPOState, batch_prompts: list) -> list:
    """This process's slice of the global batch (data parallelism: each process its own rollouts)."""
    index = state.accelerator.process_index
    return batch_prompts[index * state.local_batch :][: state.local_batch]


# ----------------------------------------------------------------------------------------------
# 1. sample
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(state: PPOState, batch_records: list) -> Rollout:
    """Responses to the prompt records (`data.load_prompt_records`), their log-probs and values."""
    cfg, tokenizer = state.cfg, state.tokenizer
    batch_prompts = [data.as_messages(r["prompt"], "user") for r in batch_records]
    queries, query_mask, truncated = sequences.encode_prompts(
        tokenizer, batch_prompts, cfg.max_prompt_length, state.device
    )
    context_length = queries.shape[1]
    state.policy.eval()

    def policy_and_critic(policy, value_model):  # what reads the trainable weights (`engine_run`)
        with state.timer("generation"), state.precision.autocast():
            generated = sequences.sample_ids(
                policy,
                queries,
                query_mask,
                max_new_tokens=cfg.response_length,
                temperature=cfg.temperature,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                output_logits=True,
                output_hidden_states=state.shared_critic,
                synced_gpus=synced_generation(state.accelerator),
            )
            # sampling stops when every row has its EOS: no compute spent on all-pad columns.
            responses, mask = sequences.truncate_at_eos(
                generated.responses, tokenizer.eos_token_id, tokenizer.pad_token_id
            )
        query_responses = torch.cat([queries, responses], 1)
        attention_mask = torch.cat([query_mask, mask.long()], 1)
        with state.timer("policy_forward"), state.precision.autocast():
            if state.logprobs_from_forward:  # the same computation the update's first forward repeats
                logits = sequences.response_logits(
                    policy, query_responses, attention_mask, context_length, temperature=cfg.temperature
                )
            else:  # the sampling pass's own (raw, float32) logits at the same T: no extra forward pass
                logits = sequences.scale_logits(generated.logits, cfg.temperature)
            logprobs = sequences.logprobs_from_scaled(logits, responses)
        values = None  # critic-free: no value model, no value forward
        if value_model is not None:
            with state.timer("value_forward"), state.precision.autocast():
                if state.shared_critic:  # lm-human-preferences: the values come out of the sampling pass
                    values = value_model(generated.hidden).squeeze(-1).float()
                else:
                    values = forward_values(value_model, query_responses, attention_mask, context_length)
        # the policy's scaled logits (batch × length × vocab) stay for the exact KL; generate's others go here
        return responses, mask, query_responses, attention_mask, logits, logprobs, values

    responses, mask, query_responses, attention_mask, logits, logprobs, values = engine_run(
        state, policy_and_critic
    )
    with state.timer("ref_forward"), state.precision.autocast():
        ref_logits = sequences.response_logits(
            state.reference, query_responses, attention_mask, context_length, temperature=cfg.temperature
        )
        ref_logprobs = sequences.logprobs_from_scaled(ref_logits, responses)
    with state.timer("exact_kl"):  # logged beside the estimators, never trained on
        exact_kl = sequences.exact_kl(logits, ref_logits)
    del logits, ref_logits
    texts = [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(responses, mask)]
    return Rollout(
        batch_prompts,
        query_responses,
        attention_mask,
        context_length,
        responses,
        mask,
        logprobs,
        ref_logprobs,
        values,
        texts,
        batch_records,
        sum(truncated),
        exact_kl,
    )


# ----------------------------------------------------------------------------------------------
# 2. score
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def score(state: PPOState, batch: Rollout, step: int = 1) -> dict:
    """The score of each episode and its parts (`scoring.sequence_score` of the weighted sum of the reward
    components), clipped to ±score_clip (OpenRLHF). `components`: each reward's values (NaN where a function
    returned None); `logged`: what reward functions passed to `log_metric`."""
    cfg = state.cfg
    components, logged = {}, {}

    def log_metric(name: str, value: float) -> None:  # TRL's reward-function hook: logged with the step
        logged.setdefault(name, []).append(float(value))

    rm_truncated_before = state.scorer.n_truncated if state.scorer is not None else 0
    with state.timer("scoring"):
        has_eos = (batch.responses == state.tokenizer.eos_token_id).any(1)
        completion_ids = [r[m].tolist() for r, m in zip(batch.responses, batch.mask)]
        for entry, name, function in state.reward_functions:
            components[name] = (
                state.scorer.score(batch.prompts, batch.texts).float().cpu()
                if function is None
                else call_reward_function(
                    entry,
                    function,
                    batch.records,
                    batch.texts,
                    completion_ids,
                    step=step,
                    max_steps=cfg.num_steps,
                    log_metric=log_metric,
                )
            )
        reward = combine(components, cfg.weights).to(state.device)
        parts = sequence_score(
            reward,
            batch.mask.sum(1),
            has_eos,
            length_coef=cfg.length_coef,
            length_target=cfg.length_target,
            missing_eos_penalty=cfg.missing_eos_penalty,
            overlong_buffer=cfg.overlong_buffer,
            overlong_penalty=cfg.overlong_penalty,
            max_length=cfg.response_length,
        )
    if cfg.score_clip:
        parts["score"] = parts["score"].clamp(-cfg.score_clip, cfg.score_clip)
    # prompts the reward model read only the end of, to fit its positions (the response is never cut)
    rm_truncated = state.scorer.n_truncated - rm_truncated_before if state.scorer is not None else 0
    return {
        **parts,
        "has_eos": has_eos,
        "components": components,
        "logged": logged,
        "rm_truncated": rm_truncated,
    }


# ----------------------------------------------------------------------------------------------
# 1-2 with dynamic sampling
# ----------------------------------------------------------------------------------------------
def sample_and_score_step(state: PPOState, prompts: list, step: int) -> tuple[Rollout, dict]:
    """The episodes of step `step` (1-based), sampled and scored. With `dynamic_sampling` (DAPO, Yu et al. 2025,
    eq. 11), a group whose scores are all equal (zero advantage, no gradient) is dropped and the groups of
    other prompts sampled in its place, a whole batch per round, up to `max_resample_rounds` rounds; still
    short, the batch is topped up with dropped groups. Round r's prompts are the step's batch of another
    shuffle (seed + r): a pure function of (seed, step), so a resumed run samples the same prompts. Every
    process runs the same number of rounds (each samples its own share; generation may be a collective).
    `parts["groups"]`: frac_reward_zero_std of the first round (TRL's metric: what the sampler produced), the
    rounds run and the zero-spread groups kept."""
    cfg = state.cfg
    draw = lambda seed: local_share(
        state,
        data.prompt_batch(
            prompts, step - 1, batch_size=cfg.batch_size, seed=seed, num_generations=cfg.num_generations
        ),
    )
    batch = sample(state, draw(cfg.seed))
    parts = score(state, batch, step)
    if cfg.num_generations < 2:
        return batch, parts
    zero_std = zero_spread_groups(parts["score"], cfg.num_generations)
    parts["groups"] = {
        "frac_reward_zero_std": zero_std.float().mean().item(),
        "resample_rounds": 0,
        "zero_std_groups_kept": int(zero_std.sum()),
    }
    if not cfg.dynamic_sampling:
        return batch, parts
    pieces, rounds = [(batch, parts, zero_std)], 0
    n_groups = state.local_batch // cfg.num_generations
    informative = lambda: sum(int((~z).sum()) for _, _, z in pieces)
    while (
        rounds < cfg.max_resample_rounds
        and int(
            state.sum_across_processes(torch.tensor(max(0, n_groups - informative()), device=state.device))
        )
        > 0
    ):
        rounds += 1
        extra = sample(state, draw(cfg.seed + 7919 * rounds))
        extra_parts = score(state, extra, step)
        pieces.append((extra, extra_parts, zero_spread_groups(extra_parts["score"], cfg.num_generations)))
    chosen = [(i, g) for i, (_, _, z) in enumerate(pieces) for g in range(len(z)) if not z[g]][:n_groups]
    chosen += [(0, g) for g in range(n_groups) if zero_std[g]][: n_groups - len(chosen)]  # topped up
    batch, parts = select_groups(
        [(b, p) for b, p, _ in pieces], chosen, cfg.num_generations, state.tokenizer.pad_token_id
    )
    parts["groups"] = {
        **pieces[0][1]["groups"],
        "resample_rounds": rounds,
        "zero_std_groups_kept": sum(bool(pieces[i][2][g]) for i, g in chosen),
    }
    return batch, parts


def zero_spread_groups(scores: torch.Tensor, num_generations: int) -> torch.Tensor:
    """[n_groups] True where a group's scores are all equal (TRL: isclose(std, 0)): its advantages are all 0."""
    std = scores.float().view(-1, num_generations).std(dim=1)
    return torch.isclose(std, torch.zeros_like(std)).cpu()


def select_groups(
    pieces: list[tuple[Rollout, dict]], chosen: list[tuple[int, int]], num_generations: int, pad_id: int
) -> tuple[Rollout, dict]:
    """One rollout (and its scores) of the chosen groups, (piece, group index) each, from rollouts sampled
    separately: prompts left-padded to the longest context, responses right-padded to the widest (padding is
    masked out everywhere; positions count real tokens only, so none moves)."""
    context = max(b.context_length for b, _ in pieces)
    width = max(b.responses.shape[1] for b, _ in pieces)
    rows = [(i, r) for i, g in chosen for r in range(g * num_generations, (g + 1) * num_generations)]

    def take(get, value=0, with_prompt=False):
        """The chosen rows of get(rollout, parts), a [B] or [B, T] tensor; [B, T] padded to the common width."""
        out = []
        for i, r in rows:
            b, p = pieces[i]
            row = get(b, p)[r : r + 1]
            if row.dim() == 2:
                left = context - b.context_length if with_prompt else 0
                row = torch.nn.functional.pad(row, (left, width - b.responses.shape[1]), value=value)
            out.append(row)
        return torch.cat(out)

    first = pieces[0][0]
    batch = Rollout(
        prompts=[pieces[i][0].prompts[r] for i, r in rows],
        query_responses=take(lambda b, _: b.query_responses, pad_id, with_prompt=True),
        attention_mask=take(lambda b, _: b.attention_mask, 0, with_prompt=True),
        context_length=context,
        responses=take(lambda b, _: b.responses, pad_id),
        mask=take(lambda b, _: b.mask, False),
        logprobs=take(lambda b, _: b.logprobs),
        ref_logprobs=take(lambda b, _: b.ref_logprobs),
        values=None if first.values is None else take(lambda b, _: b.values),
        texts=[pieces[i][0].texts[r] for i, r in rows],
        records=[pieces[i][0].records[r] for i, r in rows],
        prompts_truncated=sum(b.prompts_truncated for b, _ in pieces),
        exact_kl=None if first.exact_kl is None else take(lambda b, _: b.exact_kl),
    )
    parts = {
        name: take(lambda _, p, name=name: p[name])
        for name, value in pieces[0][1].items()
        if isinstance(value, torch.Tensor)
    }
    parts["components"] = {
        name: take(lambda _, p, name=name: p["components"][name]) for name in pieces[0][1]["components"]
    }
    parts["logged"] = {}
    for _, p in pieces:
        for name, values in p["logged"].items():
            parts["logged"].setdefault(name, []).extend(values)
    parts["rm_truncated"] = sum(p["rm_truncated"] for _, p in pieces)
    return batch, parts


# ----------------------------------------------------------------------------------------------
# 3-4. rewards, advantages
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def check_rollout_finite(step: int, batch: Rollout, parts: dict) -> None:
    """Stop before a NaN or Inf in the rollout's log-probs, values or scores reaches the targets."""
    finite = {
        "rollout logprobs": core.masked_mean(batch.logprobs, batch.mask),
        "reference logprobs": core.masked_mean(batch.ref_logprobs, batch.mask),
        "scores": parts["score"],
    }
    if batch.values is not None:
        finite["values"] = core.masked_mean(batch.values, batch.mask)
    check_finite(step, **finite)


def rollout_targets(state: PPOState, batch: Rollout, parts: dict) -> dict:
    """Per-token rewards (−β·KL unless the KL goes into the loss, the score on the last token) and the
    advantages of `advantage_estimator`: GAE over the critic's values, whitened (`core.compute_ppo_targets`),
    or critic-free (`core.compute_critic_free_targets`)."""
    cfg = state.cfg
    kl_coef = state.kl_ctl.value if cfg.kl_in == "reward" else 0.0
    # Whitening's mean and variance are over the global batch (every process's rollouts), so that N processes
    # compute what one would; TRL whitens each process's share on its own (docs/trl_differences.md).
    sum_across = state.sum_across_processes
    if not cfg.critic_free:
        targets = core.compute_ppo_targets(
            parts["score"],
            batch.logprobs,
            batch.ref_logprobs,
            batch.values,
            batch.mask,
            kl_coef=kl_coef,
            gamma=cfg.gamma,
            lam=cfg.lam,
            kl_estimator=cfg.kl_estimator,
            whiten_rewards=cfg.whiten_rewards,
            sum_across=sum_across,
        )
    else:
        targets = core.compute_critic_free_targets(
            cfg.advantage_estimator,
            parts["score"],
            batch.logprobs,
            batch.ref_logprobs,
            batch.mask,
            kl_coef=kl_coef,
            gamma=cfg.gamma,
            kl_estimator=cfg.kl_estimator,
            num_generations=cfg.num_generations,
            scale_rewards=cfg.scale_rewards,
            whiten_rewards=cfg.whiten_rewards,
            sum_across=sum_across,
        )
    # DAPO's overlong filtering: a cut answer is scored (and counts in its group's statistics) but is not learned
    # from, since its cut says nothing about whether the answer was good (TRL: mask_truncated_completions)
    targets["loss_mask"] = (
        batch.mask & parts["has_eos"].unsqueeze(1) if cfg.mask_truncated_completions else batch.mask
    )
    return targets


# ----------------------------------------------------------------------------------------------
# 5. update
# ----------------------------------------------------------------------------------------------
def ppo_update(
    state: PPOState,
    batch: Rollout,
    targets: dict,
    step: int,
    *,
    permutation: Callable[[int], torch.Tensor] | None = None,
    as_trl: bool = False,
) -> dict[str, list[float]]:
    """`num_ppo_epochs` passes over the batch in shuffled minibatches; each minibatch is one optimizer
    step over `gradient_accumulation_steps` micro-batches (the learning-rate schedule steps once per PPO
    step, in the loop, after the step is logged). Returns each statistic per micro-batch, in
    order, and `approxkl_first_minibatch`: the approx-KL between the rollout's log-probs and the first
    forward pass of the update, before any weight changed (0 up to precision drift).
    Two seams for the equivalence check against TRL's PPOTrainer (`verify/trl_numeric.py`): `permutation(epoch)`
    replaces the random minibatch order (it feeds TRL's), and `as_trl` takes TRL's update where ours differs
    (statistics over padding, each micro-batch's own token mean, no trimmed columns; docs/trl_differences.md)."""
    cfg = state.cfg
    critic = state.value_model is not None
    state.policy.train()
    if critic:
        state.value_model.train()
    names = [
        "pg_loss",
        "approxkl",
        "pg_clipfrac",
        "clipfrac_low",
        "clipfrac_high",
        "ratio",
        "entropy",
        "tokens",
    ]
    names += ["vf_loss", "vf_clipfrac"] if critic else []
    names += ["kl_loss"] if cfg.kl_in == "loss" else []
    stats = {k: [] for k in names}
    local_minibatch = state.micro_batch * cfg.gradient_accumulation_steps
    value_mask = targets.get(
        "value_mask", batch.mask
    )  # the response mask, or TRL's one-longer one (`core.compute_ppo_targets(trl_compat=True)`)
    loss_mask = targets.get(
        "loss_mask", batch.mask
    )  # without the cut answers with mask_truncated_completions
    batch.update_ratio = torch.ones_like(batch.logprobs)  # for the training samples' per-token view
    for epoch in range(cfg.num_ppo_epochs):
        order = permutation(epoch) if permutation else torch.randperm(state.local_batch, device=state.device)
        for mb_start in range(0, state.local_batch, local_minibatch):
            state.optimizer.zero_grad(set_to_none=True)
            minibatch_rows = order[mb_start : mb_start + local_minibatch]
            num_tokens = (
                {}  # TRL averages each micro-batch's mean (a short micro-batch's tokens weigh more)
                if as_trl
                else minibatch_token_counts(state, loss_mask[minibatch_rows], value_mask[minibatch_rows])
            )
            for mc_start in range(mb_start, mb_start + local_minibatch, state.micro_batch):
                idx = order[mc_start : mc_start + state.micro_batch]
                ids, attention, context_length, width = micro_batch_columns(
                    batch, idx, value_mask[idx], cfg.trim_padding and not as_trl
                )
                mask = loss_mask[idx, :width]
                # accelerate's accumulation: only the minibatch's last backward syncs gradients across processes
                with state.accelerator.accumulate(state.engine):
                    with (
                        state.precision.autocast()
                    ):  # the forward in bf16 when mixed; log-probs and losses float32
                        new_logprobs, entropy, new_values = state.engine(
                            state.update_forward,
                            ids,
                            attention,
                            context_length,
                            cfg.temperature,
                            state.shared_critic,
                        )
                    losses = update_losses(
                        state,
                        batch,
                        targets,
                        idx=idx,
                        width=width,
                        new_logprobs=new_logprobs,
                        new_values=new_values,
                        value_mask=value_mask,
                        num_tokens=num_tokens,
                        stats_over_padding=as_trl,
                    )
                    # Stop before a non-finite loss reaches the weights (they stay the last good ones).
                    check_finite(
                        step,
                        **{
                            label: losses[name]
                            for name, label in (
                                ("pg_loss", "loss/policy"),
                                ("vf_loss", "loss/value"),
                                ("kl_loss", "loss/kl"),
                            )
                            if name in losses
                        },
                    )
                    state.accelerator.backward(losses.pop("loss"))  # divided by gradient_accumulation_steps
                with torch.no_grad():
                    losses["entropy"] = core.masked_mean(entropy, mask)
                    batch.update_ratio[idx, :width] = torch.exp(
                        new_logprobs.float() - batch.logprobs[idx, :width]
                    )
                    for name, value in losses.items():
                        stats[name].append(value.item())
                stats["tokens"].append(ids.numel())  # positions through the policy (prompt included)
            # The gradients are the average over every process's rollouts by now (the engine all-reduced them
            # during the last backward; tests/engine_ppo_update.py writes it out by hand). Each model's gradient is
            # clipped on its own (`clip_groups`); DeepSpeed has clipped and stepped inside that backward already.
            for label, parameters in clip_groups(state):
                # max_grad_norm 0 or null: the norm is still measured (and checked), never applied (HF's meaning)
                grad_norm = state.accelerator.clip_grad_norm_(parameters, cfg.max_grad_norm or math.inf)
                check_finite(
                    step, weights_stepped=steps_inside_backward(state.accelerator), **{label: grad_norm}
                )
            state.optimizer.step()
    stats["approxkl_first_minibatch"] = stats["approxkl"][:1]
    return stats


def minibatch_token_counts(state: PPOState, mask, value_mask) -> dict:
    """The divisors that make bnpo's token mean (and the value loss's) the minibatch's: its real tokens over
    every micro-batch and every process, divided by what the engine divides the gradient by (each backward by
    gradient_accumulation_steps, the all-reduce by the number of processes). Each micro-batch's loss is then its
    tokens' sum over that, and the accumulated, averaged gradient is exactly the minibatch mean's."""
    engine_divides_by = state.cfg.gradient_accumulation_steps * state.accelerator.num_processes
    # at least one token: a minibatch of answers that mask_truncated_completions all left out has a loss of 0
    counts = state.sum_across_processes(torch.stack([mask.sum(), value_mask.sum()]).float()).clamp(min=1)
    return {"policy": counts[0] / engine_divides_by, "value": counts[1] / engine_divides_by}


def clip_groups(state: PPOState) -> list[tuple[str, list]]:
    """(label, parameters): the parameter lists whose gradients are clipped to max_grad_norm each: the policy's
    and a separate critic's apart, so that a large value gradient does not shrink the policy's step (and
    vf_coef weighs the value loss, not also the clip). The shared critic is one trunk: one norm. DeepSpeed
    clips inside its step, over the one engine it was given (both models): the norm it reports. TRL's
    PPOTrainer does not clip at all."""
    if state.value_model is None or state.shared_critic or steps_inside_backward(state.accelerator):
        return [
            ("gradient norm", list(state.engine.parameters()))
        ]  # frozen weights have no gradient: skipped
    return [
        ("policy gradient norm", list(state.policy.parameters())),
        ("critic gradient norm", list(state.value_model.parameters())),
    ]


def update_losses(
    state: PPOState,
    batch: Rollout,
    targets: dict,
    *,
    idx,
    width: int,
    new_logprobs,
    new_values,
    value_mask,
    num_tokens: dict,
    stats_over_padding: bool = False,
) -> dict:
    """One micro-batch's losses and statistics: `loss` (what is backpropagated: the clipped surrogate, plus
    vf_coef × the clipped value loss with a critic, plus β × the k3 KL with `kl_in: loss`) and its parts.
    `num_tokens`: the token means' divisors (`minibatch_token_counts`)."""
    cfg = state.cfg
    mask = targets.get("loss_mask", batch.mask)[
        idx, :width
    ]  # without the cut answers with mask_truncated_completions
    old_logprobs = batch.logprobs[idx, :width]
    if cfg.loss_type == "sequence":  # one ratio per sequence (TRL RLOOTrainer)
        pg_loss, pg_stats = core.sequence_policy_loss(
            new_logprobs,
            old_logprobs,
            targets["sequence_advantages"][idx],
            mask,
            cliprange=cfg.cliprange,
            cliprange_high=cfg.epsilon_high,
        )
    else:
        pg_loss, pg_stats = core.policy_loss(
            new_logprobs,
            old_logprobs,
            targets["advantages"][idx, :width],
            mask,
            cliprange=cfg.cliprange,
            stats_over_padding=stats_over_padding,
            loss_type=cfg.loss_type,
            max_len=cfg.response_length,
            num_tokens=num_tokens.get("policy"),
            cliprange_high=cfg.epsilon_high,
            importance_sampling_level=cfg.importance_sampling_level,
        )
    out = {
        "loss": pg_loss,
        "pg_loss": pg_loss,
        "approxkl": pg_stats["approxkl"],
        "pg_clipfrac": pg_stats["clipfrac"],
        "clipfrac_low": pg_stats["clipfrac_low"],
        "clipfrac_high": pg_stats["clipfrac_high"],
        "ratio": pg_stats["ratio_mean"],
    }
    if new_values is not None:
        vf_loss, vf_clipfrac = core.value_loss(
            new_values,
            targets["values"][idx, :width],
            targets["returns"][idx, :width],
            value_mask[idx, :width],
            cliprange_value=cfg.cliprange_value,
            num_tokens=num_tokens.get("value"),
        )
        out.update(loss=out["loss"] + cfg.vf_coef * vf_loss, vf_loss=vf_loss, vf_clipfrac=vf_clipfrac)
    if cfg.kl_in == "loss":  # GRPO: β·k3 of the current policy against the reference, in the loss
        kl_loss = core.kl_loss(
            new_logprobs,
            batch.ref_logprobs[idx, :width],
            mask,
            loss_type=cfg.loss_type,
            max_len=cfg.response_length,
            old_logprobs=old_logprobs if cfg.use_bias_correction_kl else None,
            num_tokens=num_tokens.get("policy"),
            importance_sampling_level=cfg.importance_sampling_level,
        )
        out.update(loss=out["loss"] + state.kl_ctl.value * kl_loss, kl_loss=kl_loss)
    return out


def micro_batch_columns(batch: Rollout, idx: torch.Tensor, value_mask: torch.Tensor, trim: bool):
    """The micro-batch's rows of the rollout: (ids, attention mask, context length, response width). Trimmed,
    without the columns that are padding in every one of its rows: the prompts' shared left padding (positions
    count real tokens only, so none moves) and every column past the longest response (past the last position
    the value loss reads). No loss changes; the forward and backward see fewer tokens."""
    ids, attention = batch.query_responses[idx], batch.attention_mask[idx]
    if not trim:
        return ids, attention, batch.context_length, batch.responses.shape[1]
    left = int(attention[:, : batch.context_length].argmax(1).min())  # the first real prompt token of any row
    width = max(1, int(value_mask.sum(1).max()))
    end = batch.context_length + width
    return ids[:, left:end], attention[:, left:end], batch.context_length - left, width


def update_forward(
    policy, value_model, ids, attention, context_length: int, temperature: float, shared_critic: bool
):
    """The update's forward pass: the response tokens' log-probs and entropies at temperature T (float32) and
    the values (None without a critic). One function, so `compile: true` can hand all of it (and its backward)
    to torch.compile."""
    if shared_critic:  # one trunk, two heads: one forward and one backward
        logits, values = sequences.response_logits(
            policy, ids, attention, context_length, temperature=temperature, value_head=value_model
        )
    else:
        logits = sequences.response_logits(policy, ids, attention, context_length, temperature=temperature)
        values = None if value_model is None else forward_values(value_model, ids, attention, context_length)
    logprobs = sequences.logprobs_from_scaled(logits, ids[:, context_length:])
    return logprobs, sequences.entropy_from_logits(logits), values


def steps_inside_backward(accelerator) -> bool:
    """DeepSpeed clips and steps the weights inside the minibatch's last backward (accelerate hands it the
    optimizer)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def check_finite(step: int, weights_stepped: bool = False, **quantities) -> None:
    for name, value in quantities.items():
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise NonFiniteError(f"{name} is NaN or Inf at step {step}", weights_stepped)


# ----------------------------------------------------------------------------------------------
# 6. log, save
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def episode_values(state: PPOState, batch: Rollout, parts: dict, targets: dict) -> dict:
    """Each episode's sequence KL (of the estimator the reward uses), gold score (logged, never a reward; the
    prompt's film when the record names it) and response length: what the metrics and the samples both read."""
    gold = [task.gold_score(t, r.get("title")) for t, r in zip(batch.texts, batch.records)]
    return {
        "kl": core.masked_sum(targets["kl"], batch.mask, dim=1),
        "gold": torch.tensor(gold, device=state.device),
        "n_tokens": batch.mask.sum(1),
    }


def step_metrics(
    state: PPOState, step: int, *, batch: Rollout, parts: dict, targets: dict, stats: dict, episodes: dict
) -> dict:
    """The step's metrics under TRL's names (plus ours), over every process's episodes. Without a critic there
    are no value metrics (loss/value_avg, val/clipfrac_avg, val/explained_variance); each reward component is
    logged as rewards/<name>/mean (TRL's name: the mean over the episodes it scored), `score/rm` when the reward
    model is one of them."""
    cfg, accelerator = state.cfg, state.accelerator
    mask, scores = batch.mask, parts["score"]
    kl_per_seq, gold, n_tokens = episodes["kl"], episodes["gold"], episodes["n_tokens"]
    with torch.no_grad():
        non_score = targets["non_score_reward"].sum(1)
        gathered = accelerator.gather_for_metrics(
            {
                "kl": kl_per_seq,
                "entropy": core.masked_sum(-batch.logprobs, mask, dim=1),
                "non_score": non_score,
                "scores": scores,
                "length_penalty": parts["length_penalty"],
                **({"overlong_penalty": parts["overlong_penalty"]} if "overlong_penalty" in parts else {}),
                "gold": gold,
                "length": n_tokens.float(),
                "eos": parts["has_eos"].float(),
                # the sequence KL three ways: the full-vocabulary sum at each sampled position, and the two estimators
                # from the sampled token alone (k1 can go negative; both are unbiased for it in expectation)
                **(
                    {"kl_exact": core.masked_sum(batch.exact_kl, mask, dim=1)}
                    if batch.exact_kl is not None
                    else {}
                ),
                "kl_k1": core.masked_sum(
                    core.kl_penalty(batch.logprobs, batch.ref_logprobs, "k1"), mask, dim=1
                ),
                "kl_k3": core.masked_sum(
                    core.kl_penalty(batch.logprobs, batch.ref_logprobs, "k3"), mask, dim=1
                ),
                "prompts_truncated": torch.tensor([float(batch.prompts_truncated)], device=state.device),
                "rm_prompts_truncated": torch.tensor([float(parts["rm_truncated"])], device=state.device),
                **{
                    f"rewards/{name}": values.to(state.device) for name, values in parts["components"].items()
                },
                **(
                    {"ev": core.explained_variance(targets["values"], targets["returns"], mask).reshape(1)}
                    if batch.values is not None
                    else {}
                ),
            }
        )
        update_stats = accelerator.gather_for_metrics(
            {k: torch.tensor([sum(v) / len(v)], device=state.device) for k, v in stats.items()}
        )
        logged = {}  # what reward functions passed to log_metric, every process's
        for process_logged in gather_object([parts["logged"]]):
            for name, values in process_logged.items():
                logged.setdefault(name, []).extend(values)
    mean_kl = gathered["kl"].mean().item()
    group_metrics = {}
    if (
        "groups" in parts
    ):  # the group estimators: the share of groups with no spread (TRL's frac_reward_zero_std)
        per_process = gather_object([parts["groups"]])
        group_metrics["frac_reward_zero_std"] = sum(g["frac_reward_zero_std"] for g in per_process) / len(
            per_process
        )
        if cfg.dynamic_sampling:
            group_metrics["rollout/resample_rounds"] = max(g["resample_rounds"] for g in per_process)
            group_metrics["rollout/zero_std_groups_kept"] = sum(
                g["zero_std_groups_kept"] for g in per_process
            )
    step_s = state.timers["rollout"] + state.timers["update"]
    metrics = {
        "objective/kl": mean_kl,
        "objective/entropy": gathered["entropy"].mean().item(),
        "objective/non_score_reward": gathered["non_score"].mean().item(),
        "objective/rlhf_reward": (gathered["scores"] + gathered["non_score"]).mean().item(),
        "objective/scores": gathered["scores"].mean().item(),
        "objective/kl_coef": state.kl_ctl.value,
        **({"objective/kl_exact": gathered["kl_exact"].mean().item()} if "kl_exact" in gathered else {}),
        "objective/kl_k1": gathered["kl_k1"].mean().item(),
        "objective/kl_k3": gathered["kl_k3"].mean().item(),
        "policy/approxkl_avg": update_stats["approxkl"].mean().item(),
        # rollout vs update log-probs before any update: precision drift only (0 in float32)
        "policy/approxkl_first_minibatch": update_stats["approxkl_first_minibatch"].mean().item(),
        "policy/clipfrac_avg": update_stats["pg_clipfrac"].mean().item(),
        # TRL GRPOTrainer's: the ratios clipped from below (rho < 1 - cliprange where A < 0) and from above
        # (rho > 1 + epsilon_high where A > 0; with cispo, rho above the cap): clip-higher moves the second
        "clip_ratio/low_mean": update_stats["clipfrac_low"].mean().item(),
        "clip_ratio/high_mean": update_stats["clipfrac_high"].mean().item(),
        "policy/entropy_avg": update_stats["entropy"].mean().item(),
        "loss/policy_avg": update_stats["pg_loss"].mean().item(),
        **(
            {
                "loss/value_avg": update_stats["vf_loss"].mean().item(),
                "val/clipfrac_avg": update_stats["vf_clipfrac"].mean().item(),
                "val/explained_variance": gathered["ev"].nanmean().item(),
            }
            if "vf_loss" in update_stats
            else {}
        ),
        **({"loss/kl_avg": update_stats["kl_loss"].mean().item()} if "kl_loss" in update_stats else {}),
        "val/ratio": update_stats["ratio"].mean().item(),
        "val/num_eos_tokens": gathered["eos"].sum().item(),
        **({"score/rm": gathered["rewards/rm"].mean().item()} if "rm" in parts["components"] else {}),
        **{
            f"rewards/{name}/mean": gathered[f"rewards/{name}"].nanmean().item()
            for name in parts["components"]
        },
        **{name: sum(values) / len(values) for name, values in logged.items()},
        "score/gold": gathered["gold"].mean().item(),
        "score/length_penalty": gathered["length_penalty"].mean().item(),
        "response/length_mean": gathered["length"].mean().item(),
        # the answers cut at response_length (TRL GRPOTrainer's name), and how alike the step's answers are:
        # distinct word bigrams over all of them (a policy that writes one template for every prompt: low)
        "completions/clipped_ratio": 1.0 - gathered["eos"].mean().item(),
        "completions/pooled_distinct_2": distinct_n(gather_object(list(batch.texts)), 2),
        **(
            {"score/overlong_penalty": gathered["overlong_penalty"].mean().item()}
            if "overlong_penalty" in gathered
            else {}
        ),
        **group_metrics,
        # prompts the policy (max_prompt_length) or the reward model (its positions) read only the end of
        "rollout/prompts_truncated": int(gathered["prompts_truncated"].sum().item()),
        "rollout/rm_prompts_truncated": int(gathered["rm_prompts_truncated"].sum().item()),
        "lr": state.scheduler.get_last_lr()[0],
        "episode": step * cfg.batch_size,
        **{f"time/{name}_s": seconds for name, seconds in state.timers.items()},
        "perf/episodes_per_s": cfg.batch_size / step_s,
        "perf/tokens_per_s": gathered["length"].sum().item() / step_s,
        # token positions the update's forward and backward passes ran on (prompts included, all processes)
        "perf/update_tokens": update_stats["tokens"].sum().item() * len(stats["tokens"]),
    }
    return metrics


def write_samples(
    state: PPOState, run_dir: Path, step: int, *, batch: Rollout, parts: dict, targets: dict, episodes: dict
) -> None:
    """The step's episodes, every process's, appended to samples.jsonl with their scores and per-token view."""
    components = {
        name: [None if v != v else v for v in values.tolist()]  # None: the function's own None
        for name, values in parts["components"].items()
    }
    rows = [
        {
            "step": step,
            "prompt": p,
            "response": t,
            "score": s,
            "rm": components["rm"][i] if "rm" in components else None,
            "gold": g,
            "kl": k,
            "n_tokens": n,
            "has_eos": e,
            "rewards": {name: values[i] for name, values in components.items()},
            "token_view": v,
        }
        for i, (p, t, s, g, k, n, e, v) in enumerate(
            zip(
                batch.prompts,
                batch.texts,
                parts["score"].tolist(),
                episodes["gold"].tolist(),
                episodes["kl"].tolist(),
                episodes["n_tokens"].tolist(),
                parts["has_eos"].tolist(),
                token_views(state, batch, targets),
            )
        )
    ]
    rows = gather_object(rows)  # every process's episodes (one process: its own)
    if state.accelerator.is_main_process:
        runlog.append_jsonl(run_dir / "samples.jsonl", rows)


def token_views(state: PPOState, batch: Rollout, targets: dict) -> list[dict]:
    """Each episode token by token, for inspect_samples --tokens and report.html: the token, k1 = log π_old −
    log π_ref (the KL penalty), the advantage, the value V(s_t) (with a critic), the ratio π/π_old at the update
    and the per-token reward (−β·k1, the score added on the last token)."""
    columns = {
        "k1": batch.logprobs - batch.ref_logprobs,
        "advantage": targets["advantages"],
        "value": batch.values,
        "ratio": batch.update_ratio,
        "reward": targets["rewards"],
    }
    columns = {name: column.float().tolist() for name, column in columns.items() if column is not None}
    views = []
    for i, n in enumerate(batch.mask.sum(1).tolist()):
        view = {"token": [state.tokenizer.decode([t]) for t in batch.responses[i, :n].tolist()]}
        view.update({name: [round(v, 4) for v in column[i][:n]] for name, column in columns.items()})
        views.append(view)
    return views


def save_step(state: PPOState, run_dir: Path, step: int) -> None:
    """A checkpoint every `save_steps` steps and at the last one."""
    cfg = state.cfg
    if step % cfg.save_steps == 0 or step == cfg.num_steps:
        if not shards_weights(
            state.accelerator
        ):  # sharded, each process holds its own part: nothing to compare
            assert_in_sync(state.parameters, state.accelerator)
        save_checkpoint(run_dir, step, state)


def finish(state: PPOState, run_dir: Path, logger, *, summary: dict, elapsed_s: float) -> None:
    """The "after" evaluation, `final/` (LoRA merged in), summary.json."""
    cfg, accelerator = state.cfg, state.accelerator
    after = evaluate_policy(state, "after") if state.eval_prompts else None
    policy_weights, _ = whole_state_dicts(accelerator, state.engine)  # a collective under FSDP and ZeRO-3
    if accelerator.is_main_process:
        if after is not None:
            summary["after"] = after
        model = state.policy.merge_and_unload() if cfg.use_lora else state.policy
        models.save_model(model, run_dir / "final", policy_weights)
        state.tokenizer.save_pretrained(run_dir / "final")
        summary["wall_s_last_session"] = elapsed_s
        summary["num_processes"] = accelerator.num_processes
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.log(cfg.num_steps, {"summary": 1, **runlog.flatten(summary)})
        logger.close()
        rundir.mark_finished(run_dir, cfg.num_steps)
    accelerator.wait_for_everyone()


def evaluate_policy(state: PPOState, when: str) -> dict | None:
    """`evaluate` of the current policy, on rank 0 (None on the others); under FSDP and ZeRO-3 on every process,
    each the same prompts with the same seeds, since their shards must gather together (`engine_run`)."""
    accelerator = state.accelerator
    if not (accelerator.is_main_process or shards_weights(accelerator)):
        return None
    # The evaluation seeds the random generator; the other processes keep their own streams (their rollouts) as if
    # they had not evaluated, as under DDP.
    cuda = [state.device.index or 0] if state.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, enabled=not accelerator.is_main_process):
        return engine_run(
            state,
            lambda policy, _: evaluate(
                state.cfg,
                policy,
                reference=state.reference,
                tokenizer=state.tokenizer,
                scorer=state.scorer,
                eval_prompts=state.eval_prompts,
                when=when,
                precision=state.precision,
                titles=state.eval_titles,
                records=state.eval_records,
                reward_functions=state.reward_functions,
                synced_gpus=synced_generation(accelerator),
                progress=accelerator.is_main_process,
            ),
        )


def evaluate(
    cfg: PPOStageConfig,
    policy,
    *,
    reference,
    tokenizer,
    scorer: RewardScorer,
    eval_prompts: list,
    when: str,
    precision: models.Precision,
    titles: list | None = None,
    records: list | None = None,
    reward_functions: list = (),
    synced_gpus: bool = False,
    progress: bool = True,
) -> dict:
    """Gold, RM, the reward functions (`rewards/<name>/mean`, from the eval `records`' columns) and sequence KL
    to the reference on the eval prompts (`sample_and_score`), sampled as in training (T, response_length).
    The run-level TRL cross-check evaluates TRL's policy with it too."""
    summary, _ = sample_and_score(
        policy,
        tokenizer,
        eval_prompts,
        Sampling(
            max_new_tokens=cfg.response_length,
            temperature=cfg.temperature,
            batch_size=32,
            seed=cfg.seed + 1,
            max_prompt_length=cfg.max_prompt_length,
            precision=precision,
            synced_gpus=synced_gpus,
        ),
        titles=titles,
        judge=Judge(scorer),
        ref=reference,
        progress=f"eval ({when})" if progress else None,
        records=records,
        reward_functions=reward_functions,
    )
    return summary
