"""torch's FSDP2 (`fully_shard`) on the tiny GPT-2: one forward, backward and AdamW step with each process its half
of a fixed batch, every block and then the whole model sharded across the processes (a gloo group on the CPU).
accelerate's FSDP plugin does not run on the CPU (README, "Scaling out"), so tests/test_engines.py holds the engine
itself against one process's step:

    python -m torch.distributed.run --nproc_per_node 2 tests/engine_fsdp2_step.py OUT

Rank 0 writes the whole (gathered) gradients and updated weights to OUT/fsdp2.pt; `step()` is one process's."""

import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from rlhf_toy import models
from rlhf_toy.stages.ppo.models import disable_dropout


def step(mesh=None) -> dict:
    """Gradients and weights after one AdamW step on 4 rows x 12 tokens (with a mesh: this process's share)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models.resolve_model_path(models.TINY_MODEL))
    disable_dropout(model)   # the same forward on every process
    ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:   # one shard unit per block, then the rest (embeddings, final norm)
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        ids = ids.chunk(mesh.size())[mesh.get_rank()]   # equal shares: the mean of their losses is the batch's
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    whole = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
    grads = {name: whole(p.grad) for name, p in model.named_parameters()}
    optimizer.step()
    return {"grads": grads, "weights": {name: whole(p) for name, p in model.named_parameters()},
            "sharded": all(isinstance(p, DTensor) for p in model.parameters())}


if __name__ == "__main__":
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    result = step(init_device_mesh("cpu", (dist.get_world_size(),)))
    if dist.get_rank() == 0:
        torch.save(result, Path(sys.argv[1]) / "fsdp2.pt")
    dist.destroy_process_group()
