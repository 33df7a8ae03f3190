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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.utils._pytree as pytree
from tabulate import tabulate
from torch import nn

from masksparse import prune
from masksparse._errors import CompactionError, MaskSparseError, PruningValueError
from masksparse.graph import Graph, trace
from masksparse.graph.heads import head_attribute, shrunk_splits
from masksparse.graph.record import _eval_mode, as_args
from masksparse.importance import shape_of

__all__ = [
    "AttributeUpdate",
    "BiasFold",
    "Plan",
    "TensorCut",
    "compact",
    "plan_compaction",
    "register_slicer",
]

RTOL = 1e-4

Slicer = Callable[[nn.Module, Mapping[str, tuple[int, ...]]], dict[str, Any]]
_SLICERS: dict[type, Slicer] = {}


def register_slicer(*types: type) -> Callable[[Slicer], Slicer]:
    """Register how modules of ``types`` update their attributes once their tensors are sliced.

    The function receives the module (before slicing) and the new shape of each of its tensors by
    name, and returns the attributes to set. Lookup follows the class's MRO, so a subclass of
    ``nn.Conv2d`` uses the convolution slicer; plain ``nn.Module`` updates nothing.

    Example:
        >>> from torch import nn
        >>> from masksparse.compaction import register_slicer
        >>> class Scale(nn.Module):
        ...     def __init__(self, n):
        ...         super().__init__()
        ...         self.n = n
        ...         self.scale = nn.Parameter(torch.ones(n))
        >>> @register_slicer(Scale)
        ... def _scale(module, shapes):
        ...     return {"n": shapes["scale"][0]}
    """

    def decorate(fn: Slicer) -> Slicer:
        for t in types:
            _SLICERS[t] = fn
        return fn

    return decorate


def _slicer_for(module: nn.Module) -> Slicer:
    for cls in type(module).__mro__:
        if cls in _SLICERS:
            return _SLICERS[cls]
    raise CompactionError(f"no slicer registered for {type(module).__name__}")  # nn.Module has one


