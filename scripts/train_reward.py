"""Stage 2: reward model.  python scripts/train_reward.py --config configs/reward.yaml [--field value ...]"""

from rlhf_toy.cli import run_stage
from rlhf_toy.stages.reward import RewardStageConfig, train_reward

if __name__ == "__main__":
    run_stage(RewardStageConfig, train_reward)
