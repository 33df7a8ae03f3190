"""Planning and stating an inexact compaction (``allow_inexact=True``): which normalisations reduce over
fewer units, the attributes that follow them, and the warning that states the measured deviation."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch
from torch import nn

from masksparse._errors import InexactCompactionWarning
from masksparse.compact.plan import AttributeUpdate, NormalisationChange, Plan
from masksparse.graph import Graph
from masksparse.graph.inexact import normalisations

__all__ = [
    "inexact_hint",
    "normalisation_attributes",
    "normalisation_changes",
    "state_deviation",
    "width_attributes",
]


def normalisation_changes(graph: Graph, removed: np.ndarray) -> list[NormalisationChange]:
    """The normalisations that will reduce over fewer units, each with its position among the
    eval-mode calls of its operation (how verification finds it again; -1: training mode only)."""
    calls: dict[int, int] = {}
    seen: dict[object, int] = {}
    for node in graph.trace.nodes:
        if not node.training:
            calls[node.index] = seen[node.op] = seen.get(node.op, -1) + 1
    changes = []
    for node, v, d in normalisations(graph):
        gone = removed[graph.slots(v, d)]
        if gone.any():
            keep = tuple(np.flatnonzero(~gone).tolist())
            changes.append(
                NormalisationChange(node.module, str(node.op), d, v.shape[d], keep, calls.get(node.index, -1))
            )
    return changes


def normalisation_attributes(
    model: nn.Module, graph: Graph, changes: list[NormalisationChange], known: list[AttributeUpdate]
) -> list[AttributeUpdate]:
    """``normalized_shape`` (``nn.LayerNorm``, ``nn.RMSNorm``) or ``num_channels`` (``nn.GroupNorm``) of
    the norm modules whose normalisation loses units, affine or not (a functional call in another
    module has nothing to update)."""
    updates: dict[tuple[str, str], AttributeUpdate] = {(a.module, a.name): a for a in known}
    found = []
    for node, v, d in normalisations(graph):
        kept = {c.dim: c.kept for c in changes if (c.module, c.op, c.dim) == (node.module, str(node.op), d)}
        if d not in kept:
            continue
        module = model.get_submodule(node.module)
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            k = len(module.normalized_shape)
            new = tuple(kept.get(j, v.shape[j]) for j in range(v.ndim - k, v.ndim))
            update = AttributeUpdate(node.module, "normalized_shape", tuple(module.normalized_shape), new)
        elif isinstance(module, nn.GroupNorm) and d == 1:
            update = AttributeUpdate(node.module, "num_channels", module.num_channels, kept[d])
        else:
            continue
        if (update.module, update.name) not in updates:
            updates[(update.module, update.name)] = update
            found.append(update)
    return found


def keep_groups_even(graph: Graph, removed: np.ndarray) -> None:
    """Keep removed units back (the first ones) until every group norm keeps a multiple of its number
    of groups, which it needs to stay a group norm. Keeping a masked unit is always allowed."""
    changed = True
    while changed:
        changed = False
        for node, v, d in normalisations(graph):
            if node.op.overloadpacket is not torch.ops.aten.native_group_norm:
                continue
            slots = graph.slots(v, d)
            gone = np.flatnonzero(removed[slots])
            extra = -(v.shape[d] - len(gone)) % node.args[6]
            for unit in np.unique(graph.labels[slots[gone[:extra]]]).tolist():
                removed[graph.labels == unit] = False
                changed = True


# operations whose sizes a model's code writes down: reshapes, and a functional layer norm's shape
_SIZED = (
    torch.ops.aten.view,
    torch.ops.aten._unsafe_view,
    torch.ops.aten.reshape,
    torch.ops.aten.native_layer_norm,
)
_WIDTH_WORDS = ("dim", "hidden", "embed", "width", "channel", "feature")


def width_attributes(
    model: nn.Module, graph: Graph, removed: np.ndarray, known: list[AttributeUpdate]
) -> list[AttributeUpdate]:
    """Int attributes a module's own code reads a removed width from (``VisionTransformer`` does
    ``x.reshape(n, self.hidden_dim, -1)``, a hand-written norm ``F.layer_norm(x, (self.dim,))``): an
    attribute of the module that ran the operation, equal to the old size, narrowed to names that
    speak of a width when several match. Only inexact plans need this (they shrink a model's main
    width); verification catches a wrong pick."""
    updates = {(a.module, a.name) for a in known}
    found = []
    for node in graph.trace.nodes:
        if node.op.overloadpacket not in _SIZED:
            continue
        module = model.get_submodule(node.module)
        for v in node.outputs:
            for d in range(v.ndim):
                old, kept = v.shape[d], int((~removed[graph.slots(v, d)]).sum())
                if kept == old:
                    continue
                names = [k for k, a in vars(module).items() if type(a) is int and a == old and k[0] != "_"]
                if len(names) > 1:
                    names = [k for k in names if any(w in k for w in _WIDTH_WORDS)]
                if len(names) != 1 or (node.module, names[0]) in updates:
                    continue
                updates.add((node.module, names[0]))
                found.append(AttributeUpdate(node.module, names[0], old, kept))
    return found


def inexact_hint(plan: Plan) -> str:
    widths = [f"{size} -> {kept}" for size, kept in sorted({(n.size, n.kept) for n in plan.normalisations})]
    return (
        f"allow_inexact=True shrank the widths that {len(plan.normalisations)} normalisation(s) reduce over "
        f"({', '.join(widths)}); a module whose code derives a size from such a width (C // num_heads, "
        f"say) cannot follow: list it in prune_channels' untouched_layers to keep the width it reads, or "
        f"compact with allow_inexact=False to keep every normalised width"
    )


def state_deviation(plan: Plan, measured: float) -> None:
    """Tell the user how much the opted-in normalisation changes move the outputs."""
    plan = dataclasses.replace(plan, deviation=measured)
    changes = "; ".join(
        f"{n.module or '<model>'} normalises over {n.kept} of {n.size} channels"
        for n in plan.normalisations[:3]
    )
    more = f" (and {len(plan.normalisations) - 3} more)" if len(plan.normalisations) > 3 else ""
    message = (
        f"compact(allow_inexact=True) changed what the model computes: max relative error {measured:.3g} "
        f"of the outputs on the example inputs, from {len(plan.normalisations)} normalisation(s) that now "
        f"reduce over fewer units: {changes}{more}"
    )
    warnings.warn(InexactCompactionWarning(message, measured, plan), stacklevel=3)
