"""The base of every pruning method: the hook, the container of iterated methods, and how one is applied.

:class:`BasePruningMethod` subclasses torch's, so torch's ``is_pruned`` and ``remove`` recognise
masksparse hooks and a method written for torch works here. Applying a method computes the mask first and
changes the module only then: everything that can fail (a missing tensor, mismatched shapes,
``compute_mask`` itself) happens before the module is touched, so a failed call leaves it as it was.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from masksparse._errors import (
    PruningAttributeError,
    PruningIndexError,
    PruningTypeError,
    PruningValueError,
    ShapeMismatchError,
)
from masksparse.distributed.tensors import is_dtensor
from masksparse.prune import _reparam, _sharded
from masksparse.prune._context import call_context

TorchMethod = torch_prune.BasePruningMethod


def bool_safe(compute_mask: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Mark a ``compute_mask`` that works on bool masks, so masks never pass through float copies."""
    compute_mask._masksparse_bool_safe = True  # type: ignore[attr-defined]
    return compute_mask


def accepts_bool_masks(method: TorchMethod) -> bool:
    """Whether ``method.compute_mask`` is one of ours that computes bool masks from bool masks.

    Other methods (a user's subclass that overrides ``compute_mask``, or a torch method) get float masks,
    exactly as torch.nn.utils.prune passes them, and their result is converted afterwards.
    """
    if isinstance(method, PruningContainer):
        return accepts_bool_masks(method[-1])
    return getattr(type(method).compute_mask, "_masksparse_bool_safe", False)


def is_binary(mask: torch.Tensor) -> bool:
    """Whether every entry of ``mask`` is 0 or 1 (so it can be stored as bool without loss)."""
    return mask.dtype == torch.bool or bool(((mask == 0) | (mask == 1)).all())


def normalise_dim(t: torch.Tensor, dim: int) -> int:
    if not -t.dim() <= dim < t.dim():
        raise PruningIndexError(f"Invalid index {dim} for tensor of size {tuple(t.shape)}")
    return dim % t.dim()


