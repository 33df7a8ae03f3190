"""The torchvision zoo: prune_channels at 50% (or torch's own ln_structured on the convolutions), then
compact; the smaller model must compute what the masked one does and, with prune_channels, be at most 60%
of its size. Every classification model up to 150M parameters runs (about 2.5 minutes on 2 cores, 4 GiB
at the peak); ``pytest -m "not zoo"`` keeps only a fast subset. benchmarks/zoo.py prints the same as a
table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from masksparse import compact, prune_channels
from masksparse.compact import relative_error
from tests.models import randomise_bn

torchvision = pytest.importorskip("torchvision")

# Small models whose families cover depthwise and grouped convs, squeeze-excitation, channel shuffle,
# concatenation, residuals and a conv classifier; each takes about a second.
_FAST = ("mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5", "squeezenet1_1", "efficientnet_b0")
# The smallest input each family accepts comfortably; the rest take 64 x 64.
_SIZES = {"inception_v3": 299, "vit": 224, "swin": 224, "maxvit": 224}
_MAX_PARAMS = 150e6


def _num_params(name: str) -> int:
    """From torchvision's weights metadata: nothing is built or downloaded."""
    return int(next(iter(torchvision.models.get_model_weights(name))).meta["num_params"])


def _zoo() -> list[object]:
    names = [
        n for n in torchvision.models.list_models(module=torchvision.models) if _num_params(n) <= _MAX_PARAMS
    ]
    return [n if n in _FAST else pytest.param(n, marks=pytest.mark.zoo) for n in names]


def _size(name: str) -> int:
    return next((s for prefix, s in _SIZES.items() if name.startswith(prefix)), 64)


def _trained_looking(name: str) -> nn.Module:
    """``name`` with weights=None, eval mode, BatchNorm statistics and affine parameters like a trained
    network's, and zero-initialised weights (a classifier, say) given small random values."""
    torch.manual_seed(0)
    return randomise_bn(torchvision.models.get_model(name, weights=None), zero_weights=True)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # *_orig stand for the dense tensors


@pytest.mark.parametrize("name", _zoo())
def test_prune_channels_half_then_compact(name: str) -> None:
    model = _trained_looking(name)
    size = _size(name)
    x = torch.randn(1, 3, size, size)
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    with torch.no_grad():
        fresh = torch.randn(2, 3, size, size)
        assert relative_error(model(fresh), small(fresh)) <= 1e-4
        assert small(x).shape == (1, 1000)  # the classes are the model's outputs: never pruned
    assert _params(small) <= 0.6 * _params(model), _params(small) / _params(model)


@pytest.mark.parametrize("name", _FAST[:3])
def test_torch_ln_structured_masks_compact_exactly(name: str, one_thread: None) -> None:
    """Plain torch masks on conv weights only: masked channels still emit their BatchNorm shift, which
    compaction must keep or fold, never drop."""
    model = _trained_looking(name)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            torch_prune.ln_structured(m, "weight", amount=0.5, n=1, dim=0)
    x = torch.randn(1, 3, 64, 64)
    small = compact(model, x)
    with torch.no_grad():
        fresh = torch.randn(2, 3, 64, 64)
        assert relative_error(model(fresh), small(fresh)) <= 1e-4
    assert _params(small) < _params(model)


@pytest.mark.parametrize(
    "name", ["regnet_y_400mf", "shufflenet_v2_x1_0", pytest.param("resnext50_32x4d", marks=pytest.mark.zoo)]
)
def test_ignored_classifier_keeps_its_outputs_only(name: str) -> None:
    """``ignored_layers=[classifier]`` as Torch-Pruning users write it: the classes stay, the features
    feeding the classifier still shrink, so the model ends as small as with nothing ignored (measured:
    0.42, 0.52 and 0.39 of the parameters)."""
    model = _trained_looking(name)
    x = torch.randn(1, 3, 64, 64)
    classifier = model.fc
    prune_channels(model, x, 0.5, ignored_layers=[classifier])
    assert classifier.weight_mask.all(dim=0).sum() < classifier.in_features  # its inputs were pruned
    small = compact(model, x)
    with torch.no_grad():
        fresh = torch.randn(2, 3, 64, 64)
        assert relative_error(model(fresh), small(fresh)) <= 1e-4
        assert small(x).shape == (1, 1000)
    assert _params(small) <= 0.6 * _params(model), _params(small) / _params(model)
