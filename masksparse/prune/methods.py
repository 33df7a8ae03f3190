"""Pruning methods: small objects that validate their options once and compute masks.

The classes mirror ``torch.nn.utils.prune`` name for name and mask for mask (random methods consume the
random number generator exactly as torch does). Their base,
:class:`~masksparse.prune.BasePruningMethod`, subclasses torch's, so torch's ``is_pruned`` and ``remove``
recognise masksparse hooks and a method written for torch works here; it and
:class:`~masksparse.prune.PruningContainer` are importable from this module too.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.nn.utils.prune as torch_prune

from masksparse._errors import PruningTypeError, PruningValueError
from masksparse.prune import _sharded
from masksparse.prune._base import BasePruningMethod as BasePruningMethod
from masksparse.prune._base import PruningContainer as PruningContainer
from masksparse.prune._base import TorchMethod as TorchMethod
from masksparse.prune._base import accepts_bool_masks as accepts_bool_masks
from masksparse.prune._base import bool_safe, check_same_shape, normalise_dim
from masksparse.prune._base import is_binary as is_binary


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

    @bool_safe
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

    @bool_safe
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
        dim = normalise_dim(t, self.dim)
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

    @bool_safe
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

    @bool_safe
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """Zero the ``m - n`` smallest ``|t|`` of every group (already-pruned entries first)."""
        if t.dim() == 0:
            raise PruningValueError("N:M pruning needs a tensor with at least one dimension, got a scalar")
        dim = normalise_dim(t, self.dim)
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


def _count(method: Any, candidates: int) -> int:
    return count_to_prune(method.amount, candidates)


# How each class computes the mask of a sharded (DTensor) parameter (see masksparse.prune._sharded).
_sharded.KINDS.update(
    {
        Identity: ("identity", None),
        torch_prune.Identity: ("identity", None),
        CustomFromMask: ("custom", None),
        torch_prune.CustomFromMask: ("custom", None),
        L1Unstructured: ("magnitude", _count),
        torch_prune.L1Unstructured: ("magnitude", _count),
    }
)
