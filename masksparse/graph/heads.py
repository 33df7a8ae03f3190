"""Attention heads: the sizes a model's own code gives its reshapes, and the attributes holding them.

A fused qkv projection reshaped to ``(B, N, 3, H, hd)`` (or a query projection reshaped to
``(B, N, H, hd)``) splits a dimension into parts whose sizes the model's code writes down, typically
``self.num_heads``. When compaction removes whole heads, that attribute must change with them; the
head size ``hd`` never does (only whole heads are removed), so the softmax scale stays as it was.
``nn.MultiheadAttention``'s fused kernel splits nothing the trace sees: its rule
(:mod:`masksparse.graph.attention`) ties each head's slots directly, and a slicer switches the module's
class (:class:`masksparse.compact.modules.CompactMultiheadAttention`).

Some attention modules derive the head size from the head count (torchvision's Swin computes
``C // num_heads`` from its input width ``C``) or reshape their heads back to their input width
(MaxViT): their own forward cannot run with fewer heads. A class registered with
:func:`register_head_swap` names the attribute holding its number of heads and the class compaction
swaps such a module to, whose forward computes the same thing with fewer heads of the same size; its
heads then prune like any others.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from masksparse._errors import CompactionError
from masksparse.graph.groups import Graph
from masksparse.graph.record import Node
from masksparse.graph.rules import Split

__all__ = [
    "HeadSplit",
    "HeadSwap",
    "fixed_heads",
    "head_attribute",
    "head_swap",
    "register_head_swap",
    "shrunk_splits",
]


@dataclass(frozen=True)
class HeadSwap:
    """How a registered attention class loses heads: ``heads`` names its attribute holding the number
    of heads, ``compact`` the class compaction swaps a module that loses heads to (its forward keeps
    the head size apart from the number of heads)."""

    heads: str
    compact: type


_SWAPS: dict[type, HeadSwap] = {}


def register_head_swap(types: Iterable[type], *, heads: str, compact: type) -> None:
    """Let the heads of modules of exactly ``types`` go, by swapping them to ``compact`` at compaction.

    ``compact`` (a subclass with the same parameters and state_dict keys) must compute what each of
    ``types`` computes, with ``heads`` heads of the head size the module had; registering ``compact``
    itself among ``types`` lets a compacted model lose heads again. Subclasses are not covered: their
    forward may differ. A slicer (:func:`masksparse.compact.slicers.register_slicer`) does the swap.

    Example:
        >>> from torch import nn
        >>> from masksparse.graph.heads import head_swap, register_head_swap
        >>> class Attention(nn.Module): ...
        >>> class CompactAttention(Attention): ...
        >>> register_head_swap([Attention, CompactAttention], heads="num_heads", compact=CompactAttention)
        >>> head_swap(Attention).compact is CompactAttention
        True
    """
    for t in types:
        _SWAPS[t] = HeadSwap(heads, compact)


# Modules defining classes that masksparse ships swaps for -> the masksparse module registering them,
# imported on first use so that ``import masksparse`` imports neither torchvision nor timm.
_SHIPPED = {
    "torchvision.models.swin_transformer": "masksparse.compact.torchvision_attention",
    "torchvision.models.maxvit": "masksparse.compact.torchvision_attention",
    "timm.models.eva": "masksparse.compact.timm_attention",
}


def head_swap(module_type: type | None) -> HeadSwap | None:
    """The registered swap of ``module_type`` (the class a masked module's class stands for), or None."""
    base = getattr(module_type, "_masksparse_base", module_type)
    shipped = _SHIPPED.get(getattr(base, "__module__", ""))
    if shipped is not None and shipped not in sys.modules:
        importlib.import_module(shipped)
    return _SWAPS.get(base)  # type: ignore[arg-type]


@dataclass(frozen=True)
class HeadSplit:
    """A reshape in ``module`` that splits out ``size`` heads (or other parts) of ``inner`` entries each,
    ``kept`` of which stay."""

    module: str
    node: Node
    size: int
    kept: int
    inner: int = 1
    # the graph slots of the heads dimension (whose units the heads are)
    slots: np.ndarray | None = field(default=None, compare=False, repr=False)
    # the reshape leaves the number of heads to torch (``view(B, N, -1, head_dim)``): no attribute holds it
    inferred: bool = False


def _head_splits(graph: Graph) -> list[tuple[Node, Split]]:
    """Reshapes splitting a dimension into parts whose units follow a part other than the innermost.

    The innermost part of a split (the head size ``hd``) is left out: it never shrinks.
    """
    return [
        (rel.node, split)
        for rel in graph.relations
        for split in rel.splits
        if split.splits and split.choice < len(split.dims) - 1
    ]


def shrunk_splits(graph: Graph, removed: np.ndarray) -> list[HeadSplit]:
    """The head splits that lose units; ``removed`` is, per slot of ``graph``, whether compaction
    removes it."""
    found = []
    for node, split in _head_splits(graph):
        d = split.dims[split.choice]
        kept = int((~removed[graph.slots(split.parts, d)]).sum())
        if kept < split.parts.shape[d]:
            slots = graph.slots(split.parts, d)
            size = split.parts.shape[d]
            found.append(
                HeadSplit(node.module, node, size, kept, _inner(split), slots, _heads_inferred(split))
            )
    return found


def _inner(split: Split) -> int:
    return math.prod(split.parts.shape[e] for e in split.dims[split.choice + 1 :])


def _heads_inferred(split: Split) -> bool:
    """Whether the reshape asks for ``-1`` where the heads go (``view(B, N, -1, self.head_dim)``, as
    Hugging Face's Llama, Mistral and Qwen attention do): torch then infers the number of heads from
    the projection's width, and nothing in the module needs to hold it."""
    return split.inferred == split.choice


def fixed_heads(model: nn.Module, graph: Graph) -> dict[int, str]:
    """Units of head splits whose module could not follow their removal, and why.

    Removing heads is exact only when the module keeps the number of heads in an attribute
    (compaction updates it) and the head size in another one (so forward does not derive it from the
    number of heads, as ``C // num_heads`` does). Pruning leaves such heads alone.
    """
    found: dict[int, str] = {}
    for node, split in _head_splits(graph):
        d = split.dims[split.choice]
        size = split.parts.shape[d]
        try:
            head_attribute(
                model.get_submodule(node.module),
                HeadSplit(node.module, node, size, size - 1, _inner(split), inferred=_heads_inferred(split)),
            )
        except CompactionError as exc:
            for unit in np.unique(graph.labels[graph.slots(split.parts, d)]).tolist():
                found.setdefault(unit, str(exc))
    return found


def head_attribute(module: nn.Module, split: HeadSplit) -> str | None:
    """The name of ``module``'s int attribute that holds ``split.size`` (the number of heads). When the
    reshape infers the number (``-1``), such an attribute is optional (None when there is none), but
    the module must still hold the head size.

    Several candidates narrow to names that speak of heads and not of a size or dim
    (``num_heads`` over ``head_dim`` when the two are equal); anything else is refused rather than
    guessed. The head size ``split.inner`` must be held in another attribute: a forward that derives
    it (``C // num_heads``) would change it once heads are removed. A class with a registered swap
    (:func:`register_head_swap`) names its attribute, and its swap keeps the head size.

    Example:
        >>> import torch
        >>> from masksparse.graph.heads import HeadSplit, head_attribute
        >>> attn = torch.nn.Module()
        >>> attn.num_heads, attn.head_dim = 4, 4
        >>> head_attribute(attn, HeadSplit("attn", None, 4, 3, inner=4))
        'num_heads'
    """
    swap = head_swap(type(module))
    if swap is not None:
        if getattr(module, swap.heads, None) != split.size:
            raise _refused(
                module, split, f"holds {getattr(module, swap.heads, None)!r} heads in {swap.heads}"
            )
        return swap.heads
    ints = [
        k for k, v in vars(module).items() if type(v) is int and v == split.size and not k.startswith("_")
    ]
    if len(ints) > 1 or split.inferred:
        ints = [k for k in ints if "head" in k and not any(w in k for w in ("dim", "size"))]
    if split.inferred:  # an attribute naming the heads is kept true, if there is one
        name = ints[0] if len(ints) == 1 else None
        _check_head_size(module, split, name or "the number of heads it infers")
        return name
    if len(ints) != 1:
        what = "no int attribute" if not ints else f"several int attributes ({', '.join(ints)})"
        raise _refused(
            module,
            split,
            f"has {what} equal to {split.size} to update: store the number of heads in one attribute "
            f"(e.g. self.num_heads) and use it in forward",
        )
    _check_head_size(module, split, ints[0])
    return ints[0]


def _check_head_size(module: nn.Module, split: HeadSplit, heads: str) -> None:
    """Refuse a module that holds no head size apart from its number of heads: its forward derives the
    head size from it (``C // num_heads``), so removing heads would change it. A head size reshaped
    together with other parts before a chunk (GPT-NeoX's ``view(B, N, -1, 3 * self.head_size)``) counts
    when the reshape infers the number of heads and an attribute named for the head size divides it."""
    held = [(k, v) for k, v in vars(module).items() if type(v) is int and v > 1 and k != heads]
    if not any(
        v == split.inner
        or (split.inferred and "head" in k and split.inner % v == 0 and split.inner // v <= 4)
        for k, v in held
    ):
        raise _refused(
            module,
            split,
            f"keeps no head size {split.inner} apart from {heads}, so forward derives it from "
            f"{heads} and removing heads would change it: store it in an attribute (e.g. "
            f"self.head_dim) and use it in forward",
        )


def _refused(module: nn.Module, split: HeadSplit, why: str) -> CompactionError:
    where = f"module {split.module or '<model>'!r} ({type(module).__name__})"
    return CompactionError(
        f"the masks make {split.size - split.kept} of the {split.size} heads dead that {split.node.op} "
        f"splits out in {where}, but that module {why}; or unmask those heads."
    )
