"""PPO checkpoints: everything needed to continue as if never stopped (policy, critic when there is one,
optimizer, scheduler, KL controller, every process's RNG state), written atomically as `checkpoints/step-N/`.

One format with one process and under DDP (every process holds the same weights and optimizer state: rank 0
writes them, the optimizer's to `trainer_state.pt`). Under DeepSpeed ZeRO and FSDP each process holds only its
shard of the optimizer state (and under ZeRO-3 and FSDP of the weights): then every process writes its shards
through accelerate's `save_state` into `engine/`, and `load_state` reads them back. The policy and critic are
saved as plain models all the same (`policy/`, `value/`, gathered whole: `whole_state_dicts`), which compare and
from_pretrained read."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

from rlhf_toy import models, runlog
from rlhf_toy.config import ConfigError
from rlhf_toy.stages.common import gathered_state_dict


def engine_shards_state(accelerator) -> bool:
    """Whether the engine splits the optimizer state across processes (DeepSpeed ZeRO, FSDP), so that every process
    must save and load its own part."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def whole_state_dicts(accelerator, engine) -> tuple[dict | None, dict | None]:
    """The policy's and the critic's whole weights, for a plain save (`gathered_state_dict` of the engine, split by
    `PolicyAndCritic`'s `policy.`/`value_model.` keys): (None, None) where every process holds them whole."""

    whole = gathered_state_dict(accelerator, engine)
    if whole is None:
        return None, None
    return tuple(
        {key[len(prefix) :]: value for key, value in whole.items() if key.startswith(prefix)}
        for prefix in ("policy.", "value_model.")
    )


def save_checkpoint(run_dir: Path, step: int, state) -> None:
    """`run_dir`/checkpoints/step-`step`: the policy (and critic) weights, the optimizer, scheduler and β state and
    every process's RNG, written to a `.partial` directory renamed when whole; the oldest beyond
    `save_total_limit` are removed. `state`: the trainer's `PPOState`."""
    accelerator, engine, optimizer = state.accelerator, state.engine, state.optimizer
    policy, value_model = state.policy, state.value_model
    checkpoints = run_dir / "checkpoints"
    partial = checkpoints / f"step-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    sharded = engine_shards_state(accelerator)
    if sharded:  # every process writes its shard of the optimizer state (a collective call)
        accelerator.save_state(str(partial / "engine"))
    # Every process has its own RNG stream (its own rollouts): each saves it.
    partial.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        partial / f"rng-{accelerator.process_index}.pt",
    )
    policy_weights, value_weights = whole_state_dicts(accelerator, engine)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    models.save_model(policy, partial / "policy", policy_weights)
    state.tokenizer.save_pretrained(partial / "policy")
    if value_model is not None:
        save_critic(value_model, partial / "value", value_weights)
    torch.save(
        {
            "step": step,
            **({} if sharded else {"optimizer": optimizer.state_dict()}),
            "scheduler": state.scheduler.state_dict(),
            "kl_ctl": state.kl_ctl.state_dict(),
            "python_rng": random.getstate(),
        },
        partial / "trainer_state.pt",
    )
    partial.rename(checkpoints / f"step-{step}")  # atomic: a half-written checkpoint is never resumed
    for _, old in runlog.checkpoints(checkpoints)[: -state.cfg.save_total_limit]:
        shutil.rmtree(old)
    accelerator.wait_for_everyone()


def save_critic(value_model, directory: Path, state_dict: dict | None = None) -> None:
    """The critic's weights (`state_dict`, or its own): a value model as a model, the shared critic's head as a file."""
    if isinstance(value_model, torch.nn.Linear):  # the shared critic's head: two tensors
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        weights = value_model.state_dict() if state_dict is None else state_dict
        save_file({k: v.contiguous() for k, v in weights.items()}, directory / "value_head.safetensors")
    else:
        models.save_model(value_model, directory, state_dict)


def load_checkpoint(path: Path, state) -> int:
    """Restore what `save_checkpoint` wrote into the trainer's `state` (its optimizer as `prepare_engine` wrapped
    it); returns the checkpoint's step."""
    from safetensors.torch import load_file

    accelerator, policy, value_model = state.accelerator, state.policy, state.value_model

    # Read to the CPU and copied into the weights wherever they live (under several CPU processes accelerate's
    # device is "cpu:0", which safetensors refuses).
    def load_weights(model, directory):
        if (directory / "value_head.safetensors").exists():
            model.load_state_dict(load_file(directory / "value_head.safetensors"))
        elif (directory / "adapter_model.safetensors").exists():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
        else:
            state = load_file(directory / "model.safetensors")
            missing, _ = model.load_state_dict(state, strict=False)
            # tied embeddings are saved once; anything else missing is a broken checkpoint
            if [k for k in missing if "lm_head" not in k]:
                raise RuntimeError(f"{directory}: checkpoint lacks {missing[:3]}")

    saved = torch.load(path / "trainer_state.pt", weights_only=True)
    if engine_shards_state(accelerator) != ("optimizer" not in saved):
        raise ConfigError(
            f"{path} was saved {'without' if 'optimizer' in saved else 'under'} DeepSpeed or FSDP, "
            "whose optimizer state is sharded across processes: resume it with the launch config it ran "
            "with"
        )
    if "optimizer" in saved:
        load_weights(policy, path / "policy")
        if value_model is not None:
            load_weights(value_model, path / "value")
        state.optimizer.load_state_dict(saved["optimizer"])
    else:  # the engine's own shards: weights and optimizer state, each process its part
        accelerator.load_state(str(path / "engine"))
    state.scheduler.load_state_dict(saved["scheduler"])
    state.kl_ctl.load_state_dict(saved["kl_ctl"])
    rng = torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True)
    torch.set_rng_state(rng["torch_rng"])
    if rng["cuda_rng"]:
        torch.cuda.set_rng_state_all(rng["cuda_rng"])
    random.setstate(_as_tuple(saved["python_rng"]))
    return saved["step"]


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
