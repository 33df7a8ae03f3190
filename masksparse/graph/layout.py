"""Rules for elementwise and data-movement operations (see :mod:`masksparse.graph.rules`).

Elementwise ops (torch's ``pointwise`` tag, and a few it misses) tie equal dimensions and evaluate
constants directly; views, permutes, concatenation, slicing and splitting move data and carry
constants along. Also the helpers the layer rules (:mod:`masksparse.graph.layers`) share.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from masksparse.graph.record import Node, Value
from masksparse.graph.rules import Relations, Split, States, asked_shape, register_rule, slice_constants

aten = torch.ops.aten

__all__: list[str] = []  # rules register themselves; nothing to import


def _where(node: Node) -> str:
    return f"{node.op} in {node.module or '<model>'!r}"


# --------------------------------------------------------------------------------------------- helpers


def _identity(node: Node, rel: Relations) -> None:
    x, out = node.inputs[0], node.outputs[0]
    for d in range(out.ndim):
        rel.carry(x, d, out, d)


def _probe(node: Node, rel: Relations, states: States) -> None:
    """Constants through an op that treats each tied slot on its own (pooling, reductions, resizing).

    The op is run once on an input whose constant slots hold their constant (the rest zero): because
    output slot i depends only on input slot i, the output slice is exactly what any input with that
    constant slice produces.
    """
    x, out = node.inputs[0], node.outputs[0]
    if any(not v.static for v in node.inputs[1:]):
        return
    for a, a_dim, a_index, b, b_dim, b_index, _ in rel.ties:
        if a is not x or b is not out:
            continue
        known = states.get(x, a_dim)
        if not np.isfinite(known).any():
            continue
        shape = [1] * x.ndim
        shape[a_dim] = x.shape[a_dim]
        fill = torch.tensor(np.nan_to_num(known, nan=0.0), dtype=x.dtype).reshape(shape)
        probe = fill.expand(x.shape).contiguous()
        args = _replace(node, {x.id: probe})
        result = node.op(*args[0], **args[1])
        first = result[0] if isinstance(result, (tuple, list)) else result
        got = slice_constants(first, b_dim)
        values = np.full(out.shape[b_dim], np.nan)
        ok = np.isfinite(known[a_index])
        values[b_index[ok]] = got[b_index[ok]]
        states.set(out, b_dim, values)


def _replace(node: Node, tensors: dict[int, torch.Tensor]) -> tuple[list[Any], dict[str, Any]]:
    """The node's arguments with values mapped to ``tensors`` (by value id) or their kept tensor."""

    def one(a: Any) -> Any:
        if isinstance(a, Value):
            return tensors.get(a.id, a.tensor)
        if isinstance(a, (list, tuple)):
            return type(a)(one(b) for b in a)
        return a

    return [one(a) for a in node.args], {k: one(v) for k, v in node.kwargs.items()}


def _block_all(rel: Relations, v: Value, reason: str) -> None:
    for d in range(v.ndim):
        rel.block(v, d, reason)


# ------------------------------------------------------------------------------------------ pointwise


def _pointwise(node: Node, rel: Relations) -> None:
    out = node.outputs[0]
    for v in node.inputs:
        off = out.ndim - v.ndim
        for d in range(v.ndim):
            if d + off >= 0 and v.shape[d] == out.shape[d + off]:
                rel.tie(v, d, out, d + off)
    for extra in node.outputs[1:]:
        if extra.shape == out.shape:
            for d in range(out.ndim):
                rel.tie(out, d, extra, d)


def _operand(v: Value, d: int, out: Value, states: States) -> np.ndarray:
    """Per output slot along ``d``, the constant of ``v`` that meets it (broadcasting)."""
    n = out.shape[d]
    k = d - (out.ndim - v.ndim)
    if k < 0:
        return np.full(n, states.whole(v))
    if v.shape[k] == 1 and n != 1:
        return np.full(n, states.get(v, k)[0])
    return states.get(v, k)


