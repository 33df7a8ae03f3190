"""The functional interface: torch.nn.utils.prune's functions, plus ``remove_all`` and ``nm_structured``.

Each function prunes in place and returns the module, like torch's. Masks are stored as bool buffers
and ``module.<name>`` is computed from ``<name>_orig`` and ``<name>_mask`` whenever it is read.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, cast

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from masksparse._errors import MaskSparseError, PruningTypeError, PruningValueError
from masksparse.distributed.tensors import is_dtensor
from masksparse.prune import _base, _context, _reparam, _sharded
from masksparse.prune import methods as _m
from masksparse.prune.select import (
    MagnitudeScores,
    RandomScores,
    RandomStream,
    Scores,
    common_dtype,
    select_smallest,
)

Parameters = Iterable[tuple[nn.Module, str]]


def identity(module: nn.Module, name: str) -> nn.Module:
    """Set up the reparametrisation of ``module.<name>`` with an all-ones mask.

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.identity(torch.nn.Linear(3, 2), "bias")
        >>> sorted(dict(layer.named_buffers()))
        ['bias_mask']
    """
    _base.prune_with("prune.identity", _m.Identity, module, name)
    return module


def random_unstructured(module: nn.Module, name: str, amount: float) -> nn.Module:
    """Prune ``amount`` entries of ``module.<name>`` chosen at random (an int counts, a float is a fraction).

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.random_unstructured(torch.nn.Linear(4, 5), "weight", amount=0.25)
        >>> int((~layer.weight_mask).sum())
        5
    """
    _base.prune_with("prune.random_unstructured", _m.RandomUnstructured, module, name, amount)
    return module


def l1_unstructured(
    module: nn.Module, name: str, amount: float, importance_scores: torch.Tensor | None = None
) -> nn.Module:
    """Prune the ``amount`` entries of ``module.<name>`` with the smallest absolute value.

    ``importance_scores`` (same shape) rank the entries instead of the tensor itself.

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.l1_unstructured(torch.nn.Linear(4, 5), "weight", amount=0.5)
        >>> float((layer.weight == 0).float().mean())
        0.5
    """
    _base.prune_with(
        "prune.l1_unstructured",
        _m.L1Unstructured,
        module,
        name,
        amount=amount,
        importance_scores=importance_scores,
    )
    return module


def random_structured(module: nn.Module, name: str, amount: float, dim: int) -> nn.Module:
    """Prune ``amount`` whole channels of ``module.<name>`` along ``dim``, chosen at random.

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.random_structured(torch.nn.Linear(4, 6), "weight", amount=0.5, dim=0)
        >>> int(layer.weight_mask.any(dim=1).sum())
        3
    """
    _base.prune_with("prune.random_structured", _m.RandomStructured, module, name, amount, dim)
    return module


def ln_structured(
    module: nn.Module,
    name: str,
    amount: float,
    n: Any,
    dim: int,
    importance_scores: torch.Tensor | None = None,
) -> nn.Module:
    """Prune the ``amount`` channels of ``module.<name>`` along ``dim`` with the smallest ``n``-norm.

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.ln_structured(torch.nn.Linear(4, 6), "weight", amount=2, n=1, dim=0)
        >>> int((~layer.weight_mask.any(dim=1)).sum())
        2
    """
    _base.prune_with(
        "prune.ln_structured",
        _m.LnStructured,
        module,
        name,
        amount,
        n,
        dim,
        importance_scores=importance_scores,
    )
    return module


def custom_from_mask(module: nn.Module, name: str, mask: torch.Tensor) -> nn.Module:
    """Prune ``module.<name>`` where ``mask`` is zero.

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.custom_from_mask(torch.nn.Linear(3, 1), "bias", mask=torch.tensor([0.0]))
        >>> layer.bias_mask
        tensor([False])
    """
    _base.prune_with("prune.custom_from_mask", _m.CustomFromMask, module, name, mask=mask)
    return module


def nm_structured(
    module: nn.Module,
    name: str,
    n: int,
    m: int,
    dim: int = -1,
    importance_scores: torch.Tensor | None = None,
) -> nn.Module:
    """N:M sparsity: keep the ``n`` largest ``|w|`` of every ``m`` consecutive entries along ``dim``.

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.nm_structured(torch.nn.Linear(8, 2), "weight", n=2, m=4)
        >>> float(layer.weight_mask.float().mean())
        0.5
    """
    _base.prune_with(
        "prune.nm_structured", _m.NMStructured, module, name, n, m, dim, importance_scores=importance_scores
    )
    return module


def narrow(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Prune ``module.<name>`` where the bool ``mask`` is False, keeping what is pruned already.

    The result is ``custom_from_mask``'s, but a tensor masksparse has pruned already has its
    ``<name>_mask`` buffer narrowed in place (``mask &= new``): no hook, container or mask copy is
    added, so repeated rounds keep one bool mask per tensor. A first round installs a
    :class:`CustomFromMask` that holds the stored buffer itself rather than a second full mask.

    Example:
        >>> import torch
        >>> from masksparse.prune.functional import narrow
        >>> layer = torch.nn.Linear(2, 2)
        >>> for keep in ([[True, True], [True, False]], [[False, True], [True, True]]):
        ...     narrow(layer, "weight", torch.tensor(keep))
        >>> (hook,) = layer._forward_pre_hooks.values()
        >>> layer.weight_mask.tolist(), hook.mask is layer.weight_mask
        ([[False, True], [True, False]], True)
    """
    if mask.dtype != torch.bool:
        raise PruningTypeError(
            f"narrowing {type(module).__name__}.{name} needs a bool mask, got {mask.dtype}"
        )
    stored = module._buffers.get(name + "_mask")
    if _base.hook_for(module, name) is None or name not in _reparam.masked_names(module) or stored is None:
        hook = _base.apply_method(_m.CustomFromMask(mask), module, name)
        newest = (
            hook[-1] if isinstance(hook, (_base.PruningContainer, torch_prune.PruningContainer)) else hook
        )
        _base.hold_stored_mask(newest, module)
        return
    _m.check_same_shape(f"the mask for {type(module).__name__}.{name}", mask, name, stored)
    with torch.no_grad():
        if stored.dtype == torch.bool:
            stored &= mask.to(device=stored.device)
        else:  # a float mask (perhaps soft, from torch) keeps its values where it is not narrowed
            stored.mul_(mask.to(device=stored.device, dtype=stored.dtype))


