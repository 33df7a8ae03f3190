"""timm's Eva attention (which merges its heads back to its input width): whole heads prune and the
module compacts to masksparse.compact.timm_attention.CompactEvaAttention, computing what the masked
model computes, with rotary embeddings, fused or separate q/k/v, and through save_compacted."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import masksparse
from masksparse.compact import compact
from masksparse.structured import prune_channels
from tests.models import assert_same, params

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 32, 32)


def tiny_eva(qkv_fused: bool) -> nn.Module:
    """Two blocks of 4 heads of 8 with rotary embeddings and a class token, biases random."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    model = Eva(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, qkv_fused=qkv_fused,
        use_rot_pos_emb=True, ref_feat_shape=(4, 4), num_classes=10,
    )  # fmt: skip
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.normal_(m.bias, std=0.1)
    for name, p in model.named_parameters():
        if name.endswith(("q_bias", "v_bias")):
            nn.init.normal_(p, std=0.1)
    return model.eval()


@pytest.mark.parametrize("qkv_fused", [True, False])
def test_eva_attention_loses_whole_heads_and_compacts_exactly(qkv_fused: bool, tmp_path: object) -> None:
    from timm.models.eva import EvaAttention

    from masksparse.compact.timm_attention import CompactEvaAttention

    model = tiny_eva(qkv_fused)
    prune_channels(model, X, 0.5)
    small = compact(model, X)
    assert_same(model, small, X)
    attns = [m for m in small.modules() if isinstance(m, EvaAttention)]
    assert len(attns) == 2
    for attn in attns:
        assert type(attn) is CompactEvaAttention
        assert attn.num_heads == 2 and attn.head_dim == 8
        assert attn.proj.in_features == 16 and attn.proj.out_features == small.embed_dim
    assert params(small) < 0.62 * params(tiny_eva(qkv_fused))  # the residual width is LayerNorm'd: kept

    path = f"{tmp_path}/eva.safetensors"
    masksparse.save_compacted(small, path)
    rebuilt = masksparse.load_compacted(tiny_eva(qkv_fused), path)
    assert all(type(m) is CompactEvaAttention for m in rebuilt.modules() if isinstance(m, EvaAttention))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X), small(X), rtol=0, atol=0)


def test_compact_eva_attention_computes_what_timm_computes_with_all_heads() -> None:
    """Differential with every head kept, in training mode with dropout: the same draws, the same output."""
    from masksparse.compact.timm_attention import CompactEvaAttention

    model = tiny_eva(True)
    for attn in (b.attn for b in model.blocks):
        attn.attn_drop.p = 0.3
    same = copy.deepcopy(model)
    for attn in (b.attn for b in same.blocks):
        attn.__class__ = CompactEvaAttention
    outs = []
    for m in (model, same):
        torch.manual_seed(1)
        outs.append(m.train()(X))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
