"""Rules for attention: ``nn.MultiheadAttention``'s fused kernel and ``F.scaled_dot_product_attention``.

In eval mode without gradients, ``nn.MultiheadAttention`` (batch_first, self-attention, an even number
of heads) runs one fused operation, ``aten._native_multi_head_attention``. Its rule makes *whole heads*
the units: the q, k and v rows of ``in_proj_weight``/``in_proj_bias`` that belong to head ``h`` and the
matching columns of ``out_proj.weight`` live or die together. A head is dead when its v (rows and bias)
is zero or its ``out_proj`` columns are. Compaction then turns the module into a
:class:`masksparse.compact.modules.CompactMultiheadAttention` with fewer heads of the same size (the head size
sets the softmax scale, so it never shrinks). Where ``nn.MultiheadAttention`` runs torch's decomposed
path instead (``batch_first=False``, cross-attention, an odd number of heads, ...), the reshapes it makes
merge the batch with the heads, and the layout rules keep every head.

``F.scaled_dot_product_attention`` records on CPU as ``aten._scaled_dot_product_flash_attention_for_cpu``
(4-D inputs with equal head sizes), or else as its math decomposition, which scales q and k by
``sqrt(scale)`` and normalises with ``aten._safe_softmax``. The heads dimension ties q, k, v and the
output (grouped-query attention ties each kv head to its group of q heads); q and k's last dimension
contract; v's last dimension makes the output's. With the default scale ``1 / sqrt(q.size(-1))``, that
last dimension of q and k may not shrink: the scale would change with it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from masksparse.graph.heads import head_swap
from masksparse.graph.layers import _softmax
from masksparse.graph.layout import _carry_except, _fill, _pointwise, _pointwise_transfer, _probe, _where
from masksparse.graph.record import Node, Value
from masksparse.graph.rules import Relations, Rule, States, register_rule, rule_for

aten = torch.ops.aten

__all__: list[str] = []  # rules register themselves; nothing to import


# --------------------------------------------------------------------------- nn.MultiheadAttention


def _foreign(node: Node) -> str | None:
    """Why no module switch could follow this fused attention, or None when its caller is torch's class.

    The class compaction switches to computes what ``nn.MultiheadAttention`` does, not what a subclass's
    own forward might (the pruned class of a masked module names its base).
    """
    kind = getattr(node.module_type, "_masksparse_base", node.module_type)
    if kind is nn.MultiheadAttention:
        return None
    name = getattr(kind, "__name__", "no module")
    return f"{_where(node)} is called by {name}, not nn.MultiheadAttention, which compaction can shrink"


def _head_blocker(node: Node, heads: int) -> str | None:
    """Why the heads of this fused attention must stay, or None when they may go."""
    mask = node.arg(9, "mask")
    if isinstance(mask, Value) and mask.ndim == 4 and mask.shape[1] == heads and heads > 1:
        return f"{_where(node)} applies a mask of shape (B, {heads}, L, S), which keeps its {heads} heads"
    if node.arg(10, "need_weights", True) and node.arg(11, "average_attn_weights", True):
        return (
            f"{_where(node)} averages the attention weights over all heads (need_weights=True): call it "
            f"with need_weights=False to let heads go"
        )
    return None


@register_rule(aten._native_multi_head_attention)
def _native_multi_head_attention(node: Node, rel: Relations) -> None:
    """``nn.MultiheadAttention``'s fused kernel: whole heads are the units.

    Row ``r`` of ``qkv_weight`` (q rows, then k rows, then v rows) belongs to head
    ``(r % E) // head_dim``, column ``c`` of ``proj_weight`` to head ``c // head_dim``: all of a head's
    slots are tied into one unit. The inputs' features contract with ``qkv_weight``'s columns; the
    output's features are ``proj_weight``'s rows and ``proj_bias`` (and, as torch's module requires,
    the query's width).
    """
    query, key, value = node.args[0], node.args[1], node.args[2]
    embed, heads = node.args[3], node.args[4]
    qkv_w, qkv_b, proj_w, proj_b = node.args[5], node.args[6], node.args[7], node.args[8]
    out, hd = node.outputs[0], embed // heads
    sources = list({v.id: v for v in (query, key, value)}.values())
    for v in sources:
        rel.tie(v, 0, out, 0)
        rel.contract(v, 2, qkv_w, 1)
    rel.tie(query, 1, out, 1)
    rel.tie(key, 1, value, 1)
    rel.block(key, 1, f"attended over (softmax) by {_where(node)}")
    rel.tie(query, 2, out, 2)
    rel.tie(proj_w, 0, out, 2)
    if isinstance(proj_b, Value):
        rel.tie(proj_b, 0, out, 2)
    rows, cols = np.arange(3 * embed), np.arange(embed)
    rel.tie(qkv_w, 0, proj_w, 1, rows, (rows % embed) // hd * hd)
    rel.tie(proj_w, 1, proj_w, 1, cols, cols // hd * hd)
    # Head h outputs softmax(...) @ v_h: zero when v_h's rows and bias are zero (whatever q and k
    # are), and then, or when its out_proj columns are zero, nothing reads the head.
    v_rows = 2 * embed + cols
    rel.contract(qkv_w, 0, proj_w, 1, x_index=v_rows, w_index=cols)
    if isinstance(qkv_b, Value):
        rel.tie(qkv_b, 0, proj_w, 1, rows, (rows % embed) // hd * hd)
        rel.contract(qkv_b, 0, proj_w, 1, x_index=v_rows, w_index=cols)
    if len(node.outputs) > 1:  # the attention weights, (B, H, L, S) or averaged to (B, L, S)
        weights = node.outputs[1]
        rel.tie(weights, 0, out, 0)
        if weights.ndim == 4:
            rel.tie(weights, 1, proj_w, 1, np.arange(heads), np.arange(heads) * hd)
        rel.tie(weights, weights.ndim - 2, out, 1)
        rel.tie(weights, weights.ndim - 1, key, 1)
    foreign = _foreign(node)
    if foreign is not None:
        rel.block(query, 2, foreign)
    blocker = foreign or _head_blocker(node, heads)
    if blocker is not None:
        rel.block(proj_w, 1, blocker)


# ------------------------------------------------------------------------ scaled_dot_product_attention


def _attention_dims(node: Node, rel: Relations, scale: float | None, causal: bool) -> None:
    """q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) -> out (B, H, L, Ev), extra outputs (B, H, L)."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    out = node.outputs[0]
    for x in (q, k, v):
        rel.tie(x, 0, out, 0)
    heads, kv_heads = q.shape[1], k.shape[1]
    rel.tie(q, 1, out, 1)
    rel.tie(k, 1, v, 1)
    # grouped-query attention: q head h reads kv head h // group; a kv head and its group are one unit
    group = heads // kv_heads if kv_heads and heads % kv_heads == 0 else 0
    if group:
        rel.tie(q, 1, k, 1, np.arange(heads), np.arange(heads) // group)
    else:
        rel.block(q, 1, f"heads of {_where(node)} that do not group evenly over the kv heads")
    rel.tie(q, 2, out, 2)
    rel.tie(k, 2, v, 2)
    rel.block(k, 2, f"attended over (softmax) by {_where(node)}")
    if causal:
        rel.block(q, 2, f"positions of the causal mask of {_where(node)}")
    if scale is None:
        rel.tie(q, 3, k, 3)
        rel.block(
            q,
            3,
            f"sets the softmax scale 1/sqrt({q.shape[3]}) of {_where(node)}: shrinking it would change "
            f"the scale (pass scale= to scaled_dot_product_attention to let it shrink)",
        )
    else:
        rel.contract(q, 3, k, 3)
    rel.tie(v, 3, out, 3)
    for extra in node.outputs[1:]:
        for d in range(min(extra.ndim, 3)):
            if extra.shape[d] == out.shape[d]:
                rel.tie(extra, d, out, d)
    mask = node.kwargs.get("attn_mask")
    if isinstance(mask, Value):
        targets = [(out, 0), (q, 1), (q, 2), (k, 2)][4 - mask.ndim :]
        for d, (t, td) in enumerate(targets):
            if mask.shape[d] == t.shape[td]:
                rel.tie(mask, d, t, td)


def _attention_transfer(node: Node, rel: Relations, states: States) -> None:
    """Zeros only: a head (or feature, or batch entry) whose v is zero yields zero."""
    q, v, out = node.args[0], node.args[2], node.outputs[0]
    heads, kv_heads = q.shape[1], v.shape[1]
    if not kv_heads or heads % kv_heads:
        return
    per_head = states.get(v, 1)[np.arange(heads) // (heads // kv_heads)]
    states.set(out, 0, np.where(states.get(v, 0) == 0, 0.0, np.nan))
    states.set(out, 1, np.where(per_head == 0, 0.0, np.nan))
    states.set(out, 3, np.where(states.get(v, 3) == 0, 0.0, np.nan))


def _flash_cpu(node: Node, rel: Relations) -> None:
    """``_scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, *, attn_mask, scale)``."""
    _attention_dims(node, rel, node.kwargs.get("scale"), bool(node.arg(4, "is_causal", False)))


register_rule(aten._scaled_dot_product_flash_attention_for_cpu, transfer=_attention_transfer)(_flash_cpu)


@register_rule(aten._safe_softmax)
def _safe_softmax(node: Node, rel: Relations) -> None:
    """The math decomposition's softmax (fully masked rows give zero): as ``aten._softmax``."""
    _softmax(node, rel)


def _default_scale_root(size: int) -> float:
    """``sqrt(1 / sqrt(size))``: the factor the math decomposition multiplies q and k by."""
    return math.sqrt(1.0 / math.sqrt(size))


@register_rule(aten.mul.Scalar, transfer=_pointwise_transfer)
def _mul_scalar(node: Node, rel: Relations) -> None:
    """Elementwise, but a factor ``sqrt(1 / sqrt(n))`` on a last (q) or second-to-last (k transposed)
    dimension of size ``n`` is how scaled_dot_product_attention's math decomposition applies its
    default scale: that dimension keeps its size (a coincidental match only keeps more)."""
    _pointwise(node, rel)
    x, factor = node.inputs[0], node.args[1]
    if not isinstance(factor, float) or x.ndim < 2:
        return
    for d in (x.ndim - 1, x.ndim - 2):
        if math.isclose(factor, _default_scale_root(x.shape[d]), rel_tol=1e-12):
            rel.block(
                x,
                d,
                f"scaled by sqrt(1/sqrt({x.shape[d]})) in {_where(node)}, the default softmax scale of "
                f"scaled_dot_product_attention: shrinking it would change the scale (pass scale= to let "
                f"it shrink)",
            )


# ------------------------------------------------------------ modules compaction swaps: Swin, MaxViT


def _qkv_third(node: Node, x: Value, dim: int, start: int, length: int) -> bool:
    """Is ``x[..., start : start + length]`` one of the q, k, v thirds of the last dimension, inside a
    module whose swapped class (:func:`~masksparse.graph.heads.register_head_swap`) recomputes the thirds
    from its width? Only whole heads go from each third, so the thirds stay equal."""
    if head_swap(node.module_type) is None or dim != x.ndim - 1 or x.shape[dim] % 3:
        return False
    third = x.shape[dim] // 3
    return third > 0 and length == third and start % third == 0


def _carry_third(node: Node, rel: Relations, x: Value, out: Value, dim: int, start: int) -> None:
    """The third carries slots ``start + i`` of ``x``; the other dimensions pass through."""
    n = out.shape[dim]
    rel.carry(x, dim, out, dim, src_index=start + np.arange(n), dst_index=np.arange(n))
    _carry_except(node, rel, x, out, dim, True)


def _layout_rule(op: torch._ops.OpOverload) -> Rule:
    found = rule_for(op)
    if found is None:  # layout registers it, and is imported above
        raise ImportError(f"masksparse.graph.layout registers no rule for {op}")
    return found


_plain_slice = _layout_rule(aten.slice.Tensor)
_plain_split = _layout_rule(aten.split.Tensor)


@register_rule(aten.slice.Tensor, transfer=_plain_slice.transfer)
def _slice_qkv(node: Node, rel: Relations) -> None:
    """A q, k or v third of a fused projection in a swapped module (see :func:`_qkv_third`) follows its
    units; any other slice is layout's (its fixed bounds fix the dimension)."""
    x, out = node.inputs[0], node.outputs[0]
    dim = node.arg(1, "dim", 0) % max(x.ndim, 1)
    start = node.arg(2, "start", None) or 0
    start = start + x.shape[dim] if start < 0 else start
    if node.arg(4, "step", 1) == 1 and _qkv_third(node, x, dim, start, out.shape[dim]):
        _carry_third(node, rel, x, out, dim, start)
    else:
        _plain_slice.relate(node, rel)


@register_rule(aten.split.Tensor, transfer=_plain_split.transfer)
def _split_qkv(node: Node, rel: Relations) -> None:
    """``torch.chunk(qkv, 3, dim=-1)`` in a swapped module: each third follows its units (see
    :func:`_qkv_third`); any other split is layout's."""
    x = node.inputs[0]
    dim = node.arg(2, "dim", 0) % max(x.ndim, 1)
    outs = node.outputs
    if len(outs) == 3 and all(
        _qkv_third(node, x, dim, k * o.shape[dim], o.shape[dim]) for k, o in enumerate(outs)
    ):
        for k, out in enumerate(outs):
            _carry_third(node, rel, x, out, dim, k * out.shape[dim])
    else:
        _plain_split.relate(node, rel)


_plain_view = _layout_rule(aten.view.default)


@register_rule(
    aten.view.default, aten._unsafe_view.default, aten.unsqueeze.default, transfer=_plain_view.transfer
)
def _view_one_head(node: Node, rel: Relations) -> None:
    """Layout's reshape rule; in a swapped module, a reshape to ``(..., 1, head_dim)`` also keeps its
    last dimension. With a single head, layout sees no split there (sizes of 1 are left out) and would
    let the head's features go one by one; the swapped class removes whole heads only."""
    _plain_view.relate(node, rel)
    x, out = node.inputs[0], node.outputs[0]
    if head_swap(node.module_type) is not None and out.ndim > max(x.ndim, 1) and out.shape[-2] == 1:
        rel.block(out, -1, f"the size of the one head of {_where(node)}, whose module loses whole heads only")


@register_rule(aten.zero_)
def _zero(node: Node, rel: Relations) -> None:
    """Swin v2 zeroes its k bias in place: as ``fill_``, same shape, contents unrelated."""
    _fill(node, rel)


@register_rule(aten.linalg_vector_norm, transfer=_probe)
def _vector_norm(node: Node, rel: Relations) -> None:
    """``linalg_vector_norm(x, ord, dim, keepdim)``, as ``F.normalize`` computes it: of an order above
    zero it sums ``|x|**ord`` (or takes the largest ``|x|``) over the reduced dimensions, where zero
    units add nothing and can go; other orders depend on every unit. Other dimensions pass through."""
    x = node.inputs[0]
    order = node.arg(1, "ord", 2)
    dims = node.arg(2, "dim", None)
    dims = [dims] if isinstance(dims, int) else list(dims or ())
    reduced = sorted({d % x.ndim for d in dims}) if dims else list(range(x.ndim))
    for d in reduced:
        if isinstance(order, (int, float)) and order > 0:
            rel.contract(x, d, None)
        else:
            rel.block(x, d, f"reduced over by {_where(node)} (a norm of order {order})")
    keepdim = bool(node.arg(3, "keepdim", False))
    kept = [d for d in range(x.ndim) if d not in reduced]
    for j, d in enumerate(kept):
        rel.tie(x, d, node.outputs[0], d if keepdim else j)