class BasePruningMethod(TorchMethod):
    """Base class for pruning methods, with ``torch.nn.utils.prune.BasePruningMethod``'s interface.

    A subclass sets ``PRUNING_TYPE`` (``"unstructured"``, ``"structured"`` with a ``dim`` attribute, or
    ``"global"``) and implements :meth:`compute_mask`; :meth:`apply` then prunes a module with it.

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> class EveryOther(prune.BasePruningMethod):
        ...     PRUNING_TYPE = "unstructured"
        ...     def compute_mask(self, t, default_mask):
        ...         mask = default_mask.clone()
        ...         mask.view(-1)[::2] = 0
        ...         return mask
        >>> layer = torch.nn.Linear(4, 2)
        >>> hook = EveryOther.apply(layer, "weight")
        >>> layer.weight_mask.view(-1).tolist()
        [False, True, False, True, False, True, False, True]
    """

    PRUNING_TYPE: str = "unstructured"

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        """Forward pre-hook. ``module.<name>`` is computed on read, so only cached copies need refreshing."""
        for method in (self, *getattr(self, "_pruning_methods", ())):
            if getattr(method, "_holds_stored_mask", False):
                # The buffer is a new tensor after module.to(device) or to_empty(): follow it.
                method.mask = module._buffers[method._tensor_name + "_mask"]
        if isinstance(module, nn.RNNBase):
            # RNN modules hand a list of their weights to the fused kernel; rebuild it from the properties.
            module._init_flat_weights()

    @abstractmethod
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """Return the mask for ``t``, starting from ``default_mask`` (already-pruned entries are zero)."""

    def apply_mask(self, module: nn.Module) -> torch.Tensor:
        """Return ``<name>_orig * <name>_mask`` for the tensor this method prunes."""
        return _reparam.masked_value(
            getattr(module, self._tensor_name + "_orig"), getattr(module, self._tensor_name + "_mask")
        )

    @classmethod
    def apply(
        cls,
        module: nn.Module,
        name: str,
        *args: Any,
        importance_scores: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> TorchMethod:
        """Prune tensor ``name`` of ``module`` with a new ``cls(*args, **kwargs)``; return the installed hook.

        On any error the module is left exactly as it was.
        """
        return prune_with(
            f"prune.{cls.__name__}.apply",
            cls,
            module,
            name,
            *args,
            importance_scores=importance_scores,
            **kwargs,
        )

    def prune(
        self,
        t: torch.Tensor,
        default_mask: torch.Tensor | None = None,
        importance_scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return ``t`` with this method's mask applied, without touching any module."""
        scores = t if importance_scores is None else importance_scores
        check_same_shape("importance_scores", scores, "the tensor t", t)
        mask = torch.ones_like(t) if default_mask is None else default_mask
        return t * self.compute_mask(scores, default_mask=mask)

    def remove(self, module: nn.Module) -> None:
        """Make the pruning permanent: ``<name>_orig`` (the same Parameter) becomes ``<name>`` again."""
        _reparam.uninstall(module, self._tensor_name)


def check_same_shape(what: str, t: torch.Tensor, against: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ShapeMismatchError(
            f"{what} should have the same shape as {against}: "
            f"got {tuple(t.shape)}, expected {tuple(ref.shape)}"
        )


def _unstructured_slice(method: TorchMethod, t: torch.Tensor, mask: torch.Tensor) -> Any:
    return mask == 1


def _structured_slice(method: TorchMethod, t: torch.Tensor, mask: torch.Tensor) -> Any:
    if not hasattr(method, "dim"):
        raise AttributeError(
            'Pruning methods of PRUNING_TYPE "structured" need to have the attribute `dim` defined.'
        )
    dim = normalise_dim(t, method.dim)
    index: list[Any] = [slice(None)] * t.dim()
    index[dim] = mask.sum(dim=[d for d in range(t.dim()) if d != dim]) != 0
    return tuple(index)


def _global_slice(method: TorchMethod, t: torch.Tensor, mask: torch.Tensor) -> Any:
    return (slice(None),) * t.dim()


# Which part of the tensor a new method prunes when it is added on top of earlier ones (torch's rules).
_REMAINING_PART: dict[str, Callable[[TorchMethod, torch.Tensor, torch.Tensor], Any]] = {
    "unstructured": _unstructured_slice,
    "structured": _structured_slice,
    "global": _global_slice,
}


class PruningContainer(BasePruningMethod):
    """The sequence of methods applied to one tensor by iterative pruning.

    The newest method only sees what the earlier ones left: unstructured methods the unpruned entries,
    structured methods the channels that still have an unpruned entry, so amounts are relative to what
    remains.

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.l1_unstructured(torch.nn.Linear(10, 10), "weight", amount=0.5)
        >>> layer = prune.l1_unstructured(layer, "weight", amount=0.5)
        >>> hook = next(iter(layer._forward_pre_hooks.values()))
        >>> len(hook), int(layer.weight_mask.sum())
        (2, 25)
    """

    def __init__(self, *methods: TorchMethod) -> None:
        self._pruning_methods: tuple[TorchMethod, ...] = ()
        if methods:
            self._tensor_name = methods[0]._tensor_name
        for method in methods:
            self.add_pruning_method(method)

    def add_pruning_method(self, method: TorchMethod) -> None:
        """Append ``method``; it must act on the same tensor name as the container."""
        if not isinstance(method, TorchMethod) and method is not None:
            raise PruningTypeError(f"{type(method)} is not a BasePruningMethod subclass")
        if method is not None and getattr(self, "_tensor_name", None) != method._tensor_name:
            raise PruningValueError(
                f"Can only add pruning methods acting on the parameter named "
                f"'{getattr(self, '_tensor_name', None)}' to PruningContainer {self}. "
                f"Found '{method._tensor_name}'"
            )
        self._pruning_methods += (method,)

    def __len__(self) -> int:
        return len(self._pruning_methods)

    def __iter__(self) -> Any:
        return iter(self._pruning_methods)

    def __getitem__(self, idx: int) -> TorchMethod:
        return self._pruning_methods[idx]

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """Let the newest method prune the part of ``t`` that ``default_mask`` leaves, as torch does."""
        method = self._pruning_methods[-1]
        kind = getattr(method, "PRUNING_TYPE", None)
        part = _REMAINING_PART.get(kind) if isinstance(kind, str) else None
        if part is None:
            raise PruningValueError(f"Unrecognized PRUNING_TYPE {kind!r} of {type(method).__name__}")
        index = part(method, t, default_mask)
        partial = method.compute_mask(t[index], default_mask=default_mask[index])
        # Bool stays bool only while the new part is bool too: a soft custom mask keeps its values.
        keep_bool = default_mask.dtype == torch.bool and partial.dtype == torch.bool
        new_mask = default_mask.clone() if keep_bool else default_mask.to(dtype=t.dtype)
        new_mask[index] = partial.to(dtype=new_mask.dtype)
        return new_mask


def hook_for(module: nn.Module, name: str) -> tuple[Any, TorchMethod] | None:
    found = [
        (k, h)
        for k, h in module._forward_pre_hooks.items()
        if isinstance(h, TorchMethod) and h._tensor_name == name
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
    check_same_shape(
        f"the mask {type(method).__name__} computed for {type(module).__name__}.{name}", mask, name, orig
    )
    if is_binary(mask):
        return (mask if mask.dtype == torch.bool else mask != 0).to(device=orig.device)
    return mask.to(device=orig.device)  # a soft mask is kept as computed, dtype included, as in torch


def apply_method(
    method: TorchMethod, module: nn.Module, name: str, importance_scores: torch.Tensor | None = None
) -> TorchMethod:
    """Prune ``module.<name>`` with an already constructed ``method``; return the hook now installed.

    Everything that can fail (a missing tensor, mismatched shapes, ``compute_mask`` itself) happens
    before the module is touched, so a failed call leaves it exactly as it was.
    """
    if not isinstance(method, TorchMethod):
        raise PruningTypeError(f"{type(method).__name__} is not a BasePruningMethod subclass")
    old = hook_for(module, name)
    mask_dtype = torch.bool if accepts_bool_masks(method) else None
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
    check_same_shape(f"importance_scores for {type(module).__name__}.{name}", scores, name, current)

    method._tensor_name = name
    hook: TorchMethod = method
    if old is not None:
        # A new container (not the old one, mutated) so that a failure below changes nothing.
        earlier = (
            tuple(old[1])
            if isinstance(old[1], (PruningContainer, torch_prune.PruningContainer))
            else (old[1],)
        )
        hook = PruningContainer(*earlier, method)
    if is_dtensor(current):
        mask = _sharded.sharded_mask(hook, scores, default_mask, current)
    else:
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


def hold_stored_mask(method: TorchMethod, module: nn.Module) -> None:
    """Let an installed ``CustomFromMask`` hold the module's ``<name>_mask`` buffer, not a second mask.

    At each forward it takes the buffer again, in case ``module.to(device)`` or ``to_empty()`` replaced it.
    """
    method.mask = module._buffers[method._tensor_name + "_mask"]  # type: ignore[attr-defined]
    method._holds_stored_mask = True  # type: ignore[attr-defined]


def prune_with(
    call: str,
    cls: type[TorchMethod],
    module: nn.Module,
    name: str,
    *args: Any,
    importance_scores: torch.Tensor | None = None,
    **kwargs: Any,
) -> TorchMethod:
    """Prune ``module.<name>`` with a new ``cls(*args, **kwargs)``; errors name ``call``."""
    with call_context(call, module, name):
        return apply_method(cls(*args, **kwargs), module, name, importance_scores)


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
