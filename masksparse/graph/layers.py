"""Rules for layers: convolution, matmul, normalisation, pooling and reductions.

See :mod:`masksparse.graph.rules` for the vocabulary. A convolution or a matmul *contracts* its input
channels against the weight's columns and makes its output channels from the weight's rows;
normalisations tie their per-channel tensors to the channel dim (and block dims they normalise over);
pooling and reductions act on spatial dims channel by channel.
"""

from __future__ import annotations

import numpy as np
import torch

from masksparse.graph.layout import _operand, _probe, _where
from masksparse.graph.record import Node, Value
from masksparse.graph.rules import Inexact, Relations, States, register_rule

aten = torch.ops.aten

__all__: list[str] = []  # rules register themselves; nothing to import


# ------------------------------------------------------------------------------------- convolution


def _conv_fold(node: Node, w: Value) -> str | None:
    """The module whose bias can absorb a constant input channel: a plain 1x1 conv without padding."""
    padding, transposed, groups = node.args[4], node.args[6], node.args[8]
    plain = not transposed and groups == 1 and all(p == 0 for p in padding)
    is_conv = node.module_type is not None and issubclass(node.module_type, torch.nn.modules.conv._ConvNd)
    ones = all(k == 1 for k in w.shape[2:])
    if (
        plain
        and is_conv
        and ones
        and w.static
        and w.origin in ((node.module, "weight"), (node.module, "weight_orig"))
    ):
        return node.module
    return None


