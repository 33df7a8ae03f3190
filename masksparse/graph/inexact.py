"""Dimensions a normalisation reduces over: no compaction removes units there exactly.

LayerNorm, GroupNorm and RMSNorm compute statistics over their normalised dimensions, so removing a
unit there changes every output, even a unit the masks zeroed. Their rules block those dimensions with
an :class:`~masksparse.graph.rules.Inexact` reason (an ordinary string, so every message reads as
before); a user who accepts the change (``allow_inexact=True`` in :func:`masksparse.prune_channels` and
:func:`masksparse.compact`) can then tell them from dimensions blocked for any other reason with
:func:`inexact_units`, and :func:`normalisations` lists the operations involved.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from masksparse._errors import PruningTypeError
from masksparse.graph.groups import Graph
from masksparse.graph.record import Node, Value
from masksparse.graph.rules import Inexact

__all__ = ["Normalised", "check_allow_inexact", "inexact_units", "normalisations"]


class Normalised(NamedTuple):
    """Dimension ``dim`` of ``value``, an input of ``node``, which normalises over it."""

    node: Node
    value: Value
    dim: int


def normalisations(graph: Graph) -> list[Normalised]:
    """Every (operation, input, dimension) a normalisation reduces over, in execution order."""
    return [
        Normalised(rel.node, v, d)
        for rel in graph.relations
        for v, d, reason in rel.blocks
        if isinstance(reason, Inexact)
    ]


def inexact_units(graph: Graph) -> dict[int, str]:
    """Units that only normalisations block: unit label -> the reason it is blocked.

    A unit that anything else also blocks (a model input or output, a spatial dimension, an operation
    without a rule) is left out: opting in to inexact pruning never overrides those.
    """
    normal: list[np.ndarray] = []
    other: list[np.ndarray] = []
    for slots, reason in graph.blocked:
        (normal if isinstance(reason, Inexact) else other).append(slots)
    if not normal:
        return {}
    blocked_otherwise = set(graph.unknown)
    if other:
        blocked_otherwise.update(np.unique(graph.labels[np.concatenate(other)]).tolist())
    return {
        u: graph.fixed.get(u, "")
        for u in np.unique(graph.labels[np.concatenate(normal)]).tolist()
        if u not in blocked_otherwise
    }


def check_allow_inexact(allow_inexact: object) -> None:
    """The ``allow_inexact`` option of prune_channels, plan_compaction and compact must be a bool.

    Example:
        >>> from masksparse.graph.inexact import check_allow_inexact
        >>> check_allow_inexact("yes")
        Traceback (most recent call last):
        ...
        masksparse._errors.PruningTypeError: allow_inexact must be True or False, got 'yes'
    """
    if not isinstance(allow_inexact, bool):
        raise PruningTypeError(f"allow_inexact must be True or False, got {allow_inexact!r}")
