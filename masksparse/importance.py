"""Scoring criteria for structured pruning: one score per unit (channel) of a group; low goes first.

A criterion is ``fn(group, model) -> Tensor`` of shape ``(group.size,)``. The built-in ones read the
group's parameter slices as the model computes them (masks applied):

- ``"l1"`` / ``"l2"``: the L1 / L2 norm of each unit's slices, per member divided by that member's
  mean so that a 3x3 conv and a BatchNorm weigh alike, then averaged over members;
- ``"bn_scale"``: the mean ``|gamma|`` of the group's BatchNorm members (network slimming); a group
  without BatchNorm gets ``None`` and is left alone;
- ``"random"``: uniform noise from torch's global generator (seed it for repeatable runs).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain

import numpy as np
import torch
from torch import nn

from masksparse._errors import PruningTypeError, PruningValueError
from masksparse.distributed.tensors import is_dtensor
from masksparse.distributed.units import slice_sums
from masksparse.graph import Group, Member

__all__ = [
    "Criterion",
    "bn_scale",
    "criterion",
    "is_parameter",
    "magnitude",
    "per_unit",
    "random",
    "reduce_slices",
    "shape_of",
    "stored_of",
    "tensor_of",
    "unit_indices",
]

Criterion = Callable[[Group, nn.Module], "torch.Tensor | None"]


def tensor_of(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` as the model computes it: ``<name>_orig * <name>_mask`` when pruned.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> _ = torch.nn.utils.prune.custom_from_mask(lin, "weight", torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        >>> bool((tensor_of(lin, "weight") == lin.weight_orig * lin.weight_mask).all())
        True
    """
    orig, mask = module._parameters.get(name + "_orig"), module._buffers.get(name + "_mask")
    if orig is not None and mask is not None:
        return (orig * mask if mask.dtype == torch.bool else orig * mask.to(orig.dtype)).detach()
    t: torch.Tensor | None = module._parameters.get(name)
    if t is None:
        t = module._buffers.get(name)
    return None if t is None else t.detach()


def stored_of(module: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor ``module.<name>`` is stored as: ``<name>_orig`` when pruned, else the parameter or
    buffer itself (None when the module has neither)."""
    for t in (
        module._parameters.get(name + "_orig"),
        module._parameters.get(name),
        module._buffers.get(name),
    ):
        if t is not None:
            return t
    return None


def shape_of(module: nn.Module, name: str) -> tuple[int, ...] | None:
    """The shape of ``module.<name>`` (of ``<name>_orig`` when pruned), without computing it."""
    t = stored_of(module, name)
    return None if t is None else tuple(t.shape)


def is_parameter(model: nn.Module, member: Member) -> bool:
    """Whether a group member is a parameter (weights, biases, affine), not a buffer (running stats)."""
    module = model.get_submodule(member.module)
    return member.tensor in module._parameters or member.tensor + "_orig" in module._parameters


def unit_indices(member: Member) -> tuple[torch.Tensor, torch.Tensor]:
    """The member's indices laid end to end, and the unit each of them belongs to.

    Example:
        >>> from masksparse.graph import Member
        >>> flat, unit = unit_indices(Member("fc", "weight", 1, ((0, 4), (1, 5))))
        >>> flat.tolist(), unit.tolist()
        ([0, 4, 1, 5], [0, 0, 1, 1])
    """
    lengths = np.fromiter(map(len, member.indices), dtype=np.int64, count=len(member.indices))
    flat = np.fromiter(chain.from_iterable(member.indices), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(flat), torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths))


def per_unit(member: Member, per_index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum ``per_index`` (one number per index along the member's dim) over each unit's indices."""
    flat, units = unit_indices(member)
    return torch.zeros(size, dtype=torch.float64).index_add_(0, units, per_index[flat].double())


def reduce_slices(t: torch.Tensor, dim: int, p: int) -> torch.Tensor:
    """``sum |t|^p`` over every dim but ``dim`` (p = 0: the number of non-zeros), without copying.

    A sharded (DTensor) ``t`` is reduced piece by piece and the pieces' sums added over its ranks.
    """
    if is_dtensor(t):
        return slice_sums(t, dim, lambda piece: reduce_slices(piece, dim, p))
    rest = [d for d in range(t.ndim) if d != dim]
    x = (t != 0).to(torch.float32) if p == 0 else t.abs() if p == 1 else t.abs().pow(p)
    return (x.sum(rest) if rest else x).double()


def magnitude(group: Group, model: nn.Module, p: int = 1) -> torch.Tensor:
    """Mean over parameter members of each unit's Lp norm, divided by that member's mean norm."""
    total = torch.zeros(group.size, dtype=torch.float64)
    count = 0
    for m in group.members:
        t = tensor_of(model.get_submodule(m.module), m.tensor)
        if t is None or not is_parameter(model, m):
            continue
        norms = per_unit(m, reduce_slices(t, m.dim, p), group.size).pow(1.0 / p)
        mean = norms.mean()
        total += norms / mean if mean > 0 else norms
        count += 1
    return total / max(count, 1)


def bn_scale(group: Group, model: nn.Module) -> torch.Tensor | None:
    """Mean ``|gamma|`` of the group's BatchNorm members; None when it has none."""
    found = []
    for m in group.members:
        module = model.get_submodule(m.module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and m.tensor == "weight":
            t = tensor_of(module, "weight")
            if t is not None:
                found.append(per_unit(m, reduce_slices(t, m.dim, 1), group.size))
    return torch.stack(found).mean(0) if found else None


def random(group: Group, model: nn.Module) -> torch.Tensor:
    """Uniform noise (torch's global generator)."""
    return torch.rand(group.size, dtype=torch.float64)


_BUILTIN: dict[str, Criterion] = {
    "l1": lambda g, m: magnitude(g, m, 1),
    "l2": lambda g, m: magnitude(g, m, 2),
    "bn_scale": bn_scale,
    "random": random,
}


def criterion(importance: str | Criterion) -> Criterion:
    """The criterion named ``importance`` (``"l1"``, ``"l2"``, ``"bn_scale"``, ``"random"``) or the
    callable itself, checked to return one score per unit."""
    if isinstance(importance, str):
        if importance not in _BUILTIN:
            raise PruningValueError(
                f"importance must be one of {sorted(_BUILTIN)} or a callable, got {importance!r}"
            )
        return _BUILTIN[importance]
    if not callable(importance):
        raise PruningTypeError(f"importance must be a string or a callable, got {type(importance).__name__}")

    def checked(group: Group, model: nn.Module) -> torch.Tensor | None:
        scores = importance(group, model)
        if scores is None:
            return None
        scores = torch.as_tensor(scores, dtype=torch.float64).detach().flatten()
        if scores.numel() != group.size:
            raise PruningValueError(
                f"the importance callable returned {scores.numel()} scores for a group of {group.size} "
                f"units (first member {group.members[0].module}.{group.members[0].tensor}); "
                f"it must return one score per unit"
            )
        return scores

    return checked