@register_rule(aten.convolution)
def _convolution(node: Node, rel: Relations) -> None:
    """Convolution (1d/2d/3d, grouped, depthwise, transposed).

    Plain: the weight's output dim makes the output channels, its input dim is contracted with the
    input channels. Depthwise (groups == input channels): each input channel feeds its own outputs,
    so they form one unit. Other grouped convs keep their outputs (each group must stay equally wide)
    and remove an input column from every group at once.
    """
    x, w, out = node.args[0], node.args[1], node.outputs[0]
    b = node.args[2]
    transposed, groups = node.args[6], node.args[8]
    c = x.ndim - (w.ndim - 2) - 1  # channel dim of input and output
    for d in range(c):
        rel.tie(x, d, out, d)
    for d in range(c + 1, x.ndim):
        rel.block(x, d, f"spatial dimension of {_where(node)}")
        rel.block(out, d, f"spatial dimension of {_where(node)}")
    w_out, w_in = (1, 0) if transposed else (0, 1)
    n_in, n_out = x.shape[c], out.shape[c]
    if groups == 1:
        rel.tie(w, w_out, out, c)
        if isinstance(b, Value):
            rel.tie(b, 0, out, c)
        rel.contract(x, c, w, w_in, fold=_conv_fold(node, w))
    elif not transposed and groups == n_in and n_out % n_in == 0:
        o = np.arange(n_out)
        rel.tie(w, 0, out, c)
        if isinstance(b, Value):
            rel.tie(b, 0, out, c)
        rel.tie(x, c, out, c, o // (n_out // n_in), o)
    else:
        o = np.arange(n_out)
        rel.tie(w, w_out, out, c, o % w.shape[w_out], o)
        if isinstance(b, Value):
            rel.tie(b, 0, out, c)
        rel.block(out, c, f"output channels of the grouped {_where(node)}")
        per_group = n_in // groups
        i = np.arange(n_in)
        rel.contract(x, c, w, w_in, x_index=i, w_index=i % per_group)


def _conv_transfer(node: Node, rel: Relations, states: States) -> None:
    """Output channel o is the constant ``bias[o] + sum_i W[o, i] * c_i`` when every input channel it
    reads is a constant, and the conv has no padding (padding makes the borders differ); with padding
    only zero inputs qualify."""
    x, w, b, out = node.args[0], node.args[1], node.args[2], node.outputs[0]
    transposed, groups = node.args[6], node.args[8]
    if w.tensor is None or transposed:
        return
    c = x.ndim - (w.ndim - 2) - 1
    s = states.get(x, c)
    n_out, per_group = w.shape[0], w.shape[1]
    nz = states.nonzero(w)  # (n_out, per_group): does output o read input j at all
    bias = states.get(b, 0) if isinstance(b, Value) else np.zeros(n_out)
    if not np.isfinite(s).any():
        # No input channel is a known constant (so in every unmasked model): only an output channel
        # that reads nothing is one, its bias.
        states.set(out, c, np.where(nz.any(1), np.nan, bias))
        return
    # The input constants each output channel meets; one row broadcast to all when not grouped.
    s_o = s[None, :] if groups == 1 else s.reshape(groups, per_group)[np.arange(n_out) // (n_out // groups)]
    padded = any(p != 0 for p in node.args[4])
    need = s_o == 0 if padded else np.isfinite(s_o)
    ok = np.all(~nz | need, axis=1)
    use = nz & np.isfinite(s_o) & (s_o != 0)
    contrib = np.zeros(n_out)
    if use.any():
        wsum = w.tensor.detach().reshape(n_out, per_group, -1).sum(-1).double().numpy()
        contrib = np.where(use, wsum * np.nan_to_num(s_o), 0.0).sum(1)
    states.set(out, c, np.where(ok, bias + contrib, np.nan))


register_rule(aten.convolution, transfer=_conv_transfer)(_convolution)


# ------------------------------------------------------------------------------------------ matmul


def _linear_fold(node: Node, wt: Value) -> str | None:
    if node.op.overloadpacket is aten.addmm and (node.arg(3, "beta", 1) != 1 or node.arg(4, "alpha", 1) != 1):
        return None
    is_linear = node.module_type is not None and issubclass(node.module_type, torch.nn.Linear)
    if is_linear and wt.static and wt.origin is not None and wt.origin[0] == node.module:
        return node.module if wt.origin[1] in ("weight", "weight_orig") else None
    return None


def _tie_broadcast(rel: Relations, bias: object, out: Value) -> None:
    """An added term (a bias) broadcast against ``out``: its dims tie to the trailing dims they match."""
    if isinstance(bias, Value):
        off = out.ndim - bias.ndim
        for d in range(bias.ndim):
            if d + off >= 0 and bias.shape[d] == out.shape[d + off]:
                rel.tie(bias, d, out, d + off)


@register_rule(aten.mm, aten.addmm)
def _mm(node: Node, rel: Relations) -> None:
    """``x @ wt (+ bias)``: x's columns contract with wt's rows; wt's columns make the outputs."""
    addmm = node.op.overloadpacket is aten.addmm
    bias, x, wt = (node.args[0], node.args[1], node.args[2]) if addmm else (None, node.args[0], node.args[1])
    out = node.outputs[0]
    rel.tie(x, 0, out, 0)
    rel.tie(wt, 1, out, 1)
    _tie_broadcast(rel, bias, out)
    rel.contract(x, 1, wt, 0, fold=_linear_fold(node, wt))


def _mm_transfer(node: Node, rel: Relations, states: States) -> None:
    """Output column n is constant when every input column that weight column n reads is constant."""
    addmm = node.op.overloadpacket is aten.addmm
    bias, x, wt = (node.args[0], node.args[1], node.args[2]) if addmm else (None, node.args[0], node.args[1])
    out = node.outputs[0]
    if wt.tensor is None:
        return
    s = states.get(x, 1)
    known = np.isfinite(s)
    if known.all():
        ok = np.ones(out.shape[1], dtype=bool)
    elif known.any():
        ok = ~states.nonzero(wt)[~known].any(0)
    else:
        ok = states.zero(wt, 1)
    value = np.zeros(out.shape[1])
    if known.any() and ok.any():  # no sum to take when no output column comes out constant
        w = wt.tensor.detach()[torch.from_numpy(known)].double()
        value = (torch.from_numpy(s[known]) @ w).numpy() * node.arg(4, "alpha", 1)
    if isinstance(bias, Value):
        value = value + node.arg(3, "beta", 1) * _operand(bias, 1, out, states)
    states.set(out, 1, np.where(ok, value, np.nan))


register_rule(aten.mm, aten.addmm, transfer=_mm_transfer)(_mm)


def _bmm_parts(node: Node) -> tuple[Value | None, Value, Value]:
    """``(added term, batch1, batch2)`` of a bmm (no added term) or a baddbmm."""
    if node.op.overloadpacket is aten.baddbmm:
        return node.args[0], node.args[1], node.args[2]
    return None, node.args[0], node.args[1]


@register_rule(aten.bmm, aten.baddbmm)
def _bmm(node: Node, rel: Relations) -> None:
    """``a @ b`` batch by batch (``beta * input + alpha * a @ b`` for baddbmm, as BLOOM's attention
    scores are computed): a's last dim contracts with b's middle one."""
    bias, a, b = _bmm_parts(node)
    out = node.outputs[0]
    rel.tie(a, 0, out, 0)
    rel.tie(b, 0, out, 0)
    rel.tie(a, 1, out, 1)
    rel.tie(b, 2, out, 2)
    rel.contract(a, 2, b, 1)
    _tie_broadcast(rel, bias, out)


def _bmm_transfer(node: Node, rel: Relations, states: States) -> None:
    """Zeros only: a batch entry either factor zeroes is zero, and so are the rows of ``a`` and the
    columns of ``b`` that are zero (attention over the v of a masked head yields zero); for baddbmm
    only where the added term is zero too."""
    bias, a, b = _bmm_parts(node)
    out = node.outputs[0]
    zeros = [
        (states.get(a, 0) == 0) | (states.get(b, 0) == 0),
        states.get(a, 1) == 0,
        states.get(b, 2) == 0,
    ]
    for d, zero in enumerate(zeros):
        if isinstance(bias, Value):
            zero = zero & (_operand(bias, d, out, states) == 0)
        states.set(out, d, np.where(zero, 0.0, np.nan))


register_rule(aten.bmm, aten.baddbmm, transfer=_bmm_transfer)(_bmm)


@register_rule(aten.addbmm)
def _addbmm(node: Node, rel: Relations) -> None:
    """``beta * input + alpha * sum_i a[i] @ b[i]``: the batch dim and a's last dim are summed over."""
    bias, a, b, out = node.args[0], node.args[1], node.args[2], node.outputs[0]
    rel.contract(a, 0, b, 0)
    rel.contract(a, 2, b, 1)
    rel.tie(a, 1, out, 0)
    rel.tie(b, 2, out, 1)
    _tie_broadcast(rel, bias, out)


# ---------------------------------------------------------------------------------- normalisation


def _batch_norm_parts(node: Node) -> tuple[Value, list[Value | None], bool, float]:
    x = node.args[0]
    packet = node.op.overloadpacket
    if packet is aten._native_batch_norm_legit_no_training:
        return x, list(node.args[1:5]), False, node.args[6]
    if packet is aten._native_batch_norm_legit and len(node.args) == 6:  # the overload without stats
        return x, [node.args[1], node.args[2], None, None], True, node.args[5]
    return x, list(node.args[1:5]), bool(node.args[5]), node.args[7]


@register_rule(
    aten.native_batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit
)
def _batch_norm(node: Node, rel: Relations) -> None:
    """Batch norm: every per-channel tensor (affine, running stats) is tied to the channel dim."""
    x, per_channel, _, _ = _batch_norm_parts(node)
    out = node.outputs[0]
    for d in range(x.ndim):
        rel.tie(x, d, out, d)
    for v in per_channel:
        if isinstance(v, Value):
            rel.tie(v, 0, out, 1)
    for extra in node.outputs[1:]:
        if extra.ndim == 1 and extra.shape[0] == x.shape[1]:
            rel.tie(extra, 0, out, 1)


def _batch_norm_transfer(node: Node, rel: Relations, states: States) -> None:
    x, (w, b, mean, var), batch_stats, eps = _batch_norm_parts(node)
    n = x.shape[1]
    s = states.get(x, 1)
    scale = states.get(w, 0) if isinstance(w, Value) else np.ones(n)
    shift = states.get(b, 0) if isinstance(b, Value) else np.zeros(n)
    if batch_stats or not isinstance(mean, Value) or not isinstance(var, Value):
        # A constant channel normalises to zero: the output is the shift.
        value = np.where(np.isfinite(s), shift, np.nan)
    else:
        mu, sigma2 = states.get(mean, 0), states.get(var, 0)
        value = (s - mu) / np.sqrt(sigma2 + eps) * scale + shift
    value = np.where(scale == 0, shift, value)
    states.set(node.outputs[0], 1, value)


register_rule(
    aten.native_batch_norm,
    aten._native_batch_norm_legit_no_training,
    aten._native_batch_norm_legit,
    transfer=_batch_norm_transfer,
)(_batch_norm)


def _normalised(what: str) -> Inexact:
    return Inexact(f"{what} (not exact to prune; allow_inexact=True prunes it anyway)")


@register_rule(aten.native_layer_norm)
def _layer_norm(node: Node, rel: Relations) -> None:
    """Layer norm normalises over its last dims: removing a unit there changes every output, so they
    are blocked with an :class:`~masksparse.graph.inexact.Inexact` reason (removable on request)."""
    x, out = node.args[0], node.outputs[0]
    k = len(node.args[1])
    for d in range(x.ndim):
        rel.tie(x, d, out, d)
    for v in (node.args[2], node.args[3]):
        if isinstance(v, Value):
            for j in range(k):
                rel.tie(v, j, x, x.ndim - k + j)
    for d in range(x.ndim - k, x.ndim):
        rel.block(x, d, _normalised(f"normalised over by {_where(node)}"))
    for extra in node.outputs[1:]:
        for d in range(x.ndim - k):
            rel.tie(x, d, extra, d)


@register_rule(aten.native_group_norm)
def _group_norm(node: Node, rel: Relations) -> None:
    """Group norm normalises each group of channels: the channels are blocked as a layer norm's are."""
    x, out = node.args[0], node.outputs[0]
    for d in range(x.ndim):
        rel.tie(x, d, out, d)
    for v in (node.args[1], node.args[2]):
        if isinstance(v, Value):
            rel.tie(v, 0, x, 1)
    rel.block(x, 1, _normalised(f"channels normalised in groups by {_where(node)}"))
    for extra in node.outputs[1:]:
        rel.tie(x, 0, extra, 0)


@register_rule(aten._softmax, aten._log_softmax)
def _softmax(node: Node, rel: Relations) -> None:
    x, out = node.args[0], node.outputs[0]
    dim = node.args[1] % x.ndim
    for d in range(x.ndim):
        rel.tie(x, d, out, d)
    rel.block(x, dim, f"normalised over by {_where(node)}")


# ----------------------------------------------------------------------------- pooling, reductions

_SPATIAL = {
    aten.max_pool1d: 1, aten.max_pool1d_with_indices: 1, aten.avg_pool1d: 1, aten.adaptive_avg_pool1d: 1,
    aten.adaptive_max_pool1d: 1, aten.max_pool2d: 2, aten.max_pool2d_with_indices: 2, aten.avg_pool2d: 2,
    aten._adaptive_avg_pool2d: 2, aten.adaptive_avg_pool2d: 2, aten.adaptive_max_pool2d: 2,
    aten.max_pool3d: 3, aten.max_pool3d_with_indices: 3, aten.avg_pool3d: 3, aten._adaptive_avg_pool3d: 3,
    aten.adaptive_max_pool3d: 3, aten.upsample_nearest1d: 1, aten.upsample_nearest2d: 2,
    aten.upsample_nearest3d: 3, aten._upsample_nearest_exact2d: 2, aten.upsample_bilinear2d: 2,
    aten.upsample_linear1d: 1, aten.upsample_bicubic2d: 2, aten.upsample_trilinear3d: 3,
}  # fmt: skip


def _spatial_op(node: Node, rel: Relations) -> None:
    """Pooling and resizing act on the trailing spatial dims of each channel separately."""
    x = node.inputs[0]
    k = _SPATIAL[node.op.overloadpacket]
    for out in node.outputs:
        for d in range(x.ndim - k):
            rel.tie(x, d, out, d)
        for d in range(x.ndim - k, x.ndim):
            rel.block(out, d, f"spatial dimension of {_where(node)}")
    for d in range(x.ndim - k, x.ndim):
        rel.block(x, d, f"spatial dimension of {_where(node)}")


register_rule(*_SPATIAL, transfer=_probe)(_spatial_op)


def _reduced_dims(node: Node, x: Value) -> list[int]:
    dims = node.arg(1, "dim", None)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(x.ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({d % x.ndim for d in dims})


def _in_rms_norm(node: Node) -> bool:
    return node.module_type is not None and issubclass(node.module_type, torch.nn.RMSNorm)


_REDUCTIONS = (aten.mean, aten.sum, aten.amax, aten.amin, aten.max.dim, aten.max.default, aten.min.dim,
               aten.min.default)  # fmt: skip


def _reduction(node: Node, rel: Relations) -> None:
    """A sum over a dimension adds its units (zero units can go); mean, max and min depend on every
    unit of the reduced dimension, so it is blocked. Other dimensions pass through."""
    x = node.inputs[0]
    reduced = _reduced_dims(node, x)
    keepdim = bool(node.arg(2, "keepdim", False))
    summing = node.op.overloadpacket is aten.sum
    for d in reduced:
        if summing:
            rel.contract(x, d, None)
        elif node.op.overloadpacket is aten.mean and _in_rms_norm(node):
            # nn.RMSNorm records as x * rsqrt(mean(x^2) + eps): the mean is its normalisation
            rel.block(x, d, _normalised(f"normalised over by {_where(node)}"))
        else:
            rel.block(x, d, f"reduced over by {_where(node)}")
    kept = [d for d in range(x.ndim) if d not in reduced]
    for out in node.outputs:
        for j, d in enumerate(kept):
            rel.tie(x, d, out, d if keepdim else j)


register_rule(*_REDUCTIONS, transfer=_probe)(_reduction)


@register_rule(aten.embedding)
def _embedding(node: Node, rel: Relations) -> None:
    """``weight[indices]``: feature j of every output is column j of the table; rows are picked by index."""
    weight, indices, out = node.args[0], node.args[1], node.outputs[0]
    rel.carry(weight, 1, out, out.ndim - 1)
    rel.block(weight, 0, f"rows looked up by index in {_where(node)}")
    for d in range(indices.ndim):
        rel.tie(indices, d, out, d)
