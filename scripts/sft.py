"""Stage 1: supervised fine-tuning.  python scripts/sft.py --config configs/sft.yaml [--field value ...]"""

from rlhf_toy.cli import run_stage
from rlhf_toy.stages.sft import SFTStageConfig, run_sft

if __name__ == "__main__":
    run_stage(SFTStageConfig, run_sft)
