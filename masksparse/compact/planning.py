"""Plan a compaction: which units the masks make dead, and every change removing them makes.

:func:`~masksparse.compact.plan_compaction` traces the masked model and decides, unit by unit, what the
masks make dead (its output is zero everywhere, or nothing reads it). A unit that still emits a constant
(a masked Linear row emits its bias) is folded into the consumer's bias where that is exact (a Linear, or
a 1x1 convolution without padding) and kept otherwise. The result is a frozen
:class:`~masksparse.compact.plan.Plan`; nothing is changed (:mod:`masksparse.compact.apply` carries it
out)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from torch import nn

from masksparse._errors import CompactionError
from masksparse.compact import modules as _modules  # noqa: F401  (registers the slicer for nn.MultiheadAttention)
from masksparse.compact._inexact import (
    keep_groups_even,
    normalisation_attributes,
    normalisation_changes,
    width_attributes,
)
from masksparse.compact.plan import AttributeUpdate, BiasFold, HeadChange, KeptUnits, Plan, TensorCut
from masksparse.compact.slicers import slicer_for
from masksparse.graph import Graph, trace
from masksparse.graph.heads import head_attribute, head_swap, shrunk_splits
from masksparse.graph.inexact import check_allow_inexact, inexact_units
from masksparse.importance import shape_of

__all__ = ["plan_compaction"]


class KeepUnits(Exception):
    """Raised inside planning: these units must stay, since ``module`` cannot follow their removal
    (``entries``: (units, module, reason)). :func:`_plan` keeps them and plans again."""

    def __init__(self, entries: list[tuple[set[int], str, str]]) -> None:
        super().__init__(entries)
        self.entries = entries


# What a compaction keeps so far: (unit labels, why), extended as planning and verification find more.
Kept = list[tuple[frozenset[int], KeptUnits]]


def _removed_units(
    graph: Graph, allow_inexact: bool = False, keep: frozenset[int] = frozenset()
) -> np.ndarray:
    """Per slot: is its unit removed? Only units owning a parameter or buffer count: removing the
    rest would change nothing in the model. With ``allow_inexact``, units that only a normalisation
    blocks may go too. ``keep``: units to keep whatever the masks say."""
    n = graph.n_slots
    bad = np.zeros(n, dtype=bool)
    inexact = inexact_units(graph) if allow_inexact else {}
    bad[[u for u in graph.fixed if u not in inexact]] = True
    bad[list(graph.live)] = True
    bad[list(keep)] = True
    owns = np.zeros(n, dtype=bool)
    for v in graph.trace.values:
        if v.source is not None:
            for d in range(v.ndim):
                owns[graph.labels[graph.slots(v, d)]] = True
    removable = owns & ~bad
    _keep_one(graph, removable)
    by_node: dict[int, set[int]] = {}
    for u, node in graph.unknown.items():
        if removable[u]:
            by_node.setdefault(node.index, set()).add(u)
    if by_node:
        entries = []
        for index, units in by_node.items():
            node = graph.trace.nodes[index]
            entries.append(
                (
                    units,
                    node.module,
                    f"{node.op} reads them and has no rule (masksparse cannot tell what removing them does "
                    f"there; masksparse.graph.register_rule({node.op.overloadpacket}) would)",
                )
            )
        raise KeepUnits(entries)
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


def _attributes(model: nn.Module, graph: Graph, cuts: list[TensorCut]) -> list[AttributeUpdate]:
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
        try:
            changes = slicer_for(module)(module, shapes)
        except Exception as exc:  # a layer that cannot take its new shape keeps its units instead
            units = cut_units(graph, cuts, path.__eq__)
            raise KeepUnits([(units, path, _why(exc))]) from exc
        for name, new in changes.items():
            old = getattr(module, name)
            if old != new:
                updates.append(AttributeUpdate(path, name, old, new))
    return updates


def _head_attributes(
    model: nn.Module, graph: Graph, removed: np.ndarray
) -> tuple[list[AttributeUpdate], list[HeadChange]]:
    """For every attention module that loses heads: the attributes holding their number (and their
    total width), and the change in the number of heads."""
    updates: dict[tuple[str, str], AttributeUpdate] = {}
    heads: dict[tuple[str, int, int], HeadChange] = {}
    for split in shrunk_splits(graph, removed):
        assert split.slots is not None  # shrunk_splits sets them
        units = set(np.unique(graph.labels[split.slots[removed[split.slots]]]).tolist())
        try:
            name = head_attribute(model.get_submodule(split.module), split)
        except CompactionError as exc:
            raise KeepUnits([(units, split.module, str(exc))]) from exc
        module = model.get_submodule(split.module)
        heads.setdefault(
            (split.module, split.size, split.kept), HeadChange(split.module, split.size, split.kept)
        )
        width = [
            AttributeUpdate(split.module, k, split.size * split.inner, split.kept * split.inner)
            for k in _HEADS_WIDTH
            if type(getattr(module, k, None)) is int and getattr(module, k) == split.size * split.inner
        ]
        held = [] if name is None else [AttributeUpdate(split.module, name, split.size, split.kept)]
        swap = head_swap(type(module))
        if swap is not None and type(module) is not swap.compact:
            # the class that holds fewer heads, for a module owning no tensor to cut (separate q/k/v)
            held.append(AttributeUpdate(split.module, "__class__", type(module), swap.compact))
        for update in [*held, *width]:
            prior = updates.setdefault((split.module, update.name), update)
            if prior != update:
                why = (
                    f"it splits {prior.old} and {update.old} out of two tensors, keeping {prior.new} and "
                    f"{update.new}: {update.name} cannot hold both"
                )
                raise KeepUnits([(units, split.module, why)])
    return list(updates.values()), list(heads.values())


# Attributes that attention classes (Hugging Face's among them) keep for heads x head size and use in
# forward (``view(..., self.all_head_size)``, timm's ``attn_dim``): they follow the heads that are cut.
# A name that may mean the model's width (``embed_dim``, ``hidden_size``) is left alone.
_HEADS_WIDTH = ("all_head_size", "inner_dim", "attn_dim")


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
    """What :func:`~masksparse.compact` would do to ``model``, as a printable
    :class:`~masksparse.compact.plan.Plan`; changes nothing.

    With ``allow_inexact=True`` the plan also removes masked units that a normalisation (LayerNorm,
    GroupNorm, ``nn.RMSNorm``) reduces over; ``plan.normalisations`` lists those normalisations and
    ``print(plan)`` says over how many units each will normalise (see :func:`compact`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse.compact import plan_compaction
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


def _plan(model: nn.Module, graph: Graph, allow_inexact: bool = False, kept: Kept | None = None) -> Plan:
    """The plan, keeping the units in ``kept`` and every unit a module turns out unable to lose (an op
    without a rule reads it, a slicer or an attention module refuses its new size): those join
    ``kept`` (extended in place) with the reason, and planning starts again without them."""
    kept = [] if kept is None else kept
    while True:
        keep = frozenset().union(*(units for units, _ in kept))
        try:
            return _plan_once(model, graph, allow_inexact, keep, tuple(why for _, why in kept))
        except KeepUnits as found:
            fresh = [(units - keep, module, reason) for units, module, reason in found.entries]
            if not any(units for units, _, _ in fresh):  # nothing new to keep: a bug, not the model's
                raise CompactionError(
                    f"compaction cannot keep what it must: {found.entries[0][2]}"
                ) from found
            kept += [(frozenset(u), KeptUnits(m, r, len(u))) for u, m, r in fresh if u]


def _plan_once(
    model: nn.Module, graph: Graph, allow_inexact: bool, keep: frozenset[int], kept: tuple[KeptUnits, ...]
) -> Plan:
    removed = _removed_units(graph, allow_inexact, keep)
    if allow_inexact:
        keep_groups_even(graph, removed)
    cuts = _cuts(graph, removed)
    folds = _folds(model, graph, removed, cuts)
    head_attributes, heads = _head_attributes(model, graph, removed)
    # a module with a head swap and tensors of its own is swapped by its slicer too: once
    attributes = list(dict.fromkeys(_attributes(model, graph, cuts) + head_attributes))
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
    return Plan(
        tuple(cuts),
        tuple(folds),
        tuple(attributes),
        before,
        after,
        activations,
        tuple(changes),
        kept=kept,
        heads=tuple(heads),
    )


def cut_units(graph: Graph, cuts: Iterable[TensorCut], where: Callable[[str], bool]) -> set[int]:
    """The units the ``cuts`` of the modules ``where`` accepts (by path) remove."""
    leaves = {(path, name): v for path, name, v in _leaves(graph)}
    units: set[int] = set()
    for c in cuts:
        v = leaves.get((c.module, c.tensor))
        if v is None or not where(c.module):
            continue  # a bias a fold creates
        gone = np.setdiff1d(np.arange(c.size), np.asarray(c.keep, dtype=np.int64))
        units.update(np.unique(graph.labels[graph.slots(v, c.dim, gone)]).tolist())
    return units


def _why(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CompactionError) else f"{type(exc).__name__}: {exc}"


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
