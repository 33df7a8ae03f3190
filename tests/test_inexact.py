"""allow_inexact: units a normalisation reduces over are pruned and removed only on request, and the
change it makes is measured and stated."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

from masksparse import (
    CompactionError,
    InexactCompactionWarning,
    KeptUnitsWarning,
    PruningTypeError,
    compact,
    plan_compaction,
    prune_channels,
)
from masksparse.compact import apply as compaction
from masksparse.compact import relative_error
from masksparse.graph import trace


def ln_mlp(seed: int = 0, affine: bool = True) -> nn.Sequential:
    """Linear -> GELU -> LayerNorm(16) -> Linear: the 16 hidden units are normalised over."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16, elementwise_affine=affine), nn.Linear(16, 4)
    ).eval()


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vit = torchvision.models.VisionTransformer(32, 16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    nn.init.normal_(vit.heads.head.weight, std=0.02)  # zero-initialised: outputs would all be zero
    return vit.eval()


def compact_inexact(
    model: nn.Module, x: torch.Tensor, **kwargs: object
) -> tuple[nn.Module, InexactCompactionWarning]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = compact(model, x, allow_inexact=True, **kwargs)  # type: ignore[arg-type]
    stated = [w.message for w in caught if isinstance(w.message, InexactCompactionWarning)]
    assert len(stated) == 1
    return small, stated[0]


def masked_rows(module: nn.Module) -> set[int]:
    mask = getattr(module, "weight_mask", None)
    if mask is None:
        return set()
    return set(torch.nonzero(~mask.reshape(mask.shape[0], -1).any(1)).flatten().tolist())


def test_default_leaves_normalised_units_alone() -> None:
    """Without the opt-in, nothing a LayerNorm normalises over is masked, and the plan is exact."""
    model, x = ln_mlp(), torch.randn(10, 8)
    prune_channels(model, x, 0.5)
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    plan = plan_compaction(model, x)
    assert plan.exact and plan.normalisations == () and plan.deviation is None


def test_opt_in_masks_every_member() -> None:
    """The same units are masked on the producer's rows and bias, the LayerNorm's weight and bias,
    and the consumer's columns."""
    model, x = ln_mlp(), torch.randn(10, 8)
    prune_channels(model, x, 0.5, allow_inexact=True)
    gone = masked_rows(model[0])
    assert len(gone) == 8
    for mask in (model[0].bias_mask, model[2].weight_mask, model[2].bias_mask):
        assert set(torch.nonzero(~mask).flatten().tolist()) == gone
    assert set(torch.nonzero(~model[3].weight_mask.any(0)).flatten().tolist()) == gone


def test_other_blocks_stay() -> None:
    """A width that is also the model's output stays whole even with the opt-in."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)).eval(), torch.randn(3, 4)
    prune_channels(model, x, 0.5, allow_inexact=True)
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())


def test_default_compact_keeps_masked_normalised_units() -> None:
    """Masks inside a normalised width compact exactly by default: those units are kept."""
    model, x = ln_mlp(), torch.randn(10, 8)
    prune_channels(model, x, 0.5, allow_inexact=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = compact(model, x)
    assert small[2].normalized_shape == (16,) and small[0].out_features == 16
    with torch.no_grad():
        assert relative_error(model(x), small(x)) <= 1e-5


@pytest.mark.parametrize("affine", [True, False])
def test_plan_and_compacted_attributes(affine: bool) -> None:
    model, x = ln_mlp(affine=affine), torch.randn(10, 8)
    prune_channels(model, x, 0.5, allow_inexact=True)
    plan = plan_compaction(model, x, allow_inexact=True)
    assert [(n.module, n.size, n.kept) for n in plan.normalisations] == [("2", 16, 8)]
    assert not plan.exact and plan.deviation is None
    assert "2: normalises over 8 of 16 channels" in str(plan)
    small, stated = compact_inexact(model, x)
    assert small[2].normalized_shape == (8,)
    if affine:
        assert small[2].weight.shape == small[2].bias.shape == (8,)
    assert (small[0].out_features, small[3].in_features) == (8, 8)
    assert small(torch.randn(2, 8)).shape == (2, 4)
    assert stated.plan.deviation == stated.deviation and "normalises over 8 of 16 channels" in str(stated)


def test_stated_deviation_is_what_the_outputs_show() -> None:
    model, x = ln_mlp(), torch.randn(10, 8)
    prune_channels(model, x, 0.5, allow_inexact=True)
    small, stated = compact_inexact(model, x)
    with torch.no_grad():
        measured = relative_error(model(x), small(x))
    assert measured > 1e-3  # a LayerNorm over half the width really changes the outputs
    assert stated.deviation == pytest.approx(measured, rel=1e-6)
    assert f"{measured:.3g}" in str(stated)


def test_tiny_vit() -> None:
    """The hidden (residual) width of a ViT: every LayerNorm, Linear and attention follows it."""
    vit, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    prune_channels(vit, x, 0.5, allow_inexact=True)
    assert int(vit.encoder.ln.weight_mask.sum()) == 16 and int(vit.conv_proj.bias_mask.sum()) == 16
    small, stated = compact_inexact(vit, x)
    assert small.hidden_dim == 16 and small.conv_proj.out_channels == 16
    for m in small.modules():
        if isinstance(m, nn.LayerNorm):
            assert m.normalized_shape == tuple(m.weight.shape) == (16,)
        if isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape)
    assert small.heads.head.in_features == 16
    assert len(stated.plan.normalisations) == 5  # ln_1, ln_2 in two blocks, and the final ln
    with torch.no_grad():
        assert stated.deviation == pytest.approx(relative_error(vit(x), small(x)), rel=1e-6)
        assert small(torch.randn(3, 3, 32, 32)).shape == (3, 1000)
    params_before = sum(p.numel() for p in vit.parameters())
    assert sum(p.numel() for p in small.parameters()) < 0.6 * params_before


def test_group_norm_and_rms_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1), nn.RMSNorm([8, 4, 4]), nn.Conv2d(8, 2, 1)
    ).eval()
    x = torch.randn(2, 3, 4, 4)
    prune_channels(model, x, 0.5, allow_inexact=True, round_to=2)
    small, stated = compact_inexact(model, x)
    assert (small[1].num_channels, small[1].num_groups) == (4, 2)
    assert small[3].normalized_shape == (4, 4, 4)
    with torch.no_grad():
        assert stated.deviation == pytest.approx(relative_error(model(x), small(x)), rel=1e-6)


def test_multi_dim_layer_norm() -> None:
    """A LayerNorm over (channels, length): only the channels shrink (the length is a conv's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 1), nn.LayerNorm([8, 5]), nn.Conv1d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 5)
    prune_channels(model, x, 0.25, allow_inexact=True)
    small, stated = compact_inexact(model, x)
    assert small[1].normalized_shape == (6, 5) and small[1].weight.shape == (6, 5)
    with torch.no_grad():
        assert stated.deviation == pytest.approx(relative_error(model(x), small(x)), rel=1e-6)


def test_inplace() -> None:
    model, x = ln_mlp(), torch.randn(10, 8)
    prune_channels(model, x, 0.5, allow_inexact=True)
    weight = model[0].weight_orig
    same, _ = compact_inexact(model, x, inplace=True)
    assert same is model and model[0].weight is weight and model[2].normalized_shape == (8,)


def test_other_changes_are_still_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Verification compares against the masked model with the normalisations over the kept units
    only: a change anywhere else raises, and the user's model is left as it was."""
    model, x = ln_mlp(), torch.randn(10, 8)
    prune_channels(model, x, 0.5, allow_inexact=True)
    before = copy.deepcopy(model.state_dict())
    apply = compaction._apply

    def broken(m: nn.Module, plan: object, optimizer: object, **kwargs: object) -> None:
        apply(m, plan, optimizer, **kwargs)  # type: ignore[arg-type]
        with torch.no_grad():
            m[3].bias.add_(1.0)

    monkeypatch.setattr(compaction, "_apply", broken)
    with pytest.raises(CompactionError, match="'3'"):
        compact(model, x, allow_inexact=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[2].normalized_shape == (16,)


def test_errors() -> None:
    model, x = ln_mlp(), torch.randn(10, 8)
    with pytest.raises(PruningTypeError, match="allow_inexact must be True or False, got 'yes'"):
        prune_channels(model, x, 0.5, allow_inexact="yes")  # type: ignore[arg-type]
    with pytest.raises(PruningTypeError, match="allow_inexact"):
        compact(model, x, allow_inexact=1)  # type: ignore[arg-type]
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())


def test_group_norm_keeps_its_groups_even() -> None:
    """GroupNorm needs a multiple of its groups: the plan keeps back as few masked units as that takes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(2, 3, 4, 4)
    prune_channels(model, x, 3, allow_inexact=True)
    assert len(masked_rows(model[0])) == 3
    small, stated = compact_inexact(model, x)
    assert (small[1].num_channels, small[0].out_channels, small[2].in_channels) == (6, 6, 6)
    assert [(n.size, n.kept) for n in stated.plan.normalisations] == [(8, 6)]
    with torch.no_grad():
        assert stated.deviation == pytest.approx(relative_error(model(x), small(x)), rel=1e-6)


def test_nothing_normalised_means_exact() -> None:
    """The opt-in changes nothing where no normalisation is involved: no warning, same plan."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), torch.randn(10, 8)
    prune_channels(model, x, 0.5, allow_inexact=True)
    assert plan_compaction(model, x, allow_inexact=True) == plan_compaction(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = compact(model, x, allow_inexact=True)
    assert small[0].out_features == 8


def test_group_reason_names_the_opt_in() -> None:
    graph = trace(ln_mlp(), torch.randn(10, 8))
    blocked = [g for g in graph.groups if g.size == 16]
    assert len(blocked) == 1 and not blocked[0].prunable
    assert "normalised over by aten.native_layer_norm" in blocked[0].reason
    assert "allow_inexact=True" in blocked[0].reason


class FunctionalNorm(nn.Module):
    """A hand-written LayerNorm: its code reads the width from ``self.dim``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim, self.image_size = dim, dim
        self.weight, self.bias = nn.Parameter(torch.rand(dim) + 0.5), nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, (self.dim,), self.weight, self.bias)


def test_functional_layer_norm_attribute_follows() -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), FunctionalNorm(16), nn.Linear(16, 4)).eval(), torch.randn(6, 8)
    prune_channels(model, x, 0.5, allow_inexact=True)
    small, stated = compact_inexact(model, x)
    assert (small[1].dim, small[1].image_size, small[1].weight.shape) == (8, 16, (8,))
    with torch.no_grad():
        assert stated.deviation == pytest.approx(relative_error(model(x), small(x)), rel=1e-6)


class DerivedWidth(nn.Module):
    """Reshapes by a size its code derives from the normalised width, as Swin's attention does."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc, self.out = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return self.out(self.fc(h).reshape(h.shape[0], 2, h.shape[-1]).sum(1))


def test_a_module_that_cannot_follow_keeps_its_units_by_name() -> None:
    """The module reshapes by a size derived from the normalised width: compaction keeps that width
    (so nothing changes there, exactly) and says which module could not follow."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 8), DerivedWidth()).eval(), torch.randn(5, 4)
    prune_channels(model, x, 0.5, allow_inexact=True)
    with pytest.warns(KeptUnitsWarning, match=r"1: the compacted model could not run.*fails in module '1'"):
        small = compact(model, x, allow_inexact=True)
    assert small[1].ln.normalized_shape == (8,)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
