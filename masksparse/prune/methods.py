"""Pruning methods: small objects that validate their options once and compute masks.

The classes mirror ``torch.nn.utils.prune`` name for name and mask for mask (random methods consume the
random number generator exactly as torch does). :class:`BasePruningMethod` subclasses torch's, so torch's
``is_pruned`` and ``remove`` recognise masksparse hooks and a method written for torch works here.
"""

from __future__ import annotations

import numbers
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from masksparse._errors import (
    PruningIndexError,
    PruningTypeError,
    PruningValueError,
    ShapeMismatchError,
)
from masksparse.prune import _reparam

TorchMethod = torch_prune.BasePruningMethod


def _bool_safe(compute_mask: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
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


def validate_amount(amount: Any) -> None:
    """Check an ``amount`` option: a non-negative int (a count) or a float in [0, 1] (a fraction).

    A bool is refused, although torch takes ``True`` for 1: ``amount=True`` is far likelier a slip
    than a wish to prune one entry. The pruning functions add the call, module and tensor to the message.
    """
    if isinstance(amount, bool):
        raise PruningTypeError(f"amount={amount!r} is a bool; give an int (a count) or a float (a fraction)")
    if not isinstance(amount, numbers.Real):
        raise PruningTypeError(
            f"amount={amount!r} should be a float in [0, 1] or a non-negative int, "
            f"not {type(amount).__name__}"
        )
    if (isinstance(amount, numbers.Integral) and amount < 0) or (
        not isinstance(amount, numbers.Integral) and not 0.0 <= float(amount) <= 1.0
    ):
        raise PruningValueError(f"amount={amount} should be a float in [0, 1] or a non-negative int")


def count_to_prune(amount: float, size: int, what: str = "the number of entries left to prune, numel") -> int:
    """How many of ``size`` entries ``amount`` prunes (a float rounds like Python's ``round``).

    ``what`` names ``size`` in the error raised when an int amount exceeds it.
    """
    count = int(amount) if isinstance(amount, numbers.Integral) else round(float(amount) * size)
    if count > size:
        raise PruningValueError(f"amount={amount} is larger than {what}={size}")
    return count


def _normalise_dim(t: torch.Tensor, dim: int) -> int:
    if not -t.dim() <= dim < t.dim():
        raise PruningIndexError(f"Invalid index {dim} for tensor of size {tuple(t.shape)}")
    return dim % t.dim()


def _require_structured(t: torch.Tensor) -> None:
    if t.dim() <= 1:
        raise PruningValueError(
            "Structured pruning can only be applied to multidimensional tensors. "
            f"Found tensor of shape {tuple(t.shape)} with {t.dim()} dims"
        )


def _channel_mask(t: torch.Tensor, dim: int, keep: torch.Tensor) -> torch.Tensor:
    """A mask like ``t`` that is one on the channels ``keep`` (indices or bool) along ``dim``."""
    mask = torch.zeros_like(t)
    index: list[Any] = [slice(None)] * t.dim()
    index[dim] = keep
    mask[tuple(index)] = 1
    return mask


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
        from masksparse.prune._apply import prune_with  # it builds on the classes of this module

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
    dim = _normalise_dim(t, method.dim)
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


class Identity(BasePruningMethod):
    """Prune nothing: the mask is all ones (useful to set up the reparametrisation).

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.identity(torch.nn.Linear(3, 2), "weight")
        >>> bool(layer.weight_mask.all())
        True
    """

    PRUNING_TYPE = "unstructured"

    @_bool_safe
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """Return ``default_mask`` unchanged."""
        return default_mask


class _Unstructured(BasePruningMethod):
    """An unstructured method whose only option is ``amount``; subclasses choose which entries go."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: float) -> None:
        validate_amount(amount)
        self.amount = amount

    def _entries_to_prune(self, t: torch.Tensor, count: int) -> torch.Tensor:
        raise NotImplementedError

    @_bool_safe
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """Zero ``amount`` entries of ``default_mask``, as chosen by the method."""
        count = count_to_prune(self.amount, t.nelement())
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if count != 0:
            mask.view(-1)[self._entries_to_prune(t, count)] = 0
        return mask


class RandomUnstructured(_Unstructured):
    """Prune ``amount`` entries chosen uniformly at random.

    Args:
        amount: an int (how many entries) or a float in [0, 1] (the fraction, rounded like ``round``).

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.random_unstructured(torch.nn.Linear(10, 10), "weight", amount=30)
        >>> int((~layer.weight_mask).sum())
        30
    """

    def _entries_to_prune(self, t: torch.Tensor, count: int) -> torch.Tensor:
        return torch.topk(torch.rand_like(t).view(-1), k=count).indices


class L1Unstructured(_Unstructured):
    """Prune the ``amount`` entries of smallest absolute value.

    Args:
        amount: an int (how many entries) or a float in [0, 1] (the fraction, rounded like ``round``).

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.1, -3.0], [2.0, -0.2]]))
        >>> layer = prune.l1_unstructured(layer, "weight", amount=0.5)
        >>> layer.weight_mask
        tensor([[False,  True],
                [ True, False]])
    """

    def _entries_to_prune(self, t: torch.Tensor, count: int) -> torch.Tensor:
        return torch.topk(torch.abs(t).view(-1), k=count, largest=False).indices


class _Structured(BasePruningMethod):
    """A structured method: ``amount`` whole channels along ``dim`` go; subclasses choose which stay."""

    PRUNING_TYPE = "structured"

    def __init__(self, amount: float, dim: int = -1) -> None:
        validate_amount(amount)
        self.amount = amount
        self.dim = dim

    def _channels_to_keep(self, t: torch.Tensor, dim: int, count: int) -> torch.Tensor:
        raise NotImplementedError

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """Zero ``amount`` channels along ``dim`` of ``default_mask``, as chosen by the method."""
        _require_structured(t)
        dim = _normalise_dim(t, self.dim)
        count = count_to_prune(
            self.amount, t.shape[dim], f"the number of channels left along dim {dim}, size"
        )
        if count == 0:
            return default_mask
        mask = _channel_mask(t, dim, self._channels_to_keep(t, dim, count))
        mask *= default_mask.to(dtype=mask.dtype)
        return mask


class RandomStructured(_Structured):
    """Prune ``amount`` whole channels along ``dim``, chosen at random.

    Args:
        amount: an int (how many channels) or a float in [0, 1] (the fraction).
        dim: the dimension that indexes the channels (0: output channels of a conv or Linear).

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.random_structured(torch.nn.Linear(4, 6), "weight", amount=2, dim=0)
        >>> int((~layer.weight_mask.any(dim=1)).sum())
        2
    """

    def _channels_to_keep(self, t: torch.Tensor, dim: int, count: int) -> torch.Tensor:
        prob = torch.rand(t.shape[dim])
        return prob > torch.kthvalue(prob, k=count).values


def _validate_norm(n: Any) -> None:
    if n in ("fro", "nuc") or (isinstance(n, numbers.Real) and not isinstance(n, bool)):
        return
    raise PruningValueError(f"n={n!r} is not a norm order: use an int or float (inf allowed), 'fro' or 'nuc'")


def channel_norms(t: torch.Tensor, n: Any, dim: int) -> torch.Tensor:
    """The ``n``-norm of every slice of ``t`` along ``dim`` (torch's ``_compute_norm``)."""
    dims = [d for d in range(t.dim()) if d != dim % t.dim()]
    if n == "nuc" or (n == "fro" and len(dims) == 2):
        return torch.linalg.matrix_norm(t, ord=n, dim=dims if len(dims) == 2 else (-2, -1))
    return torch.linalg.vector_norm(t, ord=2 if n == "fro" else n, dim=dims)


class LnStructured(_Structured):
    """Prune the ``amount`` channels along ``dim`` with the smallest ``n``-norm.

    Args:
        amount: an int (how many channels) or a float in [0, 1] (the fraction).
        n: the norm order, as in ``torch.linalg.vector_norm`` (``1``, ``2``, ``inf``, ``'fro'``, ``'nuc'``).
        dim: the dimension that indexes the channels.

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.ln_structured(torch.nn.Conv2d(3, 8, 3), "weight", amount=0.5, n=2, dim=0)
        >>> int(layer.weight_mask.flatten(1).any(dim=1).sum())
        4
    """

    def __init__(self, amount: float, n: Any, dim: int = -1) -> None:
        super().__init__(amount, dim)
        _validate_norm(n)
        self.n = n

    def _channels_to_keep(self, t: torch.Tensor, dim: int, count: int) -> torch.Tensor:
        return torch.topk(channel_norms(t, self.n, dim), k=t.shape[dim] - count, largest=True).indices


class CustomFromMask(BasePruningMethod):
    """Prune with a mask the caller supplies (combined with any earlier mask).

    Args:
        mask: a tensor of the pruned tensor's shape; zeros prune.

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.custom_from_mask(torch.nn.Linear(2, 1), "bias", mask=torch.tensor([0]))
        >>> layer.bias_mask, bool(layer.bias == 0)
        (tensor([False]), True)
    """

    PRUNING_TYPE = "global"

    def __init__(self, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor):
            raise PruningTypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        self.mask = mask

    @_bool_safe
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """Return ``default_mask * mask``."""
        check_same_shape("mask", self.mask, "the pruned tensor", default_mask)
        if default_mask.dtype == torch.bool and not is_binary(self.mask):
            default_mask = default_mask.to(dtype=t.dtype)  # a soft mask keeps its values, as in torch
        return default_mask * self.mask.to(dtype=default_mask.dtype)


class NMStructured(BasePruningMethod):
    """N:M semi-structured sparsity: keep the ``n`` largest ``|w|`` of every ``m`` consecutive entries.

    2:4 along the input dimension of a Linear weight is the pattern that sparse GPU kernels accelerate.
    Entries pruned earlier count as pruned within their group.

    Args:
        n: entries kept per group (``0 <= n <= m``).
        m: group length; the size of ``dim`` must be a multiple of it.
        dim: the dimension along which groups run (default: the last, a Linear's inputs).

    Example:
        >>> import torch
        >>> from masksparse import prune
        >>> layer = prune.nm_structured(torch.nn.Linear(8, 4), "weight", n=2, m=4)
        >>> layer.weight_mask.view(4, 2, 4).sum(dim=-1).tolist()
        [[2, 2], [2, 2], [2, 2], [2, 2]]
    """

    PRUNING_TYPE = "global"

    def __init__(self, n: int, m: int, dim: int = -1) -> None:
        for label, value in (("n", n), ("m", m), ("dim", dim)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise PruningTypeError(f"N:M pruning needs an int {label}, got {value!r}")
        if m < 1 or not 0 <= n <= m:
            raise PruningValueError(f"N:M pruning needs 0 <= n <= m and m >= 1, got n={n}, m={m}")
        self.n, self.m, self.dim = int(n), int(m), int(dim)

    @_bool_safe
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """Zero the ``m - n`` smallest ``|t|`` of every group (already-pruned entries first)."""
        if t.dim() == 0:
            raise PruningValueError("N:M pruning needs a tensor with at least one dimension, got a scalar")
        dim = _normalise_dim(t, self.dim)
        if t.shape[dim] % self.m:
            raise PruningValueError(
                f"N:M pruning with m={self.m} needs the size of dim {dim} to be a multiple of {self.m}; "
                f"the tensor has shape {tuple(t.shape)}"
            )
        moved = t.movedim(dim, -1)
        scores = (
            moved.abs()
            .reshape(-1, self.m)
            .masked_fill(default_mask.movedim(dim, -1).reshape(-1, self.m) == 0, -1)
        )
        keep = torch.ones_like(scores, dtype=torch.bool)
        if self.n < self.m:
            keep.scatter_(1, torch.topk(scores, self.m - self.n, dim=1, largest=False).indices, False)
        keep = keep.reshape(moved.shape).movedim(-1, dim)
        return default_mask * keep.to(dtype=default_mask.dtype)