def _pointwise_transfer(node: Node, rel: Relations, states: States) -> None:
    out = node.outputs[0]
    tensors = [a for a in node.args if isinstance(a, Value)] + [
        a for a in node.kwargs.values() if isinstance(a, Value)
    ]
    is_mul = node.op.overloadpacket in (aten.mul, aten.mul_)
    for d in range(out.ndim):
        operands = {v.id: _operand(v, d, out, states) for v in tensors}
        known = np.ones(out.shape[d], dtype=bool)
        for arr in operands.values():
            known &= ~np.isnan(arr)
        values = np.full(out.shape[d], np.nan)
        rows = np.nonzero(known)[0]
        if len(rows):
            subs = {v.id: torch.tensor(operands[v.id][rows], dtype=v.dtype) for v in tensors}
            try:
                args, kwargs = _replace(node, subs)
                res = node.op(*args, **kwargs)
                first = res[0] if isinstance(res, (tuple, list)) else res
                values[rows] = first.detach().double().reshape(-1).numpy()
            except (RuntimeError, TypeError, ValueError):
                pass  # an operand layout the 1-D evaluation cannot express: leave unknown
        if is_mul:
            # 0 * anything finite is 0: a zeroed channel stays zero through a gate.
            for arr in operands.values():
                values[arr == 0] = 0.0
        states.set(out, d, values)


# Elementwise ops that torch does not tag ``pointwise``.
_ELEMENTWISE = (aten._prelu_kernel, aten.where, aten.masked_fill, aten.rsub, aten.hardswish, aten.hardswish_,
                aten.gelu_, aten.mish_, aten.threshold_)  # fmt: skip
register_rule("pointwise", *_ELEMENTWISE, transfer=_pointwise_transfer)(_pointwise)


# ------------------------------------------------------------------------------------------- layout


register_rule(
    aten.clone,
    aten.alias,
    aten.detach,
    aten.lift_fresh,
    aten._to_copy,
    aten.contiguous,
    aten.dropout,
    aten.feature_dropout,
    aten.alpha_dropout,
)(_identity)


def _order(node: Node, x: Value) -> list[int]:
    """Output dim ``j`` of a permute, transpose or copy is input dim ``order[j]``."""
    order = list(range(x.ndim))
    packet = node.op.overloadpacket
    if packet is aten.permute:
        order = [d % x.ndim for d in node.args[1]]
    elif x.ndim >= 2 and packet in (aten.t, aten.numpy_T):
        order = order[::-1]
    elif packet is aten.transpose:
        a, b = node.args[1] % x.ndim, node.args[2] % x.ndim
        order[a], order[b] = order[b], order[a]
    return order


@register_rule(aten.t, aten.transpose, aten.permute, aten.numpy_T)
def _permute(node: Node, rel: Relations) -> None:
    x, out = node.inputs[0], node.outputs[0]
    for d_out, d_in in enumerate(_order(node, x)):
        rel.carry(x, d_in, out, d_out)


