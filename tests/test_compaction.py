"""compact: the compacted model computes what the masked model computes, with fewer parameters."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn

import masksparse.compaction as compact_module
from masksparse import MaskSparseError, PruningValueError, prune
from masksparse.compaction import compact, plan_compaction, relative_error
from masksparse.examples import LeNet
from masksparse.graph import groups as graph_groups
from masksparse.graph import trace
from masksparse.graph.record import Node, Value
from masksparse.graph.rules import States
from masksparse.structured import prune_channels
from tests.models import ChannelCumsum, assert_saves_and_loads, randomise_bn


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_same(masked: nn.Module, small: nn.Module, x: torch.Tensor, rtol: float = 1e-5) -> None:
    with torch.no_grad():
        assert relative_error(masked.eval()(x), small.eval()(x)) <= rtol


def assert_plain(model: nn.Module) -> None:
    """No masks, no pruning hooks, no masksparse classes: ordinary torch layers."""
    for m in model.modules():
        assert not any(n.endswith(("_mask", "_orig")) for n, _ in m.named_parameters(recurse=False))
        assert not any(n.endswith("_mask") for n, _ in m.named_buffers(recurse=False))
        assert not any(isinstance(h, torch_prune.BasePruningMethod) for h in m._forward_pre_hooks.values())
        # a pruned module's class is masksparse's generated subclass (it keeps the base's __module__)
        assert not hasattr(type(m), "_masksparse_base"), type(m)


@pytest.fixture
def lenet() -> LeNet:
    torch.manual_seed(0)
    return LeNet().eval()


X_LENET = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_lenet_as_torch_users_prune_it(lenet: LeNet) -> None:
    """ln_structured on Linear rows: each masked row still emits its bias, folded into the next bias."""
    prune.ln_structured(lenet.fc1, "weight", amount=0.5, n=2, dim=0)
    prune.ln_structured(lenet.fc2, "weight", amount=0.5, n=2, dim=0)
    small = compact(lenet, X_LENET)
    assert (small.fc1.out_features, small.fc2.in_features, small.fc2.out_features, small.fc3.in_features) == (
        60, 60, 42, 42)  # fmt: skip
    assert_same(lenet, small, X_LENET)
    assert params(small) < params(lenet) * 0.55
    assert_plain(small)
    plan = plan_compaction(lenet, X_LENET)
    assert {f.module for f in plan.folds} == {"fc2", "fc3"}
    # without the folds the outputs would differ: the masked rows are not zero
    assert (
        lenet.fc1(torch.flatten(torch.randn(2, 16, 5, 5), 1))[:, (lenet.fc1.weight_mask == 0).all(1)] != 0
    ).any()


def test_lenet_with_torch_pruning_and_a_conv_feeding_the_flatten(lenet: LeNet) -> None:
    """torch.nn.utils.prune masks (float) work too; conv2's constant channels fold through the flatten."""
    torch_prune.ln_structured(lenet.conv2, "weight", amount=0.5, n=1, dim=0)
    torch_prune.ln_structured(lenet.fc1, "weight", amount=0.25, n=1, dim=0)
    small = compact(lenet, X_LENET)
    assert small.conv2.out_channels == 8 and small.fc1.in_features == 8 * 25 and small.fc1.out_features == 90
    assert_same(lenet, small, X_LENET)
    assert_plain(small)


def conv_bn_chain(shift: float) -> nn.Sequential:
    """conv3x3-BN-ReLU-conv1x1-BN-ReLU-conv3x3(padded), the first two convs half masked by ln_structured.

    A masked channel emits its BatchNorm shift, here pushed to ``shift`` (ReLU keeps it if positive).
    """
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
    ))  # fmt: skip
    with torch.no_grad():
        model[1].bias.fill_(shift)
        model[4].bias.fill_(shift)
    prune.ln_structured(model[0], "weight", amount=0.5, n=1, dim=0)
    prune.ln_structured(model[3], "weight", amount=0.5, n=1, dim=0)
    return model


def test_conv_bn_relu_constants_fold_into_a_1x1_conv_and_stay_before_a_padded_conv() -> None:
    model, x = conv_bn_chain(shift=3.0), torch.randn(2, 3, 7, 7)
    plan = plan_compaction(model, x)
    cut = {(c.module, c.tensor, c.dim): len(c.keep) for c in plan.cuts}
    assert cut == {
        ("0", "weight", 0): 4, ("1", "weight", 0): 4, ("1", "bias", 0): 4, ("1", "running_mean", 0): 4,
        ("1", "running_var", 0): 4, ("3", "weight", 1): 4,
    }  # fmt: skip
    assert [(f.module, f.creates_bias) for f in plan.folds] == [("3", True)]
    small = compact(model, x)
    assert plan.params_after == params(small)
    assert small[0].out_channels == 4 and small[1].num_features == 4 and small[3].in_channels == 4
    assert small[3].out_channels == 6  # the padded conv reads the constants at its borders: kept
    assert small[3].bias is not None
    assert_same(model, small, x)


