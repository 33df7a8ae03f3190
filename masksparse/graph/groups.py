"""From a trace and the rules to groups: which slices of which tensors live or die together.

Every index of every dimension of every recorded value is a *slot*. Rules tie slots; the connected
components of the ties are *units* (one channel, with everything that must go with it). Units touching
the same tensors the same way (the 64 channels of one residual stream, say) form a :class:`Group`.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from masksparse._errors import CompactionError
from masksparse.graph import layers as _layers  # noqa: F401  (registers the rules)
from masksparse.graph import layout as _layout  # noqa: F401
from masksparse.graph.record import Node, Trace, Value
from masksparse.graph.rules import Contraction, Relations, States, rule_for

__all__ = ["Graph", "Group", "Member", "build"]


class Member(NamedTuple):
    """Part of a group: ``indices[u]`` are the indices of unit ``u`` along ``dim`` of ``module.tensor``."""

    module: str
    tensor: str
    dim: int
    indices: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Group:
    """Units (channels) that prune together, and every tensor slice each unit owns.

    ``prunable`` is False when some unit cannot be removed exactly whatever the masks say; ``reason``
    then says why (a model input or output, a dimension a LayerNorm normalises over, an operation
    without a rule, ...).
    """

    members: tuple[Member, ...]
    size: int
    prunable: bool
    reason: str = ""
    units: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __str__(self) -> str:
        head = f"Group of {self.size} units" + ("" if self.prunable else f" (kept: {self.reason})")
        lines = [head]
        for m in self.members:
            per_unit = len(m.indices[0]) if m.indices else 0
            lines.append(
                f"  {m.module or '<model>'}.{m.tensor} dim {m.dim}"
                + (f" ({per_unit} indices per unit)" if per_unit != 1 else "")
            )
        return "\n".join(lines)


def _leaf_name(source: tuple[str, str]) -> tuple[str, str]:
    path, name = source
    return (path, name[: -len("_orig")]) if name.endswith("_orig") else (path, name)


class Graph:
    """The analysed trace: groups for users, and per-unit facts for pruning and compaction."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.base: dict[tuple[int, int], int] = {}
        total = 0
        for v in trace.values:
            for d, size in enumerate(v.shape):
                self.base[(v.id, d)] = total
                total += size
        self.n_slots = total
        self.labels = np.arange(total)
        self.states = States()
        self.relations: list[Relations] = []
        self.unknown: dict[int, Node] = {}  # unit label -> an op without a rule touching it
        self.fixed: dict[int, str] = {}  # unit label -> why no compaction may remove it
        self.live: set[int] = set()  # units some contraction still reads
        self.folds: list[tuple[int, str, int, float]] = []  # (unit, module, column, constant)
        self.blocked: list[tuple[np.ndarray, str]] = []  # (slots, why no compaction may remove them)
        self.groups: tuple[Group, ...] = ()
        # (module path, tensor name) -> the value each parameter and buffer (masks left out) is read as
        self.leaves: dict[tuple[str, str], Value] = {}

    def slots(self, v: Value, dim: int, index: np.ndarray | None = None) -> np.ndarray:
        """Global slot numbers of ``v``'s dimension ``dim`` (all, or at ``index``)."""
        base = self.base[(v.id, dim)]
        return base + (np.arange(v.shape[dim]) if index is None else np.asarray(index))

    def __repr__(self) -> str:
        prunable = sum(g.prunable for g in self.groups)
        return (
            f"Graph({len(self.trace.nodes)} ops, {len(self.groups)} groups, {prunable} prunable, "
            f"{len(set(self.unknown.values()))} ops without a rule)"
        )


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` slots under edges ``a[k] -- b[k]``: each slot's smallest member."""
    f = np.arange(n)
    while True:
        fa, fb = f[a], f[b]
        m = np.minimum(fa, fb)
        g = f.copy()
        for idx in (fa, fb, a, b):
            np.minimum.at(g, idx, m)
        while True:  # pointer jumping until every slot points at its root
            h = g[g]
            if np.array_equal(h, g):
                break
            g = h
        if np.array_equal(g, f):
            return f
        f = g


def _relate_node(
    graph: Graph, node: Node, choices: dict[int, int] | None = None, cut: bool = False
) -> tuple[Relations, list[tuple[np.ndarray, str]]]:
    """Run the node's rule; its relations, and the slots it blocks."""
    rule = rule_for(node.op)
    rel = Relations(node, choices, cut)
    if rule is None:
        reason = f"created inside forward with a fixed size by {node}"
        return rel, [
            (graph.slots(v, d), reason)
            for v in (node.outputs if not node.inputs else ())
            for d in range(v.ndim)
        ]
    try:
        rule.relate(node, rel)
    except (IndexError, ValueError, TypeError, KeyError) as exc:
        raise CompactionError(f"the rule of {node} does not fit its arguments: {exc}") from exc
    for v in node.inputs + node.outputs:
        for d in range(v.ndim):
            if (v.id, d) not in rel.covered:
                rel.block(v, d, f"{node} does not relate its dim {d}")
    return rel, [(graph.slots(v, d), reason) for v, d, reason in rel.blocks]


def _fixed_slots(graph: Graph, blocked: list[tuple[np.ndarray, str]], labels: np.ndarray) -> np.ndarray:
    """Per slot: does some blocked slot share its unit?"""
    fixed_units = np.zeros(graph.n_slots, dtype=bool)
    if blocked:
        fixed_units[labels[np.concatenate([s for s, _ in blocked])]] = True
    return fixed_units[labels]


def _choose(
    graph: Graph, rels: list[tuple[Relations, list[tuple[np.ndarray, str]]]], base: np.ndarray
) -> None:
    """Pick, for every reshape that splits or merges a dimension, the part that follows it.

    ``rels`` were related with every split following its leading part and the other parts left free.
    A part is free when nothing fixes its units in that graph; the first free part whose units hold a
    parameter is chosen, else the first free part (the leading one when none is free):
    ``(B, N, 3, H, hd)`` unbound along the 3 follows H, and
    ``(B, H) -> B*H`` before a batched matmul follows H as well, B being tied to the model input.
    ``base``: the labels of the ties of every node without a split.
    """
    labels = _merged(graph, base, [r for r in rels if r[0].splits])
    blocked = [b for _, blocked in rels for b in blocked] + _static_blocks(graph)
    # An op without a rule fixes what it touches here, so that a choice never exposes units to it.
    blocked += [
        (graph.slots(v, d), "")
        for rel, _ in rels
        if rule_for(rel.node.op) is None
        for v in rel.node.inputs + rel.node.outputs
        for d in range(v.ndim)
    ]
    fixed = _fixed_slots(graph, blocked, labels)
    # Among free parts, one whose units hold parameter slots first: following a part no parameter
    # shares (MaxViT's windows, merged with its heads before a batched matmul) removes nothing.
    owned = np.zeros(graph.n_slots, dtype=bool)
    for v in graph.trace.values:
        if v.source is not None and not v.source[1].endswith("_mask"):
            for d in range(v.ndim):
                owned[labels[graph.slots(v, d)]] = True
    for i, (rel, _) in enumerate(rels):
        if not rel.splits:
            continue
        choices = {}
        for k, split in enumerate(rel.splits):
            free = [p for p, d in enumerate(split.dims) if not fixed[graph.slots(split.parts, d)].any()]
            last = len(split.dims) - 1
            if split.inferred not in (None, last) and split.dims[last] == split.parts.ndim - 1:
                # a head size: the last dim's size written out next to the one torch infers
                free = [p for p in free if p != last]
            useful = [p for p in free if owned[labels[graph.slots(split.parts, split.dims[p])]].any()]
            choices[k] = (useful or free or [0])[0]
        rels[i] = _relate_node(graph, rel.node, choices)


def _edges(
    graph: Graph, rels: list[tuple[Relations, list[tuple[np.ndarray, str]]]]
) -> tuple[np.ndarray, np.ndarray]:
    edges_a: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    edges_b: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    for rel, _ in rels:
        for a, da, ia, b, db, ib, _carry in rel.ties:
            edges_a.append(graph.slots(a, da, ia))
            edges_b.append(graph.slots(b, db, ib))
    return np.concatenate(edges_a), np.concatenate(edges_b)


def _labels(graph: Graph, rels: list[tuple[Relations, list[tuple[np.ndarray, str]]]]) -> np.ndarray:
    a, b = _edges(graph, rels)
    return _components(graph.n_slots, a, b) if len(a) else np.arange(graph.n_slots)


def _merged(
    graph: Graph, base: np.ndarray, rels: list[tuple[Relations, list[tuple[np.ndarray, str]]]]
) -> np.ndarray:
    """``base`` labels (each slot's smallest member) joined by the ties of ``rels``: the components of
    both, solved on the few base labels those ties touch rather than on every slot again."""
    a, b = _edges(graph, rels)
    if not len(a):
        return base
    touched, at = np.unique(np.concatenate([base[a], base[b]]), return_inverse=True)
    joined = _components(len(touched), at[: len(a)], at[len(a) :])  # sorted: smallest label first
    remap = np.arange(graph.n_slots)
    remap[touched] = touched[joined]
    return remap[base]


def _uniform(v: Value) -> bool:
    """Whether forward made ``v`` (it has a producer) and it holds one value everywhere."""
    t = v.tensor
    return v.producer is not None and t is not None and t.numel() > 0 and bool((t == t.flatten()[0]).all())


def _static_blocks(graph: Graph) -> list[tuple[np.ndarray, str]]:
    """Constants, and the model's inputs and outputs, keep their size; but not a constant that forward
    makes holding one value everywhere (see :data:`masksparse.graph.layout.FILLED`)."""
    trace = graph.trace
    blocked = []
    for v in trace.values:
        if v.static and v.source is None and v.origin is None and not _uniform(v):
            reason = "a constant tensor with a fixed size"
            blocked += [(graph.slots(v, d), reason) for d in range(v.ndim)]
    for v, kind in [(v, "input") for v in trace.inputs] + [(v, "output") for v in trace.outputs]:
        blocked += [(graph.slots(v, d), f"a model {kind}") for d in range(v.ndim)]
    return blocked


def _relate(graph: Graph) -> None:
    rels = [_relate_node(graph, node, cut=True) for node in graph.trace.nodes]
    # The ties of nodes without a reshape split do not depend on any choice: solved once, then joined
    # with the split nodes' ties as chosen.
    base = _labels(graph, [r for r in rels if not r[0].splits])
    if any(rel.splits for rel, _ in rels):
        _choose(graph, rels, base)
    graph.relations = [rel for rel, _ in rels]
    graph.blocked = [b for _, blocked in rels for b in blocked] + _static_blocks(graph)
    graph.labels = _merged(graph, base, [r for r in rels if r[0].splits])


def _transfer(graph: Graph) -> None:
    """Constants flow through the ops in execution order."""
    graph.states.nodes = graph.trace.nodes
    graph.states.splits = {s.parts.id: s for rel in graph.relations for s in rel.splits if s.splits}
    for rel in graph.relations:
        node = rel.node
        if all(v.static for v in node.outputs):
            continue
        acc: dict[tuple[int, int], tuple[Value, np.ndarray, np.ndarray]] = {}
        for a, da, ia, b, db, ib, carry in rel.ties:
            if not carry:
                continue
            _, lo, hi = acc.setdefault(
                (b.id, db), (b, np.full(b.shape[db], np.inf), np.full(b.shape[db], -np.inf))
            )
            vals = graph.states.get(a, da)[ia]
            with np.errstate(invalid="ignore"):
                np.minimum.at(lo, ib, vals)
                np.maximum.at(hi, ib, vals)
        for (_, db), (b, lo, hi) in acc.items():
            graph.states.set(b, db, np.where(lo == hi, lo, np.nan))
        rule = rule_for(node.op)
        if rule is not None and rule.transfer is not None:
            rule.transfer(node, rel, graph.states)


def _contractions(graph: Graph) -> None:
    """Mark units that some contraction still reads; record the constants to fold elsewhere."""
    contractions: list[Contraction] = [c for rel in graph.relations for c in rel.contractions]
    uses: dict[str, int] = {}
    for c in contractions:
        if c.fold is not None:
            uses[c.fold] = uses.get(c.fold, 0) + 1
    for c in contractions:
        xs = graph.states.get(c.x, c.x_dim)[c.x_index]
        dead = xs == 0
        if c.w is not None:
            dead |= graph.states.zero(c.w, c.w_dim)[c.w_index]
        # A bias absorbs a constant for every call of its module: fold only into single-use modules.
        foldable = c.fold is not None and uses[c.fold] == 1
        fold = ~dead & np.isfinite(xs) if foldable else np.zeros(len(xs), dtype=bool)
        units = graph.labels[graph.slots(c.x, c.x_dim, c.x_index)]
        graph.live.update(units[~dead & ~fold].tolist())
        if foldable:
            assert c.fold is not None
            for k in np.nonzero(fold)[0]:
                graph.folds.append((int(units[k]), c.fold, int(c.w_index[k]), float(xs[k])))


def _flags(graph: Graph) -> None:
    for slots, reason in graph.blocked:
        for unit in np.unique(graph.labels[slots]).tolist():
            graph.fixed.setdefault(unit, reason)
    for rel in graph.relations:
        node = rel.node
        if rule_for(node.op) is not None or not node.inputs:
            continue
        for v in node.inputs + node.outputs:
            for d in range(v.ndim):
                units = graph.labels[graph.slots(v, d)]
                for unit in np.unique(units).tolist():
                    graph.unknown.setdefault(unit, node)
                if v in node.inputs:
                    # The op reads its inputs in ways no rule describes: keep what it reads, except
                    # activations the masks zeroed, which stay flagged (compaction refuses to guess).
                    read = units if v.static else units[graph.states.get(v, d) != 0]
                    graph.live.update(read.tolist())


def _leaf_slots(graph: Graph) -> tuple[list[tuple[str, str, int]], np.ndarray, np.ndarray, np.ndarray]:
    """Every slot of every parameter and buffer (masks left out): its unit, its (tensor, dim), index."""
    leaves = graph.leaves
    for v in graph.trace.values:
        if v.source is not None and not v.source[1].endswith("_mask"):
            leaves.setdefault(_leaf_name(v.source), v)
    keys: list[tuple[str, str, int]] = []
    units, key_ids, indices = [], [], []
    for (path, name), v in leaves.items():
        for d in range(v.ndim):
            units.append(graph.labels[graph.slots(v, d)])
            key_ids.append(np.full(v.shape[d], len(keys)))
            indices.append(np.arange(v.shape[d]))
            keys.append((path, name, d))
    if not keys:
        empty = np.zeros(0, dtype=np.int64)
        return keys, empty, empty, empty
    return keys, np.concatenate(units), np.concatenate(key_ids), np.concatenate(indices)


def _groups(graph: Graph) -> tuple[Group, ...]:
    """Units touching the same leaf tensors along the same dims, listed as groups."""
    keys, unit, key, index = _leaf_slots(graph)
    if not keys:
        return ()
    order = np.lexsort((index, key, unit))
    unit, key, index = unit[order], key[order], index[order]
    pair = unit * len(keys) + key
    starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
    ends = np.r_[starts[1:], len(pair)]
    pair_unit, pair_key = unit[starts], key[starts]
    # A family is the set of units touching the same (tensor, dim) keys: hash each unit's key set.
    hashes = np.random.default_rng(0).integers(1, 2**62, size=len(keys))
    ulist, inverse = np.unique(pair_unit, return_inverse=True)
    signature = np.zeros(len(ulist), dtype=np.int64)
    np.add.at(signature, inverse, hashes[pair_key])
    n_keys = np.bincount(inverse)
    sizes = np.bincount(graph.labels, minlength=graph.n_slots)
    first_pair = np.r_[0, np.cumsum(n_keys)[:-1]]
    flagged = np.zeros(graph.n_slots, dtype=bool)  # units with a reason to keep them
    flagged[list(graph.fixed) + list(graph.unknown)] = True
    groups = []
    for positions in _families(signature):
        p0 = first_pair[positions[0]]
        lone = n_keys[positions[0]] == 1 and sizes[ulist[positions[0]]] == ends[p0] - starts[p0]
        if lone:
            continue  # a dimension no rule ties to anything (a kernel dim): not worth listing
        positions = positions[np.argsort(index[starts[first_pair[positions]]], kind="stable")]
        members = []
        for k in range(n_keys[positions[0]]):
            path, name, d = keys[pair_key[p0 + k]]
            pairs = first_pair[positions] + k
            members.append(Member(path, name, d, _per_unit(index, starts[pairs], ends[pairs])))
        units = ulist[positions]
        hits = np.flatnonzero(flagged[units])
        bad = _reason(graph, int(units[hits[0]])) if len(hits) else ""
        groups.append(Group(tuple(members), len(units), not bad, bad, tuple(units.tolist())))
    return tuple(groups)


def _families(signature: np.ndarray) -> list[np.ndarray]:
    """Positions sharing a signature: families in order of first appearance, positions ascending."""
    _, first, inverse = np.unique(signature, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(inverse))]
    return [order[bounds[f] : bounds[f + 1]] for f in np.argsort(first).tolist()]


def _per_unit(index: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """``index[starts[u]:ends[u]]`` for every unit ``u``, as tuples; built without a Python loop over
    units when every unit has the same number of indices (one, mostly)."""
    lengths = ends - starts
    if (lengths == lengths[0]).all():
        if lengths[0] == 1:
            return tuple(zip(index[starts].tolist()))
        return tuple(map(tuple, index[starts[:, None] + np.arange(lengths[0])].tolist()))
    return tuple(tuple(index[a:b].tolist()) for a, b in zip(starts.tolist(), ends.tolist()))


def _reason(graph: Graph, unit: int) -> str:
    if unit in graph.fixed:
        return graph.fixed[unit]
    if unit in graph.unknown:
        return f"{graph.unknown[unit]} has no rule"
    return ""


def build(trace: Trace) -> Graph:
    """Analyse a :class:`~masksparse.graph.record.Trace` into a :class:`Graph`."""
    with _gc_paused():
        graph = Graph(trace)
        _relate(graph)
        _transfer(graph)
        _contractions(graph)
        _flags(graph)
        graph.groups = _groups(graph)
    return graph


@contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused while the analysis runs: it allocates objects by the hundred
    thousand (the groups' index tuples), none of them garbage in cycles, and the collections those
    allocations trigger walk them and every other live object (a full one takes about 0.2 s in a
    process that imported torchvision)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
