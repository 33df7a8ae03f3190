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

from masksparse import prune
from masksparse._errors import CompactionError, PruningValueError
from masksparse.graph import Graph, trace
from masksparse.graph.heads import head_attribute, shrunk_splits
from masksparse.importance import shape_of
from masksparse.plan import AttributeUpdate, BiasFold, Plan, TensorCut
from masksparse.slicers import register_slicer, slicer_for
from masksparse.verification import relative_error, verify

__all__ = [
    "AttributeUpdate",
    "BiasFold",
    "Plan",
    "TensorCut",
    "compact",
    "plan_compaction",
    "register_slicer",
    "relative_error",
    "verify",
]


# -------------------------------------------------------------------------------------------- plan


def _removed_units(graph: Graph) -> np.ndarray:
    """Per slot: is its unit removed? Only units owning a parameter or buffer count: removing the
    rest would change nothing in the model."""
    n = graph.n_slots
    bad = np.zeros(n, dtype=bool)
    bad[list(graph.fixed)] = True
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


def _attributes(model: nn.Module, cuts: list[TensorCut]) -> list[AttributeUpdate]:
    updates = []
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


def plan_compaction(model: nn.Module, example_inputs: Any) -> Plan:
    """What :func:`compact` would do to ``model``, as a printable :class:`~masksparse.plan.Plan`; changes
    nothing.

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
    graph = trace(model, example_inputs)
    return _plan(model, graph)


def _plan(model: nn.Module, graph: Graph) -> Plan:
    removed = _removed_units(graph)
    cuts = _cuts(graph, removed)
    folds = _folds(model, graph, removed, cuts)
    attributes = _attributes(model, cuts) + _head_attributes(model, graph, removed)
    before = _count(model)
    after = before + _param_change(model, cuts)
    for f in folds:
        weight = shape_of(model.get_submodule(f.module), "weight")
        if f.creates_bias and weight and not any(c.module == f.module and c.tensor == "bias" for c in cuts):
            after += weight[0]  # a new bias, not cut
    return Plan(tuple(cuts), tuple(folds), tuple(attributes), before, after, _activations(graph, removed))


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


def _apply(model: nn.Module, plan: Plan, optimizer: torch.optim.Optimizer | None) -> None:
    prune.remove_all(model)
    for fold in plan.folds:
        _fold(model, fold, optimizer)
    by_tensor: dict[tuple[str, str], list[TensorCut]] = {}
    for cut in plan.cuts:
        by_tensor.setdefault((cut.module, cut.tensor), []).append(cut)
    for (path, name), cuts in by_tensor.items():
        _slice(model.get_submodule(path), name, cuts, optimizer)
    for a in plan.attributes:
        setattr(model.get_submodule(a.module), a.name, a.new)


def _fold(model: nn.Module, fold: BiasFold, optimizer: torch.optim.Optimizer | None) -> None:
    module = cast(nn.Linear, model.get_submodule(fold.module))  # a Linear or a 1x1 conv
    weight = module.weight.detach().double()
    block = weight[:, torch.tensor(fold.columns, dtype=torch.long)]
    if block.ndim > 2:
        block = block.flatten(2).sum(-1)  # a 1x1 kernel
    delta = block @ torch.tensor(fold.constants, dtype=torch.float64)
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=module.weight.dtype))
        if optimizer is not None:
            group = next(g for g in optimizer.param_groups if any(p is module.weight for p in g["params"]))
            group["params"].append(module.bias)
    with torch.no_grad():
        module.bias.add_(delta.to(module.bias.dtype))


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


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy, also of torch-pruned modules whose cached ``weight`` still carries autograd history
    (deepcopy refuses non-leaf tensors): those are copied detached, the user's model is not touched."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def compact(
    model: nn.Module,
    example_inputs: Any,
    *,
    inplace: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """A model of plain torch layers with every unit the masks make dead removed, verified.

    The plan (see :func:`plan_compaction`) is applied to a deep copy, which must reproduce the masked
    model's outputs on ``example_inputs`` within a relative error of 1e-4 (``max |diff| / max |ref|``);
    otherwise :class:`~masksparse.CompactionError` names the first diverging module and ``model`` is
    left as it was. The result has no masks (they are made permanent) and updated attributes
    (``out_channels``, ``in_features``, ``num_features``, ...). With ``inplace=True`` the same plan is
    then applied to ``model`` itself, slicing the same Parameter objects; pass the ``optimizer`` to
    slice its state (SGD momentum, Adam moments) as well.

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
    """
    if optimizer is not None and not inplace:
        raise PruningValueError(
            "an optimizer can only be sliced along with the model it trains: pass inplace=True "
            "(compact(model, inputs, inplace=True, optimizer=opt))"
        )
    graph = trace(model, example_inputs)
    plan = _plan(model, graph)
    candidate = _copy(model)
    _apply(candidate, plan, None)
    verify(model, candidate, example_inputs, plan, reference=graph.trace.output_tensors)
    if not inplace:
        return candidate
    _apply(model, plan, optimizer)
    return model
