"""Applying a pruning method to a module: compute the mask first, then change the module.

Everything that can fail (a missing tensor, mismatched shapes, ``compute_mask`` itself) happens before
the module is touched, so a failed call leaves it exactly as it was.
"""

from __future__ import annotations

import contextlib
import keyword
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from masksparse._errors import (
    MaskSparseError,
    PruningAttributeError,
    PruningTypeError,
    PruningValueError,
)
from masksparse.prune import _reparam
from masksparse.prune import methods as _m


@contextlib.contextmanager
def error_context(prefix: str) -> Iterator[None]:
    """Prefix a masksparse error raised within by where it came from, e.g. ``prune.f(Linear, 'weight')``.

    Only the outermost context adds its prefix, so a function built on another names itself once.
    """
    try:
        yield
    except MaskSparseError as error:
        if not getattr(error, "_masksparse_call", False):
            error._masksparse_call = True  # type: ignore[attr-defined]
            error.args = (f"{prefix}: {error}", *error.args[1:])
        raise


@contextlib.contextmanager
def call_context(call: str, module: Any, name: Any) -> Iterator[None]:
    """:func:`error_context` for a call on one tensor: ``prune.l1_unstructured(Linear, 'weight'): ...``.

    A dotted ``name`` that a submodule owns (``"fc1.weight"``) adds which call was likely meant.
    """
    with error_context(f"{call}({type(module).__name__}, {name!r})"):
        try:
            yield
        except MaskSparseError as error:
            hint = owner_hint(call, module, name)
            if hint and not getattr(error, "_masksparse_call", False):
                error.args = (f"{error}; {hint}", *error.args[1:])
            raise


def _path_expression(model: nn.Module, path: str) -> str:
    """Python that reaches ``model.get_submodule(path)``: ``model.blocks[0].fc1`` where it can."""
    expression, parent = "model", model
    for part in path.split("."):
        if part.isdigit() and isinstance(parent, (nn.Sequential, nn.ModuleList)):
            expression += f"[{part}]"
        elif part.isidentifier() and not keyword.iskeyword(part):
            expression += f".{part}"
        else:
            return f"model.get_submodule({path!r})"
        parent = parent._modules[part]  # type: ignore[assignment]
    return expression


def owner_of(module: Any, name: Any) -> tuple[str, str] | None:
    """For ``name="fc1.weight"`` owned by ``module.fc1``: ``("model.fc1", "weight")``; else None."""
    if not isinstance(module, nn.Module) or not isinstance(name, str) or "." not in name:
        return None
    path, leaf = name.rsplit(".", 1)
    try:
        owner = module.get_submodule(path)
    except AttributeError:
        return None
    if leaf not in owner._parameters and leaf + "_orig" not in owner._parameters:
        return None
    return _path_expression(module, path), leaf


def owner_hint(call: str, module: Any, name: Any) -> str:
    """The call that was probably meant when a dotted name is a submodule's tensor; else ``""``."""
    found = owner_of(module, name)
    if found is None:
        return ""
    expression, leaf = found
    return (
        f"the first argument is the module that owns the tensor: did you mean {call}({expression}, {leaf!r})?"
    )


def prune_with(
    call: str,
    cls: type[_m.TorchMethod],
    module: nn.Module,
    name: str,
    *args: Any,
    importance_scores: torch.Tensor | None = None,
    **kwargs: Any,
) -> _m.TorchMethod:
    """Prune ``module.<name>`` with a new ``cls(*args, **kwargs)``; errors name ``call``."""
    with call_context(call, module, name):
        return apply_method(cls(*args, **kwargs), module, name, importance_scores)


def hook_for(module: nn.Module, name: str) -> tuple[Any, _m.TorchMethod] | None:
    found = [
        (k, h)
        for k, h in module._forward_pre_hooks.items()
        if isinstance(h, _m.TorchMethod) and h._tensor_name == name
    ]
    if len(found) > 1:
        raise PruningValueError(
            f"{type(module).__name__} has {len(found)} pruning hooks for {name!r}; expected at most one"
        )
    return found[0] if found else None


def _as_stored_mask(
    mask: torch.Tensor, orig: torch.Tensor, module: nn.Module, name: str, method: Any
) -> torch.Tensor:
    """Validate a computed mask; a binary one is stored as bool, any other as it is."""
    if not isinstance(mask, torch.Tensor):
        raise PruningTypeError(
            f"{type(method).__name__}.compute_mask returned {type(mask).__name__}, not a tensor"
        )
    _m.check_same_shape(
        f"the mask {type(method).__name__} computed for {type(module).__name__}.{name}", mask, name, orig
    )
    if _m.is_binary(mask):
        return (mask if mask.dtype == torch.bool else mask != 0).to(device=orig.device)
    return mask.to(device=orig.device)  # a soft mask is kept as computed, dtype included, as in torch


