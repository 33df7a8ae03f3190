"""The compact form of timm's ``EvaAttention``, which compaction switches a module to when it loses heads.

timm's Eva attention (EVA-02, and the models built on its blocks) reshapes its heads back to its input
width (``reshape(B, N, C)``), so its forward does not run with fewer heads. A module of that class that
loses heads becomes a :class:`CompactEvaAttention` in place (its class is swapped; parameters, buffers
and state_dict keys stay), which reshapes them back to ``num_heads * head_dim``.

masksparse imports this module (and so timm) only when a model with an ``EvaAttention`` is traced (see
:func:`masksparse.graph.heads.head_swap`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat, maybe_add_mask, resolve_self_attn_mask
from timm.models.eva import EvaAttention
from torch import Tensor

from masksparse.compact.slicers import register_slicer, swap_heads
from masksparse.graph.heads import register_head_swap

__all__ = ["CompactEvaAttention"]


class CompactEvaAttention(EvaAttention):
    """timm's ``EvaAttention`` whose ``num_heads * head_dim`` may be less than its input width.

    Same parameters, buffers and state_dict keys (a fused ``qkv`` or ``q_proj``/``k_proj``/``v_proj``,
    the q/k/v biases, ``norm``, ``proj``) and the same forward as timm 1.0's (rotary embeddings and
    their prefix tokens, masks, the fused or explicit softmax, the optional gate), except that the heads
    are merged back to ``num_heads * head_dim`` rather than to the input width. Compaction creates it by
    swapping the class of a module that lost heads.

    Example:
        >>> import torch
        >>> from timm.models.eva import EvaAttention
        >>> from masksparse.compact.timm_attention import CompactEvaAttention
        >>> attn = EvaAttention(16, num_heads=2, qkv_bias=True, norm_layer=torch.nn.LayerNorm).eval()
        >>> same = EvaAttention(16, num_heads=2, qkv_bias=True, norm_layer=torch.nn.LayerNorm).eval()
        >>> _ = same.load_state_dict(attn.state_dict())
        >>> same.__class__ = CompactEvaAttention
        >>> x = torch.randn(1, 5, 16)
        >>> torch.allclose(same(x), attn(x), atol=1e-6)
        True
    """

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """What timm's class computes, over ``num_heads`` heads of ``head_dim``."""
        B, N, _ = x.shape
        gate_layer: Any = getattr(self, "gate", None)  # the optional gate of recent timm
        gate = gate_layer(x).sigmoid() if gate_layer is not None else None
        if self.qkv is not None:
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                qkv_bias = torch.cat([self.q_bias, cast(Tensor, self.k_bias), self.v_bias])
                if self.qkv_bias_separate:
                    qkv = self.qkv(x)
                    qkv += qkv_bias
                else:
                    qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt = self.num_prefix_tokens
            half = getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2)
            k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2)
            q, k = q.type_as(v), k.type_as(v)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
            )  # fmt: skip
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


register_head_swap([EvaAttention, CompactEvaAttention], heads="num_heads", compact=CompactEvaAttention)


register_slicer(EvaAttention)(swap_heads)
