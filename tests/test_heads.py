"""Attention heads in hand-written attention (graph/heads.py): whole heads go, num_heads follows, and
modules whose forward could not follow keep their heads or refuse by name."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from masksparse import KeptUnitsWarning, prune
from masksparse.compact import compact, plan_compaction
from masksparse.structured import prune_channels
from tests.models import assert_same, params


class Attention(nn.Module):
    """ViT-style self-attention with a fused qkv projection, its head count in ``num_heads``."""

    def __init__(self, dim: int = 24, num_heads: int = 4, head_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * self.head_dim)
        self.proj = nn.Linear(num_heads * self.head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class ViTBlock(nn.Module):
    def __init__(self, dim: int = 24, num_heads: int = 4, head_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


X_TOKENS = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("head_dim", [None, 4])  # 6 per head, or as many per head as there are heads
def test_whole_attention_heads_are_removed_and_num_heads_follows(head_dim: int | None) -> None:
    """Invariant: removing whole heads computes what the masked model computes; head_dim and the
    softmax scale stay, num_heads shrinks, qkv loses the q, k and v rows of each head."""
    torch.manual_seed(0)
    model = ViTBlock(head_dim=head_dim).eval()
    prune_channels(model, X_TOKENS, 0.5, ignored_layers=[model.mlp])
    hd = model.attn.head_dim
    rows = model.attn.qkv.weight_mask.any(1).reshape(3, 4, hd)
    alive = rows[0, :, 0]
    assert int(alive.sum()) == 2 and bool((rows == alive[None, :, None]).all())  # whole heads, q k v alike
    small = compact(model, X_TOKENS)
    assert_same(model, small, X_TOKENS, rtol=1e-4)
    assert small.attn.num_heads == 2 and small.attn.head_dim == hd and small.attn.scale == hd**-0.5
    assert small.attn.qkv.out_features == 3 * 2 * hd and small.attn.proj.in_features == 2 * hd
    assert params(small) == params(model) - 2 * hd * (3 * 24 + 3 + 24)
    assert model.attn.num_heads == 4  # the user's model is left as it was


def test_heads_masked_on_the_output_projection_alone_are_dead() -> None:
    torch.manual_seed(0)
    model = ViTBlock().eval()
    columns = torch.ones(24, 24, dtype=torch.bool)
    columns[:, 6:12] = False  # head 1 contributes nothing
    prune.custom_from_mask(model.attn.proj, "weight", columns)
    plan = plan_compaction(model, X_TOKENS)
    assert ("attn", "num_heads", 4, 3) in {(a.module, a.name, a.old, a.new) for a in plan.attributes}
    qkv = next(c for c in plan.cuts if c.module == "attn.qkv" and c.tensor == "weight")
    assert qkv.keep == tuple(i for i in range(72) if i % 24 // 6 != 1)
    small = compact(model, X_TOKENS)
    assert_same(model, small, X_TOKENS, rtol=1e-4)
    assert small.attn.num_heads == 3


class LiteralHeads(Attention):
    """The number of heads written into forward as a literal: compaction cannot update it."""

    def __init__(self) -> None:
        super().__init__()
        del self.num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 4, 6).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class DerivedHeadSize(Attention):
    """The head size derived from the number of heads, as ``C // num_heads``: removing a head would
    change it, so pruning leaves the heads alone (torchvision's Swin attention keeps no head size)."""

    def __init__(self) -> None:
        super().__init__()
        del self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("kind", [LiteralHeads, DerivedHeadSize])
def test_prune_channels_leaves_heads_alone_where_forward_could_not_follow(kind: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = kind().eval()
    prune_channels(model, X_TOKENS, 0.5)
    assert not hasattr(model.qkv, "weight_mask") and not hasattr(model.proj, "weight_mask")


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        (LiteralHeads, r"\(LiteralHeads\).*no int attribute equal to 4"),
        (DerivedHeadSize, r"\(DerivedHeadSize\).*no head size 6 apart from num_heads"),
    ],
)
def test_heads_the_module_cannot_follow_are_kept_by_name(kind: type[nn.Module], why: str) -> None:
    """Dead heads whose number is not in one attribute, or whose size forward derives from it, are kept
    rather than guessed at, and the plan and the warning say why; the result is exact."""
    torch.manual_seed(0)
    model = kind().eval()
    columns = torch.ones(24, 24, dtype=torch.bool)
    columns[:, 6:12] = False  # head 1 contributes nothing
    prune.custom_from_mask(model.proj, "weight", columns)
    reference = model(X_TOKENS)
    plan = plan_compaction(model, X_TOKENS)
    assert plan.cuts == () and len(plan.kept) == 1
    assert re.search(r"1 of the 4 heads dead .* in module '<model>' " + why, plan.kept[0].reason)
    with pytest.warns(KeptUnitsWarning, match="1 dead unit"):
        small = compact(model, X_TOKENS, inplace=True)
    assert small.proj.in_features == 24
    torch.testing.assert_close(small(X_TOKENS), reference, rtol=0, atol=0)