def apply_method(
    method: _m.TorchMethod, module: nn.Module, name: str, importance_scores: torch.Tensor | None = None
) -> _m.TorchMethod:
    """Prune ``module.<name>`` with an already constructed ``method``; return the hook now installed.

    Everything that can fail (a missing tensor, mismatched shapes, ``compute_mask`` itself) happens
    before the module is touched, so a failed call leaves it exactly as it was.
    """
    if not isinstance(method, _m.TorchMethod):
        raise PruningTypeError(f"{type(method).__name__} is not a BasePruningMethod subclass")
    old = hook_for(module, name)
    mask_dtype = torch.bool if _m.accepts_bool_masks(method) else None
    if old is None:
        tensor = prunable_parameter(module, name)
        default_mask = torch.ones_like(tensor, dtype=mask_dtype)
        current: torch.Tensor = tensor
    else:
        orig, stored = getattr(module, name + "_orig"), getattr(module, name + "_mask")
        if stored.dtype != torch.bool:
            mask_dtype = None  # a float (perhaps soft) mask stays float, as torch passes it
        default_mask = (
            stored.detach().to(dtype=mask_dtype or orig.dtype).clone(memory_format=torch.contiguous_format)
        )
        current = _reparam.masked_value(orig, stored)
    scores = current if importance_scores is None else importance_scores
    _m.check_same_shape(f"importance_scores for {type(module).__name__}.{name}", scores, name, current)

    method._tensor_name = name
    hook: _m.TorchMethod = method
    if old is not None:
        # A new container (not the old one, mutated) so that a failure below changes nothing.
        earlier = (
            tuple(old[1])
            if isinstance(old[1], (_m.PruningContainer, torch_prune.PruningContainer))
            else (old[1],)
        )
        hook = _m.PruningContainer(*earlier, method)
    with torch.no_grad():
        mask = hook.compute_mask(scores, default_mask=default_mask)
    mask = _as_stored_mask(mask, current, module, name, method)

    if old is None:
        _reparam.install(module, name, mask)
    else:
        del module._forward_pre_hooks[old[0]]
        stored = module._buffers[name + "_mask"]
        if stored is not None and stored.dtype == mask.dtype:
            stored.copy_(mask)  # in place: the buffer keeps its identity and no stale copy is left
        else:
            module.register_buffer(name + "_mask", mask)
        _reparam.adopt(module, name)
    module.register_forward_pre_hook(hook)
    return hook


def narrow(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Prune ``module.<name>`` where the bool ``mask`` is False, keeping what is pruned already.

    The result is ``custom_from_mask``'s, but a tensor masksparse has pruned already has its
    ``<name>_mask`` buffer narrowed in place (``mask &= new``): no hook, container or mask copy is
    added, so repeated rounds keep one bool mask per tensor. A first round installs a
    :class:`CustomFromMask` that holds the stored buffer itself rather than a second full mask.
    """
    if mask.dtype != torch.bool:
        raise PruningTypeError(
            f"narrowing {type(module).__name__}.{name} needs a bool mask, got {mask.dtype}"
        )
    stored = module._buffers.get(name + "_mask")
    if hook_for(module, name) is None or name not in _reparam.masked_names(module) or stored is None:
        hook = apply_method(_m.CustomFromMask(mask), module, name)
        newest = hook[-1] if isinstance(hook, (_m.PruningContainer, torch_prune.PruningContainer)) else hook
        cast(_m.CustomFromMask, newest).mask = getattr(module, name + "_mask")
        return
    _m.check_same_shape(f"the mask for {type(module).__name__}.{name}", mask, name, stored)
    with torch.no_grad():
        if stored.dtype == torch.bool:
            stored &= mask.to(device=stored.device)
        else:  # a float mask (perhaps soft, from torch) keeps its values where it is not narrowed
            stored.mul_(mask.to(device=stored.device, dtype=stored.dtype))


def prunable_parameter(module: nn.Module, name: str) -> nn.Parameter:
    """``module``'s Parameter ``name``, or the error torch's pruning would raise (a clearer message)."""
    tensor = module._parameters.get(name)
    if isinstance(tensor, nn.Parameter):
        return tensor
    kind = type(module).__name__
    if name in module._parameters:
        raise PruningTypeError(f"{kind}.{name} is None: there is nothing to prune")
    if name in module._buffers:
        raise PruningTypeError(f"{kind}.{name} is a buffer; only parameters can be pruned")
    params = ", ".join(module._parameters) or "none"
    raise PruningAttributeError(f"{kind} has no parameter named {name!r} (its parameters: {params})")
