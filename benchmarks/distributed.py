"""Global pruning of a ~400M-weight model sharded over 4 CPU processes (FSDP2, gloo), next to one process.

The model is a stack of ``--layers`` x Linear(``--width``, ``--width``) (default 24 x 4096 x 4096 =
402.7M weights, 1.5 GiB in float32). In the sharded run every rank builds the model on the meta device,
shards it with ``fully_shard`` and fills only its own shard (``--ranks`` processes); the single run
builds the whole model in one process. Both make the same call on the same weights (the same generator
per layer, so both see the same values), once for each of

* ``prune.global_unstructured(..., L1Unstructured, amount=0.8)``: weights ranked across all layers;
* ``masksparse.prune_channels(model, x, 0.5, global_ranking=True)``: the hidden units between layers
  ranked across all of them by the L1 norm of their rows and columns (a trace of one forward first),

and report:

* seconds of the call (rank 0's wall clock; ranks start it together after a barrier);
* bytes of mask held by each rank (its shards) and by the single process (whole masks);
* bytes sent by the selection's collectives (per rank: histograms and counts) and how many calls;
* whether the two runs kept the same number of weights, and a hash of every mask (gathered rank by
  rank on rank 0, one tensor at a time) against the single run's;
* the peak resident memory of each process (it includes filling the weights: a rank holds one whole
  layer briefly while it copies its rows).

The machine has 2 cores: 4 ranks share them, so wall times are of a crowded machine, not of 4 machines.
Run: ``python benchmarks/distributed.py [--ranks 4 --layers 24 --width 4096]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1]))

import masksparse  # noqa: E402
from masksparse import prune  # noqa: E402

KINDS = ("global_unstructured", "prune_channels")


def _prune(kind: str, model: nn.Sequential, amount: float) -> None:
    if kind == "global_unstructured":
        prune.global_unstructured([(layer, "weight") for layer in model], prune.L1Unstructured, amount=amount)
    else:
        x = torch.randn(2, model[0].in_features, generator=torch.Generator().manual_seed(0))
        masksparse.prune_channels(model, x, amount, global_ranking=True)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _fill(layer: nn.Linear, index: int) -> torch.Tensor:
    """Layer ``index``'s weight values (the same in both runs)."""
    g = torch.Generator().manual_seed(index)
    return torch.randn(layer.out_features, layer.in_features, generator=g)


def _stack(layers: int, width: int, device: str) -> nn.Sequential:
    with torch.device(device):
        return nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))


