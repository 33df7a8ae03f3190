"""Attention: nn.MultiheadAttention's heads prune and compact as whole units; scaled_dot_product_attention's
rule ties heads and refuses to shrink what sets its scale."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from masksparse import prune
from masksparse.compact import compact, plan_compaction, relative_error
from masksparse.compact.modules import CompactMultiheadAttention
from masksparse.graph import Group, trace
from masksparse.structured import prune_channels
from tests.models import assert_same, assert_saves_and_loads, params

pytestmark = pytest.mark.usefixtures("one_thread")

X_IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
X_TOKENS = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def tiny_vit(seed: int = 0) -> torchvision.models.VisionTransformer:
    """Two layers of 4 heads of 8; torchvision zero-initialises the classifier, so give it weights."""
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(32, 16, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)
    nn.init.normal_(model.heads.head.weight)
    return model.eval()


def groups_of(model: nn.Module, x: torch.Tensor, module: str, tensor: str = "weight") -> list[Group]:
    """The groups holding rows (dim 0) of ``module.tensor``."""
    return [
        g
        for g in trace(model, x).groups
        if any(m.module.endswith(module) and m.tensor == tensor and m.dim == 0 for m in g.members)
    ]


# ----------------------------------------------------------------------------- nn.MultiheadAttention


def test_a_vit_head_is_one_unit_owning_its_q_k_v_rows_and_out_proj_columns() -> None:
    groups = groups_of(tiny_vit(), X_IMAGES, "self_attention", "in_proj_weight")
    assert len(groups) == 2 and all(g.prunable and g.size == 4 for g in groups)
    members = {(m.module.rsplit(".", 1)[-1], m.tensor, m.dim): m.indices for m in groups[0].members}
    assert set(members) == {
        ("self_attention", "in_proj_weight", 0),
        ("self_attention", "in_proj_bias", 0),
        ("out_proj", "weight", 1),
    }
    for h in range(4):
        rows = [p * 32 + h * 8 + j for p in range(3) for j in range(8)]  # q, k and v rows of head h
        assert sorted(members[("self_attention", "in_proj_weight", 0)][h]) == rows
        assert sorted(members[("self_attention", "in_proj_bias", 0)][h]) == rows
        assert members[("out_proj", "weight", 1)][h] == tuple(range(h * 8, h * 8 + 8))


def test_prune_channels_then_compact_a_vit_removes_whole_heads() -> None:
    """Invariant: masks cover whole heads on every member; the compacted model computes what the masked
    one does with half the heads of the same size; the user's model is left as it was."""
    model = tiny_vit()
    prune_channels(model, X_IMAGES, 0.5)
    for layer in model.encoder.layers:
        attn = layer.self_attention
        rows = attn.in_proj_weight_mask.all(1).view(3, 4, 8)
        alive = rows[0].all(1)
        assert int(alive.sum()) == 2 and bool((rows == alive[None, :, None]).all())  # q, k, v alike
        assert torch.equal(attn.in_proj_bias_mask.view(3, 4, 8), rows)
        assert torch.equal(attn.out_proj.weight_mask.all(0).view(4, 8), alive[:, None].expand(4, 8))
    small = compact(model, X_IMAGES)
    assert_same(model, small, X_IMAGES)
    for layer in small.encoder.layers:
        attn = layer.self_attention
        assert type(attn) is CompactMultiheadAttention
        assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (32, 2, 8)
        assert attn.in_proj_weight.shape == (48, 32) and attn.out_proj.weight.shape == (32, 16)
    # per layer: 48 in_proj rows with their bias, 16 out_proj columns, half of the MLP
    assert params(model) - params(small) == 2 * (48 * 32 + 48 + 32 * 16 + (32 * 32 + 32 + 32 * 32))
    assert type(model.encoder.layers[0].self_attention) is not CompactMultiheadAttention
    assert model.encoder.layers[0].self_attention.num_heads == 4


@pytest.fixture(scope="module")
def small_vit() -> tuple[nn.Module, nn.Module]:
    model = tiny_vit()
    prune_channels(model, X_IMAGES, 0.5)
    return model, compact(model, X_IMAGES)


