"""DTensor helpers: which tensors are sharded, their local pieces, and masks placed like their tensors.

Everything here is a no-op question on an ordinary tensor (``is_dtensor`` is an ``isinstance`` check), so
the pruning code asks it on every tensor at no cost and only sharded tensors take the slower paths.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from masksparse._errors import PruningTypeError

try:  # torch.distributed is optional in torch builds (some macOS and mobile wheels lack it)
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - every wheel the test suite installs has torch.distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a Parameter holding one included)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Any) -> torch.Tensor:
    """This rank's piece of a DTensor; an ordinary tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def check_placements(t: Any, what: str) -> None:
    """Refuse a DTensor with a ``Partial`` placement: its entries are not values until reduced."""
    for placement in t.placements:
        if not isinstance(placement, (Shard, Replicate)):
            raise PruningTypeError(
                f"{what} is a DTensor placed as {tuple(t.placements)}: only Shard and Replicate placements "
                "hold the tensor's values; redistribute it (e.g. to Replicate()) before pruning"
            )


def same_layout(t: Any, ref: Any) -> bool:
    """Whether DTensor ``t`` has ``ref``'s shape, mesh and placements."""
    return (
        is_dtensor(t)
        and tuple(t.shape) == tuple(ref.shape)
        and t.device_mesh == ref.device_mesh
        and tuple(t.placements) == tuple(ref.placements)
    )


def from_local(piece: torch.Tensor, ref: Any) -> torch.Tensor:
    """The DTensor whose local piece on this rank is ``piece``, placed like DTensor ``ref``."""
    return DTensor.from_local(
        piece, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape, stride=ref.stride()
    )


def placed_like(t: Any, ref: Any, source: int | None = None) -> Any:
    """``t`` (a whole tensor, or a DTensor of ``ref``'s shape) as a DTensor placed like ``ref``.

    A whole tensor is cut locally when ``source`` is None (every rank holds the same tensor, so nothing
    is sent), or scattered from rank ``source`` (ranks that may disagree all take that rank's values);
    a DTensor is redistributed.
    """
    if is_dtensor(t):
        if same_layout(t, ref):
            return t
        return t.redistribute(ref.device_mesh, ref.placements)
    return distribute_tensor(t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=source)


def local_part(t: Any, ref: Any) -> torch.Tensor:
    """This rank's piece of ``t`` (whole, or a DTensor of ``ref``'s shape) where DTensor ``ref`` is placed."""
    return placed_like(t, ref).to_local()


def whole(t: Any) -> torch.Tensor:
    """The whole value of a DTensor, gathered on every rank; an ordinary tensor as it is."""
    return t.full_tensor() if is_dtensor(t) else t


# id(whole tensor) -> the DTensor gathered into it, while the whole tensor lives (see gathered).
_GATHERED: dict[int, tuple[weakref.ref[torch.Tensor], Any]] = {}


def gathered(t: Any) -> torch.Tensor:
    """:func:`whole`, remembering which DTensor the result was gathered from (:func:`gathered_from`):
    how a trace of an FSDP2 forward tells the mask buffer in ``weight_orig * weight_mask``."""
    full = whole(t)
    if full is not t:
        key = id(full)
        _GATHERED[key] = (weakref.ref(full), t)
        weakref.finalize(full, _GATHERED.pop, key, None)
    return full


def gathered_from(t: torch.Tensor) -> Any:
    """The DTensor :func:`gathered` made ``t`` from; None for any other tensor."""
    entry = _GATHERED.get(id(t))
    return entry[1] if entry is not None and entry[0]() is t else None


def global_offset(t: Any) -> tuple[int, ...]:
    """Where this rank's piece of DTensor ``t`` starts in the whole tensor, per dimension."""
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(int(o) for o in offset)


def counts_here(t: Any) -> bool:
    """Whether this rank's piece of ``t`` is counted in sums over ranks.

    Ranks that hold copies of the same piece (a Replicate placement on some mesh dimension) count it
    once: only the first rank along each replicated mesh dimension does.
    """
    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh: it holds nothing
        return False
    return all(c == 0 for c, p in zip(coordinate, t.placements) if not isinstance(p, Shard))


def flat_global_index(t: Any, local_flat: torch.Tensor) -> torch.Tensor:
    """Flat indices in the whole tensor of the entries at ``local_flat`` in this rank's piece of ``t``."""
    piece_shape = tuple(t.to_local().shape)
    offset = global_offset(t)
    index = torch.zeros_like(local_flat)
    rest = local_flat
    for dim in reversed(range(len(piece_shape))):
        coordinate = rest % piece_shape[dim] + offset[dim]
        rest = rest // piece_shape[dim]
        index += coordinate * math.prod(t.shape[dim + 1 :])
    return index


__all__ = [
    "check_placements",
    "counts_here",
    "flat_global_index",
    "from_local",
    "gathered",
    "gathered_from",
    "global_offset",
    "is_dtensor",
    "local",
    "local_part",
    "placed_like",
    "refuse_sharded",
    "same_layout",
    "whole",
]


def refuse_sharded(model: torch.nn.Module, what: str) -> None:
    """Raise before anything changes if ``model`` holds sharded (DTensor) parameters: ``what`` runs the
    model to trace or calibrate it, which needs whole parameters."""
    for name, param in model.named_parameters():
        if is_dtensor(param):
            raise PruningTypeError(
                f"{what} runs the model on whole tensors, but {name} is a sharded DTensor "
                f"{tuple(param.shape)} placed as {tuple(getattr(param, 'placements', ()))}. "
                f"Run {what} on the model "
                "before sharding it (every rank alike, or under masksparse.data_parallel() with calibration "
                "data), then fully_shard it and call masksparse.distributed.shard_masks(model); "
                "prune.global_unstructured and the prune.* functions work on sharded parameters directly"
            )