def test_channels_a_relu_zeroes_are_dead_even_before_a_padded_conv() -> None:
    model, x = conv_bn_chain(shift=-3.0), torch.randn(2, 3, 7, 7)
    small = compact(model, x)
    assert (small[0].out_channels, small[3].out_channels, small[6].in_channels) == (4, 3, 3)
    assert small[3].bias is None  # relu(negative shift) = 0: nothing to fold
    assert_same(model, small, x)


def test_prune_channels_then_compact_a_chain() -> None:
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ))  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    assert [small[0].out_channels, small[3].in_channels, small[3].out_channels, small[8].in_features] == [
        4,
        4,
        3,
        3,
    ]
    assert_same(model, small, x)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.skip = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        y = F.relu(self.bn(self.conv(y)) + self.skip(y))
        return self.head(y.mean((2, 3)))


def test_residual_add_shrinks_both_sides() -> None:
    torch.manual_seed(0)
    model = randomise_bn(Residual())
    x = torch.randn(2, 3, 6, 6)
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    widths = (
        small.stem.out_channels,
        small.conv.out_channels,
        small.skip.out_channels,
        small.head.in_features,
    )
    assert widths == (4, 4, 4, 4)
    assert_same(model, small, x)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(3, 6, 3, padding=1)
        self.right = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(torch.cat([self.left(x), self.right(x)], 1)))


def test_concat_shrinks_each_input_and_the_consumer_at_its_offsets() -> None:
    torch.manual_seed(0)
    model = Concat().eval()
    x = torch.randn(1, 3, 5, 5)
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    assert (small.left.out_channels, small.right.out_channels, small.head.in_channels) == (3, 2, 5)
    assert_same(model, small, x)


def test_flatten_into_linear_removes_whole_blocks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).eval()
    x = torch.randn(2, 1, 5, 5)
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    assert small[0].out_channels == 2 and small[3].in_features == 18
    assert_same(model, small, x)


def test_depthwise_separable_block() -> None:
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 4, 1),
    ))  # fmt: skip
    x = torch.randn(1, 3, 6, 6)
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    dw = small[3]
    assert (dw.in_channels, dw.out_channels, dw.groups, small[6].in_channels) == (4, 4, 4, 4)
    assert_same(model, small, x)


def test_resnet18_prune_half_and_compact() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 3, 32, 32)
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    assert_same(model, small, x, rtol=1e-4)
    assert params(small) <= 0.6 * params(model)
    assert small.layer1[0].conv1.out_channels == 32 and small.fc.in_features == 256
    assert_plain(small)


def test_plan_is_printable_and_building_it_changes_nothing(lenet: LeNet) -> None:
    prune.ln_structured(lenet.fc1, "weight", amount=0.5, n=2, dim=0)
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    ids = [id(p) for p in lenet.parameters()]
    plan = plan_compaction(lenet, X_LENET)
    assert all(torch.equal(before[k], v) for k, v in lenet.state_dict().items())
    assert [id(p) for p in lenet.parameters()] == ids and hasattr(lenet.fc1, "weight_mask")
    text = str(plan)
    assert "Compaction plan" in text and "fc1" in text and "fold: fc2.bias" in text
    assert "set: fc1.out_features = 60 (was 120)" in text
    assert plan.params_after == params(compact(lenet, X_LENET))
    assert plan == plan_compaction(lenet, X_LENET)  # frozen data, reproducible


def test_a_model_with_nothing_dead_compacts_to_itself(lenet: LeNet) -> None:
    plan = plan_compaction(lenet, X_LENET)
    assert plan.cuts == () and plan.params_after == plan.params_before
    assert "nothing is dead" in str(plan)
    assert_same(lenet, compact(lenet, X_LENET), X_LENET, rtol=0.0)


