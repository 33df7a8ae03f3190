"""One rank of the distributed tests, launched by tests/test_distributed.py with torchrun (gloo, CPU).

``python -m torch.distributed.run --nproc-per-node N tests/distributed_worker.py OUT [CHECKPOINT]``
prunes the same models as :func:`prune_sharded` and :func:`prune_calibrated` on one process would, on
parameters sharded over the N ranks, and writes what it found to ``OUT/rank<r>.pt`` (whole masks,
gathered): the test compares them with a single process. With ``CHECKPOINT`` it first loads that
distributed checkpoint into a freshly sharded model; it always writes its own to ``OUT/checkpoint``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import masksparse
from masksparse import prune


def mlp() -> nn.Sequential:
    """Sizes that do not divide by 2 or 4, so shards are uneven and some ranks hold no rows at all."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 13), nn.ReLU(), nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 3))


def prune_sharded(model: nn.Sequential) -> None:
    """Per-tensor, iterative and global pruning, the same calls on one process or on sharded ones."""
    torch.manual_seed(1)
    prune.l1_unstructured(model[0], "weight", amount=0.4)
    params = [(model[0], "weight"), (model[2], "weight"), (model[4], "weight"), (model[2], "bias")]
    prune.global_unstructured(params, prune.L1Unstructured, amount=0.5)
    prune.ln_structured(model[4], "weight", amount=1, n=2, dim=0)
    prune.random_unstructured(model[0], "bias", amount=3)
    prune.nm_structured(model[0], "weight", n=2, m=4)


def convnet() -> nn.Sequential:
    """Channels that BatchNorm shares with a conv, and a conv feeding a Linear through a flatten."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 10, 3), nn.BatchNorm2d(10), nn.ReLU(), nn.Conv2d(10, 9, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(9 * 4 * 4, 5),
    )  # fmt: skip


def bert() -> nn.Module:
    """A small Hugging Face encoder: attention heads and FFN units pruned across sharded blocks."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def bert_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))}


def structured_inputs(model: nn.Module) -> torch.Tensor:
    shape = (2, 3, 8, 8) if isinstance(model[0], nn.Conv2d) else (4, 16)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(5))


def prune_structured(model: nn.Sequential) -> None:
    """Channels ranked across layers, then a larger amount per layer on top: the same calls sharded."""
    x = structured_inputs(model)
    masksparse.prune_channels(model, x, 0.3, global_ranking=True)
    masksparse.prune_channels(model, x, 0.5, importance="l2")


def tied() -> tuple[torch.Tensor, torch.Tensor]:
    """Two weights with many equal magnitudes: ties at the threshold must break as in one process."""
    g = torch.Generator().manual_seed(2)
    return (
        torch.randint(-3, 4, (6, 10), generator=g).float(),
        torch.randint(-3, 4, (5, 9), generator=g).float(),
    )


def prune_tied(a: nn.Module, b: nn.Module) -> None:
    prune.global_unstructured([(a, "weight"), (b, "weight")], prune.L1Unstructured, amount=47)


def calibration_data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(8, 16, generator=g) for _ in range(8)]


def prune_calibrated(model: nn.Module, data: list[torch.Tensor]) -> None:
    masksparse.prune_unstructured(
        model, data, amount=0.5, method="wanda", progress=False, dtype=torch.float64
    )


def whole_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, buffer in model.named_buffers():
        if name.endswith("_mask"):
            out[name] = buffer.full_tensor() if hasattr(buffer, "full_tensor") else buffer.clone()
    return out


def whole_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}


def _sharded_mlp(mesh: Any) -> nn.Sequential:
    return _sharded(mlp(), mesh)


