"""Stage 4: DPO on the preference pairs.  python scripts/dpo.py --config configs/dpo.yaml [--field value ...]"""

from rlhf_toy.cli import run_stage
from rlhf_toy.stages.dpo import DPOStageConfig, run_dpo

if __name__ == "__main__":
    run_stage(DPOStageConfig, run_dpo)