def test_a_mismatch_names_the_first_diverging_module_and_leaves_the_model_untouched(
    lenet: LeNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    prune.ln_structured(lenet.fc1, "weight", amount=0.5, n=2, dim=0)
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    # a broken fold (the copy and the in-place path both compute what a fold adds here)
    monkeypatch.setattr(compact_module, "_fold_delta", lambda weight, fold: torch.zeros(weight.shape[0]))
    for inplace in (False, True):
        with pytest.raises(MaskSparseError, match="first module whose output diverges is 'fc2'"):
            compact(lenet, X_LENET, inplace=inplace)
        assert set(lenet.state_dict()) == set(before)
        assert all(torch.equal(before[k], v) for k, v in lenet.state_dict().items())
        assert lenet.fc1.out_features == 120 and hasattr(lenet.fc1, "weight_mask")


def test_an_op_without_a_rule_on_dead_channels_raises() -> None:
    model = ChannelCumsum()
    x = torch.randn(1, 3, 2, 2)
    assert compact(model, x).a.out_channels == 4  # nothing dead: fine
    keep = torch.tensor([True, False, True, False])
    prune.custom_from_mask(model.a, "weight", keep[:, None, None, None].expand(4, 3, 1, 1))
    prune.custom_from_mask(model.a, "bias", keep)  # channels 1 and 3 are now zero everywhere
    with pytest.raises(MaskSparseError, match=r"aten\.cumsum.*no rule"):
        compact(model, x)


class HardCoded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).permute(0, 2, 3, 1).reshape(-1, 8))


def test_a_forward_with_hard_coded_sizes_fails_verification_by_name() -> None:
    model = HardCoded()
    x = torch.randn(1, 3, 2, 2)
    prune_channels(model, x, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MaskSparseError, match="compacted model fails in module 'fc'.*cannot be multiplied"):
        compact(model, x, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=0.01),
])  # fmt: skip
def test_inplace_slices_the_same_parameters_and_the_optimizer_state(make_optimizer) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = make_optimizer(model.parameters())
    x = torch.randn(5, 6)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    prune_channels(model, x, 0.5)
    weight = model[0].weight_orig
    state_before = {k: v.clone() for k, v in opt.state[weight].items() if torch.is_tensor(v) and v.ndim == 2}
    masked_out = model(x).detach()
    kept = (model[0].weight_mask != 0).any(1)
    result = compact(model, x, inplace=True, optimizer=opt)
    assert result is model and model[0].weight is weight and model[0].out_features == 4
    assert all(torch.equal(opt.state[weight][k], v[kept]) for k, v in state_before.items())
    assert opt.state[model[2].weight][next(iter(state_before))].shape == (3, 4)
    assert relative_error(masked_out, model(x).detach()) <= 1e-5
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()  # training continues without rebuilding the optimizer


def test_optimizer_without_inplace_is_refused(lenet: LeNet) -> None:
    with pytest.raises(PruningValueError, match="inplace=True"):
        compact(lenet, X_LENET, optimizer=torch.optim.SGD(lenet.parameters(), lr=0.1))


def test_compacted_model_saves_and_loads_with_plain_torch(lenet: LeNet) -> None:
    prune.ln_structured(lenet.fc1, "weight", amount=0.5, n=2, dim=0)
    small = compact(lenet, X_LENET)
    assert_saves_and_loads(small, X_LENET)


def test_a_fully_masked_layer_keeps_one_channel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    prune.custom_from_mask(model[0], "weight", torch.zeros(3, 4, dtype=torch.bool))
    prune.custom_from_mask(model[0], "bias", torch.zeros(3, dtype=torch.bool))
    x = torch.randn(5, 4)
    small = compact(model, x)
    assert small[0].out_features == 1 and small[2].in_features == 1
    assert_same(model, small, x, rtol=0.0)


