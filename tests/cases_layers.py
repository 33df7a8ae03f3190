"""Rule-registry cases for layer and layout rules (matmul variants, stacking, ...): small models that
tests/test_graph.py prunes with prune_channels and compacts, exactly, and whose ops count as exercised.

Each entry: name -> (model factory, input shape, whether compaction must shrink the model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ScoresWithBias(nn.Module):
    """Attention scores as BLOOM computes them: ``baddbmm(alibi, q, k^T)``, then ``bmm`` with v."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)
        self.register_buffer("alibi", torch.linspace(-1, 1, 5).expand(2, 5, 5).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.baddbmm(self.alibi, self.q(x), self.k(x).transpose(1, 2), beta=1.0, alpha=0.5)
        return self.out(torch.bmm(scores.softmax(-1), torch.relu(self.v(x))))


class SummedBatches(nn.Module):
    """``addbmm``: a product summed over the batch, plus a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 4)
        self.bias = nn.Parameter(torch.randn(8, 4))
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.addbmm(self.bias, torch.relu(self.a(x)).transpose(1, 2), self.b(x)))


class Stacked(nn.Module):
    """Two branches stacked along a new dim, then averaged (as selective-kernel and cross-scale
    models combine paths)."""

    def __init__(self) -> None:
        super().__init__()
        self.p1, self.p2 = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.stack([torch.relu(self.p1(x)), torch.relu(self.p2(x))], dim=1).sum(1))


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]] = {
    "baddbmm": (ScoresWithBias, (2, 5, 6), True),
    "addbmm": (SummedBatches, (3, 5, 6), True),
    "stack": (Stacked, (2, 3, 6, 6), True),
}
