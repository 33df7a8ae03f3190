"""Structured pruning of sharded tensors: per-slice sums over ranks, slice masks cut to each rank's piece.

A group's units are slices along one dimension of its members (a weight's rows, its input columns), and
scoring them needs one number per slice: each rank reduces its own piece, and one ``all_reduce`` of a
vector as long as the dimension gives every rank the whole tensor's figures (O(units) sent, never the
weights). The masks that remove the chosen slices are built piece by piece, with no whole mask anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from masksparse.distributed.select import TRAFFIC, _group, _sum
from masksparse.distributed.tensors import counts_here, from_local, global_offset

__all__ = ["broadcast_scores", "slice_sums", "slices_masked"]


def slice_sums(t: Any, dim: int, per_slice: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``per_slice`` summed over the whole DTensor ``t``: a float64 vector of ``t.shape[dim]``, the same
    on every rank (a collective over ``t``'s mesh).

    ``per_slice(piece)`` gives one figure per slice of a piece along ``dim`` (a sum over its other
    dimensions, such as ``|w|`` summed); the pieces' figures add up to the whole tensor's, and a piece
    held by several ranks (a Replicate placement) is counted once.
    """
    piece = t.to_local()
    out = torch.zeros(t.shape[dim], dtype=torch.float64)
    if counts_here(t) and piece.numel():
        start = global_offset(t)[dim]
        out[start : start + piece.shape[dim]] += per_slice(piece).double()
    return _sum(out, _group([t]))


def broadcast_scores(scores: Sequence[torch.Tensor], ref: Any) -> list[torch.Tensor]:
    """Rank 0's ``scores`` on every rank of DTensor ``ref``'s mesh, so that ranks whose criteria disagree
    (random scores, a user's function) still choose the same units; one collective for all of them.
    """
    if not scores:
        return []
    flat = torch.cat([s.double().flatten() for s in scores])
    group = _group([ref])
    source = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(flat, src=source, group=group)
    TRAFFIC.add(flat)
    return list(torch.split(flat, [s.numel() for s in scores]))


def slices_masked(ref: Any, dim: int, removed: torch.Tensor) -> torch.Tensor:
    """A bool DTensor placed like ``ref``, False on the slices ``removed`` (indices into the whole
    tensor along ``dim``): each rank builds only its own piece.
    """
    piece_shape = tuple(ref.to_local().shape)
    piece = torch.ones(piece_shape, dtype=torch.bool, device=ref.to_local().device)
    if piece.numel():
        start = global_offset(ref)[dim]
        here = removed[(removed >= start) & (removed < start + piece_shape[dim])] - start
        piece.index_fill_(dim, here.to(piece.device), False)
    return from_local(piece, ref)
