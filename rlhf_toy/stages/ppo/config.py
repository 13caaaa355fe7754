"""The PPO stage's configuration: plain data, one field per implementation detail (TRL's names where the
quantity is the same)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_toy.config import CommonConfig, ConfigError, LoraFields, at_least


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
    # Where the rollout's log-probs come from: "generate" (the sampling pass's own logits, no extra
    # forward), "forward" (one more forward pass, the very computation the update repeats), "auto" =
    # generate in float32, forward otherwise: in bf16 generate's KV-cache path and a full forward round
    # differently (approx-KL 1.9e-3 between them on SmolLM2-135M in pure bf16, 8e-12 in float32).
    rollout_logprobs: str = "auto"
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
    weight_decay: float = 0.0                       # AdamW's, on weight matrices only (never biases or norms); TRL's 0
    max_grad_norm: float = 1.0
    # speed, not math
    # Each micro-batch without the columns that are padding in all its rows (shared left padding of the
    # prompts, everything past the longest response): the same losses on fewer tokens (off with trl_compat,
    # whose statistics average over padding).
    trim_padding: bool = True
    # torch.compile the update's forward (policy and critic, log-probs, entropy) and its backward: fuses the
    # element-wise work on the [batch, tokens, vocab] logits. Costs compile time in the first steps.
    compile: bool = False
    # TRL's choices where ours differ (score one past the last token, value loss over one more position,
    # statistics over padding; docs/trl_differences.md): only for the equivalence checks against TRL.
    trl_compat: bool = False
    # output
    sample_every: int = 5                           # write samples.jsonl every N steps
    save_steps: int = 5

    def validate(self):
        super().validate()
        at_least(self, 1, "total_episodes", "batch_size", "num_mini_batches", "gradient_accumulation_steps",
                 "num_ppo_epochs", "response_length", "max_prompt_length", "sample_every")
        at_least(self, 0, "num_eval_prompts", "kl_coef", "kl_target", "length_coef", "missing_eos_penalty",
                 "score_clip")
        if self.learning_rate <= 0 or self.temperature <= 0:
            raise ConfigError(f"learning_rate and temperature must be > 0, got {self.learning_rate} and "
                              f"{self.temperature}")
        if self.critic not in ("separate", "shared"):
            raise ConfigError(f"critic must be 'separate' or 'shared', got {self.critic!r}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.lr_scheduler_type not in ("linear", "constant"):
            raise ConfigError(f"lr_scheduler_type must be linear or constant, got {self.lr_scheduler_type!r}")
        split_batch(self.batch_size, 1, self.num_mini_batches, self.gradient_accumulation_steps)
        if self.rollout_logprobs not in ("auto", "generate", "forward"):
            raise ConfigError(f"rollout_logprobs must be auto, generate or forward, got {self.rollout_logprobs!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.total_episodes < self.batch_size:
            raise ConfigError(f"total_episodes ({self.total_episodes}) < batch_size ({self.batch_size})")

    @property
    def num_steps(self) -> int:
        return self.total_episodes // self.batch_size


def split_batch(batch_size: int, num_processes: int, num_mini_batches: int,
                gradient_accumulation_steps: int) -> tuple[int, int]:
    """(episodes per process, episodes per micro-batch): each process takes an equal share of the batch,
    cuts it into `num_mini_batches` minibatches (one optimizer step each) of `gradient_accumulation_steps`
    equal micro-batches. Anything that does not divide exactly is an error, never a rounded-down size
    (a micro-batch of 0, or gradients scaled for micro-batches that do not exist)."""
    for name, value in (("batch_size", batch_size), ("num_mini_batches", num_mini_batches),
                        ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    per_step = num_mini_batches * gradient_accumulation_steps
    if batch_size % num_processes or (batch_size // num_processes) % per_step:
        where = f" over {num_processes} processes ({batch_size / num_processes:g} each)" if num_processes > 1 else ""
        raise ConfigError(
            f"batch_size ({batch_size}){where} must split into num_mini_batches ({num_mini_batches}) x "
            f"gradient_accumulation_steps ({gradient_accumulation_steps}) equal micro-batches")
    local_batch = batch_size // num_processes
    return local_batch, local_batch // per_step

