"""Small models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def mlp(seed: int = 0) -> nn.Sequential:
    """Three Linear layers with ReLUs: 12 -> 16 -> 8 -> 4."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def convnet(seed: int = 0) -> nn.Sequential:
    """Conv, BatchNorm, ReLU, pooled into a Linear; input (N, 3, 8, 8)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (module, name) of a weight or bias parameter, in module order."""
    return [
        (module, name)
        for module in model.modules()
        for name in ("weight", "bias")
        if isinstance(module, (nn.Linear, nn.Conv2d)) and getattr(module, name, None) is not None
    ]


class ChannelCumsum(nn.Module):
    """Conv -> cumsum over channels (an operation without a rule) -> conv; input (N, 3, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.cumsum(self.a(x), dim=1))
