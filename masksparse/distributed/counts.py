"""Counting a sharded tensor's nonzero entries and zero slices with one ``all_reduce`` per tensor."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from masksparse.distributed.tensors import counts_here, global_offset


def nonzero_counts(t: Any, dims: tuple[int, ...] = (0, 1)) -> tuple[int, list[torch.Tensor | None]]:
    """``(nonzero entries, [nonzero entries per slice along each of dims])`` of the whole DTensor ``t``.

    Every rank gets the same figures (a collective over ``t``'s mesh); a dimension ``t`` lacks gives None.
    """
    piece = t.to_local() != 0
    offset = global_offset(t)
    counted = counts_here(t)
    parts = [torch.tensor([int(piece.sum()) if counted else 0], dtype=torch.int64)]
    for dim in dims:
        if piece.dim() <= dim:
            continue
        per_slice = torch.zeros(t.shape[dim], dtype=torch.int64)
        if counted and piece.numel():
            local = piece.movedim(dim, 0).reshape(piece.shape[dim], -1).sum(1)
            per_slice[offset[dim] : offset[dim] + piece.shape[dim]] = local
        parts.append(per_slice)
    flat = torch.cat(parts)
    mesh = t.device_mesh
    dist.all_reduce(flat, group=mesh.get_group() if mesh.ndim == 1 else None)
    sizes = [p.numel() for p in parts]
    pieces = list(torch.split(flat, sizes))
    out: list[torch.Tensor | None] = []
    it = iter(pieces[1:])
    for dim in dims:
        out.append(next(it) if piece.dim() > dim else None)
    return int(pieces[0]), out
