"""Structured pruning across layers: score whole groups, write torch-style masks on every member.

:func:`prune_channels` traces the model (:func:`masksparse.graph.trace`), scores the units of every
prunable group with a criterion from :mod:`masksparse.importance`, and masks the chosen units on every
parameter that owns a slice of them: the producing layer's weight rows and bias, the BatchNorm affine
parameters, the consumers' input columns, both sides of a residual add. The masked model then computes
exactly what :func:`masksparse.compact` will make of it.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from masksparse._errors import KeptUnitsWarning, PruningTypeError, PruningValueError
from masksparse._feed import Forward, LossFn, batches
from masksparse._macs import count_uses
from masksparse.criteria import refitting
from masksparse.criteria.attribution import DATA_CRITERIA, Shapley, gather
from masksparse.distributed.tensors import is_dtensor
from masksparse.distributed.units import broadcast_scores, slices_masked
from masksparse.graph import Graph, Group, trace
from masksparse.graph.heads import fixed_heads
from masksparse.graph.inexact import check_allow_inexact, inexact_units
from masksparse.graph.record import Node
from masksparse.graph.rules import any_nonzero
from masksparse.importance import (
    Criterion,
    criterion,
    is_parameter,
    per_unit,
    reduce_slices,
    shape_of,
    stored_of,
    tensor_of,
    unit_indices,
)
from masksparse.prune.functional import narrow

__all__ = ["compacted_size", "prunable_units", "prune_channels"]


@dataclass
class _Candidate:
    group: Group
    amount: float | int
    dead: torch.Tensor  # (size,) bool: already masked on every parameter member
    scores: torch.Tensor | None = None


def _path_of(model: nn.Module, layer: nn.Module | str, what: str) -> str:
    if isinstance(layer, str):
        try:
            model.get_submodule(layer)
        except AttributeError as exc:
            raise PruningValueError(f"{what}: the model has no submodule {layer!r}") from exc
        return layer
    for path, m in model.named_modules():
        if m is layer:
            return path
    raise PruningValueError(f"{what}: {type(layer).__name__} is not a submodule of the model")


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _check_amount(amount: Any, what: str) -> float | int:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise PruningTypeError(f"{what} must be a float in [0, 1] or a non-negative int, got {amount!r}")
    if isinstance(amount, float) and not 0.0 <= amount <= 1.0:
        raise PruningValueError(f"{what} must be in [0, 1] when a float, got {amount}")
    if isinstance(amount, int) and amount < 0:
        raise PruningValueError(f"{what} must be non-negative when an int, got {amount}")
    return amount


def _producers(group: Group) -> set[str]:
    """Modules whose outputs the group's units are (a member along dim 0: weight rows, bias, affine)."""
    return {m.module for m in group.members if m.dim == 0}


def _group_amount(group: Group, default: float | int, amounts: dict[str, float | int]) -> float | int:
    producers = _producers(group)
    found = {prefix: a for prefix, a in amounts.items() if any(_under(p, prefix) for p in producers)}
    if len(set(found.values())) > 1:
        modules = ", ".join(sorted({m.module for m in group.members}))
        raise PruningValueError(
            f"amounts gives different amounts {found} to modules that prune together (group of "
            f"{group.size} units with {modules}); give them one amount"
        )
    return next(iter(found.values()), default)


def _dead_units(model: nn.Module, graph: Graph, group: Group) -> torch.Tensor:
    alive = torch.zeros(group.size, dtype=torch.bool)
    for m in group.members:
        if not is_parameter(model, m):
            continue
        t = tensor_of(model.get_submodule(m.module), m.tensor)
        if t is None:
            continue
        leaf = graph.leaves.get((m.module, m.tensor))
        if is_dtensor(t):  # non-zeros counted per slice on each rank's piece, summed over ranks
            nonzero = reduce_slices(t, m.dim, 0)
        elif leaf is not None and leaf.tensor is not None and leaf.shape == tuple(t.shape) and m.dim < 2:
            # the trace read this tensor: its zero slices are those the analysis found (or finds) there
            nonzero = torch.from_numpy(~graph.states.zero(leaf, m.dim))
        else:
            rest = tuple(d for d in range(t.ndim) if d != m.dim)
            nonzero = torch.from_numpy(any_nonzero(t, rest))
        alive |= per_unit(m, nonzero.double(), group.size) > 0
    return ~alive