def _digest(masks: list[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for mask in masks:
        h.update(mask.numpy().tobytes())
    return h.hexdigest()


def single(kind: str, layers: int, width: int, amount: float) -> dict[str, Any]:
    model = _stack(layers, width, "cpu")
    with torch.no_grad():
        for i, layer in enumerate(model):
            layer.weight.copy_(_fill(layer, i))
    start = time.perf_counter()
    _prune(kind, model, amount)
    seconds = time.perf_counter() - start
    masks = [layer.weight_mask for layer in model]
    return {
        "seconds": seconds,
        "mask_bytes": sum(m.numel() * m.element_size() for m in masks),
        "kept": sum(int(m.sum()) for m in masks),
        "digest": _digest(masks),
        "peak_mib": _peak_mib(),
    }


def sharded(kind: str, layers: int, width: int, amount: float) -> dict[str, Any] | None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = _stack(layers, width, "meta")
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for i, layer in enumerate(model):
            whole = _fill(layer, i)  # the whole layer, briefly, then only this rank's rows are kept
            piece = layer.weight.to_local()
            rows = piece.shape[0]
            start_row = min(rank * -(-width // world), width)
            piece.copy_(whole[start_row : start_row + rows])
            del whole
    masksparse.distributed.TRAFFIC.reset()
    dist.barrier()
    start = time.perf_counter()
    _prune(kind, model, amount)
    dist.barrier()
    seconds = time.perf_counter() - start
    traffic = masksparse.distributed.TRAFFIC
    local_bytes = sum(layer.weight_mask.to_local().numel() for layer in model)  # bool: one byte each
    kept_here = torch.tensor(sum(int(layer.weight_mask.to_local().sum()) for layer in model))
    dist.all_reduce(kept_here)
    h = hashlib.blake2b(digest_size=8)
    for layer in model:  # a collective: every rank gathers each whole mask in turn, rank 0 hashes it
        whole_mask = layer.weight_mask.full_tensor()
        h.update(whole_mask.numpy().tobytes())
        del whole_mask
    digest = h.hexdigest()
    dist.barrier()
    result = {
        "seconds": seconds,
        "mask_bytes": local_bytes,
        "kept": int(kept_here),
        "sent_bytes": traffic.bytes,
        "sent_calls": traffic.calls,
        "rounds": traffic.rounds,
        "digest": digest if rank == 0 else None,
        "peak_mib": _peak_mib(),
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, result)
    dist.destroy_process_group()
    return {"ranks": gathered} if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--amount", type=float, default=0.8, help="of the weights (global_unstructured)")
    parser.add_argument("--channels", type=float, default=0.5, help="of the hidden units (prune_channels)")
    parser.add_argument("--kind", choices=KINDS, action="append", help="default: both")
    parser.add_argument("--worker", choices=["single", "sharded"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker is not None:
        (kind,) = args.kind
        run = single if args.worker == "single" else sharded
        result = run(kind, args.layers, args.width, args.amount)
        if result is not None:
            Path(args.out).write_text(json.dumps(result))
        return
    for kind in args.kind or KINDS:
        _compare(args, kind, args.amount if kind == "global_unstructured" else args.channels)


def _compare(args: argparse.Namespace, kind: str, amount: float) -> None:
    out = Path("/tmp/masksparse_distributed_bench")
    out.mkdir(exist_ok=True)
    common = ["--layers", str(args.layers), "--width", str(args.width), "--amount", str(amount)]
    common += ["--kind", kind]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    me = str(Path(__file__).resolve())
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
         me, "--worker", "sharded", "--out", str(out / "sharded.json"), *common],
        check=True, env=env,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, me, "--worker", "single", "--out", str(out / "single.json"), *common],
        check=True, env={**os.environ, "OMP_NUM_THREADS": str(min(2, os.cpu_count() or 1))},
    )  # fmt: skip
    one = json.loads((out / "single.json").read_text())
    many = json.loads((out / "sharded.json").read_text())["ranks"]
    weights = args.layers * args.width * args.width
    rows = [
        ["1 process", f"{one['seconds']:.2f}", f"{one['mask_bytes'] / 2**20:.1f}", f"{one['peak_mib']:.0f}",
         "-", "-", one["kept"], "-"]
    ]  # fmt: skip
    for r, found in enumerate(many):
        rows.append(
            [f"rank {r} of {args.ranks}", f"{found['seconds']:.2f}", f"{found['mask_bytes'] / 2**20:.1f}",
             f"{found['peak_mib']:.0f}", f"{found['sent_bytes'] / 2**10:.1f}", found["sent_calls"],
             found["kept"], "" if found["digest"] is None else str(found["digest"] == one["digest"])]
        )  # fmt: skip
    shape = f"{args.layers} x Linear({args.width}, {args.width})"
    print(f"\n{kind}: {weights / 1e6:.1f}M weights ({shape}), amount {amount}")
    print(
        tabulate(
            rows,
            headers=["run", "seconds", "mask MiB held", "peak MiB", "KiB sent", "collectives", "kept",
                     "masks equal"],
            tablefmt="github",
        )
    )  # fmt: skip
    per_rank = max(found["mask_bytes"] for found in many) / one["mask_bytes"]
    rounds = f"; radix rounds per selection: {many[0]['rounds']}" if many[0]["rounds"] else ""
    print(f"mask memory per rank / one process: {per_rank:.3f}{rounds}")


if __name__ == "__main__":
    main()
