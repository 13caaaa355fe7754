"""Stage 3: hand-written PPO.  python scripts/ppo.py --config configs/ppo.yaml [--field value ...]

Several processes (rollouts split, gradients averaged):  accelerate launch --num_processes 2 scripts/ppo.py ...
"""

from rlhf_toy.cli import run_stage
from rlhf_toy.stages.ppo.config import PPOStageConfig
from rlhf_toy.stages.ppo.trainer import train_ppo

if __name__ == "__main__":
    run_stage(PPOStageConfig, train_ppo)