def _output_units(graph: Graph, ignored: list[str]) -> set[int]:
    """The units the outputs of the ignored modules (and of every module inside them) carry: as in
    Torch-Pruning, an ignored layer keeps its outputs, and its inputs follow the layers producing them."""
    units: set[int] = set()
    for path, v in graph.trace.module_outputs.items():
        if any(_under(path, p) for p in ignored):
            for d in range(v.ndim):
                units.update(np.unique(graph.labels[graph.slots(v, d)]).tolist())
    return units


def _candidates(
    model: nn.Module,
    graph: Graph,
    amount: float | int,
    amounts: dict[str, float | int],
    ignored: list[str],
    untouched: list[str],
    allow_inexact: bool = False,
) -> list[_Candidate]:
    found = []
    heads = fixed_heads(model, graph)
    # units only a normalisation blocks count as free when the user accepts the change it makes
    inexact = inexact_units(graph) if allow_inexact else {}
    kept_outputs = _output_units(graph, ignored)
    skipped: list[tuple[Group, Node]] = []
    for group in graph.groups:
        if any(_under(m.module, p) for m in group.members for p in untouched):
            continue
        if kept_outputs.intersection(group.units):
            continue
        if not any(is_parameter(model, m) for m in group.members):
            continue
        unknown = [graph.unknown[u] for u in group.units if u in graph.unknown and u not in graph.fixed]
        if unknown:
            skipped.append((group, unknown[0]))
            continue
        prunable = group.prunable or (
            bool(inexact)
            and all(u in inexact or (u not in graph.fixed and u not in graph.unknown) for u in group.units)
        )
        if prunable and not any(u in heads for u in group.units):
            found.append(
                _Candidate(group, _group_amount(group, amount, amounts), _dead_units(model, graph, group))
            )
    if skipped:
        _warn_skipped(skipped)
    return found


def prunable_units(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignored_layers: Iterable[nn.Module | str] = (),
    untouched_layers: Iterable[nn.Module | str] = (),
    allow_inexact: bool = False,
) -> tuple[int, int]:
    """``(units, dead)``: how many units the groups :func:`prune_channels` would prune hold, and how
    many of them are dead now (masked or all zero): the count :class:`masksparse.GradualPruner`
    schedules against.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse.structured import prunable_units, prune_channels
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(3, 4)
        >>> prunable_units(model, x), prunable_units(prune_channels(model, x, 0.5), x)
        ((8, 0), (8, 4))
    """
    cands = _quiet_candidates(model, example_inputs, ignored_layers, untouched_layers, allow_inexact)
    return sum(c.group.size for c in cands), sum(int(c.dead.sum()) for c in cands)


def _quiet_candidates(
    model: nn.Module,
    example_inputs: Any,
    ignored_layers: Iterable[nn.Module | str],
    untouched_layers: Iterable[nn.Module | str],
    allow_inexact: bool,
) -> list[_Candidate]:
    """The groups prune_channels would prune, as they are now, without its warnings (it says them)."""
    ignored = [_path_of(model, layer, "ignored_layers") for layer in ignored_layers]
    untouched = [_path_of(model, layer, "untouched_layers") for layer in untouched_layers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KeptUnitsWarning)
        return _candidates(model, trace(model, example_inputs), 0.0, {}, ignored, untouched, allow_inexact)


def _warn_skipped(skipped: list[tuple[Group, Node]], limit: int = 3) -> None:
    """Groups an operation without a rule touches are left whole; say which, once."""
    shown = "; ".join(
        f"{g.size} units of {g.members[0].module}.{g.members[0].tensor} ({node.op} in module "
        f"{node.module or '<model>'!r})"
        for g, node in skipped[:limit]
    )
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    warnings.warn(
        KeptUnitsWarning(
            f"prune_channels left {len(skipped)} group(s) whole that operations without a rule read, and "
            f"pruned the rest: {shown}{more}. masksparse cannot tell what pruning them does there; a rule "
            f"(masksparse.graph.register_rule) would let them go."
        ),
        stacklevel=3,
    )


