"""Small models and helpers shared by the tests."""

from __future__ import annotations

import copy
import io

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


def params(model: nn.Module) -> int:
    """Parameter count (a pruned tensor's ``_orig`` stands for the dense one)."""
    return sum(p.numel() for p in model.parameters())


def assert_same(masked: nn.Module, small: nn.Module, *inputs: torch.Tensor, rtol: float = 1e-5) -> None:
    """The compacted model computes what the masked one does: max relative error at most ``rtol``."""
    from masksparse.compact import relative_error

    with torch.no_grad():
        assert relative_error(masked.eval()(*inputs), small.eval()(*inputs)) <= rtol


def randomise_bn(model: nn.Module, seed: int = 0, *, zero_weights: bool = False) -> nn.Module:
    """BatchNorm statistics and affine parameters like a trained network's (not 0/1), in eval mode. With
    ``zero_weights``, weights initialised to zero (a classifier, say) first get small random values, so
    outputs are not all zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters() if zero_weights else ():
            if name.endswith("weight") and p.ndim >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def assert_saves_and_loads(model: nn.Module, *inputs: torch.Tensor) -> None:
    """``model``'s state_dict loads into a zeroed copy, and the whole pickled model loads, with plain torch
    (``weights_only`` for the state_dict); both compute exactly what ``model`` computes."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = copy.deepcopy(model)
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    whole = io.BytesIO()
    torch.save(model, whole)
    whole.seek(0)
    loaded = torch.load(whole, weights_only=False)
    with torch.no_grad():
        expected = model.eval()(*inputs)
        assert torch.equal(fresh.eval()(*inputs), expected)
        assert torch.equal(loaded.eval()(*inputs), expected)