def test_compacted_attention_saves_and_loads_with_plain_torch(small_vit: tuple[nn.Module, nn.Module]) -> None:
    _, small = small_vit
    keys = set(small.encoder.layers[0].self_attention.state_dict())
    assert keys == {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
    assert_saves_and_loads(small, X_IMAGES)


def test_compacted_attention_compiles_and_exports_to_onnx(
    small_vit: tuple[nn.Module, nn.Module], tmp_path: Path
) -> None:
    onnx = pytest.importorskip("onnx")
    masked, small = small_vit
    with torch.no_grad():
        expected = small(X_IMAGES)
        assert relative_error(expected, torch.compile(small, backend="aot_eager")(X_IMAGES)) <= 1e-6
    torch.onnx.export(small, (X_IMAGES,), tmp_path / "vit.onnx", dynamo=False)
    exported = onnx.load(tmp_path / "vit.onnx")
    onnx.checker.check_model(exported)
    stored = sum(int(torch.tensor(init.dims).prod()) for init in exported.graph.initializer)
    assert stored < params(masked)  # the exported graph is the smaller model


def torch_mha(batch_first: bool, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    nn.init.normal_(mha.in_proj_bias)
    nn.init.normal_(mha.out_proj.bias)
    return mha.eval()


def as_compact(mha: nn.MultiheadAttention) -> CompactMultiheadAttention:
    """The same module, class swapped with all its heads: it must compute what torch's does."""
    same = copy.deepcopy(mha)
    same.__class__ = CompactMultiheadAttention
    return same


BOOL_MASK = torch.rand(5, 5, generator=torch.Generator().manual_seed(2)) > 0.7
PADDING = torch.tensor([[False] * 4 + [True], [False] * 5])
CALLS = {
    "plain": {},
    "need_weights": {"need_weights": True},
    "per_head_weights": {"need_weights": True, "average_attn_weights": False},
    "bool_mask": {"attn_mask": BOOL_MASK, "need_weights": False},
    "float_mask_weights": {"attn_mask": torch.randn(5, 5), "need_weights": True},
    "per_head_mask": {"attn_mask": torch.randn(4, 5, 5), "need_weights": False},
    "padding": {"key_padding_mask": PADDING, "need_weights": False},
    "padding_and_mask": {"key_padding_mask": PADDING, "attn_mask": BOOL_MASK},
    "causal": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(5), "is_causal": True},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("call", list(CALLS))
def test_compact_attention_computes_what_torch_computes(batch_first: bool, call: str) -> None:
    """Differential against nn.MultiheadAttention, the reference: same outputs and weights."""
    mha = torch_mha(batch_first)
    x = X_TOKENS if batch_first else X_TOKENS.transpose(0, 1)
    kwargs = CALLS[call]
    for query, key in [(x, x), (x, x.flip(-1))]:  # self- and cross-attention
        with torch.no_grad():
            want = mha(query, key, key, **kwargs)
            got = as_compact(mha)(query, key, key, **kwargs)
        assert relative_error(want[0], got[0]) <= 1e-5
        assert (want[1] is None) == (got[1] is None)
        if want[1] is not None:
            assert relative_error(want[1], got[1]) <= 1e-5


def test_compact_attention_takes_unbatched_inputs_and_refuses_is_causal_without_a_mask() -> None:
    mha = torch_mha(batch_first=True)
    with torch.no_grad():
        want, want_w = mha(X_TOKENS[0], X_TOKENS[0], X_TOKENS[0])
        got, got_w = as_compact(mha)(X_TOKENS[0], X_TOKENS[0], X_TOKENS[0])
    assert got.shape == (5, 8) and relative_error(want, got) <= 1e-5
    assert got_w is not None and relative_error(want_w, got_w) <= 1e-5
    with pytest.raises(ValueError, match="is_causal is a hint .* pass that attn_mask"):
        as_compact(mha)(X_TOKENS, X_TOKENS, X_TOKENS, is_causal=True)


class MHABlock(nn.Module):
    """Linear -> nn.MultiheadAttention (4 heads of 4) -> Linear, tokens (B, N, 8) in."""

    def __init__(self, batch_first: bool = True, **call: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.out = nn.Linear(16, 3)
        nn.init.normal_(self.attn.in_proj_bias)  # torch starts them at zero: a masked v would be dead
        nn.init.normal_(self.attn.out_proj.bias)
        self.call = {"need_weights": False, **call}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.attn(h, h, h, **self.call)[0])


def mask_head_1(model: MHABlock, where: str = "out_proj") -> None:
    if where == "out_proj":  # head 1 contributes nothing
        columns = torch.ones(16, 16, dtype=torch.bool)
        columns[:, 4:8] = False
        prune.custom_from_mask(model.attn.out_proj, "weight", columns)
    else:  # v of head 1 is zero (its rows, and with where == "v_and_bias" its bias)
        rows = torch.ones(48, dtype=torch.bool)
        rows[32 + 4 : 32 + 8] = False
        prune.custom_from_mask(model.attn, "in_proj_weight", rows[:, None].expand(48, 16))
        if where == "v_and_bias":
            prune.custom_from_mask(model.attn, "in_proj_bias", rows)


@pytest.mark.parametrize(("where", "heads"), [("out_proj", 3), ("v", 4), ("v_and_bias", 3)])
def test_a_head_is_dead_when_its_out_proj_columns_or_its_whole_v_are_zero(where: str, heads: int) -> None:
    """A head whose v rows are zero still emits its v bias (softmax rows sum to one): it stays."""
    model = MHABlock().eval()
    mask_head_1(model, where)
    plan = plan_compaction(model, X_TOKENS)
    small = compact(model, X_TOKENS)
    assert_same(model, small, X_TOKENS)
    assert small.attn.num_heads == heads
    assert small.attn.in_proj_weight.shape == (12 * heads, 16)
    if heads == 3:
        assert ("attn", "num_heads", 4, 3) in {(a.module, a.name, a.old, a.new) for a in plan.attributes}
        assert small.attn(torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16))[1] is not None


@pytest.mark.parametrize(
    ("call", "why"),
    [
        ({"batch_first": False}, r"in 'attn'"),  # torch's decomposed path merges batch and heads
        ({"need_weights": True}, r"averages the attention weights over all heads .* need_weights=False"),
        ({"attn_mask": torch.zeros(8, 5, 5, dtype=torch.bool)}, r"applies a mask of shape \(B, 4, L, S\)"),
    ],
)
def test_heads_are_kept_where_removing_them_would_not_be_exact(call: dict[str, object], why: str) -> None:
    """Heads stay whole; the input and output widths still shrink (torch's class then cannot hold the
    narrower query, so the module is switched all the same)."""
    model = MHABlock(**call).eval()
    x = X_TOKENS if call.get("batch_first", True) else X_TOKENS.transpose(0, 1)
    (group,) = groups_of(model, x, "attn", "in_proj_weight")
    assert not group.prunable
    assert re.search(why, group.reason), group.reason
    prune_channels(model, x, 0.5)
    assert bool(model.attn.in_proj_weight_mask.any(1).all())  # no q, k or v row lost
    assert bool(model.attn.out_proj.weight_mask.any(0).all())
    mask_head_1(model)
    small = compact(model, x)
    assert_same(model, small, x)
    assert small.attn.num_heads == 4 and small.attn.in_proj_weight.shape == (48, 8)


def test_per_head_weights_let_heads_go() -> None:
    model = MHABlock(need_weights=True, average_attn_weights=False).eval()
    mask_head_1(model)
    small = compact(model, X_TOKENS)
    assert small.attn.num_heads == 3
    assert_same(model, small, X_TOKENS)


# --------------------------------------------------------------------- scaled_dot_product_attention


class SDPAttention(nn.Module):
    """Fused qkv reshaped to (B, N, 3, H, hd) and F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 8, num_heads: int = 4, head_dim: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


def test_sdpa_records_as_the_cpu_flash_kernel_and_its_heads_prune_whole() -> None:
    model = SDPAttention().eval()
    ops = {str(n.op) for n in trace(model, X_TOKENS).trace.nodes}
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in ops
    (group,) = groups_of(model, X_TOKENS, "qkv")
    assert group.prunable and group.size == 4
    prune_channels(model, X_TOKENS, 0.5)
    small = compact(model, X_TOKENS)
    assert_same(model, small, X_TOKENS)
    assert (small.num_heads, small.head_dim, small.qkv.out_features, small.proj.in_features) == (2, 4, 24, 8)


class OneHead(nn.Module):
    """Separate q, k, v projections into one head; ``four_d`` adds a heads dim (flash kernel), else
    q, k, v stay 3-D (the math decomposition)."""

    def __init__(self, scale: float | None = None, four_d: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)
        self.scale, self.four_d = scale, four_d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.four_d:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out(out.squeeze(1) if self.four_d else out)


def mask_q_rows(model: OneHead) -> None:
    rows = torch.tensor([True, False] * 4)
    prune.custom_from_mask(model.q, "weight", rows[:, None].expand(8, 8))
    prune.custom_from_mask(model.q, "bias", rows)


@pytest.mark.parametrize("four_d", [True, False])
def test_sdpa_default_scale_keeps_the_size_of_q_and_k(four_d: bool) -> None:
    """With the default scale 1/sqrt(E), removing a q/k feature would change the scale: kept."""
    model = OneHead(four_d=four_d).eval()
    (group,) = groups_of(model, X_TOKENS, "q")
    assert {m.module for m in group.members} >= {"q", "k"}
    assert not group.prunable and "softmax scale" in group.reason and "scale=" in group.reason
    mask_q_rows(model)
    small = compact(model, X_TOKENS)
    assert small.q.out_features == small.k.out_features == 8
    assert_same(model, small, X_TOKENS)


@pytest.mark.parametrize("four_d", [True, False])
def test_sdpa_with_a_given_scale_contracts_q_with_k(four_d: bool) -> None:
    model = OneHead(scale=0.3, four_d=four_d).eval()
    mask_q_rows(model)
    small = compact(model, X_TOKENS)
    assert small.q.out_features == small.k.out_features == 4 and small.v.out_features == 8
    assert_same(model, small, X_TOKENS)


class GroupedQuery(nn.Module):
    """4 query heads sharing 2 kv heads (enable_gqa)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.kv = nn.Linear(8, 16), nn.Linear(8, 16)
        self.proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 4).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.proj(out.transpose(1, 2).reshape(b, n, 16))


