"""One PPO update of the trainer on a fixed global rollout: with one process, or under `accelerate launch` with
each process its share of the rollout and accelerate's DDP engine averaging the gradients (tests/test_engines.py).
The rollout's responses have their own lengths (real masks), and each process computes its share's targets as the
trainer does: the whitening and the token means must be global for N processes to equal one.

    accelerate launch --config_file configs/accelerate/ddp.yaml tests/engine_ppo_update.py PIPELINE OUT \
        [ACCUMULATION [FIELD VALUE ...]]

Under several processes it also holds the hand-written `average_gradients` against what DDP computed on the same
micro-batch. Rank 0 writes the updated weights to OUT/weights.pt."""

import dataclasses
import sys
from pathlib import Path

import torch
from conftest import tiny_flags
from torch.distributed.tensor import DTensor

from rlhf_toy import data
from rlhf_toy.cli import close_process_group
from rlhf_toy.config import parse_config
from rlhf_toy.stages.common import shards_weights
from rlhf_toy.stages.ppo import trainer
from rlhf_toy.stages.ppo.config import PPOStageConfig

GLOBAL_BATCH = 8  # 2 minibatches a PPO epoch: of 2 rows per process with 2 processes, of 4 rows with one


def update(pipeline: Path, out: Path, gradient_accumulation_steps: int = 1, **overrides) -> list:
    """The updated trainable weights after 2 PPO epochs of 2 minibatches over the same 8 episodes, each minibatch
    in `gradient_accumulation_steps` micro-batches."""
    cfg = parse_config(
        PPOStageConfig,
        tiny_flags(
            pipeline,
            out / "run",
            batch_size=GLOBAL_BATCH,
            total_episodes=GLOBAL_BATCH,
            num_mini_batches=2,
            num_ppo_epochs=2,
            num_eval_prompts=0,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **overrides,
        ),
    )
    state, _, _ = trainer.build(cfg)
    rank, world = state.accelerator.process_index, state.accelerator.num_processes
    # SGD: its step is linear in the gradient, so a wrongly averaged one shows (AdamW's first step would hide it)
    state.optimizer = torch.optim.SGD(state.parameters, lr=0.5)
    # step 0's batch as the trainer draws it (with num_generations > 1: each prompt's group side by side)
    prompts = data.prompt_batch(
        data.load_prompt_records(str(pipeline / "prompts.jsonl")),
        0,
        batch_size=GLOBAL_BATCH,
        seed=cfg.seed,
        num_generations=cfg.num_generations,
    )
    torch.manual_seed(4)  # every process samples the whole global rollout alike, then keeps its share
    batch = trainer.sample(state, prompts)
    lengths = batch.mask.sum(1)
    assert len(set(lengths[:4].tolist())) > 1 and lengths[:4].sum() != lengths[4:].sum(), (
        lengths
    )  # real masks
    scores = trainer.score(state, batch)["score"]
    share = slice(rank * state.local_batch, (rank + 1) * state.local_batch)

    def rows(value):  # this process's rows of a per-episode tensor or list; anything else as it is
        per_episode = (
            value.ndim > 0 and value.shape[0] == GLOBAL_BATCH
            if isinstance(value, torch.Tensor)
            else isinstance(value, list) and len(value) == GLOBAL_BATCH
        )
        return value[share] if per_episode else value

    batch = dataclasses.replace(
        batch, **{f.name: rows(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
    )
    targets = trainer.rollout_targets(state, batch, {"score": scores[share]})  # whitened over both shares
    if world > 1 and not shards_weights(state.accelerator):  # FSDP's gradients are shards: nothing to compare
        check_average_gradients(state, batch)
    # Each minibatch holds the same episodes either way: with 2 processes, rows r and r + 4 of the global batch
    # sit at the same place in the two shares; with one, the two shares' minibatch rows side by side.
    shared_order = lambda epoch: torch.arange(4).roll(epoch)
    if world == 1:
        permutation = lambda epoch: torch.cat(
            [torch.cat([shared_order(epoch)[m : m + 2], 4 + shared_order(epoch)[m : m + 2]]) for m in (0, 2)]
        )
    else:
        permutation = shared_order
    trainer.ppo_update(state, batch, targets, 1, permutation=permutation)
    whole = lambda p: (
        p.full_tensor() if isinstance(p, DTensor) else p
    )  # FSDP's shards gathered (every process)
    return [whole(p.detach()).clone() for p in state.parameters]


def check_average_gradients(state, batch) -> None:
    """DDP's gradients (the engine's, from a backward whose forward went through it) equal the hand-written
    all-reduce of each process's own gradients."""
    ids, attention, context_length, _ = trainer.micro_batch_columns(
        batch, torch.arange(2), batch.mask[:2], True
    )

    def gradients(model):
        state.optimizer.zero_grad(set_to_none=True)
        logprobs, _, values = model(
            state.update_forward, ids, attention, context_length, state.cfg.temperature, state.shared_critic
        )
        (
            logprobs.mean() + (0 if values is None else values.pow(2).mean())
        ).backward()  # critic-free: no values
        return [p.grad.clone() for p in state.parameters]

    engine = gradients(state.engine)
    own = gradients(
        state.accelerator.unwrap_model(state.engine)
    )  # the module itself: DDP does not sync these
    average_gradients(state.parameters, state.accelerator.num_processes)
    by_hand = [p.grad for p in state.parameters]
    assert any(not torch.equal(a, b) for a, b in zip(own, by_hand)), (
        "the processes' gradients were already equal"
    )
    worst = max((a - b).abs().max().item() for a, b in zip(engine, by_hand))
    assert worst <= 1e-7, f"average_gradients differs from DDP's by {worst}"
    state.optimizer.zero_grad(set_to_none=True)


def average_gradients(parameters, num_processes: int) -> None:
    """What DDP does for data parallelism, by hand: after the backward pass, every process holds the gradient of
    its own share of the batch; one all-reduce sums them, flattened into one buffer, and dividing by the number of
    processes gives the gradient of the whole batch's mean loss, the same on every process (so the weights stay
    equal). The trainer lets the engine do this (`trainer.prepare_engine`), which also cuts the buffer into buckets and
    sends each while the backward pass is still computing the rest; tests/test_engines.py holds the two equal."""
    grads = [p.grad for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


if __name__ == "__main__":
    pipeline, out = Path(sys.argv[1]), Path(sys.argv[2])
    overrides = dict(
        zip(sys.argv[4::2], sys.argv[5::2])
    )  # config fields and their values, as flags give them
    weights = update(pipeline, out, *map(int, sys.argv[3:4]), **overrides)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(weights, out / "weights.pt")
    close_process_group()
