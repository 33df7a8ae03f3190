"""compact: the compacted model computes what the masked model computes, with fewer parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn

from masksparse import PruningValueError, prune
from masksparse.compact import compact, plan_compaction, relative_error
from masksparse.examples import LeNet
from masksparse.structured import prune_channels
from tests.models import assert_same, assert_saves_and_loads, params, randomise_bn


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