def _data_criterion(
    importance: Any, data: Any, has_loss: bool, reconstruct: bool
) -> tuple[Any, bool | str, bool] | None:
    """(score, reads inputs, reads gradients) for a data-driven importance, or None for the rest;
    "reads inputs" is ``"hessian"`` when ``X^T X`` is needed too."""
    if isinstance(importance, str) and importance in DATA_CRITERIA:
        if data is None:
            raise PruningValueError(f"importance={importance!r} is computed from data: pass data=[batches]")
        return DATA_CRITERIA[importance]
    if isinstance(importance, Shapley):  # scores on the loss alone: no statistics or gradients to gather
        if data is None:
            raise PruningValueError("Shapley values are computed from data: pass data=[batches]")
        return importance, False, False
    if callable(importance) and not isinstance(importance, str) and _arity(importance) >= 3:
        if data is None:
            raise PruningValueError(
                "an importance callable taking (group, model, attribution) needs calibration data: pass data="
            )
        return importance, True, has_loss  # gradients when there is a loss to take them of
    if (
        data is not None
        and not reconstruct
        and isinstance(importance, str)
        and importance in ("l1", "l2", "bn_scale", "random")
    ):
        raise PruningValueError(
            f"importance={importance!r} reads weights only and ignores data; use one of "
            f"{', '.join(sorted(DATA_CRITERIA))} or drop data="
        )
    return None


def _arity(fn: Any) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _checked(scores: Any, group: Group) -> torch.Tensor:
    out = torch.as_tensor(scores, dtype=torch.float64).detach().flatten().cpu()
    if out.numel() != group.size:
        raise PruningValueError(
            f"the importance returned {out.numel()} scores for a group of {group.size} units (first member "
            f"{group.members[0].module}.{group.members[0].tensor}); it must return one score per unit"
        )
    return out


def _target(amount: float | int, size: int) -> int:
    return round(amount * size) if isinstance(amount, float) else amount


def _cap(size: int, round_to: int | None) -> int:
    """At most this many units of a group of ``size`` may be pruned: a layer is never emptied."""
    return max(0, size - max(1, round_to or 1))


def _rounded(c: _Candidate, n_dead: int, round_to: int | None) -> int:
    """Units to leave dead so that the kept count is a multiple of ``round_to`` (rounding kept up)."""
    if not round_to:
        return n_dead
    kept = c.group.size - n_dead
    kept = min(c.group.size, math.ceil(kept / round_to) * round_to)
    return max(int(c.dead.sum()), c.group.size - kept)


def _select_local(c: _Candidate, round_to: int | None) -> torch.Tensor:
    size = c.group.size
    n_dead = min(
        max(_target(c.amount, size), int(c.dead.sum())), max(_cap(size, round_to), int(c.dead.sum()))
    )
    n_dead = _rounded(c, n_dead, round_to)
    return _lowest(c, n_dead - int(c.dead.sum()))


def _lowest(c: _Candidate, n: int) -> torch.Tensor:
    """The ``n`` lowest-scoring units that are still alive (ties broken by position)."""
    if n <= 0 or c.scores is None:
        return torch.zeros(0, dtype=torch.long)
    alive = torch.nonzero(~c.dead).flatten()
    order = torch.argsort(c.scores[alive], stable=True)
    return alive[order[:n]]


def _select_global(cands: list[_Candidate], amount: float | int, round_to: int | None) -> list[torch.Tensor]:
    total = sum(c.group.size for c in cands)
    target = _target(amount, total) if isinstance(amount, float) else amount
    already = sum(int(c.dead.sum()) for c in cands)
    pool = [
        (float(c.scores[u]), k, int(u))
        for k, c in enumerate(cands)
        if c.scores is not None
        for u in torch.nonzero(~c.dead).flatten()
    ]
    pool.sort()
    chosen: list[list[int]] = [[] for _ in cands]
    budget = target - already
    for _, k, u in pool:
        if budget <= 0:
            break
        c = cands[k]
        if int(c.dead.sum()) + len(chosen[k]) < _cap(c.group.size, round_to):
            chosen[k].append(u)
            budget -= 1
    result = []
    for c, picked in zip(cands, chosen):
        n_dead = _rounded(c, int(c.dead.sum()) + len(picked), round_to)
        result.append(torch.tensor(picked[: max(0, n_dead - int(c.dead.sum()))], dtype=torch.long))
    return result