def remove(module: nn.Module, name: str) -> nn.Module:
    """Make the pruning of ``module.<name>`` permanent.

    ``<name>_orig`` (the same Parameter object, masked entries now zero) becomes ``<name>`` again, and the
    mask and the hook go. Works on tensors pruned by masksparse or by torch.nn.utils.prune.

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.l1_unstructured(torch.nn.Linear(3, 2), "weight", amount=2)
        >>> layer = prune.remove(layer, "weight")
        >>> [name for name, _ in layer.named_parameters()], int((layer.weight == 0).sum())
        (['bias', 'weight'], 2)
    """
    with _context.call_context("prune.remove", module, name):
        found = _base.hook_for(module, name)
        if found is None:
            raise PruningValueError(
                f"Parameter '{name}' of module {type(module).__name__} has to be pruned "
                "before pruning can be removed"
            )
        key, hook = found
        hook.remove(module)
        del module._forward_pre_hooks[key]
    return module


def remove_all(model: nn.Module) -> nn.Module:
    """Make every pruned tensor of ``model`` permanent, as :func:`masksparse.prune.remove` does.

    Afterwards the state_dict has plain keys and loads into a fresh, unpruned model.

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
        >>> prune.global_unstructured(
        ...     [(model[0], "weight"), (model[1], "weight")], prune.L1Unstructured, amount=0.5)
        >>> list(prune.remove_all(model).state_dict())
        ['0.bias', '0.weight', '1.bias', '1.weight']
    """
    for module in model.modules():
        for hook in [h for h in module._forward_pre_hooks.values() if isinstance(h, _m.TorchMethod)]:
            remove(module, hook._tensor_name)
    return model


