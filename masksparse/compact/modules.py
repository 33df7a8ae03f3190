"""Layers that compaction switches a module to when torch's own class cannot hold its new shape.

``nn.MultiheadAttention`` requires its inner width (heads times head size) to equal ``embed_dim``, the
width of the query. Removing whole heads breaks that, so compaction turns the module into a
:class:`CompactMultiheadAttention` in place (its class is swapped; parameters, their names and the
state_dict keys stay as they were) with the kept number of heads and the original head size, so the
softmax scale ``1 / sqrt(head_dim)`` does not change.

The compact forms of torchvision's Swin and MaxViT attention are in
:mod:`masksparse.compact.torchvision_attention`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masksparse._errors import CompactionError, PruningValueError, ShapeMismatchError
from masksparse.compact.slicers import register_slicer

__all__ = ["CompactMultiheadAttention"]


class CompactMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose heads may be fewer than ``embed_dim // head_dim``.

    Same parameters and state_dict keys as torch's class (``in_proj_weight`` of shape
    ``(3 * num_heads * head_dim, embed_dim)``, ``in_proj_bias``, ``out_proj.weight`` of shape
    ``(embed_dim, num_heads * head_dim)``, ``out_proj.bias``) and the same ``forward`` signature:
    ``batch_first``, unbatched inputs, ``key_padding_mask``, ``attn_mask`` (2-D, or 3-D with
    ``batch * num_heads`` rows), ``need_weights``, ``average_attn_weights`` and ``is_causal`` (a hint,
    as in torch: the ``attn_mask`` given is applied) behave as torch documents them. Key and value have
    the query's width. Compaction creates it by swapping the class of an ``nn.MultiheadAttention`` that
    lost heads; it can also be built directly.

    Example:
        >>> import torch
        >>> from masksparse.compact.modules import CompactMultiheadAttention
        >>> attn = CompactMultiheadAttention(embed_dim=16, num_heads=3, head_dim=4, batch_first=True)
        >>> tuple(attn.in_proj_weight.shape), tuple(attn.out_proj.weight.shape)
        ((36, 16), (16, 12))
        >>> out, weights = attn(*[torch.randn(2, 5, 16)] * 3)
        >>> tuple(out.shape), tuple(weights.shape)
        ((2, 5, 16), (2, 5, 5))
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PruningValueError(
                    f"CompactMultiheadAttention: {name} must be a positive int, got {value!r}"
                )
        # nn.MultiheadAttention.__init__ insists on num_heads * head_dim == embed_dim: set up its
        # attributes here instead, with the same names.
        nn.Module.__init__(self)
        inner = num_heads * head_dim
        self.embed_dim = self.kdim = self.vdim = embed_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, device=device, dtype=dtype))
        self.register_parameter("q_proj_weight", None)
        self.register_parameter("k_proj_weight", None)
        self.register_parameter("v_proj_weight", None)
        self.register_parameter(
            "in_proj_bias", nn.Parameter(torch.zeros(3 * inner, device=device, dtype=dtype)) if bias else None
        )
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(
            inner, embed_dim, bias=bias, device=device, dtype=dtype
        )
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    # torch's fused kernels (this class's base forward, nn.TransformerEncoderLayer's fast path) read
    # this flag and then assume num_heads * head_dim == embed_dim; False keeps them away.
    @property
    def _qkv_same_embed_dim(self) -> bool:
        return False

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"batch_first={self.batch_first}"
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention as ``nn.MultiheadAttention.forward`` computes it, over ``num_heads`` heads."""
        if is_causal and attn_mask is None:
            raise PruningValueError(
                "CompactMultiheadAttention: is_causal is a hint that attn_mask is the causal mask, as in "
                "nn.MultiheadAttention: pass that attn_mask too"
            )
        batched, shared = query.dim() == 3, query is key and key is value
        if batched and not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        elif not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        q, k, v = self._project(query, key, value, shared)
        mask = self._mask(attn_mask, key_padding_mask, q)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
            attn = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            attn = F.dropout(attn, p=dropout) if dropout > 0.0 else attn
            out = attn @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        b, _, n, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _project(
        self, query: Tensor, key: Tensor, value: Tensor, shared: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Batch-first inputs to q, k, v of shape ``(batch, heads, length, head_dim)``."""
        w, b = self.in_proj_weight, self.in_proj_bias
        heads, hd = self.num_heads, self.head_dim
        if shared:
            # Self-attention as one projection reshaped to (B, N, 3, heads, head_dim): a trace sees
            # whole heads there, so a compacted model can be pruned and compacted again.
            qkv = F.linear(query, w, b).view(query.shape[0], query.shape[1], 3, heads, hd)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        inner = heads * hd
        parts = []
        for i, t in enumerate((query, key, value)):
            bias = None if b is None else b[i * inner : (i + 1) * inner]
            x = F.linear(t, w[i * inner : (i + 1) * inner], bias)
            parts.append(x.view(t.shape[0], t.shape[1], heads, hd).transpose(1, 2))
        return parts[0], parts[1], parts[2]

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, q: Tensor) -> Tensor | None:
        """One additive float mask broadcasting over ``(batch, heads, length, source length)``."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            if mask.dim() == 3:
                if mask.shape[0] != q.shape[0] * self.num_heads:
                    raise ShapeMismatchError(
                        f"CompactMultiheadAttention: a 3-D attn_mask needs batch * num_heads = "
                        f"{q.shape[0] * self.num_heads} rows, got shape {tuple(attn_mask.shape)}"
                    )
                mask = mask.view(q.shape[0], self.num_heads, *mask.shape[1:])
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).view(q.shape[0], 1, 1, -1)
            mask = padding if mask is None else mask + padding
        return mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A torch boolean mask (True: not attended) as an additive float one, as torch's MHA reads it."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _refuse(mha: nn.MultiheadAttention, why: str) -> CompactionError:
    return CompactionError(
        f"cannot compact nn.MultiheadAttention(embed_dim={mha.embed_dim}, num_heads={mha.num_heads}) "
        f"{why}; only the fused in_proj layout (kdim == vdim == embed_dim, no bias_k/bias_v, no "
        f"add_zero_attn) is supported"
    )


@register_slicer(nn.MultiheadAttention)
def _multihead_attention(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Fewer heads (or a narrower query) turn the module into a :class:`CompactMultiheadAttention`."""
    mha = cast(nn.MultiheadAttention, module)
    base = getattr(type(mha), "_masksparse_base", type(mha))  # the class of a masked module
    if base not in (nn.MultiheadAttention, CompactMultiheadAttention):
        raise _refuse(mha, f"of class {base.__name__}: its forward may differ from the class it would become")
    weight = shapes.get("in_proj_weight")
    separate = not isinstance(mha, CompactMultiheadAttention) and not mha._qkv_same_embed_dim
    if weight is None or mha.in_proj_weight is None or separate:
        raise _refuse(mha, "with separate q/k/v projection weights")
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        raise _refuse(mha, "with bias_k/bias_v or add_zero_attn")
    head_dim = mha.head_dim
    if weight[0] % (3 * head_dim):
        raise _refuse(mha, f"to {weight[0]} in_proj rows, which are not whole heads of {head_dim}")
    return {
        "__class__": CompactMultiheadAttention,
        "embed_dim": weight[1],
        "kdim": weight[1],
        "vdim": weight[1],
        "num_heads": weight[0] // (3 * head_dim),
    }
