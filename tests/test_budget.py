"""prune_channels(target_params=...): the smallest amount that leaves at most the asked fraction of the
parameters, as the compacted model counts them; impossible or contradictory budgets fail up front."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import masksparse
from masksparse import PruningValueError, prune_channels


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("global_ranking", [False, True])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_the_compacted_model_meets_the_budget_within_one_unit(target, global_ranking):
    x = torch.randn(2, 3, 8, 8)
    model = _net()
    dense = _params(model)
    prune_channels(model, x, target_params=target, global_ranking=global_ranking)
    small = masksparse.compact(model, x)
    reached = _params(small) / dense
    assert reached <= target
    # one unit fewer (the smallest group's unit is the cheapest) would not have met it: within a unit
    cheapest_unit = 3 * 9 + 1 + 2 + 16 * 9  # a conv1 channel: its filter, bias, BatchNorm and conv2 inputs
    biggest_unit = 16 * 9 + 1 + 64  # a conv2 channel with its bias and fc input column
    assert reached > target - max(cheapest_unit, biggest_unit, 32 + 1 + 10) / dense * 2
    assert torch.allclose(small(x), model(x), atol=1e-5)


def test_bad_budgets_fail_before_anything_changes():
    x = torch.randn(2, 3, 8, 8)
    model = _net()
    for kwargs, match in [
        ({"amount": 0.5, "target_params": 0.5}, "one of amount, target_params or target_macs"),
        ({}, "one of amount, target_params or target_macs"),
        ({"target_params": 1.5}, r"target_params must be a fraction in \(0, 1\)"),
        ({"target_params": 0.001}, "cannot be met: pruning every prunable unit still leaves"),
    ]:
        with pytest.raises(PruningValueError, match=match):
            prune_channels(model, x, **kwargs)
        assert not any(name.endswith("_mask") for name, _ in model.named_buffers())


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    total = masksparse.sparsity_report(model, x).total.macs
    assert total is not None
    return total


@pytest.mark.parametrize("global_ranking", [False, True])
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_a_mac_budget_is_met_by_the_compacted_model(target, global_ranking):
    x = torch.randn(2, 3, 8, 8)
    model = _net()
    dense = _macs(model, x)
    prune_channels(model, x, target_macs=target, global_ranking=global_ranking)
    assert masksparse.structured.compacted_size(model, x, "macs")[1] / dense <= target
    small = masksparse.compact(model, x)
    reached = _macs(small, x) / dense
    assert reached <= target
    # within a unit: one conv1 channel (its filter and conv2's inputs over 64 positions) is the costliest
    costliest = 2 * 64 * (3 * 9 + 32 * 9)
    assert reached > target - 2 * costliest / dense
    assert torch.allclose(small(x), model(x), atol=1e-5)


def test_a_mac_budget_leaves_layers_with_their_own_amount_alone():
    x = torch.randn(1, 3, 8, 8)
    model = _net()
    dense = _macs(model, x)
    prune_channels(model, x, target_macs=0.4, amounts={model[7]: 0})  # fc1's 64 outputs stay
    assert int(model[7].weight_mask.any(1).sum()) == 64
    assert int(model[3].weight_mask.flatten(1).any(1).sum()) < 32
    assert _macs(masksparse.compact(model, x), x) / dense <= 0.4


def test_mac_budgets_fail_clearly():
    x = torch.randn(2, 3, 8, 8)
    model = _net()
    with pytest.raises(PruningValueError, match="one of amount, target_params or target_macs, got amount"):
        prune_channels(model, x, 0.5, target_macs=0.5)
    with pytest.raises(PruningValueError, match=r"target_macs must be a fraction in \(0, 1\), got 0"):
        prune_channels(model, x, target_macs=0)
    with pytest.raises(PruningValueError, match="target_macs=0.001 cannot be met.*MACs"):
        prune_channels(model, x, target_macs=0.001)
    with pytest.raises(PruningValueError, match="measure must be 'params' or 'macs', got 'flops'"):
        masksparse.structured.compacted_size(model, x, "flops")
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    norm_only = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU())
    with pytest.raises(PruningValueError, match="Sequential runs no Linear or Conv layer"):
        prune_channels(norm_only, torch.randn(2, 4), target_macs=0.5)