def is_pruned(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` has a pruned tensor (by masksparse or torch.nn.utils.prune).

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = torch.nn.Linear(2, 2)
        >>> prune.is_pruned(layer), prune.is_pruned(prune.identity(layer, "weight"))
        (False, True)
    """
    return any(
        isinstance(hook, _m.TorchMethod)
        for sub in module.modules()
        for hook in sub._forward_pre_hooks.values()
    )


class _Target:
    """One (module, name) of a global pruning call, resolved and validated before anything changes."""

    def __init__(self, module: nn.Module, name: str, scores: torch.Tensor | None) -> None:
        if not isinstance(module, nn.Module) or not isinstance(name, str):
            raise PruningTypeError(
                f"global_unstructured(): expected (module, name) pairs, got ({module!r}, {name!r})"
            )
        self.module, self.name = module, name
        self.stored: torch.Tensor | None = None
        self.candidates: torch.Tensor | None = None  # None: every entry may be pruned
        if _base.hook_for(module, name) is not None:
            self.tensor, self.stored = getattr(module, name + "_orig"), getattr(module, name + "_mask")
            # As in torch, only entries whose mask is exactly 1 are still candidates.
            self.candidates = self.stored if self.stored.dtype == torch.bool else self.stored == 1
        else:
            self.tensor = _base.prunable_parameter(module, name)
        if scores is not None:
            _m.check_same_shape(
                f"importance_scores for {type(module).__name__}.{name}", scores, name, self.tensor
            )
        self.importance = scores

    @property
    def remaining(self) -> int:
        return self.tensor.numel() if self.candidates is None else int(self.candidates.sum())

    @property
    def scores(self) -> torch.Tensor:
        return self.tensor if self.importance is None else self.importance

    def mask_after(self, chosen: torch.Tensor) -> torch.Tensor:
        """The mask that torch's global pruning hands to ``custom_from_mask``: the old one, chosen zeroed."""
        if self.stored is None:
            return chosen.logical_not_()
        if self.stored.dtype == torch.bool:
            return self.stored & ~chosen
        return self.stored * ~chosen


def _resolve(parameters: Any, importance_scores: Any) -> list[_Target]:
    if not isinstance(parameters, Iterable):
        raise PruningTypeError("global_unstructured(): parameters is not an Iterable")
    scores = {} if importance_scores is None else importance_scores
    if not isinstance(scores, dict):
        raise PruningTypeError("global_unstructured(): importance_scores must be of type dict")
    targets, seen = [], set()
    for module, name in parameters:
        if (id(module), name) in seen:
            raise PruningValueError(
                f"global_unstructured(): ({type(module).__name__}, {name!r}) is listed twice"
            )
        seen.add((id(module), name))
        try:
            targets.append(_Target(module, name, scores.get((module, name))))
        except MaskSparseError as error:
            owner = _context.owner_of(module, name)
            if owner is not None:
                hint = (
                    f"a pair names the module that owns the tensor: did you mean ({owner[0]}, {owner[1]!r})?"
                )
                error.args = (f"{error}; {hint}", *error.args[1:])
            raise
    if not targets:
        raise PruningValueError("global_unstructured(): parameters is empty")
    return targets


def _score_sources(method: _m.TorchMethod, targets: list[_Target]) -> list[Scores]:
    """Per-tensor scores for the methods that rank entries one by one; empty for any other method."""
    if isinstance(method, (_m.L1Unstructured, torch_prune.L1Unstructured)):
        return [MagnitudeScores(t.scores) for t in targets]
    if isinstance(method, (_m.RandomUnstructured, torch_prune.RandomUnstructured)):
        stream = RandomStream(functools.reduce(torch.promote_types, [t.scores.dtype for t in targets]))
        last = len(targets) - 1
        return [
            RandomScores(stream, tuple(t.tensor.shape), t.candidates, first=i == 0, last=i == last)
            for i, t in enumerate(targets)
        ]
    return []


def _new_masks(method: _m.TorchMethod, targets: list[_Target]) -> list[torch.Tensor]:
    """Each target's new mask, with exactly as many entries pruned as torch prunes."""
    if any(is_dtensor(t.tensor) for t in targets):
        return _sharded.global_masks(method, targets, type(method).__name__)
    scores = _score_sources(method, targets)
    if not scores:
        return _new_masks_concatenated(method, targets)
    # Only L1Unstructured and RandomUnstructured (ours or torch's) get here; both have an amount.
    remaining = sum(t.remaining for t in targets)
    count = _m.count_to_prune(
        cast(Any, method).amount, remaining, "the number of entries left to prune, numel"
    )
    if count == 0:  # torch draws no random numbers then either
        return [t.mask_after(torch.zeros(t.tensor.shape, dtype=torch.bool)) for t in targets]
    dtype = common_dtype([source.dtype for source in scores])
    chosen = select_smallest(scores, [t.candidates for t in targets], count, dtype)
    if isinstance(scores[0], RandomScores):
        scores[0].stream.finish()
    return [t.mask_after(c) for c, t in zip(chosen, targets)]


def _new_masks_concatenated(method: _m.TorchMethod, targets: list[_Target]) -> list[torch.Tensor]:
    """torch's own algorithm, for methods that must see all remaining scores at once (custom methods)."""
    scores = torch.cat([t.scores.detach().reshape(-1) for t in targets])
    masks = [torch.ones(t.tensor.numel()) if t.stored is None else t.stored.reshape(-1) for t in targets]
    method._tensor_name = "global"
    container = _m.PruningContainer(method)
    mask = container.compute_mask(scores, default_mask=torch.cat([m.to(scores.dtype) for m in masks]))
    pieces = torch.split(mask, [t.tensor.numel() for t in targets])
    return [piece.view(t.tensor.shape) for piece, t in zip(pieces, targets)]


def global_unstructured(
    parameters: Parameters,
    pruning_method: type[_m.TorchMethod],
    importance_scores: dict[tuple[nn.Module, str], torch.Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """Prune the entries of several tensors together, ranking them all at once.

    With ``L1Unstructured`` (or ``RandomUnstructured``) exactly as many entries are pruned as torch would
    prune, a valid set of the smallest, found without concatenating the scores: memory stays near the
    size of the largest tensor instead of several times the model. Other unstructured methods fall back
    to torch's concatenating algorithm.

    Args:
        parameters: ``(module, name)`` pairs.
        pruning_method: an unstructured method class, e.g. ``prune.L1Unstructured``.
        importance_scores: optional ``{(module, name): scores}`` to rank by instead of the tensors.
        **kwargs: options for ``pruning_method``, e.g. ``amount``.

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10))
        >>> prune.global_unstructured(
        ...     [(model[0], "weight"), (model[1], "weight")], prune.L1Unstructured, amount=0.3)
        >>> int((~model[0].weight_mask).sum() + (~model[1].weight_mask).sum())
        60
    """
    targets = _resolve(parameters, importance_scores)
    label = getattr(pruning_method, "__name__", type(pruning_method).__name__)
    with _context.error_context(f"prune.global_unstructured({label})"):
        method = pruning_method(**kwargs)
        kind = getattr(method, "PRUNING_TYPE", None)
        if kind != "unstructured":
            raise PruningTypeError(
                'Only "unstructured" PRUNING_TYPE supported for the `pruning_method`. '
                f"Found method {pruning_method} of type {kind}"
            )
        with torch.no_grad():
            masks = _new_masks(method, targets)
    masks.reverse()
    for target in targets:
        applied = _m.CustomFromMask(masks.pop())  # dropped once installed: one copy of each mask at a time
        _base.apply_method(applied, target.module, target.name)
        _base.hold_stored_mask(applied, target.module)  # no second copy of the mask stays alive
