"""Checks across ranks: replicated models pruned alike, and masks placed like their sharded tensors."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from masksparse._errors import MaskSparseError
from masksparse.distributed.tensors import is_dtensor, placed_like


class RanksDisagreeError(MaskSparseError, RuntimeError):
    """Ranks that should hold the same masks hold different ones."""


def _masks(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, b) for name, b in model.named_buffers() if name.endswith("_mask")]


def _fingerprint(mask: torch.Tensor) -> tuple[int, int]:
    """``(kept entries, a hash of which)`` of one whole (not sharded) mask."""
    kept = mask.detach().reshape(-1) != 0
    digest = hashlib.blake2b(kept.cpu().numpy().tobytes(), digest_size=7).digest()
    return int(kept.sum()), int.from_bytes(digest, "little")


def check_ranks_agree(model: nn.Module, group: Any = None) -> None:
    """Raise unless every rank of ``group`` holds the same masks (names, kept counts and positions).

    For a model replicated on every rank (DistributedDataParallel): pruning needs no communication when
    every rank sees the same weights and data, and this check, one ``all_gather`` of a few numbers per
    mask, catches the rank that did not (another seed, other calibration data) before training goes on
    with diverging models. Sharded (DTensor) masks are skipped: each rank holds its own shard of them.

    Raises:
        RanksDisagreeError: naming the first mask that differs and what each rank holds of it.
    """
    masks = [(name, m) for name, m in _masks(model) if not is_dtensor(m)]
    mine = [(name, *_fingerprint(m)) for name, m in masks]
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    reference = gathered[0]
    for rank, theirs in enumerate(gathered):
        if theirs == reference:
            continue
        names = [entry[0] for entry in reference]
        if [entry[0] for entry in theirs] != names:
            raise RanksDisagreeError(
                f"rank {rank} holds masks {[e[0] for e in theirs][:5]}, rank 0 holds {names[:5]}: the ranks "
                "pruned different tensors"
            )
        for ours, other in zip(reference, theirs):
            if ours != other:
                raise RanksDisagreeError(
                    f"mask {ours[0]!r} differs between rank 0 ({ours[1]} entries kept) and rank {rank} "
                    f"({other[1]} kept{', at other positions' if ours[1] == other[1] else ''}): the ranks "
                    "pruned from different weights or data; seed every rank alike, or compute the masks "
                    "on one rank and broadcast the model"
                )


def shard_masks(model: nn.Module) -> int:
    """Make every whole mask of a sharded (DTensor) parameter a DTensor placed like its parameter.

    After pruning a model and then sharding it with ``fully_shard`` (which shards parameters but not
    buffers), each rank still holds whole masks; this cuts each to the rank's shard (no communication).
    Returns how many masks were sharded.
    """
    count = 0
    for module in model.modules():
        for name, mask in list(module._buffers.items()):
            if not name.endswith("_mask") or mask is None or is_dtensor(mask):
                continue
            orig = module._parameters.get(name[: -len("_mask")] + "_orig")
            if orig is not None and is_dtensor(orig) and tuple(orig.shape) == tuple(mask.shape):
                module._buffers[name] = placed_like(mask, orig)
                count += 1
    return count