def test_a_non_binary_mask_is_baked_into_the_kept_weights() -> None:
    class HalveOddRows(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
            mask = default_mask.clone().float()
            mask[::2] = 0.0
            mask[1::2] *= 0.5
            return mask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    HalveOddRows.apply(model[0], "weight")
    x = torch.randn(3, 4)
    small = compact(model, x)
    assert small[0].out_features == 3 and small[2].in_features == 3
    assert_same(model, small, x)


def test_torch_pruned_modules_that_never_ran_are_copied(lenet: LeNet) -> None:
    """torch.nn.utils.prune leaves a weight with autograd history on modules the trace never runs."""
    lenet.unused = nn.Linear(3, 3)  # type: ignore[assignment]
    torch_prune.ln_structured(lenet.unused, "weight", amount=0.5, n=1, dim=0)
    torch_prune.ln_structured(lenet.fc1, "weight", amount=0.5, n=1, dim=0)
    assert lenet.unused.weight.grad_fn is not None
    small = compact(lenet, X_LENET)
    assert small.fc1.out_features == 60 and small.unused.weight.grad_fn is None
    assert lenet.unused.weight.grad_fn is not None


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
def test_removing_heads_the_module_cannot_follow_raises(kind: type[nn.Module], why: str) -> None:
    """Dead heads whose number is not in one attribute, or whose size forward derives from it, are
    refused by name rather than guessed at; the model is left as it was."""
    torch.manual_seed(0)
    model = kind().eval()
    columns = torch.ones(24, 24, dtype=torch.bool)
    columns[:, 6:12] = False  # head 1 contributes nothing
    prune.custom_from_mask(model.proj, "weight", columns)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MaskSparseError, match=r"1 of the 4 heads dead .* in module '<model>' " + why):
        compact(model, X_TOKENS, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


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


def test_compacted_model_saves_compiles_and_exports_with_plain_torch(tmp_path: Path) -> None:
    """The compacted model is ordinary torch: torch.save/load, torch.compile and ONNX export all work."""
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = LeNet().eval()
    x = torch.randn(4, 1, 28, 28)
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    expected = small(x)

    torch.save(small, tmp_path / "small.pt")
    assert torch.equal(torch.load(tmp_path / "small.pt", weights_only=False)(x), expected)
    assert torch.allclose(torch.compile(small, backend="aot_eager")(x), expected, atol=1e-6)

    torch.onnx.export(small, (x,), tmp_path / "small.onnx", dynamo=False)
    exported = onnx.load(tmp_path / "small.onnx")
    onnx.checker.check_model(exported)
    shapes = {init.name: tuple(init.dims) for init in exported.graph.initializer}
    assert shapes == {name: tuple(p.shape) for name, p in small.named_parameters()}
    assert shapes["fc1.weight"][0] < 120  # the exported graph is the smaller model


# ------------------------------------------------------------------ fast paths agree with the slow ones


def _cut_copy_model() -> nn.Sequential:
    """Masked conv channels that still emit relu(BN shift) fold into a bias-less 1x1 conv (a created
    bias), others die; a masked Linear row with a live bias folds into the classifier."""
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 16, 10), nn.ReLU(), nn.Linear(10, 5),
    ))  # fmt: skip
    with torch.no_grad():
        model[1].bias.fill_(2.0)
    rows = torch.ones(8, dtype=torch.bool)
    rows[[1, 4]] = False
    prune.custom_from_mask(model[0], "weight", rows[:, None, None, None].expand(8, 3, 3, 3))
    prune.custom_from_mask(model[3], "weight", (torch.arange(6) != 2)[:, None, None, None].expand(6, 8, 1, 1))
    prune.custom_from_mask(model[6], "weight", (torch.arange(10) % 3 != 0)[:, None].expand(10, 96))
    return model


def test_the_copy_cut_while_copying_equals_slicing_in_place() -> None:
    """Invariant: compact's copy, cut while copying (folds read from the user's uncut weights), is the
    model that slicing the same plan in place makes; the user's model and its tensors stay as they were."""
    model, x = _cut_copy_model(), torch.randn(2, 3, 6, 6)
    plan = plan_compaction(model, x)
    assert {f.module for f in plan.folds} == {"3", "8"} and any(f.creates_bias for f in plan.folds)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    small = compact(model, x)
    assert {k: id(v) for k, v in model.state_dict(keep_vars=True).items()} == tensors
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    in_place = compact(copy.deepcopy(model), x, inplace=True)  # copies to verify, then slices in place
    assert str(small) == str(in_place)
    expected = in_place.state_dict()
    assert list(small.state_dict()) == list(expected)
    assert all(torch.equal(v, expected[k]) for k, v in small.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in small.parameters())
    assert_same(model, small, x)


def test_a_tensor_two_cut_names_share_is_copied_whole() -> None:
    tied = nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 3))
    tied[1].weight = tied[0].weight
    plan = compact_module.Plan(
        tuple(compact_module.TensorCut(p, "weight", 0, 3, (0, 2)) for p in ("0", "1")), (), (), 0, 0
    )
    assert compact_module._cut_tensors(tied, plan) is None
    copied, cut = compact_module._copy(tied, plan)
    assert not cut and copied[0].weight is copied[1].weight and copied[0].weight.shape == (3, 4)


def _old_slice_constants(t: torch.Tensor, dim: int) -> np.ndarray:
    """Per index along ``dim``: the value its whole slice holds, NaN if none (slice by slice)."""
    out = np.full(t.shape[dim], np.nan)
    for i in range(t.shape[dim]):
        s = t.select(dim, i).reshape(-1).double()
        if s.numel() and bool((s == s[0]).all()):
            out[i] = float(s[0])
    return out