def test_sdpa_grouped_query_heads_go_with_their_kv_head() -> None:
    (group,) = groups_of(GroupedQuery().eval(), X_TOKENS, "kv")
    members = {(m.module, m.dim): m.indices for m in group.members}
    assert members[("q", 0)] == (tuple(range(8)), tuple(range(8, 16)))  # q heads 0-1, then 2-3
    assert members[("proj", 1)] == (tuple(range(8)), tuple(range(8, 16)))


def test_a_compacted_vit_prunes_and_compacts_again(small_vit: tuple[nn.Module, nn.Module]) -> None:
    """CompactMultiheadAttention projects self-attention as (B, N, 3, heads, head_dim): whole heads again."""
    _, small = small_vit
    again = copy.deepcopy(small)
    prune_channels(again, X_IMAGES, 0.75)
    smaller = compact(again, X_IMAGES)
    assert_same(again, smaller, X_IMAGES)
    attn = smaller.encoder.layers[0].self_attention
    assert (attn.num_heads, attn.head_dim, attn.in_proj_weight.shape) == (1, 8, (24, 32))


class DoubledAttention(nn.MultiheadAttention):
    """A subclass whose forward differs from torch's: switching its class would change what it computes."""

    def forward(self, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        out, weights = super().forward(*args, **kwargs)  # type: ignore[arg-type]
        return 2 * out, weights


def test_a_subclass_of_multihead_attention_keeps_its_heads_and_width() -> None:
    model = MHABlock().eval()
    model.attn.__class__ = DoubledAttention
    (group,) = groups_of(model, X_TOKENS, "attn", "in_proj_weight")
    assert not group.prunable and "called by DoubledAttention" in group.reason
    prune_channels(model, X_TOKENS, 0.5)
    small = compact(model, X_TOKENS)
    assert type(small.attn) is DoubledAttention and small.attn.in_proj_weight.shape == (48, 16)
    assert_same(model, small, X_TOKENS)


def test_a_transformer_encoder_layer_loses_heads_and_keeps_off_torch_fused_kernel() -> None:
    """nn.TransformerEncoderLayer's own fast path assumes num_heads * head_dim == embed_dim: the compact
    module's ``_qkv_same_embed_dim`` is False, so the layer calls its forward instead."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 4, 16, dropout=0.0, batch_first=True).eval()
    prune_channels(layer, X_TOKENS, 0.5)
    small = compact(layer, X_TOKENS)
    assert type(small.self_attn) is CompactMultiheadAttention and small.self_attn.num_heads == 2
    assert not small.self_attn._qkv_same_embed_dim
    assert_same(layer, small, X_TOKENS)
