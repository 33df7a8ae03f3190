"""Attention heads: the sizes a model's own code gives its reshapes, and the attributes holding them.

A fused qkv projection reshaped to ``(B, N, 3, H, hd)`` (or a query projection reshaped to
``(B, N, H, hd)``) splits a dimension into parts whose sizes the model's code writes down, typically
``self.num_heads``. When compaction removes whole heads, that attribute must change with them; the
head size ``hd`` never does (only whole heads are removed), so the softmax scale stays as it was.
``nn.MultiheadAttention``'s fused kernel splits nothing the trace sees: its rule
(:mod:`masksparse.graph.attention`) ties each head's slots directly, and a slicer switches the module's
class (:class:`masksparse.modules.CompactMultiheadAttention`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from masksparse._errors import CompactionError
from masksparse.graph.groups import Graph
from masksparse.graph.record import Node
from masksparse.graph.rules import Split

__all__ = ["HeadSplit", "fixed_heads", "head_attribute", "shrunk_splits"]


@dataclass(frozen=True)
class HeadSplit:
    """A reshape in ``module`` that splits out ``size`` heads (or other parts) of ``inner`` entries each,
    ``kept`` of which stay."""

    module: str
    node: Node
    size: int
    kept: int
    inner: int = 1


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
            found.append(HeadSplit(node.module, node, split.parts.shape[d], kept, _inner(split)))
    return found


def _inner(split: Split) -> int:
    return math.prod(split.parts.shape[e] for e in split.dims[split.choice + 1 :])


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
                model.get_submodule(node.module), HeadSplit(node.module, node, size, size - 1, _inner(split))
            )
        except CompactionError as exc:
            for unit in np.unique(graph.labels[graph.slots(split.parts, d)]).tolist():
                found.setdefault(unit, str(exc))
    return found


def head_attribute(module: nn.Module, split: HeadSplit) -> str:
    """The name of ``module``'s int attribute that holds ``split.size`` (the number of heads).

    Several candidates narrow to names that speak of heads and not of a size or dim
    (``num_heads`` over ``head_dim`` when the two are equal); anything else is refused rather than
    guessed. The head size ``split.inner`` must be held in another attribute: a forward that derives
    it (``C // num_heads``) would change it once heads are removed.

    Example:
        >>> import torch
        >>> from masksparse.graph.heads import HeadSplit, head_attribute
        >>> attn = torch.nn.Module()
        >>> attn.num_heads, attn.head_dim = 4, 4
        >>> head_attribute(attn, HeadSplit("attn", None, 4, 3, inner=4))
        'num_heads'
    """
    ints = [
        k for k, v in vars(module).items() if type(v) is int and v == split.size and not k.startswith("_")
    ]
    if len(ints) > 1:
        ints = [k for k in ints if "head" in k and not any(w in k for w in ("dim", "size"))]
    if len(ints) != 1:
        what = "no int attribute" if not ints else f"several int attributes ({', '.join(ints)})"
        raise _refused(
            module,
            split,
            f"has {what} equal to {split.size} to update: store the number of heads in one attribute "
            f"(e.g. self.num_heads) and use it in forward",
        )
    if not any(type(v) is int and v == split.inner and k != ints[0] for k, v in vars(module).items()):
        raise _refused(
            module,
            split,
            f"keeps no head size {split.inner} apart from {ints[0]}, so forward derives it from "
            f"{ints[0]} and removing heads would change it: store it in an attribute (e.g. "
            f"self.head_dim) and use it in forward",
        )
    return ints[0]


def _refused(module: nn.Module, split: HeadSplit, why: str) -> CompactionError:
    where = f"module {split.module or '<model>'!r} ({type(module).__name__})"
    return CompactionError(
        f"the masks make {split.size - split.kept} of the {split.size} heads dead that {split.node.op} "
        f"splits out in {where}, but that module {why}; or unmask those heads."
    )
