"""How each aten operation relates the dimensions of its inputs to those of its outputs.

A rule is a function ``rule(node, rel)`` registered for one or more operations with
:func:`~masksparse.graph.rules.register_rule`. It tells ``rel`` (a :class:`Relations`) which index
slots are *tied* (must be removed together), which dimensions are *contracted* (summed over, as a
Linear's input features are), and which dimensions are *blocked* (no compaction may change their
size: a LayerNorm's normalised dimension, a convolution's spatial dimensions, a slice along a
dimension). A dimension of an input or
output that a rule leaves unexplained is blocked, so an incomplete rule errs on the side of keeping.

A rule may also register a *transfer*: how the operation maps per-slot constants (a channel that is
the same number everywhere) from inputs to outputs. Compaction uses constants to fold a channel that
only emits its bias into the next layer's bias. Ties declared with ``carry=True`` (pure data movement:
views, permutes, concatenation) carry constants along by themselves.

The rules themselves live in ``masksparse.graph.layout`` and ``masksparse.graph.layers``; this
module holds the registry and the vocabulary rules speak.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from masksparse.graph.record import Node, Value

__all__ = [
    "Contraction",
    "Inexact",
    "Relations",
    "Rule",
    "Split",
    "States",
    "any_nonzero",
    "asked_shape",
    "register_rule",
    "rule_for",
]

Index = np.ndarray


class Inexact(str):
    """A block reason: a normalisation reduces over the dimension (see :mod:`masksparse.graph.inexact`).

    Example:
        >>> from masksparse.graph.rules import Inexact
        >>> reason = Inexact("normalised over by a LayerNorm")
        >>> isinstance(reason, Inexact), reason == "normalised over by a LayerNorm"
        (True, True)
    """

    __slots__ = ()


@dataclass(frozen=True)
class Contraction:
    """Slots of ``x`` summed against slots of ``w`` (``w`` None: a plain sum over ``x``'s slots).

    Removing a contracted slot is exact when either side is zero there, or when ``x`` is a constant
    there and ``fold`` names the module whose bias can absorb ``w``'s column times that constant.
    """

    node: Node
    x: Value
    x_dim: int
    x_index: Index
    w: Value | None
    w_dim: int
    w_index: Index
    fold: str | None


@dataclass(frozen=True)
class Split:
    """A reshape that splits one dimension into parts (or merges parts into one): ``merged``'s
    ``merged_dim`` against ``parts``' ``dims``. Only one part can follow the merged dimension's units
    (``choice``, a position in ``dims``); the others keep their size. ``splits``: the merged
    dimension is the input (``(B, N, 3*H*hd) -> (B, N, 3, H, hd)``), so the part sizes come from the
    model's code. ``inferred``: the position in ``dims`` of the part the split's reshape gives as ``-1``
    (``view(B, N, -1, self.head_dim)``), whose size torch infers; None when every size is written out.
    """

    merged: Value
    merged_dim: int
    parts: Value
    dims: tuple[int, ...]
    splits: bool
    choice: int
    inferred: int | None = None


_RESHAPES = (torch.ops.aten.view, torch.ops.aten.reshape, torch.ops.aten._unsafe_view)


def asked_shape(node: Node) -> list[Any] | None:
    """The sizes a ``view``/``reshape`` node was asked for, ``-1`` where torch infers one; None for
    other nodes.

    Example:
        >>> import torch
        >>> from masksparse.graph.record import record
        >>> from masksparse.graph.rules import asked_shape
        >>> class Heads(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x.view(2, -1, 4)
        >>> trace = record(Heads(), torch.randn(2, 12))
        >>> [asked_shape(n) for n in trace.nodes]
        [[2, -1, 4]]
    """
    shape = node.args[1] if node.op.overloadpacket in _RESHAPES and len(node.args) > 1 else None
    return list(shape) if isinstance(shape, (list, tuple)) and len(shape) == node.outputs[0].ndim else None


def _inferred(node: Node, dims: list[int]) -> int | None:
    shape = asked_shape(node)
    return None if shape is None else next((k for k, d in enumerate(dims) if shape[d] == -1), None)


class Relations:
    """What the rule of one node says; filled by the rule, read by :mod:`masksparse.graph.groups`.

    ``choices`` picks, per :class:`~masksparse.graph.rules.Split` of the node (in the order the rule
    asks), the part that follows the merged dimension (default: the leading one); ``cut`` asks the
    rule to leave the other parts free rather than blocked, so that the graph builder can see which
    parts something else fixes.
    """

    def __init__(self, node: Node, choices: dict[int, int] | None = None, cut: bool = False) -> None:
        self.node = node
        self.choices = choices or {}
        self.cut = cut
        self.splits: list[Split] = []
        # (a, a_dim, a_index, b, b_dim, b_index, carry): a[a_index[k]] is tied to b[b_index[k]]; with
        # carry, b is an output whose slot holds exactly the data of the tied input slots.
        self.ties: list[tuple[Value, int, Index, Value, int, Index, bool]] = []
        self.blocks: list[tuple[Value, int, str]] = []
        self.contractions: list[Contraction] = []
        self.covered: set[tuple[int, int]] = set()

    def tie(
        self,
        a: Value,
        a_dim: int,
        b: Value,
        b_dim: int,
        a_index: Index | None = None,
        b_index: Index | None = None,
        *,
        carry: bool = False,
    ) -> None:
        """Tie slot ``a_index[k]`` of ``a``'s dimension ``a_dim`` to ``b_index[k]`` of ``b``'s (all: 1:1)."""
        a_dim, b_dim = a_dim % max(a.ndim, 1), b_dim % max(b.ndim, 1)
        if a_index is None and b_index is None:
            if a.shape[a_dim] != b.shape[b_dim]:
                raise ValueError(f"cannot tie sizes {a.shape[a_dim]} and {b.shape[b_dim]} one to one")
            a_index = b_index = np.arange(a.shape[a_dim])
        assert a_index is not None and b_index is not None  # both given, or both derived above
        self.ties.append((a, a_dim, np.asarray(a_index), b, b_dim, np.asarray(b_index), carry))
        self.covered.update({(a.id, a_dim), (b.id, b_dim)})

    def carry(self, src: Value, src_dim: int, dst: Value, dst_dim: int, **index: Index) -> None:
        """Tie ``src`` to the output ``dst`` as pure data movement (constants carry along)."""
        self.tie(src, src_dim, dst, dst_dim, index.get("src_index"), index.get("dst_index"), carry=True)

    def choose(self, merged: Value, merged_dim: int, parts: Value, dims: list[int], splits: bool) -> int:
        """Which of ``dims`` (a position) follows ``merged``'s ``merged_dim``.

        See :class:`~masksparse.graph.rules.Split`.
        """
        choice = self.choices.get(len(self.splits), 0)
        merged_dim = merged_dim % max(merged.ndim, 1)
        inferred = _inferred(self.node, dims) if splits else None
        self.splits.append(Split(merged, merged_dim, parts, tuple(dims), splits, choice, inferred))
        return choice

    def keep_part(self, v: Value, dim: int, reason: str) -> None:
        """A part that does not follow its split keeps its size (under ``cut``: left free instead)."""
        if self.cut:
            self.covered.add((v.id, dim % max(v.ndim, 1)))
        else:
            self.block(v, dim, reason)

    def ignore(self, v: Value) -> None:
        """``v`` is an input whose contents the op does not read (it lends only dtype and device)."""
        self.covered.update((v.id, d) for d in range(v.ndim))

    def block(self, v: Value, dim: int, reason: str) -> None:
        """No compaction may change the size of ``v``'s dimension ``dim``; ``reason`` says why."""
        dim = dim % max(v.ndim, 1)
        self.blocks.append((v, dim, reason))
        self.covered.add((v.id, dim))

    def contract(
        self,
        x: Value,
        x_dim: int,
        w: Value | None,
        w_dim: int = 0,
        *,
        x_index: Index | None = None,
        w_index: Index | None = None,
        fold: str | None = None,
    ) -> None:
        """``x``'s dimension ``x_dim`` is summed against ``w``'s ``w_dim`` (or just summed)."""
        x_dim = x_dim % max(x.ndim, 1)
        xi = np.arange(x.shape[x_dim]) if x_index is None else np.asarray(x_index)
        wi = xi if w_index is None else np.asarray(w_index)
        if w is not None:
            w_dim = w_dim % max(w.ndim, 1)
            self.tie(x, x_dim, w, w_dim, xi, wi)
        self.covered.add((x.id, x_dim))
        self.contractions.append(Contraction(self.node, x, x_dim, xi, w, w_dim, wi, fold))


class States:
    """Per-slot constants: ``get(v, d)[i]`` is the value every entry of ``v``'s slice ``i`` along ``d``
    holds, or NaN when that is not known. Static values (parameters, masked weights) are read off
    their contents; everything else starts unknown and is filled by transfers in execution order.
    """

    def __init__(self) -> None:
        # what transfers may look back on: the ops in execution order, and the reshape splits by the
        # id of the value holding the parts (see masksparse.graph.layout._picked)
        self.nodes: list[Node] = []
        self.splits: dict[int, Split] = {}
        self._known: dict[tuple[int, int], np.ndarray] = {}
        self._nonzero: dict[int, np.ndarray] = {}
        self._zero: dict[tuple[int, int], np.ndarray] = {}

    def get(self, v: Value, dim: int) -> np.ndarray:
        """The constants of ``v``'s slots along ``dim`` (NaN: not a known constant)."""
        key = (v.id, dim)
        got = self._known.get(key)
        if got is None:
            got = np.full(v.shape[dim], np.nan) if v.tensor is None else slice_constants(v.tensor, dim)
            self._known[key] = got
        return got

    def zero(self, v: Value, dim: int) -> np.ndarray:
        """Per slot of ``v`` along ``dim``: is the whole slice zero? Same as ``get(v, dim) == 0``, but
        cheaper for a static weight's dims 0 and 1: read off :meth:`nonzero` where that is small (a
        conv weight's) or made already, else one reduction that allocates nothing weight-sized."""
        if (v.id, dim) in self._known or v.tensor is None or v.ndim < 2 or dim > 1 or v.tensor.numel() == 0:
            return np.asarray(self.get(v, dim) == 0)
        got = self._zero.get((v.id, dim))
        if got is None:
            if v.ndim > 2 or v.id in self._nonzero:
                got = np.asarray(~self.nonzero(v).any(1 - dim))
            else:
                got = ~any_nonzero(v.tensor, (1 - dim,))
            got.flags.writeable = False  # shared by every caller
            self._zero[(v.id, dim)] = got
        return got

    def nonzero(self, v: Value) -> np.ndarray:
        """For a static value of 2+ dims, shape ``(shape[0], shape[1])``: does the block ``v[i, j]``
        hold a non-zero (NaN counts as non-zero)? Whether a conv's output channel reads an input
        channel at all, without the cost of per-block minima and maxima."""
        got = self._nonzero.get(v.id)
        if got is None:
            assert v.tensor is not None
            t = v.tensor.detach()
            n0, n1 = v.shape[0], v.shape[1]
            if t.numel() == 0:  # no entries to tell: assume a read, the safe side
                got = np.ones((n0, n1), dtype=bool)
            else:
                got = any_nonzero(t.reshape(n0, n1, -1), (2,))
            self._nonzero[v.id] = got
        return got

    def set(self, v: Value, dim: int, values: np.ndarray) -> None:
        """Record the constants of ``v``'s slots along ``dim``."""
        self._known[(v.id, dim)] = np.asarray(values, dtype=np.float64)

    def whole(self, v: Value) -> float:
        """The single value every entry of ``v`` holds, or NaN."""
        if v.tensor is not None and v.tensor.numel() > 0:
            lo, hi = torch.aminmax(_numeric(v.tensor))
            return float(lo) if bool(lo == hi) else math.nan
        return math.nan


# dtypes whose values numpy reads in place (not bfloat16)
_NUMPY_DTYPES = frozenset(
    (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    + (torch.float16, torch.float32, torch.float64)
)


def any_nonzero(t: torch.Tensor, dims: tuple[int, ...]) -> np.ndarray:
    """``t.any(dims)`` as a numpy array: does each slice hold a non-zero (NaN counts)?

    A CPU tensor numpy can read is reduced by numpy, in place: torch's ``any`` over a float tensor is
    about five times slower (a 3072 x 768 float32 weight along either dim: 1.4-1.9 ms against 6-9 ms,
    one thread). Anything else (bfloat16, an accelerator, a tensor subclass) by torch.

    Example:
        >>> import torch
        >>> from masksparse.graph.rules import any_nonzero
        >>> any_nonzero(torch.tensor([[0.0, 1.0], [0.0, float("nan")]]), (1,)).tolist()
        [True, True]
        >>> any_nonzero(torch.tensor([[0.0, 1.0], [0.0, float("nan")]]), (0,)).tolist()
        [False, True]
    """
    t = t.detach()
    if not dims:
        return (t != 0).cpu().numpy()
    if (
        type(t) is torch.Tensor
        and t.device.type == "cpu"
        and t.dtype in _NUMPY_DTYPES
        and not (t.is_conj() or t.is_neg())
    ):
        return np.asarray(t.numpy().any(axis=dims))
    return t.any(dim=dims).cpu().numpy()


def _numeric(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.to(torch.uint8) if t.dtype == torch.bool else t


def slice_constants(t: torch.Tensor, dim: int) -> np.ndarray:
    """For each index along ``dim``, the value the whole slice holds, or NaN if it is not constant."""
    n = t.shape[dim]
    if t.numel() == 0:
        return np.full(n, np.nan)
    m = _numeric(t)
    if m.ndim == 1:
        lo = hi = m
    else:
        # Reduce in memory order: torch reduces a transposed view (a Linear's weight as mm reads it)
        # many times slower than the same data laid out contiguously.
        strides = m.stride()
        order = sorted(range(m.ndim), key=lambda d: -strides[d])
        m = m.permute(order)
        if not m.is_contiguous():
            m = m.contiguous()
        dim = order.index(dim)
        rest = [d for d in range(m.ndim) if d != dim]
        lo, hi = m.amin(rest), m.amax(rest)
    lo_np, hi_np = lo.double().numpy(), hi.double().numpy()
    return np.where(lo_np == hi_np, lo_np, np.nan)


Relate = Callable[[Node, Relations], None]
Transfer = Callable[[Node, Relations, States], None]


@dataclass(frozen=True)
class Rule:
    """A registered rule: how dimensions relate, and optionally how constants flow."""

    relate: Relate
    transfer: Transfer | None = None


_RULES: dict[object, Rule] = {}


def register_rule(*ops: object, transfer: Transfer | None = None) -> Callable[[Relate], Relate]:
    """Register the decorated function as the rule of ``ops`` (aten overload packets or overloads).

    Example:
        >>> import torch
        >>> from masksparse.graph.rules import register_rule, rule_for
        >>> @register_rule(torch.ops.aten.positive)
        ... def _positive(node, rel):
        ...     x, out = node.inputs[0], node.outputs[0]
        ...     for d in range(out.ndim):
        ...         rel.carry(x, d, out, d)
        >>> rule_for(torch.ops.aten.positive.default).relate is _positive
        True
    """

    def decorate(relate: Relate) -> Relate:
        for op in ops:
            _RULES[op] = Rule(relate, transfer)
        return relate

    return decorate


def rule_for(op: torch._ops.OpOverload) -> Rule | None:
    """The rule registered for ``op`` (the overload, else its packet); torch's own ``pointwise`` tag
    stands for an elementwise rule."""
    found = _RULES.get(op) or _RULES.get(op.overloadpacket)
    if found is None and torch.Tag.pointwise in op.tags:
        found = _RULES.get("pointwise")
    return found


def registered_ops() -> dict[object, Rule]:
    """Every operation with a registered rule (overload packets or overloads), and its rule."""
    return {op: rule for op, rule in _RULES.items() if op != "pointwise"}