def _blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Match the dimensions (size 1 left out) of two shapes with the same number of elements."""
    ia = [i for i, s in enumerate(a) if s != 1]
    ib = [i for i, s in enumerate(b) if s != 1]
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        da, db = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(ia):
                pa *= a[ia[i]]
                da.append(ia[i])
                i += 1
            elif pb < pa and j < len(ib):
                pb *= b[ib[j]]
                db.append(ib[j])
                j += 1
            else:
                return None
        blocks.append((da, db))
    return blocks if i == len(ia) and j == len(ib) else None


@register_rule(aten.view, aten._unsafe_view, aten.reshape, aten.squeeze, aten.unsqueeze, aten.flatten)
def _view(node: Node, rel: Relations) -> None:
    """Reshapes as merges and splits: one part of a merged or split block can shrink, the others not.

    Flattening ``(N, C, H, W)`` to ``(N, C*H*W)``: feature ``f`` belongs to channel ``f // (H*W)``,
    so removing a channel removes a contiguous block of features and H, W stay whole. Which part
    follows the merged dimension is the graph builder's choice (:class:`~masksparse.graph.rules.Split`):
    the leading part unless something else fixes it, so a fused qkv output reshaped to
    ``(B, N, 3, H, hd)`` and then unbound along the 3 follows the heads, and the heads stay equally wide.
    """
    x, out = node.inputs[0], node.outputs[0]
    blocks = _blocks(x.shape, out.shape) if 0 not in x.shape else None
    if blocks is None:
        return
    blocks = [_single_head(node, out, da, db) for da, db in blocks]
    for da, db in blocks:
        if len(da) == 1 and len(db) == 1:
            rel.carry(x, da[0], out, db[0])
            continue
        merged, parts, parts_of = (out, x, da) if len(db) == 1 else (x, out, db)
        if len(da) > 1 and len(db) > 1:
            for d in da:
                rel.block(x, d, f"reshaped together with other dimensions by {_where(node)}")
            for d in db:
                rel.block(out, d, f"reshaped together with other dimensions by {_where(node)}")
            continue
        m_dim = (db if merged is out else da)[0]
        j = rel.choose(merged, m_dim, parts, parts_of, merged is x)
        sizes = [parts.shape[d] for d in parts_of]
        f = np.arange(merged.shape[m_dim])
        coord = (f // math.prod(sizes[j + 1 :])) % sizes[j]
        if merged is out:
            rel.carry(x, parts_of[j], out, m_dim, src_index=coord, dst_index=f)
        else:
            rel.carry(x, m_dim, out, parts_of[j], src_index=f, dst_index=coord)
        for k, d in enumerate(parts_of):
            if k != j:
                rel.keep_part(parts, d, f"other part of a dimension merged or split by {_where(node)}")


def _single_head(node: Node, out: Value, da: list[int], db: list[int]) -> tuple[list[int], list[int]]:
    """``view(B, N, -1, self.head_dim)`` of a projection one head wide (multi-query attention's keys and
    values) moves the head size to the last dim, and torch infers the one head before it: still a split
    of the projection into heads and a head size written out, which keeps its size."""
    shape = asked_shape(node)
    if len(da) == len(db) == 1 and shape is not None:
        k = db[0] - 1
        if db[0] == out.ndim - 1 and k >= 0 and shape[k] == -1 and out.shape[k] == 1:
            return da, [k, db[0]]
    return da, db


@register_rule(aten.expand)
def _expand(node: Node, rel: Relations) -> None:
    x, out = node.inputs[0], node.outputs[0]
    off = out.ndim - x.ndim
    for d in range(x.ndim):
        if x.shape[d] == out.shape[d + off]:
            rel.carry(x, d, out, d + off)


@register_rule(aten.repeat)
def _repeat(node: Node, rel: Relations) -> None:
    """``x.repeat(sizes)`` tiles each dim: output slot ``i`` holds input slot ``i % n``."""
    x, out = node.inputs[0], node.outputs[0]
    off = out.ndim - x.ndim
    for d in range(x.ndim):
        f = np.arange(out.shape[d + off])
        rel.carry(x, d, out, d + off, src_index=f % max(x.shape[d], 1), dst_index=f)
    for d in range(off):
        rel.block(out, d, f"created with a fixed size by {_where(node)}")


@register_rule(aten.cat)
def _cat(node: Node, rel: Relations) -> None:
    """Concatenation: each input occupies a range of the output, at an offset."""
    out = node.outputs[0]
    dim = node.arg(1, "dim", 0) % out.ndim
    offset = 0
    for v in node.args[0]:
        if v.ndim != out.ndim:  # legacy empty tensors of shape (0,) take no part
            continue
        for d in range(out.ndim):
            if d == dim:
                n = v.shape[d]
                rel.carry(v, d, out, d, src_index=np.arange(n), dst_index=offset + np.arange(n))
            else:
                rel.carry(v, d, out, d)
        offset += v.shape[dim]


@register_rule(aten.stack)
def _stack(node: Node, rel: Relations) -> None:
    """``stack(tensors, dim)``: every input's dims carry to the output's, shifted past the new ``dim``,
    whose size (the number of tensors) is fixed."""
    out = node.outputs[0]
    dim = node.arg(1, "dim", 0) % out.ndim
    for v in node.args[0]:
        for d in range(v.ndim):
            rel.carry(v, d, out, d if d < dim else d + 1)
    rel.block(out, dim, f"the number of tensors stacked by {_where(node)}")


def _carry_except(node: Node, rel: Relations, x: Value, out: Value, dim: int, keeps_dim: bool) -> None:
    for d in range(x.ndim):
        if d == dim:
            continue
        rel.carry(x, d, out, d if keeps_dim or d < dim else d - 1)


@register_rule(aten.slice)
def _slice(node: Node, rel: Relations) -> None:
    """A slice with fixed bounds stops being the same slice once units are removed: block its dim."""
    x, out = node.inputs[0], node.outputs[0]
    dim = node.arg(1, "dim", 0) % x.ndim
    if x.shape == out.shape and node.arg(4, "step", 1) == 1:
        _identity(node, rel)
        return
    rel.block(x, dim, f"sliced with fixed bounds by {_where(node)}")
    rel.block(out, dim, f"sliced with fixed bounds by {_where(node)}")
    _carry_except(node, rel, x, out, dim, True)


@register_rule(aten.select)
def _select(node: Node, rel: Relations) -> None:
    x, out = node.inputs[0], node.outputs[0]
    dim = node.args[1] % x.ndim
    rel.block(x, dim, f"indexed with a fixed index by {_where(node)}")
    _carry_except(node, rel, x, out, dim, False)


@register_rule(aten.split, aten.split_with_sizes, aten.unbind, aten.unsafe_split, aten.chunk)
def _split(node: Node, rel: Relations) -> None:
    x = node.inputs[0]
    dim = node.arg(1 if node.op.overloadpacket is aten.unbind else 2, "dim", 0) % x.ndim
    if _equal_parts(node, rel, x, dim):
        return
    rel.block(x, dim, f"split into fixed sizes by {_where(node)}")
    for out in node.outputs:
        keeps = out.ndim == x.ndim
        if keeps:
            rel.block(out, dim, f"split into fixed sizes by {_where(node)}")
        _carry_except(node, rel, x, out, dim, keeps)


def _equal_parts(node: Node, rel: Relations, x: Value, dim: int) -> bool:
    """``chunk(n, dim)`` (which reaches aten as ``split`` into equal sizes, see ``Node.chunk``; a
    ``split`` the model calls writes its sizes out and keeps them): each part's slot ``j`` is
    the input's ``k * size + j``, and the parts lose the same slots, so that chunking the compacted
    tensor cuts it where it cut before (Phi-3's fused ``gate_up_proj``, then ``gate * up``)."""
    outs = node.outputs
    if not node.chunk or node.op.overloadpacket not in (aten.split, aten.unsafe_split) or len(outs) < 2:
        return False
    size = outs[0].shape[dim] if outs[0].ndim == x.ndim else 0
    if (
        size == 0
        or any(o.ndim != x.ndim or o.shape[dim] != size for o in outs)
        or size * len(outs) != x.shape[dim]
    ):
        return False
    j = np.arange(size)
    for k, out in enumerate(outs):
        rel.carry(x, dim, out, dim, src_index=k * size + j, dst_index=j)
        if k:
            rel.tie(outs[0], dim, out, dim)
        _carry_except(node, rel, x, out, dim, True)
    return True


_MOVES = (aten.t, aten.transpose, aten.permute, aten.clone, aten.contiguous, aten.alias, aten.detach)


def _split_source(states: States, v: Value) -> tuple[Split, list[int | None]] | None:
    """Follow ``v`` back through permutes and copies to the reshape that split it into parts: that
    split, and for each dim of ``v`` its position among the split's parts (None: not a part)."""
    dims, cur = list(range(v.ndim)), v
    while cur.id not in states.splits:
        node = states.nodes[cur.producer] if cur.producer is not None else None
        if node is None or node.op.overloadpacket not in _MOVES:
            return None
        cur = node.inputs[0]
        order = _order(node, cur)
        dims = [order[d] for d in dims]
    split = states.splits[cur.id]
    return split, [split.dims.index(d) if d in split.dims else None for d in dims]


def _picked(node: Node, rel: Relations, states: States) -> None:
    """Constants of what ``select``/``unbind`` picks out of a split part, read jointly off the merged
    dimension: ``v`` of a fused qkv is zero in head h when the v rows of head h are, whatever q and k
    hold there (the per-dimension constants of the heads mix q, k and v)."""
    x = node.inputs[0]
    dim = node.arg(1, "dim", 0) % x.ndim
    found = _split_source(states, x)
    if found is None or found[1][dim] is None:
        return
    split, pos = found
    sizes = [split.parts.shape[d] for d in split.dims]
    table = states.get(split.merged, split.merged_dim).reshape(sizes)
    picks = [node.args[2] % x.shape[dim]] if node.op.overloadpacket is aten.select else range(x.shape[dim])
    for out, k in zip(node.outputs, picks):
        sub = np.take(table, k, axis=pos[dim])
        for d in range(x.ndim):
            p = pos[d]
            if d == dim or p is None:
                continue
            rows = np.moveaxis(sub, p - (p > pos[dim]), 0).reshape(sizes[p], -1)
            lo, hi = rows.min(1), rows.max(1)
            states.set(out, d - (d > dim), np.where(lo == hi, lo, np.nan))


register_rule(aten.select, transfer=_picked)(_select)
register_rule(aten.unbind, transfer=_picked)(_split)


def _pad(node: Node, rel: Relations) -> None:
    x, out = node.inputs[0], node.outputs[0]
    pad = list(node.args[1])
    padded = {x.ndim - 1 - k // 2 for k, p in enumerate(pad) if p != 0}
    for d in range(x.ndim):
        if d in padded:
            rel.block(x, d, f"padded by {_where(node)}")
        else:
            rel.tie(x, d, out, d)  # not carry: the padding value is part of every slice


register_rule(aten.constant_pad_nd, transfer=_probe)(_pad)


@register_rule(aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like)
def _like(node: Node, rel: Relations) -> None:
    # Same shape as the input, contents unrelated: shrinks along with it, constants do not carry.
    x, out = node.inputs[0], node.outputs[0]
    for d in range(out.ndim):
        rel.tie(x, d, out, d)


@register_rule(aten.roll)
def _roll(node: Node, rel: Relations) -> None:
    """A roll moves data along its dims: those keep their size; the others pass through."""
    x, out = node.inputs[0], node.outputs[0]
    dims = node.arg(2, "dims", [])
    rolled = {d % x.ndim for d in dims} if dims else set(range(x.ndim))
    for d in range(x.ndim):
        if d in rolled:
            rel.block(x, d, f"rolled by {_where(node)}")
        else:
            rel.carry(x, d, out, d)


@register_rule(aten.index)
def _index(node: Node, rel: Relations) -> None:
    """``x[..., idx, ...]`` with one index tensor: the indexed dim is blocked, the others pass through."""
    x, out = node.args[0], node.outputs[0]
    indices = list(node.args[1])
    used = [k for k, i in enumerate(indices) if i is not None]
    if len(used) != 1 or not isinstance(indices[used[0]], Value):
        return  # advanced indexing over several dims: every dim left unexplained is blocked
    k, idx = used[0], indices[used[0]]
    rel.block(x, k, f"indexed by {_where(node)}")
    for d in range(x.ndim):
        if d != k:
            rel.carry(x, d, out, d if d < k else d + idx.ndim - 1)
    for d in range(idx.ndim):
        rel.tie(idx, d, out, k + d)


# Factories of tensors holding one value everywhere: such a tensor is the same whatever its size, so it
# shrinks with what it meets, made again by the module's code from the attributes compaction updates
# (T5's cross-attention adds ``torch.zeros((1, self.n_heads, q, k))`` to its scores, and the later layers
# add the same tensor). A size written as a literal fails verification instead, which keeps those units.
FILLED = (aten.zeros, aten.ones, aten.full)


@register_rule(*FILLED)
def _filled(node: Node, rel: Relations) -> None:
    rel.ignore(node.outputs[0])


@register_rule(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full)
def _new(node: Node, rel: Relations) -> None:
    """A new tensor of a fixed size: its input only lends dtype and device."""
    rel.ignore(node.inputs[0])
    for d in range(node.outputs[0].ndim):
        rel.block(node.outputs[0], d, f"created with a fixed size by {_where(node)}")


@register_rule(aten.fill_, aten.fill)
def _fill(node: Node, rel: Relations) -> None:
    # Overwritten with one value: same shape as before, contents unrelated (no constant carried).
    x, out = node.inputs[0], node.outputs[0]
    for d in range(out.ndim):
        rel.tie(x, d, out, d)
    for v in node.inputs[1:]:
        rel.ignore(v)


def _same_layout(x: Value, size: list[int], stride: list[int], offset: int | None) -> bool:
    """Does the view ``(size, stride, offset)`` of ``x``'s storage put every element of ``x`` where it
    was? Only if the sizes match and so do the offset and the strides of every dim longer than 1."""
    if x.stride is None or tuple(size) != x.shape:
        return False
    if 0 in x.shape:
        return True
    if offset is not None and offset != x.storage_offset:
        return False
    return all(n == 1 or a == b for n, a, b in zip(size, stride, x.stride))


@register_rule(aten.as_strided, aten.as_strided_)
def _as_strided(node: Node, rel: Relations) -> None:
    """A restride is a no-op on the data when each element keeps its place (an adaptive pooling to 1x1
    of a permuted tensor restrides its fresh ``(N, C, 1, 1)`` output to channels-last); any other
    restride moves elements in ways only the strides tell, so every dim keeps its size."""
    x, out = node.inputs[0], node.outputs[0]
    size, stride = list(node.args[1]), list(node.arg(2, "stride"))
    if _same_layout(x, size, stride, node.arg(3, "storage_offset")):
        _identity(node, rel)
        return
    _block_all(rel, x, f"restrided by {_where(node)}, which moves elements")
    _block_all(rel, out, f"restrided by {_where(node)}, which moves elements")


# Filled with random numbers (dropout's noise in training mode): same shape as the input, contents
# unrelated, so no transfer; a product with the noise stays zero where the other factor is.
register_rule(aten.bernoulli, aten.bernoulli_, aten.uniform_, aten.normal_, aten.exponential_)(_pointwise)
