"""Compact forms of torchvision's windowed attention, which compaction switches a module to when it loses
heads.

torchvision's Swin attention (v1 and v2) derives its head size from its input width (``C // num_heads``),
and MaxViT's reshapes its heads back to its input width: neither forward runs with fewer heads. A
module of theirs that loses heads becomes a :class:`CompactShiftedWindowAttention`,
:class:`CompactShiftedWindowAttentionV2` or :class:`CompactRelativePositionalMultiHeadAttention` in place
(its class is swapped; parameters and state_dict keys stay), with the original head size.

masksparse imports this module (and so torchvision) only when a model with a torchvision module is
traced (see :func:`masksparse.graph.heads.head_swap`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import maxvit as _maxvit  # type: ignore[import-untyped]
from torchvision.models import swin_transformer as _swin

from masksparse.compact.slicers import register_slicer, swap_heads
from masksparse.graph.heads import register_head_swap

__all__ = [
    "CompactRelativePositionalMultiHeadAttention",
    "CompactShiftedWindowAttention",
    "CompactShiftedWindowAttentionV2",
]


def _window_attention(attn: Any, x: Tensor, position_bias: Tensor, logit_scale: Tensor | None) -> Tensor:
    """torchvision's ``shifted_window_attention`` with ``attn.num_heads`` heads of ``attn.head_dim``.

    The same operations in the same order (padding, cyclic shift, windows, the shift mask, the softmax
    scale or v2's cosine attention and its k bias held at zero, dropout), except that q, k and v are
    split into heads of ``attn.head_dim`` rather than ``C // num_heads``, and the heads are merged to
    ``num_heads * head_dim`` rather than ``C`` before ``proj``.
    """
    window, heads, hd = attn.window_size, attn.num_heads, attn.head_dim
    training, qkv_bias = attn.training, attn.qkv.bias
    b, h, w, c = x.shape
    pad_r = (window[1] - w % window[1]) % window[1]
    pad_b = (window[0] - h % window[0]) % window[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    shift = list(attn.shift_size)
    # a window as large as the feature map needs no shift
    if window[0] >= pad_h:
        shift[0] = 0
    if window[1] >= pad_w:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    num_windows = (pad_h // window[0]) * (pad_w // window[1])
    x = x.view(b, pad_h // window[0], window[0], pad_w // window[1], window[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * num_windows, window[0] * window[1], c)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    qkv = F.linear(x, attn.qkv.weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        scores = (q * hd**-0.5).matmul(k.transpose(-2, -1))
    scores = scores + position_bias
    if sum(shift) > 0:
        mask = _shift_mask(x, pad_h, pad_w, window, shift, num_windows)
        scores = scores.view(x.size(0) // num_windows, num_windows, heads, x.size(1), x.size(1))
        scores = scores + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, heads, x.size(1), x.size(1))
    scores = F.dropout(F.softmax(scores, dim=-1), p=attn.attention_dropout, training=training)
    x = scores.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), heads * hd)
    x = F.dropout(F.linear(x, attn.proj.weight, attn.proj.bias), p=attn.dropout, training=training)
    out = x.size(-1)
    x = x.view(b, pad_h // window[0], pad_w // window[1], window[0], window[1], out)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, out)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def _shift_mask(
    x: Tensor, pad_h: int, pad_w: int, window: list[int], shift: list[int], num_windows: int
) -> Tensor:
    """The additive mask (0 or -100) keeping shifted windows from attending across the wrap-around."""
    mask = x.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    count = 0
    for hs in h_slices:
        for ws in w_slices:
            mask[hs[0] : hs[1], ws[0] : ws[1]] = count
            count += 1
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _relative_attention(attn: Any, x: Tensor) -> Tensor:
    """torchvision's ``RelativePositionalMultiHeadAttention.forward``, with the heads merged to
    ``n_heads * head_dim`` rather than the input width before ``merge``."""
    b, g, p, _ = x.shape
    heads, hd = attn.n_heads, attn.head_dim
    q, k, v = torch.chunk(attn.to_qkv(x), 3, dim=-1)
    q = q.reshape(b, g, p, heads, hd).permute(0, 1, 3, 2, 4)
    k = k.reshape(b, g, p, heads, hd).permute(0, 1, 3, 2, 4)
    v = v.reshape(b, g, p, heads, hd).permute(0, 1, 3, 2, 4)
    k = k * attn.scale_factor
    scores = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
    scores = F.softmax(scores + attn.get_relative_positional_bias(), dim=-1)
    out = torch.einsum("B G H I J, B G H J D -> B G H I D", scores, v)
    return attn.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, heads * hd))


class _WindowHeads(nn.Module):
    """Shared by the compact Swin classes: the head size is the qkv rows per head, held apart from
    the input width."""

    qkv: nn.Linear
    num_heads: int

    @property
    def head_dim(self) -> int:
        """The size of one head: ``qkv.out_features // (3 * num_heads)``, whatever the input width."""
        return self.qkv.out_features // (3 * self.num_heads)

    def forward(self, x: Tensor) -> Tensor:
        """What the torchvision class computes, over ``num_heads`` heads of ``head_dim``."""
        bias = self.get_relative_position_bias()  # type: ignore[operator]
        return _window_attention(self, x, bias, getattr(self, "logit_scale", None))


class CompactShiftedWindowAttention(_WindowHeads, _swin.ShiftedWindowAttention):
    """torchvision's Swin ``ShiftedWindowAttention`` with heads of a size apart from the input width.

    Same parameters, buffers and state_dict keys (``qkv`` of ``3 * num_heads * head_dim`` rows,
    ``proj`` of ``num_heads * head_dim`` columns, a ``relative_position_bias_table`` column per
    head) and the same forward, shifted windows, mask and dropout included. Compaction creates it
    by swapping the class of a module that lost heads.

    Example:
        >>> import torch
        >>> from torchvision.models.swin_transformer import ShiftedWindowAttention
        >>> from masksparse.compact.torchvision_attention import CompactShiftedWindowAttention
        >>> attn = ShiftedWindowAttention(16, [4, 4], [2, 2], num_heads=2).eval()
        >>> x = torch.randn(1, 8, 8, 16)
        >>> same = ShiftedWindowAttention(16, [4, 4], [2, 2], num_heads=2).eval()
        >>> _ = same.load_state_dict(attn.state_dict())
        >>> same.__class__ = CompactShiftedWindowAttention
        >>> same.head_dim, torch.allclose(same(x), attn(x), atol=1e-6)
        (8, True)
    """


class CompactShiftedWindowAttentionV2(_WindowHeads, _swin.ShiftedWindowAttentionV2):
    """torchvision's Swin v2 ``ShiftedWindowAttentionV2`` with heads of a size apart from the input
    width: as :class:`CompactShiftedWindowAttention`, with v2's cosine attention, one
    ``logit_scale`` per head and a ``cpb_mlp`` whose last layer gives one bias per head.

    Example:
        >>> import torch
        >>> from torchvision.models.swin_transformer import ShiftedWindowAttentionV2
        >>> from masksparse.compact.torchvision_attention import CompactShiftedWindowAttentionV2
        >>> attn = ShiftedWindowAttentionV2(16, [4, 4], [2, 2], num_heads=2).eval()
        >>> same = ShiftedWindowAttentionV2(16, [4, 4], [2, 2], num_heads=2).eval()
        >>> _ = same.load_state_dict(attn.state_dict())
        >>> same.__class__ = CompactShiftedWindowAttentionV2
        >>> x = torch.randn(1, 8, 8, 16)
        >>> torch.allclose(same(x), attn(x), atol=1e-6)
        True
    """


register_head_swap(
    [_swin.ShiftedWindowAttention, CompactShiftedWindowAttention],
    heads="num_heads",
    compact=CompactShiftedWindowAttention,
)
register_head_swap(
    [_swin.ShiftedWindowAttentionV2, CompactShiftedWindowAttentionV2],
    heads="num_heads",
    compact=CompactShiftedWindowAttentionV2,
)


class CompactRelativePositionalMultiHeadAttention(_maxvit.RelativePositionalMultiHeadAttention):
    """torchvision's MaxViT ``RelativePositionalMultiHeadAttention`` whose ``n_heads * head_dim`` may
    be less than its input width.

    Same parameters, buffers and state_dict keys (``to_qkv`` of ``3 * n_heads * head_dim`` rows,
    ``merge`` of ``n_heads * head_dim`` columns, a ``relative_position_bias_table`` column per head)
    and the same forward, whose ``scale_factor`` stays what it was. Compaction creates it by
    swapping the class of a module that lost heads.

    Example:
        >>> import torch
        >>> from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
        >>> from masksparse.compact.torchvision_attention import CompactRelativePositionalMultiHeadAttention
        >>> attn = RelativePositionalMultiHeadAttention(16, 8, max_seq_len=4)
        >>> same = RelativePositionalMultiHeadAttention(16, 8, max_seq_len=4)
        >>> _ = same.load_state_dict(attn.state_dict())
        >>> same.__class__ = CompactRelativePositionalMultiHeadAttention
        >>> x = torch.randn(1, 2, 4, 16)
        >>> torch.allclose(same(x), attn(x), atol=1e-6)
        True
    """

    def forward(self, x: Tensor) -> Tensor:
        """What the torchvision class computes, over ``n_heads`` heads of ``head_dim``."""
        return _relative_attention(self, x)


register_head_swap(
    [_maxvit.RelativePositionalMultiHeadAttention, CompactRelativePositionalMultiHeadAttention],
    heads="n_heads",
    compact=CompactRelativePositionalMultiHeadAttention,
)


for _cls in (_swin.ShiftedWindowAttention, _maxvit.RelativePositionalMultiHeadAttention):
    register_slicer(_cls)(swap_heads)
