"""Masks for DTensor parameters: each rank computes only its shard of the mask.

Magnitude pruning (``L1Unstructured``) selects across ranks with histograms summed over the mesh, so no
rank ever holds the whole tensor; ``Identity`` and ``CustomFromMask`` are elementwise and need nothing
from other ranks. Any other method (structured, N:M, random, a user's) sees the whole tensor, gathered
for that one tensor, and rank 0's mask is scattered, so every rank holds the same mask whatever its
random generator says. The result is a DTensor placed like the parameter.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from masksparse._errors import PruningTypeError
from masksparse.distributed.select import ShardedScores, count_candidates, select_smallest_sharded
from masksparse.distributed.tensors import (
    check_placements,
    from_local,
    is_dtensor,
    local,
    local_part,
    placed_like,
    whole,
)

# How a method class computes a sharded mask: "identity", "custom" (elementwise with its ``mask``),
# "magnitude" (the ``count(method, candidates)`` smallest ``|t|``); any class not listed is "gather".
# Filled by masksparse.prune.methods for its classes and torch's (exact types: a subclass that overrides
# compute_mask is gathered, so its own code runs).
KINDS: dict[type, tuple[str, Callable[[Any, int], int] | None]] = {}


def _newest(hook: Any) -> Any:
    return hook[-1] if hasattr(hook, "_pruning_methods") else hook


def _precision(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sharded_mask(
    hook: Any, scores: torch.Tensor, default_mask: torch.Tensor, ref: torch.Tensor
) -> torch.Tensor:
    """The mask ``hook`` computes for the DTensor ``ref`` from ``scores`` and ``default_mask``, as a
    DTensor placed like ``ref``; a collective when the method needs other ranks (every rank must call it).
    """
    check_placements(ref, "the pruned tensor")
    if scores is not ref:
        if is_dtensor(scores):
            check_placements(scores, "importance_scores")
        scores = placed_like(scores, ref)
    default_mask = placed_like(default_mask, ref)
    method = _newest(hook)
    kind, count_of = KINDS.get(type(method), ("gather", None))
    if kind == "identity":
        return default_mask
    here = local(default_mask)
    if kind == "custom":
        piece_method = copy.copy(method)
        piece_method.mask = local_part(method.mask, ref)
        return from_local(piece_method.compute_mask(local(scores), here), ref)
    if kind == "magnitude" and count_of is not None:
        candidates = here if here.dtype == torch.bool else here != 0
        item = ShardedScores(local(scores), candidates, ref)
        count = count_of(method, count_candidates([item]))
        (chosen,) = select_smallest_sharded([item], count, _precision(scores.dtype))
        piece = here & ~chosen if here.dtype == torch.bool else here * ~chosen
        return from_local(piece, ref)
    with torch.no_grad():
        full = hook.compute_mask(whole(scores), default_mask=whole(default_mask))
    return placed_like(full, ref, source=0)


def global_masks(method: Any, targets: list[Any], label: str) -> list[torch.Tensor]:
    """The masks of a ``global_unstructured`` call over DTensor parameters, selected across ranks.

    ``targets`` are the call's resolved ``(module, name)`` entries (``tensor``, ``scores``, ``stored``,
    ``candidates``); every one must be a DTensor on the same mesh.
    """
    for target in targets:
        what = f"{type(target.module).__name__}.{target.name}"
        if not is_dtensor(target.tensor):
            raise PruningTypeError(
                f"global_unstructured(): {what} is an ordinary tensor while other parameters are sharded "
                "DTensors; rank sharded and unsharded parameters in separate calls, or shard them alike"
            )
        check_placements(target.tensor, what)
    kind, count_of = KINDS.get(type(method), ("gather", None))
    if kind != "magnitude" or count_of is None:
        raise PruningTypeError(
            f"global_unstructured({label}) on sharded (DTensor) parameters: only L1Unstructured selects "
            "across ranks without gathering every score; pass other criteria as importance_scores"
        )
    items = [
        ShardedScores(
            local(placed_like(t.scores, t.tensor)),
            None if t.candidates is None else local(placed_like(t.candidates, t.tensor)),
            t.tensor,
        )
        for t in targets
    ]
    count = count_of(method, count_candidates(items))
    dtype = torch.float64 if any(t.scores.dtype == torch.float64 for t in targets) else torch.float32
    chosen = select_smallest_sharded(items, count, dtype)
    masks = []
    for target, picked in zip(targets, chosen):
        if target.stored is None:
            piece = ~picked
        else:
            stored = local(target.stored)
            piece = stored & ~picked if stored.dtype == torch.bool else stored * ~picked
        masks.append(from_local(piece, target.tensor))
    return masks
