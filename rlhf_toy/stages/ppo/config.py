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
