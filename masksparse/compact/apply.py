"""Carry out a compaction plan and check the result: the smaller model computes what the masked one did.

:func:`~masksparse.compact` plans (:func:`~masksparse.compact.plan_compaction`), applies the plan to a copy,
checks that the copy computes what the masked model computes, and only then returns it (or applies the
plan in place, slicing the same Parameter objects and their optimizer state).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, cast

import torch
from torch import nn

from masksparse import prune
from masksparse._errors import CompactionError, KeptUnitsWarning, PruningValueError
from masksparse.compact._inexact import inexact_hint, state_deviation
from masksparse.compact.fallback import describe, units_to_keep
from masksparse.compact.huggingface import apply_config, config_changes, config_mismatch
from masksparse.compact.plan import BiasFold, KeptUnits, Plan, TensorCut, record_plan
from masksparse.compact.planning import Kept, _plan
from masksparse.compact.verification import deviation, verify
from masksparse.distributed.tensors import refuse_sharded
from masksparse.graph import Graph, trace
from masksparse.graph.inexact import check_allow_inexact
from masksparse.importance import tensor_of

__all__ = ["compact"]


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
            delta = delta.index_select(0, torch.tensor(c.keep, dtype=torch.long, device=delta.device))
    if module.bias is None:
        module.bias = nn.Parameter(
            torch.zeros(len(delta), dtype=module.weight.dtype, device=module.weight.device)
        )
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
    return block @ torch.tensor(fold.constants, dtype=torch.float64, device=block.device)


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
            buf = _select(buf, dim, index)
        module._buffers[name] = buf
        return
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    with torch.no_grad():
        for dim, index in indices:
            shape = param.shape
            for key, val in state.items():
                if isinstance(val, torch.Tensor) and val.shape == shape:
                    state[key] = _select(val, dim, index)
            grad = None if param.grad is None else _select(param.grad, dim, index)
            param.grad = None
            _replace_data(param, _select(param.data, dim, index))
            param.grad = grad


def _replace_data(param: nn.Parameter, data: torch.Tensor) -> None:
    """Give ``param`` (the same Python object) the smaller ``data``.

    ``param.data = data`` alone would keep the parameter's gradient accumulator, which an autograd graph
    still alive from the last step (a training loop's ``loss`` variable) holds with the old shape, and
    the next backward would fail on it; swapping in a fresh tensor gives the next graph a new one. The
    class and the attributes stay. A parameter that cannot be swapped (one with weak references to it)
    gets the plain ``.data`` assignment.
    """
    fresh = nn.Parameter(data, requires_grad=param.requires_grad)
    try:
        if type(param) is not nn.Parameter:
            fresh.__class__ = type(param)
        fresh.__dict__.update(param.__dict__)
        torch.utils.swap_tensors(param, fresh)
    except (RuntimeError, TypeError):
        param.data = data


def _select(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(dim, index)``, the index moved to ``t``'s device; for a bool tensor (a mask)
    cut along a later dim, the same by ``gather``, which torch runs several times faster there (a
    3072 x 768 mask's columns: 0.4 ms against 3.8 ms on this project's CPU benchmark machine)."""
    index = index.to(t.device)
    if t.dtype != torch.bool or dim == 0 or t.ndim < 2:
        return t.index_select(dim, index)
    view = [1] * t.ndim
    view[dim] = -1
    shape = list(t.shape)
    shape[dim] = len(index)
    return torch.gather(t, dim, index.view(view).expand(shape))


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
                    small = _select(small, c.dim, torch.tensor(c.keep, dtype=torch.long))
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
    left as it was. ``example_inputs`` is a tensor, a tuple of positional arguments or a mapping of
    keyword arguments (``model(**inputs)``); every tensor of the outputs (in tuples, dicts, dataclasses
    or a Hugging Face ``ModelOutput``) is compared. The result has no masks (they are made permanent)
    and updated attributes (``out_channels``, ``in_features``, ``num_features``, ...); an attention
    module that loses heads and whose torch or torchvision class cannot hold fewer becomes a subclass of
    it with the same parameters (:class:`~masksparse.compact.modules.CompactMultiheadAttention`,
    :mod:`masksparse.compact.torchvision_attention`). With ``inplace=True`` the same plan is then
    applied to ``model`` itself, slicing the same Parameter objects; pass the ``optimizer`` to slice its
    state (SGD momentum, Adam moments) as well.

    The result carries the plan it was compacted with (:func:`~masksparse.compact.plan.compaction_plans`;
    compacting again adds the next), which :func:`~masksparse.save_compacted` writes down so that
    :func:`~masksparse.load_compacted` can rebuild it from a fresh model. A Hugging Face model's
    ``config`` gets the new sizes where one value describes every layer (``intermediate_size``,
    ``num_attention_heads``, ...; ``plan.config`` lists them, and the sizes left as they were, with the
    reason: see :mod:`masksparse.compact.huggingface`), so ``save_pretrained`` / ``from_pretrained``
    round-trip it.

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
        >>> from masksparse.compact import compact
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
    refuse_sharded(model, "compact")
    check_allow_inexact(allow_inexact)
    if optimizer is not None and not inplace:
        raise PruningValueError(
            "an optimizer can only be sliced along with the model it trains: pass inplace=True "
            "(compact(model, inputs, inplace=True, optimizer=opt))"
        )
    graph = trace(model, example_inputs)
    plan, candidate = _verified(model, graph, example_inputs, allow_inexact)
    if plan.kept:
        warnings.warn(KeptUnitsWarning(_kept_message(plan), plan), stacklevel=2)
    if not plan.exact:
        state_deviation(plan, deviation(candidate, example_inputs, graph.trace.output_tensors))
    changes = config_changes(model, candidate, plan) if plan.cuts else ()
    mismatch = config_mismatch(model, candidate, changes) if plan.cuts else ""
    plan = dataclasses.replace(plan, config=changes, config_mismatch=mismatch)
    result = candidate
    if inplace:
        _apply(model, plan, optimizer)
        result = model
    apply_config(result, plan.config)
    record_plan(result, plan)
    return result


def _verified(
    model: nn.Module, graph: Graph, example_inputs: Any, allow_inexact: bool
) -> tuple[Plan, nn.Module]:
    """The plan and the compacted copy that verification accepts: when the copy fails in a module, that
    module keeps its units (see :mod:`masksparse.compact.fallback`) and compaction plans again."""
    kept: Kept = []
    while True:
        plan = _plan(model, graph, allow_inexact, kept)
        candidate, cut = _copy(model, plan)
        _apply(candidate, plan, None, source=model if cut else None)
        try:
            verify(model, candidate, example_inputs, plan, reference=graph.trace.output_tensors)
            return plan, candidate
        except CompactionError as exc:
            units, where = units_to_keep(model, graph, plan, exc)
            units -= frozenset().union(*(u for u, _ in kept))
            if not units:
                if plan.exact or exc.__cause__ is None:  # only a model that fails to run gets the hint
                    raise
                raise CompactionError(f"{exc}. {inexact_hint(plan)}", exc.module, exc.ran) from exc
            kept.append((frozenset(units), KeptUnits(where, describe(exc), len(units))))


def _kept_message(plan: Plan, limit: int = 3) -> str:
    n = sum(k.units for k in plan.kept)
    shown = "; ".join(f"{k.module or '<model>'}: {k.reason}" for k in plan.kept[:limit])
    more = f"; and {len(plan.kept) - limit} more" if len(plan.kept) > limit else ""
    return (
        f"compaction kept {n} dead unit(s) that it could not remove exactly, and compacted the rest: "
        f"{shown}{more} (print(warning.plan) lists them)"
    )