@pytest.mark.parametrize("mask_bias", [True, False])
def test_a_head_whose_v_rows_are_masked_is_dead_only_if_its_v_bias_is_too(mask_bias: bool) -> None:
    """Attention over an all-zero v is zero, so the head's q and k rows go too; with the v bias kept
    the head still emits that bias (softmax rows sum to one) and stays."""
    torch.manual_seed(0)
    model = ViTBlock().eval()
    rows = torch.ones(72, dtype=torch.bool)
    rows[48 + 6 : 48 + 12] = False  # v of head 1
    prune.custom_from_mask(model.attn.qkv, "weight", rows[:, None].expand(72, 24))
    if mask_bias:
        prune.custom_from_mask(model.attn.qkv, "bias", rows)
    small = compact(model, X_TOKENS)
    assert_same(model, small, X_TOKENS, rtol=1e-4)
    assert small.attn.num_heads == (3 if mask_bias else 4)
    assert small.attn.qkv.out_features == (54 if mask_bias else 72)


class GroupedQueryAttention(nn.Module):
    """Llama-style attention: separate q, k, v projections reshaped with ``-1`` heads and a stored
    head size, two query heads per key/value head, keys and values repeated for the groups."""

    def __init__(self, dim: int = 24, heads: int = 4, kv_heads: int = 2, head_dim: int = 6) -> None:
        super().__init__()
        self.head_dim, self.groups = head_dim, heads // kv_heads
        self.q_proj = nn.Linear(dim, heads * head_dim)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, dim)

    def head_size(self, width: int) -> int:
        return self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        shape = (b, n, -1, self.head_size(c))
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k, v = (
            p(x).view(shape).transpose(1, 2).repeat_interleave(self.groups, 1)
            for p in (self.k_proj, self.v_proj)
        )
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class InferredHeadsDerivedSize(GroupedQueryAttention):
    """``-1`` heads, but a head size computed from the input width: no attribute states it."""

    def __init__(self) -> None:
        super().__init__()
        del self.head_dim

    def head_size(self, width: int) -> int:
        return width // 4


def test_inferred_grouped_query_heads_go_with_their_key_value_head() -> None:
    """Invariant: with ``view(b, n, -1, head_dim)`` nothing holds the number of heads, so none needs
    updating; a unit is one key/value head with its query heads, and the head size stays."""
    torch.manual_seed(0)
    model = GroupedQueryAttention().eval()
    prune_channels(model, X_TOKENS, 0.5)
    small = compact(model, X_TOKENS)
    assert_same(model, small, X_TOKENS, rtol=1e-4)
    assert (small.q_proj.out_features, small.k_proj.out_features, small.o_proj.in_features) == (12, 6, 12)
    assert small.head_dim == 6 and small.groups == 2
    plan = plan_compaction(model, X_TOKENS)
    assert [(h.module, h.old, h.new) for h in plan.heads] == [("", 4, 2), ("", 2, 1)]
    assert "heads: <model> keeps 2 of 4" in str(plan)


def test_inferred_heads_without_a_stored_head_size_are_left_alone() -> None:
    torch.manual_seed(0)
    model = InferredHeadsDerivedSize().eval()
    prune_channels(model, X_TOKENS, 0.5)
    assert not hasattr(model.q_proj, "weight_mask")
    mask = torch.ones(24, 24, dtype=torch.bool)
    mask[:, 12:] = False  # key/value head 1 and its two query heads contribute nothing
    prune.custom_from_mask(model.o_proj, "weight", mask)
    plan = plan_compaction(model, X_TOKENS)
    assert any("no head size 6 apart from the number of heads it infers" in k.reason for k in plan.kept)
