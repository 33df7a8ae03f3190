"""Sensitivity analysis: how much each layer alone can lose before the model suffers.

:func:`masksparse.sensitivity` prunes one layer at a time at each amount (by magnitude: single
weights, or whole output rows/channels with ``structured=True``), calls the user's
``evaluate(model) -> float``, and puts the layer back exactly as it was;
:func:`masksparse.amounts_from_sensitivity` turns the table into the per-layer ``amounts`` dict that
:func:`masksparse.prune_channels` and :func:`masksparse.prune_unstructured` take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from masksparse._errors import MissingDependencyError, PruningTypeError, PruningValueError
from masksparse.prune.functional import narrow, remove

__all__ = ["SensitivityTable", "amounts_from_sensitivity", "sensitivity"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
    """``baseline`` (the score of the model as it was) and ``scores[layer][i]``, the score with only
    ``layer`` pruned at ``amounts[i]``. ``print(table)`` shows it; :meth:`plot` draws it."""

    baseline: float
    amounts: tuple[float, ...]
    scores: dict[str, tuple[float, ...]]

    def __str__(self) -> str:
        headers = ["layer", *(f"{a:.0%}" for a in self.amounts)]
        rows = [[name, *(f"{s:.4g}" for s in scores)] for name, scores in self.scores.items()]
        return f"baseline {self.baseline:.4g}\n" + tabulate(rows, headers=headers)

    def plot(self, ax: Any = None) -> Any:
        """One line per layer, score against amount (needs matplotlib); returns the axes."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise MissingDependencyError(
                "SensitivityTable.plot needs matplotlib: pip install matplotlib"
            ) from exc
        ax = ax if ax is not None else plt.subplots()[1]
        for name, scores in self.scores.items():
            ax.plot(self.amounts, scores, marker=".", label=name)
        ax.axhline(self.baseline, color="k", lw=1)
        ax.set_xlabel("amount pruned (this layer only)")
        ax.set_ylabel("score")
        ax.legend(fontsize="small")
        return ax


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)  # Linear or Conv, checked by the caller
    return weight


def _drop(weight: torch.Tensor, amount: float, structured: bool) -> torch.Tensor:
    """The bool keep-mask pruning ``amount`` of the weight by magnitude (rows by L2 norm if structured)."""
    w = weight.detach()
    if structured:
        norms = w.flatten(1).norm(dim=1)
        keep = torch.ones_like(norms, dtype=torch.bool)
        keep[norms.argsort()[: round(amount * norms.numel())]] = False
        return keep.view(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()
    keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    keep[w.abs().flatten().argsort()[: round(amount * w.numel())]] = False
    return keep.view_as(w)


def _restore(module: nn.Module, old_mask: torch.Tensor | None) -> None:
    with torch.no_grad():
        if old_mask is None:
            module._buffers["weight_mask"].fill_(True)  # type: ignore[union-attr]
            remove(module, "weight")
        else:
            module._buffers["weight_mask"].copy_(old_mask)  # type: ignore[union-attr]


def sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    amounts: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    layers: Sequence[nn.Module | str] | None = None,
    *,
    structured: bool = False,
) -> SensitivityTable:
    """Prune each layer alone at each amount, score the model, and restore it.

    Args:
        model: the model; left exactly as it was (masks included).
        evaluate: ``evaluate(model) -> float``, higher is better (an accuracy, a negative loss).
        amounts: fractions of the layer's weight to prune, each in [0, 1).
        layers: Linear/Conv layers (modules or paths); every one when None.
        structured: prune whole output rows/channels (smallest L2 norm) instead of single weights.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse import sensitivity
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(16, 4)
        >>> y = model(x).detach()
        >>> table = sensitivity(model, lambda m: -float((m(x) - y).pow(2).mean()), amounts=(0.25, 0.75))
        >>> sorted(table.scores), table.baseline == 0.0, torch.equal(model(x), y)
        (['0', '2'], True, True)
    """
    for a in amounts:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a < 1:
            raise PruningValueError(f"sensitivity: amounts must be fractions in [0, 1), got {a!r}")
    names = {id(m): n for n, m in model.named_modules()}
    if layers is None:
        chosen = {n: m for n, m in model.named_modules() if isinstance(m, _LAYERS)}
    else:
        chosen = {}
        for item in layers:
            path = item if isinstance(item, str) else names.get(id(item))
            module = model.get_submodule(path) if isinstance(path, str) else None
            if not isinstance(module, _LAYERS):
                raise PruningTypeError(f"sensitivity: {item!r} is not a Linear or Conv layer of the model")
            chosen[str(path)] = module
    baseline = float(evaluate(model))
    scores: dict[str, tuple[float, ...]] = {}
    for name, module in chosen.items():
        row = []
        for a in amounts:
            stored = module._buffers.get("weight_mask") if "weight_orig" in module._parameters else None
            old = None if stored is None else stored.clone()
            keep = _drop(_weight(module), float(a), structured)
            narrow(module, "weight", keep)
            try:
                row.append(float(evaluate(model)))
            finally:
                _restore(module, old)
        scores[name] = tuple(row)
    return SensitivityTable(baseline, tuple(float(a) for a in amounts), scores)


def amounts_from_sensitivity(table: SensitivityTable, tolerance: float) -> dict[str, float]:
    """Per layer, the largest amount whose score stayed within ``tolerance`` of the baseline (and every
    smaller amount did too); 0.0 for a layer that none did.

    Example:
        >>> from masksparse.schedule.analysis import SensitivityTable, amounts_from_sensitivity
        >>> scores = {"fc1": (0.98, 0.975, 0.90), "fc2": (0.95, 0.97, 0.9)}
        >>> table = SensitivityTable(0.98, (0.2, 0.5, 0.8), scores)
        >>> amounts_from_sensitivity(table, tolerance=0.01)
        {'fc1': 0.5, 'fc2': 0.0}
    """
    if not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise PruningValueError(f"amounts_from_sensitivity: tolerance must be >= 0, got {tolerance!r}")
    out = {}
    for name, scores in table.scores.items():
        best = 0.0
        for a, s in zip(table.amounts, scores, strict=True):
            if s < table.baseline - tolerance:
                break
            best = a
        out[name] = best
    return out
