"""Turn structured masks into a smaller model that computes the same thing: plan, apply, verify.

:func:`plan_compaction` traces the masked model and decides, unit by unit, what the masks make dead
(its output is zero everywhere, or nothing reads it). A unit that still emits a constant (a masked
Linear row emits its bias) is folded into the consumer's bias where that is exact (a Linear, or a 1x1
convolution without padding) and kept otherwise. :func:`compact` applies the plan to a copy, checks
that the copy computes what the masked model computes, and only then returns it (or applies the plan
in place, slicing the same Parameter objects and their optimizer state).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from masksparse import modules as _modules  # noqa: F401  (registers the slicer for nn.MultiheadAttention)
from masksparse import prune
from masksparse._errors import CompactionError, PruningValueError
from masksparse._inexact import (
    inexact_hint,
    keep_groups_even,
    normalisation_attributes,
    normalisation_changes,
    state_deviation,
    width_attributes,
)
from masksparse.graph import Graph, trace
from masksparse.graph.heads import head_attribute, shrunk_splits
from masksparse.graph.inexact import check_allow_inexact, inexact_units
from masksparse.importance import shape_of, tensor_of
from masksparse.plan import AttributeUpdate, BiasFold, NormalisationChange, Plan, TensorCut
from masksparse.slicers import register_slicer, slicer_for
from masksparse.verification import deviation, relative_error, verify

__all__ = [
    "AttributeUpdate",
    "BiasFold",
    "NormalisationChange",
    "Plan",
    "TensorCut",
    "compact",
    "plan_compaction",
    "register_slicer",
    "relative_error",
    "verify",
]


# -------------------------------------------------------------------------------------------- plan


def _removed_units(graph: Graph, allow_inexact: bool = False) -> np.ndarray:
    """Per slot: is its unit removed? Only units owning a parameter or buffer count: removing the
    rest would change nothing in the model. With ``allow_inexact``, units that only a normalisation
    blocks may go too."""
    n = graph.n_slots
    bad = np.zeros(n, dtype=bool)
    inexact = inexact_units(graph) if allow_inexact else {}
    bad[[u for u in graph.fixed if u not in inexact]] = True
    bad[list(graph.live)] = True
    owns = np.zeros(n, dtype=bool)
    for v in graph.trace.values:
        if v.source is not None:
            for d in range(v.ndim):
                owns[graph.labels[graph.slots(v, d)]] = True
    removable = owns & ~bad
    _keep_one(graph, removable)
    unknown = [u for u in graph.unknown if removable[u]]
    if unknown:
        node = graph.unknown[unknown[0]]
        raise CompactionError(
            f"the masks make {len(unknown)} unit(s) dead that flow through {node.op} in module "
            f"{node.module or '<model>'!r}, which has no rule: masksparse cannot tell what removing them "
            f"does there. Register one with masksparse.graph.register_rule({node.op.overloadpacket}), or "
            f"unmask those channels."
        )
    return removable[graph.labels]


def _keep_one(graph: Graph, removable: np.ndarray) -> None:
    """Never empty a dimension (a layer with no channels left is no layer): keep its first unit.
    Keeping a dead unit is always exact; it is then computed, not folded."""
    changed = True
    while changed:
        changed = False
        for _, _, v in _leaves(graph):
            for d in range(v.ndim):
                units = graph.labels[graph.slots(v, d)]
                if len(units) and removable[units].all():
                    removable[units[0]] = False
                    changed = True


def _leaves(graph: Graph) -> Iterator[tuple[str, str, Any]]:
    seen = set()
    for v in graph.trace.values:
        if v.source is None or v.source[1].endswith("_mask") or v.source in seen:
            continue
        seen.add(v.source)
        path, name = v.source
        yield path, name[: -len("_orig")] if name.endswith("_orig") else name, v


def _cuts(graph: Graph, removed: np.ndarray) -> list[TensorCut]:
    cuts = []
    for path, name, v in _leaves(graph):
        for d in range(v.ndim):
            gone = removed[graph.slots(v, d)]
            if gone.any():
                keep = tuple(np.flatnonzero(~gone).tolist())
                cuts.append(TensorCut(path, name, d, v.shape[d], keep))
    return cuts


def _folds(model: nn.Module, graph: Graph, removed: np.ndarray, cuts: list[TensorCut]) -> list[BiasFold]:
    by_module: dict[str, dict[int, float]] = {}
    removed_units = set(np.unique(graph.labels[removed]).tolist())
    for unit, path, column, constant in graph.folds:
        if unit in removed_units and constant != 0:
            by_module.setdefault(path, {})[column] = constant
    folds = []
    for path, columns in sorted(by_module.items()):
        creates = shape_of(model.get_submodule(path), "bias") is None
        if creates:
            out_cut = next(
                (c for c in cuts if c.module == path and c.tensor == "weight" and c.dim == 0), None
            )
            if out_cut is not None:
                cuts.append(TensorCut(path, "bias", 0, out_cut.size, out_cut.keep))
        cols = sorted(columns)
        folds.append(BiasFold(path, tuple(cols), tuple(columns[c] for c in cols), creates))
    return folds


def _shared(model: nn.Module, cuts: list[TensorCut]) -> list[TensorCut]:
    """The cuts again under every other module that holds the same tensor object (tied weights): the
    tensor is cut once, but each holder's attributes must follow it."""
    holders: dict[int, list[tuple[str, str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and not name.endswith("_mask"):
                base = name[: -len("_orig")] if name.endswith("_orig") else name
                holders.setdefault(id(t), []).append((path, base))
    by_name = {key: group for group in holders.values() if len(group) > 1 for key in group}
    return [
        TensorCut(path, name, c.dim, c.size, c.keep)
        for c in cuts
        for path, name in by_name.get((c.module, c.tensor), ())
        if (path, name) != (c.module, c.tensor)
    ]


def _attributes(model: nn.Module, cuts: list[TensorCut]) -> list[AttributeUpdate]:
    updates = []
    cuts = cuts + _shared(model, cuts)
    for path in dict.fromkeys(c.module for c in cuts):
        module = model.get_submodule(path)
        shapes: dict[str, tuple[int, ...]] = {}
        for name in list(module._parameters) + list(module._buffers):
            base = name[: -len("_orig")] if name.endswith("_orig") else name
            shape = shape_of(module, base)
            if shape is not None and not name.endswith("_mask"):
                shapes[base] = shape
        for c in cuts:
            if c.module == path and c.tensor in shapes:
                new = list(shapes[c.tensor])
                new[c.dim] = len(c.keep)
                shapes[c.tensor] = tuple(new)
            elif c.module == path:  # a bias a fold creates
                shapes[c.tensor] = (len(c.keep),)
        for name, new in slicer_for(module)(module, shapes).items():
            old = getattr(module, name)
            if old != new:
                updates.append(AttributeUpdate(path, name, old, new))
    return updates


def _head_attributes(model: nn.Module, graph: Graph, removed: np.ndarray) -> list[AttributeUpdate]:
    """The attribute holding the number of heads, for every attention module that loses heads."""
    updates: dict[tuple[str, str], AttributeUpdate] = {}
    for split in shrunk_splits(graph, removed):
        name = head_attribute(model.get_submodule(split.module), split)
        update = AttributeUpdate(split.module, name, split.size, split.kept)
        prior = updates.setdefault((split.module, name), update)
        if prior != update:
            raise CompactionError(
                f"module {split.module or '<model>'!r} splits {prior.old} and {update.old} heads out of "
                f"two tensors, keeping {prior.new} and {update.new}: {name} cannot hold both"
            )
    return list(updates.values())


def _activations(
    graph: Graph, removed: np.ndarray
) -> tuple[tuple[str, tuple[tuple[int, ...] | None, ...]], ...]:
    out = []
    for path, v in graph.trace.module_outputs.items():
        keeps = []
        for d in range(v.ndim):
            gone = removed[graph.slots(v, d)]
            keeps.append(tuple(np.flatnonzero(~gone).tolist()) if gone.any() else None)
        out.append((path, tuple(keeps)))
    return tuple(out)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plan_compaction(model: nn.Module, example_inputs: Any, *, allow_inexact: bool = False) -> Plan:
    """What :func:`compact` would do to ``model``, as a printable :class:`~masksparse.plan.Plan`; changes
    nothing.

    With ``allow_inexact=True`` the plan also removes masked units that a normalisation (LayerNorm,
    GroupNorm, ``nn.RMSNorm``) reduces over; ``plan.normalisations`` lists those normalisations and
    ``print(plan)`` says over how many units each will normalise (see :func:`compact`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse.compaction import plan_compaction
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> _ = nn.init.constant_(model[0].bias, 0.5)
        >>> rows = torch.tensor([[True], [False], [True]]).expand(3, 4)  # mask row 1 of the first layer
        >>> _ = torch.nn.utils.prune.custom_from_mask(model[0], "weight", rows)
        >>> plan = plan_compaction(model, torch.randn(5, 4))
        >>> [(c.module, c.tensor, c.dim, c.keep) for c in plan.cuts]
        [('0', 'weight', 0, (0, 2)), ('0', 'bias', 0, (0, 2)), ('2', 'weight', 1, (0, 2))]
        >>> [f.module for f in plan.folds]  # the masked row still emits relu(bias[1])
        ['2']
    """
    check_allow_inexact(allow_inexact)
    graph = trace(model, example_inputs)
    return _plan(model, graph, allow_inexact)


def _plan(model: nn.Module, graph: Graph, allow_inexact: bool = False) -> Plan:
    removed = _removed_units(graph, allow_inexact)
    if allow_inexact:
        keep_groups_even(graph, removed)
    cuts = _cuts(graph, removed)
    folds = _folds(model, graph, removed, cuts)
    attributes = _attributes(model, cuts) + _head_attributes(model, graph, removed)
    changes = normalisation_changes(graph, removed) if allow_inexact else []
    if changes:
        attributes += normalisation_attributes(model, graph, changes, attributes)
        attributes += width_attributes(model, graph, removed, attributes)
    before = _count(model)
    after = before + _param_change(model, cuts)
    for f in folds:
        weight = shape_of(model.get_submodule(f.module), "weight")
        if f.creates_bias and weight and not any(c.module == f.module and c.tensor == "bias" for c in cuts):
            after += weight[0]  # a new bias, not cut
    activations = _activations(graph, removed)
    return Plan(tuple(cuts), tuple(folds), tuple(attributes), before, after, activations, tuple(changes))


def _param_change(model: nn.Module, cuts: list[TensorCut]) -> int:
    """How many parameters the cuts add (a created bias) or remove."""
    shapes: dict[tuple[str, str], list[int]] = {}
    change = 0
    for c in cuts:
        module = model.get_submodule(c.module)
        old = shape_of(module, c.tensor)
        if old is None:  # a bias a fold creates
            change += len(c.keep)
            continue
        if c.tensor not in module._parameters and c.tensor + "_orig" not in module._parameters:
            continue  # a buffer
        shape = shapes.setdefault((c.module, c.tensor), list(old))
        shape[c.dim] = len(c.keep)
    for (path, name), shape in shapes.items():
        old = shape_of(model.get_submodule(path), name)
        assert old is not None
        change += math.prod(shape) - math.prod(old)
    return change


# ------------------------------------------------------------------------------------------- apply


def _apply(
    model: nn.Module, plan: Plan, optimizer: torch.optim.Optimizer | None, source: nn.Module | None = None
) -> None:
    """Apply ``plan`` to ``model``. ``source``: the model ``model`` was copied from with the cuts made
    already (see :func:`_copy`); then nothing is sliced, and folds read ``source``'s uncut weights."""
    prune.remove_all(model)
    for fold in plan.folds:
        _fold(model, fold, optimizer, source, plan)
    if source is None:
        for (path, name), cuts in _by_tensor(plan).items():
            _slice(model.get_submodule(path), name, cuts, optimizer)
    for a in plan.attributes:
        setattr(model.get_submodule(a.module), a.name, a.new)


def _fold(
    model: nn.Module,
    fold: BiasFold,
    optimizer: torch.optim.Optimizer | None,
    source: nn.Module | None = None,
    plan: Plan | None = None,
) -> None:
    """Add ``fold``'s constants, through the consumer's weight columns, to its bias (created if missing).

    With ``source`` (the model ``model`` was copied from with ``plan``'s cuts made, see :func:`_copy`),
    the delta comes from ``source``'s uncut weight (the masked one, as ``prune.remove`` leaves it) and
    is cut like the bias."""
    module = cast(nn.Linear, model.get_submodule(fold.module))  # a Linear or a 1x1 conv
    if source is None:
        delta = _fold_delta(module.weight, fold)
    else:
        weight = tensor_of(source.get_submodule(fold.module), "weight")
        assert weight is not None and plan is not None
        delta = _fold_delta(weight, fold)
        for c in _by_tensor(plan).get((fold.module, "bias"), []):
            delta = delta.index_select(0, torch.tensor(c.keep, dtype=torch.long))
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(len(delta), dtype=module.weight.dtype))
        if optimizer is not None:
            group = next(g for g in optimizer.param_groups if any(p is module.weight for p in g["params"]))
            group["params"].append(module.bias)
    with torch.no_grad():
        module.bias.add_(delta.to(module.bias.dtype))


def _fold_delta(weight: torch.Tensor, fold: BiasFold) -> torch.Tensor:
    """What ``fold`` adds to the bias of the layer with this (uncut) weight, in float64."""
    block = weight.detach().double()[:, torch.tensor(fold.columns, dtype=torch.long)]
    if block.ndim > 2:
        block = block.flatten(2).sum(-1)  # a 1x1 kernel
    return block @ torch.tensor(fold.constants, dtype=torch.float64)


def _slice(
    module: nn.Module, name: str, cuts: list[TensorCut], optimizer: torch.optim.Optimizer | None
) -> None:
    """Slice a parameter in place (same object, its gradient and optimizer state too) or a buffer."""
    indices = [(c.dim, torch.tensor(c.keep, dtype=torch.long)) for c in cuts]
    param = module._parameters.get(name)
    if param is None:
        buf = module._buffers[name]
        assert buf is not None  # the plan only cuts tensors the trace saw
        for dim, index in indices:
            buf = buf.index_select(dim, index)
        module._buffers[name] = buf
        return
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    with torch.no_grad():
        for dim, index in indices:
            shape = param.shape
            for key, val in state.items():
                if isinstance(val, torch.Tensor) and val.shape == shape:
                    state[key] = val.index_select(dim, index)
            grad = None if param.grad is None else param.grad.index_select(dim, index)
            param.grad = None
            param.data = param.data.index_select(dim, index)
            param.grad = grad


def _copy(model: nn.Module, plan: Plan) -> tuple[nn.Module, bool]:
    """A deep copy of ``model`` (the user's model is not touched), and whether the plan's cuts are made.

    The cuts are made while copying: a tensor to cut (with its ``_orig`` and mask when pruned) is copied
    already cut, so no big tensor is copied whole only to be sliced (:func:`_apply` with ``source``
    does the rest). Not when one tensor is shared by two cut names: that one is sliced once, by
    :func:`_apply`. torch-pruned modules' cached ``weight``, which still carries autograd history
    (deepcopy refuses non-leaf tensors), is copied detached.
    """
    memo: dict[int, Any] = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    cut = _cut_tensors(model, plan)
    memo.update(cut or {})
    return copy.deepcopy(model, memo), cut is not None


def _by_tensor(plan: Plan) -> dict[tuple[str, str], list[TensorCut]]:
    by_tensor: dict[tuple[str, str], list[TensorCut]] = {}
    for c in plan.cuts:
        by_tensor.setdefault((c.module, c.tensor), []).append(c)
    return by_tensor


def _cut_tensors(model: nn.Module, plan: Plan) -> dict[int, torch.Tensor] | None:
    """id of every tensor the plan cuts (a pruned one's ``_orig`` and mask) -> its cut copy; None when
    one tensor is shared by two cut names (then it is copied whole and sliced once, by ``_apply``)."""
    cut: dict[int, torch.Tensor] = {}
    for (path, name), cuts in _by_tensor(plan).items():
        module = model.get_submodule(path)
        for key in (name, name + "_orig", name + "_mask"):
            t = module._parameters.get(key) if key in module._parameters else module._buffers.get(key)
            if t is None:
                continue  # a bias a fold creates; or the plain name of a pruned tensor
            if id(t) in cut:
                return None
            with torch.no_grad():
                small = t.detach()
                for c in cuts:
                    small = small.index_select(c.dim, torch.tensor(c.keep, dtype=torch.long))
            cut[id(t)] = type(t)(small, t.requires_grad) if isinstance(t, nn.Parameter) else small
    return cut


def compact(
    model: nn.Module,
    example_inputs: Any,
    *,
    inplace: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    allow_inexact: bool = False,
) -> nn.Module:
    """A model of plain torch layers with every unit the masks make dead removed, verified.

    The plan (see :func:`plan_compaction`) is applied to a deep copy, which must reproduce the masked
    model's outputs on ``example_inputs`` within a relative error of 1e-4 (``max |diff| / max |ref|``);
    otherwise :class:`~masksparse.CompactionError` names the first diverging module and ``model`` is
    left as it was. The result has no masks (they are made permanent) and updated attributes
    (``out_channels``, ``in_features``, ``num_features``, ...); an attention module that loses heads and
    whose torch or torchvision class cannot hold fewer becomes a subclass of it with the same parameters
    (:class:`~masksparse.modules.CompactMultiheadAttention`, :mod:`masksparse.torchvision_attention`).
    With ``inplace=True`` the same plan is
    then applied to ``model`` itself, slicing the same Parameter objects; pass the ``optimizer`` to
    slice its state (SGD momentum, Adam moments) as well.

    Masked units that a normalisation reduces over (a LayerNorm's normalised width, GroupNorm's or
    ``nn.RMSNorm``'s channels) are kept by default: removing them changes the statistics, so no
    compaction of them is exact. With ``allow_inexact=True`` they are removed (``normalized_shape`` and
    ``num_channels`` follow), and verification runs in two parts: the compacted model must reproduce,
    within 1e-4, the masked model run with those normalisations reducing over the kept units only (so
    any other change is still caught and raises); then the deviation from the plain masked model, the
    largest relative error of the outputs on ``example_inputs``, is measured and stated in an
    :class:`~masksparse.InexactCompactionWarning`, whose ``deviation`` and ``plan`` (with
    ``plan.deviation`` set) hold it for code.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse.compaction import compact
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> _ = nn.init.constant_(model[0].bias, 0.5)
        >>> rows = torch.tensor([[True], [False], [True]]).expand(3, 4)  # mask row 1 of the first layer
        >>> _ = torch.nn.utils.prune.custom_from_mask(model[0], "weight", rows)
        >>> compact(model, torch.randn(5, 4))
        Sequential(
          (0): Linear(in_features=4, out_features=2, bias=True)
          (1): ReLU()
          (2): Linear(in_features=2, out_features=2, bias=True)
        )

        Removing half the width a LayerNorm normalises over, on request, with the change measured:

        >>> import warnings
        >>> from masksparse import InexactCompactionWarning, prune_channels
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> x = torch.randn(16, 4)
        >>> _ = prune_channels(model, x, 0.5, allow_inexact=True)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     small = compact(model, x, allow_inexact=True)
        >>> small[1]
        LayerNorm((4,), eps=1e-05, elementwise_affine=True, bias=True)
        >>> warning = caught[0].message
        >>> isinstance(warning, InexactCompactionWarning), warning.deviation > 0
        (True, True)
    """
    check_allow_inexact(allow_inexact)
    if optimizer is not None and not inplace:
        raise PruningValueError(
            "an optimizer can only be sliced along with the model it trains: pass inplace=True "
            "(compact(model, inputs, inplace=True, optimizer=opt))"
        )
    graph = trace(model, example_inputs)
    plan = _plan(model, graph, allow_inexact)
    candidate, cut = _copy(model, plan)
    _apply(candidate, plan, None, source=model if cut else None)
    try:
        verify(model, candidate, example_inputs, plan, reference=graph.trace.output_tensors)
    except CompactionError as exc:
        if plan.exact or exc.__cause__ is None:  # only a model that fails to run gets the hint
            raise
        raise CompactionError(f"{exc}. {inexact_hint(plan)}") from exc
    if not plan.exact:
        state_deviation(plan, deviation(candidate, example_inputs, graph.trace.output_tensors))
    if not inplace:
        return candidate
    _apply(model, plan, optimizer)
    return model
