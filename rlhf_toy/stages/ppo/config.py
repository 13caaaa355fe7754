"""The PPO stage's configuration: plain data, one field per implementation detail (TRL's names where the
quantity is the same)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rlhf_toy.config import CommonConfig, ConfigError, LoraFields, above, at_least, within
from rlhf_toy.stages.ppo.core import (
    CRITIC_FREE_ESTIMATORS,
    GROUP_ESTIMATORS,
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
)

ESTIMATORS = ("gae", *CRITIC_FREE_ESTIMATORS)


@dataclass
class PPOStageConfig(LoraFields, CommonConfig):
    output_dir: str = "runs/ppo"
    model_name_or_path: str = "runs/sft/final"  # policy init and the frozen reference
    reward_model_path: str = "runs/reward/final"  # the scorer, and the separate critic's init
    # "separate": the critic is its own model, initialised from the RM (TRL's PPOTrainer).
    # "shared": a zero-initialised scalar head on the policy's trunk (lm-human-preferences' policy.py,
    #   Model(scalar_heads=['value'])): one forward/backward per minibatch instead of two, values
    #   from the sampling pass, one model less in memory; the value loss also shapes the trunk.
    #   "none": no value model (what a critic-free estimator runs with); "auto" = separate for gae, none otherwise.
    critic: str = "auto"
    # How the advantages are estimated. "gae": GAE over the critic's values (TRL PPOTrainer). Critic-free (no value
    # model loaded or trained): "grpo" (Shao et al. 2024: (R - group mean) / group std), "rloo" (Ahmadian et al.
    # 2024: R - mean of the group's other samples), "reinforce_pp" (Hu 2025: the reward-to-go whitened over the batch).
    advantage_estimator: str = "gae"
    # Samples per prompt in each step's batch (each prompt repeated, next to each other): the group grpo and rloo
    # compare within; batch_size must be a multiple of it.
    num_generations: int = 1
    scale_rewards: bool = True  # grpo: divide by the group std; false = Dr. GRPO (Liu et al. 2025)
    prompts: str = "data/prompts_train.jsonl"
    eval_prompts: str = "data/prompts_eval.jsonl"
    num_eval_prompts: int = 64  # sampled before and after training (0 = skip)
    # rollout
    total_episodes: int = 512
    batch_size: int = 16  # episodes per PPO step (split across processes)
    response_length: int = 48
    max_prompt_length: int = 128
    temperature: float = 0.7  # TRL's default; logprobs are taken at the same T
    # Where the rollout's log-probs come from: "generate" (the sampling pass's own logits, no extra
    # forward), "forward" (one more forward pass, the very computation the update repeats), "auto" =
    # generate in float32, forward otherwise: in bf16 generate's KV-cache path and a full forward round
    # differently (approx-KL 1.9e-3 between them on SmolLM2-135M in pure bf16, 8e-12 in float32).
    rollout_logprobs: str = "auto"
    # reward: "rm" (the reward model, normalised) and/or "module:function" with TRL's reward-function signature,
    # f(prompts, completions, **columns) -> one float (or None) per completion; summed with reward_weights
    # (default all 1), then the length and missing-EOS penalties. Each is logged as rewards/<name>/mean.
    rewards: list[str] = field(default_factory=lambda: ["rm"])
    reward_weights: list[float] = field(default_factory=list)
    length_coef: float = 0.02
    length_target: int = 40
    missing_eos_penalty: float = 1.0
    score_clip: float = 10.0  # OpenRLHF: clip the score to ±score_clip (0 = off)
    kl_coef: float = 0.05
    kl_target: float = 0.0  # > 0: adaptive β (Ziegler et al.), else fixed
    kl_horizon: float = 10000.0
    kl_estimator: str = "k1"
    # "reward": -beta*KL on every token's reward (Ziegler et al., TRL PPOTrainer). "loss": beta times the k3
    # estimator of the current policy added to the loss (GRPO, TRL GRPOTrainer); needs kl_estimator: k3.
    kl_in: str = "reward"
    # kl_in: loss: weight each token's k3 by the importance ratio pi/pi_old, which makes its gradient that of the
    # reverse KL (DeepSeek-V3.2; TRL GRPOTrainer's default); false: the GRPO paper's plain k3 term.
    use_bias_correction_kl: bool = True
    # PPO
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    gradient_accumulation_steps: int = 1
    gamma: float = 1.0  # GAE's and reinforce_pp's discount (grpo, rloo: whole responses)
    lam: float = 0.95  # GAE's
    cliprange: float = 0.2  # the ratio's clip: 1 - cliprange below, 1 + cliprange above
    # Clip-higher (DAPO, Yu et al. 2025): the upper clip is 1 + epsilon_high instead (null: cliprange), so that an
    # unlikely token with a positive advantage can grow further: against entropy collapse. With loss_type: cispo,
    # the cap of CISPO's importance weight itself (TRL's meaning; e.g. 5).
    epsilon_high: float | None = None
    # "token": one importance ratio per token (PPO, GRPO); "sequence": one per sequence, exp(mean_t log ratio),
    # clipped as a whole (GSPO, Zheng et al. 2025; TRL GRPOTrainer's name and definition).
    importance_sampling_level: str = "token"
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    # How the per-token policy loss is averaged (TRL GRPOTrainer's names): "bnpo" over all the minibatch's response
    # tokens (TRL PPOTrainer's), "grpo" per sequence then over sequences, "dr_grpo" sum / (sequences x
    # response_length), "dapo" the token mean over the minibatch (DAPO's token-level loss: our bnpo, TRL's dapo up
    # to its divisor, docs/trl_differences.md), "cispo" REINFORCE with a clipped, detached importance weight
    # (MiniMax-M1: no token loses its gradient; needs epsilon_high, the cap); "sequence": one clipped ratio per
    # sequence (TRL RLOOTrainer's; grpo and rloo only).
    loss_type: str = "bnpo"
    # Answers cut at response_length (no EOS) are left out of the loss (DAPO's overlong filtering, TRL's name):
    # still scored and still in their group's mean and std, they just teach nothing.
    mask_truncated_completions: bool = False
    # DAPO's soft overlong punishment: over the last overlong_buffer tokens before response_length the score
    # loses up to overlong_penalty, linearly in the tokens past response_length - overlong_buffer (0: off).
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    # DAPO's dynamic sampling (grpo, rloo): a group whose scores are all equal has zero advantages and no
    # gradient; drop it and sample other prompts' groups, up to max_resample_rounds extra rounds of a whole
    # batch each (the cost: up to that many more rollouts per step). Still short, the batch is topped up with
    # the dropped groups (logged: rollout/zero_std_groups_kept).
    dynamic_sampling: bool = False
    max_resample_rounds: int = 3
    whiten_rewards: bool = False
    learning_rate: float = 3e-6
    lr_scheduler_type: str = "linear"  # linear (decay to 0) or constant
    adam_eps: float = 1e-5  # CleanRL's ppo.py; PyTorch's 1e-8 is too small for RL
    weight_decay: float = 0.0  # AdamW's, on weight matrices only (never biases or norms); TRL's 0
    max_grad_norm: float | None = (
        1.0  # clip each model's gradient norm to this; 0 or null = no clipping (HF's)
    )
    # speed, not math
    # Each micro-batch without the columns that are padding in all its rows (shared left padding of the
    # prompts, everything past the longest response): the same losses on fewer tokens.
    trim_padding: bool = True
    # torch.compile the update's forward (policy and critic, log-probs, entropy) and its backward: fuses the
    # element-wise work on the [batch, tokens, vocab] logits. Costs compile time in the first steps.
    compile: bool = False
    # output
    sample_every: int = 5  # write samples.jsonl every N steps
    save_steps: int = 5

    def validate(self):
        super().validate()
        at_least(
            self,
            1,
            "total_episodes",
            "batch_size",
            "num_mini_batches",
            "gradient_accumulation_steps",
            "num_ppo_epochs",
            "response_length",
            "max_prompt_length",
            "sample_every",
        )
        at_least(
            self,
            0,
            "num_eval_prompts",
            "kl_coef",
            "kl_target",
            "length_coef",
            "length_target",
            "missing_eos_penalty",
            "score_clip",
            "vf_coef",
            "weight_decay",
            "overlong_buffer",
            "overlong_penalty",
            "max_resample_rounds",
        )
        if self.overlong_buffer > self.response_length:
            raise ConfigError(
                f"overlong_buffer ({self.overlong_buffer}) is longer than response_length "
                f"({self.response_length}): the penalty ramps over the last overlong_buffer tokens"
            )
        above(
            self, 0, "learning_rate", "temperature", "cliprange", "cliprange_value", "adam_eps", "kl_horizon"
        )
        within(self, 0, 1, "gamma", "lam")
        if self.max_grad_norm is not None:
            at_least(self, 0, "max_grad_norm")
        self.validate_estimator()
        self.validate_rewards()
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.kl_in not in ("reward", "loss"):
            raise ConfigError(f"kl_in must be 'reward' or 'loss', got {self.kl_in!r}")
        if self.kl_in == "loss" and self.kl_estimator != "k3":
            raise ConfigError(
                "kl_in: loss adds the k3 estimator to the loss (k1's gradient is zero in expectation): "
                "set kl_estimator: k3"
            )
        if self.lr_scheduler_type not in ("linear", "constant"):
            raise ConfigError(f"lr_scheduler_type must be linear or constant, got {self.lr_scheduler_type!r}")
        split_batch(
            self.batch_size,
            num_processes=1,
            num_mini_batches=self.num_mini_batches,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
        )
        if self.rollout_logprobs not in ("auto", "generate", "forward"):
            raise ConfigError(
                f"rollout_logprobs must be auto, generate or forward, got {self.rollout_logprobs!r}"
            )
        if self.total_episodes < self.batch_size:
            raise ConfigError(f"total_episodes ({self.total_episodes}) < batch_size ({self.batch_size})")

    def validate_estimator(self):
        if self.advantage_estimator not in ESTIMATORS:
            raise ConfigError(
                f"advantage_estimator must be one of {', '.join(ESTIMATORS)}, "
                f"got {self.advantage_estimator!r}"
            )
        critic_free = self.advantage_estimator != "gae"
        if self.critic == "auto":  # resolved here, so config.yaml records what ran
            self.critic = "none" if critic_free else "separate"
        if self.critic not in ("separate", "shared", "none"):
            raise ConfigError(f"critic must be 'separate', 'shared', 'none' or 'auto', got {self.critic!r}")
        if critic_free and self.critic != "none":
            raise ConfigError(
                f"critic: {self.critic} needs a value model, which advantage_estimator: "
                f"{self.advantage_estimator} does not use (it has no critic): remove critic or set "
                "critic: none, or use advantage_estimator: gae"
            )
        if not critic_free and self.critic == "none":
            raise ConfigError(
                "advantage_estimator: gae needs a critic (critic: separate or shared); the critic-free "
                "estimators are grpo, rloo and reinforce_pp"
            )
        at_least(self, 1, "num_generations")
        if self.advantage_estimator in GROUP_ESTIMATORS and self.num_generations < 2:
            raise ConfigError(
                f"advantage_estimator: {self.advantage_estimator} compares the samples of a prompt: "
                f"num_generations must be >= 2, got {self.num_generations}"
            )
        if self.batch_size % self.num_generations:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of num_generations "
                f"({self.num_generations}): each prompt is sampled num_generations times in a step"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ConfigError(
                f"importance_sampling_level must be token or sequence, got {self.importance_sampling_level!r}"
            )
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            raise ConfigError(f"epsilon_high must be > 0 (or null for cliprange), got {self.epsilon_high}")
        if self.loss_type == "cispo" and (self.epsilon_high is None or self.epsilon_high < 1):
            raise ConfigError(
                f"loss_type: cispo caps the importance weight at epsilon_high, which must be >= 1 "
                f"(e.g. 5; a cap below 1 would shrink every on-policy token), got {self.epsilon_high}"
            )
        if self.loss_type == "sequence" and self.importance_sampling_level == "sequence":
            raise ConfigError(
                "loss_type: sequence already takes one ratio per sequence (the summed log-ratio, TRL "
                "RLOOTrainer's); importance_sampling_level: sequence is GSPO's length-normalised one "
                "for the token losses: set one of them"
            )
        if self.dynamic_sampling and self.advantage_estimator not in GROUP_ESTIMATORS:
            raise ConfigError(
                f"dynamic_sampling drops groups whose scores have zero spread: it needs groups, "
                f"advantage_estimator grpo or rloo, got {self.advantage_estimator}"
            )
        if self.loss_type == "sequence" and self.advantage_estimator not in GROUP_ESTIMATORS:
            raise ConfigError(
                "loss_type: sequence needs one advantage per sequence: advantage_estimator grpo or rloo"
            )
        if self.loss_type == "sequence" and self.kl_in == "loss":
            raise ConfigError(
                "loss_type: sequence has no per-token loss to add the KL to: use kl_in: reward "
                "(TRL RLOOTrainer's place for it)"
            )
        if self.whiten_rewards and self.advantage_estimator in GROUP_ESTIMATORS:
            raise ConfigError(
                f"whiten_rewards whitens per-token rewards (gae, reinforce_pp); "
                f"{self.advantage_estimator} compares whole-response rewards within each group"
            )

    def validate_rewards(self):
        if not self.rewards:
            raise ConfigError("rewards is empty: list rm and/or module:function entries")
        for entry in self.rewards:
            if entry != "rm" and not re.fullmatch(r"[\w.]+:\w+", entry):
                raise ConfigError(
                    f"rewards entry {entry!r}: expected rm or module:function (e.g. my_rewards:length_reward)"
                )
        if len(set(self.rewards)) != len(self.rewards):
            raise ConfigError(f"rewards lists an entry twice: {self.rewards}")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} weights for {len(self.rewards)} "
                f"rewards ({', '.join(self.rewards)}): one each, or none for all 1"
            )

    @property
    def critic_free(self) -> bool:
        return self.advantage_estimator != "gae"

    @property
    def weights(self) -> list[float]:
        """One weight per entry of `rewards` (all 1 when reward_weights is empty)."""
        return list(self.reward_weights) or [1.0] * len(self.rewards)

    @property
    def num_steps(self) -> int:
        return self.total_episodes // self.batch_size


def split_batch(
    batch_size: int,
    *,
    num_processes: int,
    num_mini_batches: int,
    gradient_accumulation_steps: int,
    num_generations: int = 1,
) -> tuple[int, int]:
    """(episodes per process, episodes per micro-batch): each process takes an equal share of the batch,
    cuts it into `num_mini_batches` minibatches (one optimizer step each) of `gradient_accumulation_steps`
    equal micro-batches. Anything that does not divide exactly is an error, never a rounded-down size
    (a micro-batch of 0, or gradients scaled for micro-batches that do not exist). Each process's share holds
    whole groups of `num_generations` samples of a prompt (a group is scored and compared on one process)."""
    for name, value in (
        ("batch_size", batch_size),
        ("num_mini_batches", num_mini_batches),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    per_step = num_mini_batches * gradient_accumulation_steps
    if batch_size % num_processes or (batch_size // num_processes) % per_step:
        where = (
            f" over {num_processes} processes ({batch_size / num_processes:g} each)"
            if num_processes > 1
            else ""
        )
        raise ConfigError(
            f"batch_size ({batch_size}){where} must split into num_mini_batches ({num_mini_batches}) x "
            f"gradient_accumulation_steps ({gradient_accumulation_steps}) equal micro-batches"
        )
    local_batch = batch_size // num_processes
    if local_batch % num_generations:
        raise ConfigError(
            f"batch_size ({batch_size}) over {num_processes} processes ({local_batch} each) must be a "
            f"multiple of num_generations ({num_generations})"
        )
    return local_batch, local_batch // per_step