def _write_masks(model: nn.Module, selections: list[tuple[Group, torch.Tensor]]) -> None:
    for (path, name), mask in _masks_for(model, selections).items():
        # Narrowed in place on later rounds: one bool mask per tensor however often this runs.
        narrow(model.get_submodule(path), name, mask)


def _masks_for(
    model: nn.Module, selections: list[tuple[Group, torch.Tensor]]
) -> dict[tuple[str, str], torch.Tensor]:
    """The bool mask of every parameter tensor the selected units own a slice of."""
    masks: dict[tuple[str, str], torch.Tensor] = {}
    for group, units in selections:
        if len(units) == 0:
            continue
        chosen = torch.zeros(group.size, dtype=torch.bool)
        chosen[units] = True
        for m in group.members:
            if not is_parameter(model, m):
                continue
            flat, unit = unit_indices(m)
            removed = flat[chosen[unit]]
            ref = stored_of(model.get_submodule(m.module), m.tensor)
            assert ref is not None  # a parameter member (is_parameter above)
            if is_dtensor(ref):  # each rank builds its own piece of the mask
                piece = slices_masked(ref, m.dim, removed)
                key = (m.module, m.tensor)
                masks[key] = piece if key not in masks else masks[key] & piece
                continue
            mask = masks.setdefault((m.module, m.tensor), torch.ones(ref.shape, dtype=torch.bool))
            mask.index_fill_(m.dim, removed, False)
    return masks


def _select(
    cands: list[_Candidate], own: list[_Candidate], amount: float | int, round_to: int | None
) -> list[tuple[Group, torch.Tensor]]:
    shared = [c for c in cands if c not in own]
    selections = [(c.group, _select_local(c, round_to)) for c in own]
    if shared:
        selections += list(zip((c.group for c in shared), _select_global(shared, amount, round_to)))
    return selections


@dataclass
class _Cost:
    """What a budget counts: ``per_entry(module path, tensor name)`` for one entry of a tensor, and the
    model's total now."""

    name: str  # the budget's argument, for messages
    total: int
    per_entry: Callable[[str, str], int]


def _cost(model: nn.Module, example_inputs: Any, measure: str) -> _Cost:
    if measure == "params":
        return _Cost("target_params", sum(p.numel() for p in model.parameters()), lambda path, name: 1)
    uses = count_uses(model, example_inputs)
    total = 0
    for path, n in uses.items():
        shape = shape_of(model.get_submodule(path), "weight")
        total += n * (math.prod(shape) if shape is not None else 0)
    if total == 0:
        raise PruningValueError(
            f"target_macs: {type(model).__name__} runs no Linear or Conv layer on the example inputs, so it "
            "has no MACs to budget"
        )
    return _Cost("target_macs", total, lambda path, name: uses.get(path, 0) if name == "weight" else 0)


def _left(
    model: nn.Module, cands: list[_Candidate], selections: list[tuple[Group, torch.Tensor]], cost: _Cost
) -> int:
    """What the budget counts once the selected and the already dead units go, as compaction removes them."""
    chosen = {id(g): units for g, units in selections}
    none = torch.zeros(0, dtype=torch.long)
    everything = [
        (c.group, torch.cat([chosen.get(id(c.group), none), torch.nonzero(c.dead).flatten()]).unique())
        for c in cands
    ]
    removed = 0
    for (path, name), mask in _masks_for(model, everything).items():
        per_entry = cost.per_entry(path, name)
        if per_entry:
            removed += per_entry * int((~mask).sum())
    return cost.total - removed


