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
        ({"amount": 0.5, "target_params": 0.5}, "either amount or target_params"),
        ({}, "either amount or target_params"),
        ({"target_params": 1.5}, r"target_params must be a fraction in \(0, 1\)"),
        ({"target_params": 0.001}, "cannot be met: pruning every prunable unit still leaves"),
    ]:
        with pytest.raises(PruningValueError, match=match):
            prune_channels(model, x, **kwargs)
        assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