def _sharded(model: nn.Sequential, mesh: Any) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main(out: Path, checkpoint: Path | None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    found: dict[str, Any] = {"world": world}

    if checkpoint is not None:  # a checkpoint written by another number of ranks, resharded on load
        fresh = _sharded_mlp(mesh)
        masksparse.load_state_dict(fresh, checkpoint)
        found["loaded"] = whole_state(fresh)
        found["loaded_mask_local"] = tuple(fresh[0].weight_mask.to_local().shape)

    model = _sharded_mlp(mesh)
    masksparse.distributed.TRAFFIC.reset()
    prune_sharded(model)
    found["traffic"] = masksparse.distributed.TRAFFIC.bytes
    found["masks"] = whole_masks(model)
    found["mask_types"] = {n: type(b).__name__ for n, b in model.named_buffers() if n.endswith("_mask")}
    found["local_mask_numel"] = sum(
        b.to_local().numel() for n, b in model.named_buffers() if n.endswith("_mask")
    )
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    out_masked = model(x)
    out_masked.sum().backward()  # FSDP2 gathers weight_orig and the mask, and reduce-scatters the gradient
    found["output"] = out_masked.detach()
    found["grad_type"] = type(model[0].weight_orig.grad).__name__
    found["report"] = [
        (r.name, r.nonzero, r.zero_slices_dim0, r.zero_slices_dim1) for r in masksparse.sparsity_report(model)
    ]
    dcp.save(model.state_dict(), checkpoint_id=str(out / "checkpoint"))
    masks_before = whole_masks(model)
    found["refused"] = []
    for refused in (
        lambda: masksparse.prune_channels(model, x, 0.5, importance="activation", data=[x]),
        lambda: masksparse.prune_unstructured(model, [x], 0.5),
    ):
        try:
            refused()
            found["refused"].append("")
        except masksparse.PruningTypeError as error:
            found["refused"].append(str(error))
    found["refused_left_unchanged"] = (
        all(torch.equal(m, masks_before[n]) for n, m in whole_masks(model).items())
        and masks_before.keys() == whole_masks(model).keys()
    )

    # Structured pruning: channels scored from each rank's pieces, masks built piece by piece.
    for make in (mlp, convnet):
        sharded = _sharded(make(), mesh)
        prune_structured(sharded)
        found[f"structured_{make.__name__}"] = whole_masks(sharded)
        found[f"structured_{make.__name__}_output"] = sharded(structured_inputs(sharded)).detach()
    from torch.distributed.fsdp import fully_shard

    encoder = bert()
    for block in encoder.encoder.layer:
        fully_shard(block, mesh=mesh)
    fully_shard(encoder, mesh=mesh)
    masksparse.prune_channels(encoder, bert_inputs(), 0.5, global_ranking=True)
    found["structured_bert"] = whole_masks(encoder)
    found["structured_bert_output"] = encoder(**bert_inputs()).last_hidden_state.detach()

    randomly = _sharded(mlp(), mesh)
    torch.manual_seed(rank)  # every rank draws other scores: rank 0's are used by all
    masksparse.prune_channels(randomly, structured_inputs(randomly), 0.5, importance="random")
    found["structured_random"] = whole_masks(randomly)
    prune.remove(model[2], "weight")
    found["removed"] = model[2].weight.full_tensor()
    model(x)  # FSDP2 swaps the parameter under its old name again

    # DTensors placed by hand: Shard(1) pieces are not contiguous, Replicate ones are counted once.
    a_whole, b_whole = tied()
    a, b = nn.Linear(10, 6, bias=False), nn.Linear(9, 5, bias=False)
    a.weight = nn.Parameter(distribute_tensor(a_whole, mesh, [Shard(1)]))
    b.weight = nn.Parameter(distribute_tensor(b_whole, mesh, [Replicate()]))
    prune_tied(a, b)
    found["tied"] = [a.weight_mask.full_tensor(), b.weight_mask.full_tensor()]
    found["tied_placements"] = [str(a.weight_mask.placements), str(b.weight_mask.placements)]

    # Data-parallel calibration: each rank feeds its own batches, the statistics are summed.
    replicated = mlp()
    data = calibration_data()
    with masksparse.data_parallel():
        prune_calibrated(replicated, data[rank::world])
    found["calibrated"] = whole_masks(replicated)
    masksparse.distributed.check_ranks_agree(replicated)
    if rank == 1:  # one rank prunes from other data: the check must catch it on every rank
        prune.l1_unstructured(replicated[2], "weight", amount=1)
    try:
        masksparse.distributed.check_ranks_agree(replicated)
        found["disagreement"] = None
    except masksparse.distributed.RanksDisagreeError as error:
        found["disagreement"] = str(error)

    torch.save(found, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