def _meet(
    model: nn.Module,
    cands: list[_Candidate],
    own: list[_Candidate],
    free: list[_Candidate],
    target: float,
    round_to: int | None,
    cost: _Cost,
) -> float:
    """The smallest amount (bisected to a unit) whose selection leaves at most ``target`` of what
    ``cost`` counts (``own`` are ranked alone, the rest globally); raises PruningValueError before
    anything changes when no amount does."""

    def left(a: float) -> float:
        for c in free:  # the groups ranked alone without an amount of their own
            c.amount = a
        return _left(model, cands, _select(cands, own, a, round_to), cost) / cost.total

    least = left(1.0)
    if least > target:
        what = "parameters" if cost.name == "target_params" else "MACs of its Linear and Conv layers"
        raise PruningValueError(
            f"{cost.name}={target} cannot be met: pruning every prunable unit still leaves {least:.3f} of "
            f"the {what} (groups that cannot be removed exactly, ignored layers and embeddings stay)"
        )
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        if left(mid) <= target:
            high = mid
        else:
            low = mid
    left(high)
    return high


def compacted_size(
    model: nn.Module,
    example_inputs: Any,
    measure: str = "params",
    *,
    ignored_layers: Iterable[nn.Module | str] = (),
    untouched_layers: Iterable[nn.Module | str] = (),
    allow_inexact: bool = False,
) -> tuple[int, int]:
    """``(now, compacted)``: the model's parameters (``measure="params"``) or the MACs of its Linear and
    Conv layers on ``example_inputs`` (``"macs"``, counted as :func:`masksparse.report` counts them),
    now and once :func:`masksparse.compact` removes the units that are dead now (masked or all zero) in
    the groups :func:`prune_channels` prunes: the figures ``target_params`` and ``target_macs`` budget.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse.structured import compacted_size, prune_channels
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(3, 4)
        >>> compacted_size(prune_channels(model, x, 0.5), x), compacted_size(model, x, "macs")
        ((58, 30), (144, 72))
    """
    if measure not in ("params", "macs"):
        raise PruningValueError(f"compacted_size: measure must be 'params' or 'macs', got {measure!r}")
    cands = _quiet_candidates(model, example_inputs, ignored_layers, untouched_layers, allow_inexact)
    cost = _cost(model, example_inputs, measure)
    return cost.total, _left(model, cands, [], cost)


def _sharded_parameter(model: nn.Module) -> tuple[str, torch.Tensor] | None:
    """The first sharded (DTensor) parameter of ``model`` with its name; None when there is none."""
    return next(((n, p) for n, p in model.named_parameters() if is_dtensor(p)), None)


def _check_sharded(found: tuple[str, torch.Tensor], budget: str, data: bool, reconstruct: bool) -> None:
    """What prune_channels cannot do yet on a sharded model, refused before anything changes."""
    name, param = found
    asked = [
        what
        for what, on in (
            (budget, budget != "amount"),
            ("a data-driven importance", data),
            ("reconstruct=True", reconstruct),
        )
        if on
    ]
    if asked:
        raise PruningTypeError(
            f"prune_channels on a sharded model ({name} is a DTensor {tuple(param.shape)} placed as "
            f"{tuple(getattr(param, 'placements', ()))}) takes an amount with a weight criterion (l1, l2, "
            f"bn_scale, random or fn(group, model)), not {' or '.join(asked)}; run that on the model before "
            "sharding it"
        )