@register_slicer(nn.Module)
def _plain(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    return {}


@register_slicer(nn.modules.conv._ConvNd)
def _conv(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    conv = cast(nn.modules.conv._ConvNd, module)
    w, groups = shapes["weight"], conv.groups
    if conv.transposed:
        in_ch, out_ch = w[0], w[1] * groups
    else:
        out_ch, in_ch = w[0], w[1] * groups
    if groups > 1 and groups == conv.in_channels and not conv.transposed:
        # depthwise: one group per input channel, each with the same number of outputs
        groups = out_ch // (conv.out_channels // conv.in_channels)
        in_ch = groups
    return {"in_channels": in_ch, "out_channels": out_ch, "groups": groups}


@register_slicer(nn.Linear)
def _linear(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    return {"in_features": shapes["weight"][1], "out_features": shapes["weight"][0]}


@register_slicer(nn.modules.batchnorm._NormBase)
def _norm(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    shape = shapes.get("weight") or shapes.get("running_mean")
    return {"num_features": shape[0]} if shape else {}


@register_slicer(nn.Embedding)
def _embedding(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    return {"num_embeddings": shapes["weight"][0], "embedding_dim": shapes["weight"][1]}


@register_slicer(nn.PReLU)
def _prelu(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    return {"num_parameters": shapes["weight"][0]}


@dataclass(frozen=True)
class TensorCut:
    """Keep only ``keep`` (of ``size``) along ``dim`` of ``module.tensor``."""

    module: str
    tensor: str
    dim: int
    size: int
    keep: tuple[int, ...]


@dataclass(frozen=True)
class BiasFold:
    """``module.bias += module.weight[:, columns] @ constants`` (summed over a 1x1 kernel)."""

    module: str
    columns: tuple[int, ...]
    constants: tuple[float, ...]
    creates_bias: bool = False


@dataclass(frozen=True)
class AttributeUpdate:
    """``module.name`` changes from ``old`` to ``new``."""

    module: str
    name: str
    old: Any
    new: Any


@dataclass(frozen=True)
class Plan:
    """What compaction will do; building it changes nothing. ``print(plan)`` shows it."""

    cuts: tuple[TensorCut, ...]
    folds: tuple[BiasFold, ...]
    attributes: tuple[AttributeUpdate, ...]
    params_before: int
    params_after: int
    # for diagnosing a failed verification: module path -> kept indices per dim of its output
    activations: tuple[tuple[str, tuple[tuple[int, ...] | None, ...]], ...] = field(repr=False, default=())

    def __str__(self) -> str:
        ratio = self.params_after / max(self.params_before, 1)
        lines = [f"Compaction plan: {self.params_before:,} -> {self.params_after:,} parameters ({ratio:.1%})"]
        if not self.cuts:
            lines.append("nothing is dead: the model stays as it is")
        rows = [
            (c.module or "<model>", c.tensor, c.dim, f"{len(c.keep)} of {c.size}", _short(c.keep))
            for c in self.cuts
        ]
        if rows:
            lines.append(tabulate(rows, headers=["module", "tensor", "dim", "kept", "indices kept"]))
        for f in self.folds:
            new = " (new bias)" if f.creates_bias else ""
            lines.append(
                f"fold: {f.module}.bias{new} += {f.module}.weight[:, {_short(f.columns)}] @ constants"
            )
        for a in self.attributes:
            lines.append(f"set: {a.module}.{a.name} = {a.new!r} (was {a.old!r})")
        return "\n".join(lines)


def _short(indices: tuple[int, ...], limit: int = 8) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"


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
        for name, new in _slicer_for(module)(module, shapes).items():
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
    """What :func:`compact` would do to ``model``, as a printable :class:`Plan`; changes nothing.

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


# ------------------------------------------------------------------------------------------ verify


def _run(
    model: nn.Module, args: tuple[Any, ...], record: bool
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``model``; with ``record``, also every module's first output tensor, in execution order."""
    seen: dict[str, torch.Tensor] = {}
    stack: list[str] = []
    handles = []
    for path, m in model.named_modules() if record else ():
        handles.append(m.register_forward_pre_hook(lambda mod, a, p=path: stack.append(p)))
        handles.append(m.register_forward_hook(lambda mod, a, out, p=path: _keep(seen, stack, p, out)))
    try:
        with _eval_mode(model), torch.no_grad():
            out = model(*args)
    except Exception as exc:
        where = stack[-1] if stack else ""
        raise CompactionError(f"the compacted model fails in module {where or '<model>'!r}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)], seen


def _keep(seen: dict[str, torch.Tensor], stack: list[str], path: str, out: Any) -> None:
    stack.pop()
    first = next((t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)), None)
    if first is not None and path not in seen:
        seen[path] = first.detach().clone()


def relative_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    """``max |ref - got| / max |ref|`` (inf when the shapes differ).

    Example:
        >>> round(relative_error(torch.tensor([2.0, -4.0]), torch.tensor([2.0, -3.9])), 6)
        0.025
    """
    if ref.shape != got.shape:
        return math.inf
    if ref.numel() == 0:
        return 0.0
    ref64, got64 = ref.detach().double(), got.detach().double()
    return float((ref64 - got64).abs().max() / ref64.abs().max().clamp_min(1e-30))


def verify(
    masked: nn.Module,
    compacted: nn.Module,
    example_inputs: Any,
    plan: Plan,
    rtol: float = RTOL,
    reference: list[torch.Tensor] | None = None,
) -> float:
    """The largest relative error between the two models' outputs; raises past ``rtol``, naming the
    first module whose output (the part compaction keeps) diverges. ``reference``: the masked model's
    outputs on ``example_inputs`` when already known."""
    args = as_args(example_inputs)
    ref = reference if reference is not None else _run(masked, args, record=False)[0]
    try:
        got, _ = _run(compacted, args, record=False)
    except MaskSparseError:
        _run(compacted, args, record=True)  # again, to name the module that fails
        raise
    errors = [relative_error(a, b) for a, b in zip(ref, got)] if len(ref) == len(got) else [math.inf]
    worst = max(errors, default=0.0)
    if worst <= rtol:
        return worst
    _, ref_modules = _run(masked, args, record=True)
    _, got_modules = _run(compacted, args, record=True)
    keeps = dict(plan.activations)
    for path, r in ref_modules.items():
        if path not in got_modules:
            continue
        for dim, keep in enumerate(keeps.get(path, ())):
            if keep is not None and dim < r.ndim:
                r = r.index_select(dim, torch.tensor(keep, dtype=torch.long))
        err = relative_error(r, got_modules[path])
        if err > rtol:
            raise CompactionError(
                f"compaction changed what the model computes (max relative error {worst:.3g} > {rtol:g}); "
                f"the first module whose output diverges is {path or '<model>'!r} (relative error {err:.3g})"
            )
    raise CompactionError(
        f"compaction changed the model's output (max relative error {worst:.3g} > {rtol:g})"
    )


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
