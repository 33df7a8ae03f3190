"""Structured reconstruction: after channels are pruned, refit the layers that read them.

Each ``nn.Linear`` that consumes pruned units (reads them as input columns) is refit by least squares on
the calibration inputs it saw before pruning (:func:`masksparse.criteria.reconstruction.refit`): its kept
columns and its bias take over what the removed columns contributed, the bias absorbing their mean. Only
kept entries change, so the model still compacts exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from masksparse._feed import Forward, LossFn
from masksparse.criteria.calibration import LayerStats, _batch_runs, _run_pass
from masksparse.criteria.reconstruction import refit
from masksparse.graph import Group

__all__ = ["consumers", "reconstruct", "snapshot", "statistics"]


def consumers(model: nn.Module, groups: Sequence[Group]) -> list[str]:
    """Paths of the ``nn.Linear`` layers that read the groups' units along their inputs."""
    found = {
        m.module
        for g in groups
        for m in g.members
        if m.tensor == "weight" and m.dim == 1 and isinstance(model.get_submodule(m.module), nn.Linear)
    }
    return sorted(found)


def statistics(
    model: nn.Module,
    data: Iterable[Any],
    paths: Sequence[str],
    loss_fn: LossFn | None,
    forward: Forward | None,
) -> dict[str, LayerStats]:
    """``X^T X`` (and sums) of each layer's inputs over the data, the model as it is now."""
    runs = _batch_runs(model, data, loss_fn, forward)
    return _run_pass(model, runs, list(paths), None, hessian=True, dtype=torch.float64, bar=None)


def _param(module: nn.Module, name: str) -> nn.Parameter | None:
    return module._parameters.get(name + "_orig", module._parameters.get(name))


def reconstruct(
    model: nn.Module,
    stats: dict[str, LayerStats],
    before: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    ridge: float = 0.1,
) -> None:
    """Refit every layer of ``stats`` for the input columns its mask now removes, toward the outputs
    its weight and bias as they were ``before`` (taken with :func:`snapshot`) gave."""
    for path, layer_stats in stats.items():
        module = model.get_submodule(path)
        mask = module._buffers.get("weight_mask")
        if mask is None:
            continue
        keep = mask.bool().any(0) if mask.dtype == torch.bool else (mask != 0).any(0)
        if bool(keep.all()):
            continue
        weight, bias = _param(module, "weight"), _param(module, "bias")
        assert weight is not None  # an nn.Linear whose weight is masked
        old_w, old_b = before[path]
        new_w, new_b = refit(old_w, old_b, layer_stats, keep, ridge)
        with torch.no_grad():
            weight[:, keep] = new_w[:, keep]
            if bias is not None and new_b is not None:
                bias.copy_(new_b)


def snapshot(model: nn.Module, paths: Iterable[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Each layer's weight and bias as the model computes them now."""
    out = {}
    for path in paths:
        module = model.get_submodule(path)
        w, b = module.weight, module.bias
        assert isinstance(w, torch.Tensor)
        out[path] = (w.detach().clone(), b.detach().clone() if isinstance(b, torch.Tensor) else None)
    return out