def prune_channels(
    model: nn.Module,
    example_inputs: Any,
    amount: float | int | None = None,
    *,
    target_params: float | None = None,
    target_macs: float | None = None,
    importance: str | Criterion = "l1",
    global_ranking: bool = False,
    amounts: Mapping[nn.Module | str, float | int] | None = None,
    ignored_layers: Iterable[nn.Module | str] = (),
    untouched_layers: Iterable[nn.Module | str] = (),
    round_to: int | None = None,
    allow_inexact: bool = False,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    forward: Forward | None = None,
    reconstruct: bool = False,
) -> nn.Module:
    """Mask the least important channels of every prunable group, on every tensor that owns them.

    By default a group that no compaction can remove exactly is left alone: the channels a LayerNorm,
    GroupNorm or ``nn.RMSNorm`` normalises over (a transformer's hidden width) among them, since
    removing one changes the statistics over the rest. ``allow_inexact=True`` prunes those too (the
    normalisation's own weight and bias entries are masked like every other member);
    :func:`masksparse.compact` with ``allow_inexact=True`` then removes them and states how much the
    outputs change. Groups blocked for any other reason stay untouched either way.

    A model sharded with FSDP2 (DTensor parameters) is pruned where it lies when every rank calls this
    alike: the channels' scores are summed over the ranks' pieces, rank 0's are used by all, and each
    rank writes only its piece of every mask (see the docs page on pruning sharded models). There,
    ``amount`` with a weight criterion is supported; the budgets, data-driven importances and
    ``reconstruct`` raise a PruningTypeError before anything changes.

    Args:
        model: the model; pruned in place (torch-style ``<name>_orig`` / ``<name>_mask``).
        example_inputs: what to trace the model with: a tensor, a tuple of positional arguments, or a
            mapping of keyword arguments (a dict or ``BatchEncoding``, called as ``model(**inputs)``).
        amount: per group, the fraction (float in [0, 1]) or number (int) of units to leave pruned,
            counted against the original size: calling again with the same amount changes nothing,
            with a larger one prunes up to it. A group always keeps at least one unit.
        target_params: instead of ``amount``, the fraction of the model's parameters to keep (counted
            as compaction removes them: every slice the pruned units own, dead units included): the
            smallest amount that meets it is found, to within one unit per group. With
            ``global_ranking`` the units are ranked across groups as usual, so layers shrink unevenly.
        target_macs: like ``target_params``, the fraction of the multiply-accumulates of the model's
            Linear and Conv layers on ``example_inputs`` to keep (as :func:`masksparse.report` counts
            them; attention's matmuls are not layers and are not counted). See :func:`compacted_size`
            for both figures.
        importance: ``"l1"``, ``"l2"``, ``"bn_scale"``, ``"random"`` or ``fn(group, model) -> scores``
            (see :mod:`masksparse.importance`); with ``data``, also ``"activation"``, ``"apoz"``,
            ``"taylor"``, ``"hessian"``, ``"sensitivity"``, ``"shapley"`` (see
            :mod:`masksparse.criteria.attribution`) or
            ``fn(group, model, attribution) -> scores`` (the attribution holds the consumers' input
            statistics, and gradients when a ``loss_fn`` or ``forward`` is given). The lowest scores are
            pruned.
        global_ranking: rank units across all groups at once (``amount`` then applies to the total);
            groups with their own entry in ``amounts`` are still ranked on their own.
        amounts: a module (or its path) -> amount for the groups of its output units (the groups
            where it owns weight rows, bias or affine entries); a container module applies to every
            module inside it.
        ignored_layers: modules (or paths) whose outputs are kept, as in Torch-Pruning: the units that
            the module, or any module inside it, outputs are never pruned (a classifier keeps its
            classes), while its inputs shrink with the layers that produce them.
        untouched_layers: modules (or paths) whose tensors are never shrunk at all, inputs included:
            every group with a member in them is skipped (so the layers feeding them keep their width).
        round_to: keep a multiple of this many units per group (rounding the kept count up).
        allow_inexact: also prune groups blocked only because a normalisation reduces over them
            (see above). A GroupNorm needs a multiple of its groups: compaction keeps back as few
            masked channels as that takes.
        data: calibration batches (a DataLoader, a list) for the data-driven importances; a mapping
            batch is called ``model(**batch)``, a tuple positionally.
        loss_fn: ``loss_fn(model(inputs), target)`` on ``(inputs, target)`` batches, for ``"taylor"``
            (a Hugging Face model fed batches with labels needs none: its ``.loss`` is used).
        forward: ``forward(model, batch)`` feeds a batch (and returns the loss, for ``"taylor"``).
        reconstruct: refit every ``nn.Linear`` that reads pruned units by least squares on ``data``
            (its kept input columns and its bias take over what the removed ones contributed; see
            :mod:`masksparse.criteria.refitting`). The model still compacts exactly.

    Returns:
        ``model``.

    Warns:
        KeptUnitsWarning: operations without a rule read some groups; those are left whole (the
            warning names them) and the rest is pruned.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse.structured import prune_channels
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> _ = prune_channels(model, torch.randn(1, 3, 8, 8), 0.5)
        >>> int((model[0].weight_mask.flatten(1).any(1)).sum()), int(model[3].weight_mask.any(0).sum())
        (4, 4)

        The hidden width a LayerNorm normalises over is pruned only on request:

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> _ = prune_channels(model, torch.randn(3, 4), 0.5, allow_inexact=True)
        >>> ln_kept = model[1].weight_mask
        >>> torch.equal(ln_kept, model[0].bias_mask), int(ln_kept.sum())  # the same 4 of 8 units
        (True, 4)
    """
    asked = (("amount", amount), ("target_params", target_params), ("target_macs", target_macs))
    given = [k for k, v in asked if v is not None]
    if len(given) != 1:
        raise PruningValueError(
            "prune_channels takes one of amount, target_params or target_macs"
            + (f", got {' and '.join(given)}" if given else ", got none")
        )
    budget = target_params if target_params is not None else target_macs
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1
    ):
        raise PruningValueError(f"{given[0]} must be a fraction in (0, 1), got {budget!r}")
    amount = _check_amount(0.0 if amount is None else amount, "amount")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise PruningValueError(f"round_to must be a positive int or None, got {round_to!r}")
    check_allow_inexact(allow_inexact)
    if reconstruct and data is None:
        raise PruningValueError("reconstruct=True refits layers on calibration data: pass data=[batches]")
    if data is not None:
        data = list(batches(data, "data"))
    data_score = _data_criterion(importance, data, loss_fn is not None or forward is not None, reconstruct)
    sharded = _sharded_parameter(model)
    if sharded is not None:
        _check_sharded(sharded, given[0], data_score is not None, reconstruct)
    score = criterion(importance) if data_score is None else None
    per_module = {
        _path_of(model, k, "amounts"): _check_amount(v, f"amounts[{k!r}]") for k, v in (amounts or {}).items()
    }
    ignored = [_path_of(model, layer, "ignored_layers") for layer in ignored_layers]
    untouched = [_path_of(model, layer, "untouched_layers") for layer in untouched_layers]
    graph = trace(model, example_inputs)
    cands = _candidates(model, graph, amount, per_module, ignored, untouched, allow_inexact)
    if data_score is not None:
        fn, inputs, grads = data_score
        assert data is not None  # _data_criterion asks for data
        att = gather(
            model,
            data,
            [c.group for c in cands],
            inputs=inputs,
            grads=grads,
            loss_fn=loss_fn,
            forward=forward,
        )
        for c in cands:
            c.scores = _checked(fn(c.group, model, att), c.group)
    else:
        assert score is not None
        for c in cands:
            c.scores = score(c.group, model)
    if sharded is not None:  # every rank ranks rank 0's scores (random ones, a user's function)
        scored = [(c, c.scores) for c in cands if c.scores is not None]
        for (c, _), same in zip(scored, broadcast_scores([s for _, s in scored], sharded[1])):
            c.scores = same
    own = [
        c
        for c in cands
        if not global_ranking or any(_under(m, p) for m in _producers(c.group) for p in per_module)
    ]
    if budget is not None:
        cost = _cost(model, example_inputs, "params" if target_params is not None else "macs")
        free = [c for c in cands if not any(_under(m, p) for m in _producers(c.group) for p in per_module)]
        amount = _meet(model, cands, own, [c for c in own if c in free], budget, round_to, cost)
    selections = _select(cands, own, amount, round_to)
    if reconstruct:
        assert data is not None  # checked on entry
        chosen = [g for g, units in selections if len(units)]
        paths = refitting.consumers(model, chosen)
        stats = refitting.statistics(model, data, paths, loss_fn, forward)
        before = refitting.snapshot(model, paths)
    _write_masks(model, selections)
    if reconstruct:
        refitting.reconstruct(model, stats, before)
    return model
