"""Any stage under accelerate's FSDP2 engine on 2 CPU processes (a gloo group), for tests/test_engines.py.

accelerate 1.15 runs FSDP on GPUs only: on the CPU it drops the launch config's FSDP and runs plain DDP (the stages
refuse `configs/accelerate/fsdp.yaml` there). Its FSDP2 code itself runs on the CPU: this script launches under the
DDP config, then switches every Accelerator it creates (PPO's own, the HF Trainer's) to FSDP with the plugin that
`configs/accelerate/fsdp.yaml` describes, before anything is prepared. Everything after that (`fully_shard` of each
block and of the rest, the sharded AdamW, gradient sync, `get_state_dict`, `save_state`/`load_state` of the shards)
is accelerate's and torch's own code, run as on a GPU. The one switch is the only thing that differs from a GPU run.

    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 tests/engine_fsdp2_cpu.py \\
        update PIPELINE OUT          # engine_ppo_update's update under FSDP2: rank 0 writes OUT/weights.pt
    accelerate launch ... tests/engine_fsdp2_cpu.py ppo FLAGS...   # scripts/ppo.py FLAGS under FSDP2 (or sft, dpo, ...)
"""

import runpy
import sys
from pathlib import Path

import accelerate
import transformers.trainer
import yaml
from conftest import ROOT


def fsdp2_plugin():
    """accelerate's FSDP plugin with the settings of the shipped configs/accelerate/fsdp.yaml."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    settings = {
        key.removeprefix("fsdp_"): value
        for key, value in yaml.safe_load((ROOT / "configs/accelerate/fsdp.yaml").read_text())[
            "fsdp_config"
        ].items()
    }
    return FullyShardedDataParallelPlugin(
        fsdp_version=settings.pop("version"), cpu_offload=settings.pop("offload_params"), **settings
    )


class FSDP2OnCPU(accelerate.Accelerator):
    """An Accelerator of several CPU processes switched to FSDP2, as `accelerate launch --config_file fsdp.yaml` makes
    it on a GPU machine. PartialState's copy too: every AcceleratorState construction copies it back."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        assert self.num_processes > 1 and self.device.type == "cpu"
        PartialState().distributed_type = DistributedType.FSDP
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = fsdp2_plugin()


if __name__ == "__main__":
    accelerate.Accelerator = transformers.trainer.Accelerator = FSDP2OnCPU  # PPO's and the HF Trainer's
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "update":
        import engine_ppo_update
        import torch
        import torch.distributed as dist

        weights = engine_ppo_update.update(Path(args[0]), Path(args[1]))
        if dist.get_rank() == 0:
            torch.save(weights, Path(args[1]) / "weights.pt")
        from rlhf_toy.cli import close_process_group

        close_process_group()
    else:  # scripts/MODE.py with its flags, as a user runs it
        sys.argv = [str(ROOT / "scripts" / f"{mode}.py"), *args]
        runpy.run_path(sys.argv[0], run_name="__main__")
