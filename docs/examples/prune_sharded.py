"""Prune a model sharded with FSDP2 over several processes: torchrun --nproc-per-node 2 prune_sharded.py DIR

Runs on CPUs with the gloo backend (use "nccl" and CUDA devices on GPUs). Every rank holds a shard of
each weight and of each mask; the global threshold is found with collectives over the mesh, and the
masks equal those one process would compute on the whole model.
"""

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import masksparse
from masksparse import prune

dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))

torch.manual_seed(0)  # every rank builds the same model; fully_shard keeps each rank's shard
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
for layer in model:
    if isinstance(layer, nn.Linear):
        fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)

# 1. One global threshold over every shard of every weight: the same masks as a single process.
weights = [(layer, "weight") for layer in model if isinstance(layer, nn.Linear)]
prune.global_unstructured(weights, prune.L1Unstructured, amount=0.8)
mask = model[2].weight_mask
print(
    f"rank {rank}: {type(mask).__name__} {tuple(mask.shape)}, this rank holds {tuple(mask.to_local().shape)}"
)

# 2. The report sums the counts over the ranks; print it once.
report = masksparse.sparsity_report(model)
if rank == 0:
    print(report)

# 3. Train as usual: FSDP2 gathers weight_orig and its mask for each forward.
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for _ in range(3):
    loss = model(torch.randn(32, 64)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

# 4. A distributed checkpoint, masks included; it loads into any number of ranks, or into one process.
dcp.save(model.state_dict(), checkpoint_id=sys.argv[1])
if rank == 0:
    print(f"saved to {sys.argv[1]}; total sparsity {report.total.nonzero / report.total.numel:.1%} kept")
dist.destroy_process_group()