def test_constants_and_zeros_of_static_tensors_in_any_layout() -> None:
    """States reads constants in memory order and zeros off one non-zero map: the same answers as a
    slice-by-slice scan, for transposed views, NaN, -0.0, bool and empty tensors."""
    w = torch.randn(6, 5, 3, 3)
    w[1], w[:, 2], w[3], w[:, 4] = 0.0, 0.0, 0.5, -0.0
    w[4, 0, 0, 0] = float("nan")
    cases = [w, w.transpose(0, 1), w[:, :, 0, 0].t(), w.flatten(1), w != 0, torch.zeros(3, 0, 2), w[0, 0, 0]]
    for t in cases:
        v = Value(0, tuple(t.shape), t.dtype, True, tensor=t)
        for d in range(t.ndim):
            expected = _old_slice_constants(t, d)
            np.testing.assert_array_equal(States().get(v, d), expected)
            np.testing.assert_array_equal(States().zero(v, d), expected == 0)
        if t.ndim >= 2 and t.numel():
            reads = t.reshape(t.shape[0], t.shape[1], -1).ne(0).any(2)
            np.testing.assert_array_equal(States().nonzero(v), reads.numpy())


def _old_conv_constants(node: Node, states: States) -> np.ndarray:
    """The conv transfer as a per-(row, input) min/max scan: the oracle of its fast path."""
    x, w, b, groups = node.args[0], node.args[1], node.args[2], node.args[8]
    s = states.get(x, 1)
    n_out, per_group = w.shape[0], w.shape[1]
    t = w.tensor.detach().reshape(n_out, per_group, -1)
    nz = ~((t.amin(2) == 0) & (t.amax(2) == 0)).numpy()
    s_o = s.reshape(groups, per_group)[np.arange(n_out) // (n_out // groups)]
    need = s_o == 0 if any(p != 0 for p in node.args[4]) else np.isfinite(s_o)
    ok = np.all(~nz | need, axis=1)
    use = nz & np.isfinite(s_o) & (s_o != 0)
    contrib = np.where(use, t.sum(-1).double().numpy() * np.nan_to_num(s_o), 0.0).sum(1)
    bias = states.get(b, 0) if isinstance(b, Value) else np.zeros(n_out)
    return np.where(ok, bias + contrib, np.nan)


@pytest.mark.parametrize("masked", [False, True])
def test_conv_constants_match_a_full_scan(masked: bool) -> None:
    """Unmasked (no input channel is a constant: the fast path) and masked (constants flow into plain,
    padded and grouped convs), every conv's output constants are those of a full min/max scan."""
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, groups=2),
    ))  # fmt: skip
    if masked:
        rows = (torch.arange(8) % 3 != 1)[:, None, None, None]
        prune.custom_from_mask(model[0], "weight", rows.expand(8, 3, 3, 3))
        columns = (torch.arange(8) != 5)[None, :, None, None]
        prune.custom_from_mask(model[3], "weight", rows.expand(8, 8, 1, 1) & columns)
    graph = trace(model, torch.randn(2, 3, 8, 8))
    convs = [n for n in graph.trace.nodes if n.op.overloadpacket is torch.ops.aten.convolution]
    assert len(convs) == 4
    known = 0
    for node in convs:
        got = graph.states.get(node.outputs[0], 1)
        np.testing.assert_array_equal(got, _old_conv_constants(node, graph.states))
        known += int(np.isfinite(got).sum())
    assert (known > 0) == masked


def test_labels_joined_after_the_reshape_choices_are_the_components_of_every_tie() -> None:
    torch.manual_seed(0)
    graph = trace(ViTBlock().eval(), X_TOKENS)
    assert any(rel.splits for rel in graph.relations)
    every = graph_groups._labels(graph, [(rel, []) for rel in graph.relations])
    np.testing.assert_array_equal(graph.labels, every)


class TiedLinears(nn.Module):
    """fc4 shares fc2's weight (tied weights): both must report the shape the shared tensor gets."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 8)
        self.fc3, self.fc4 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.fc4.weight = self.fc2.weight
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.out(self.fc4(torch.relu(self.fc3(h))))


def test_tied_weights_update_the_attributes_of_every_holder() -> None:
    torch.manual_seed(0)
    model, x = TiedLinears(), torch.randn(6, 4)
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    assert_same(model, small, x)
    assert small.fc4.weight is small.fc2.weight
    for name in ("fc1", "fc2", "fc3", "fc4", "out"):
        layer = getattr(small, name)
        assert (layer.out_features, layer.in_features) == tuple(layer.weight.shape), name
    assert params(small) < params(model)
