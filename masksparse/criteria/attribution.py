"""Data-driven importance of channel groups: what calibration data says each unit contributes.

:func:`gather` runs the model over calibration batches once and keeps what the criteria read: the input
statistics of every Linear or Conv that *consumes* a group's units (reads them along its input
dimension) and, for criteria that need a loss, the gradient of every tensor a group owns. Each
criterion then scores a group from those, every member contributing:

- ``"activation"``: Wanda's score lifted to units: ``sum |W[:, j]| * ||X_j||`` over the consumers'
  input columns ``j`` of the unit (Sun et al., 2023);
- ``"apoz"``: one minus the average percentage of zeros the unit's activations show at its consumers'
  inputs (Hu et al., 2016: units that are almost always zero after a ReLU matter least);
- ``"taylor"``: first-order Taylor expansion of the loss, ``sum |w * dL/dw|`` over every parameter
  slice of the unit (Molchanov et al., 2019), with the gradient summed over the batches;
- ``"hessian"``: Optimal Brain Surgeon's saliency of each consumer input column,
  ``||W[:, j]||^2 / [H^-1]_jj`` with ``H = X^T X`` (dampened by 1% of its mean diagonal; Hassibi &
  Stork, 1993, as SparseGPT uses it): the output error left once the other columns compensate for the
  removed one, so a unit the rest can stand in for scores low even when its weights are large. It
  pairs with ``reconstruct=True``, which makes that compensation. A convolution's columns are its input
  channels, with ``H`` over channels (every position a row).

Scores are divided by their mean per member before members are averaged, so a group's members weigh
alike and ``global_ranking`` compares groups on one scale. A group with no Linear/Conv consumer (for
``"activation"`` and ``"apoz"``) is scored by ``"l1"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from masksparse._errors import PruningValueError
from masksparse._feed import Forward, LossFn, batches, loss_of, run_batch
from masksparse.criteria.calibration import LayerStats, _batch_error, _batch_runs, _run_pass
from masksparse.graph import Group, Member
from masksparse.importance import is_parameter, magnitude, per_unit, reduce_slices, tensor_of

__all__ = ["Attribution", "activation", "apoz", "gather", "hessian", "taylor"]


@dataclasses.dataclass
class Attribution:
    """What the data-driven criteria read: ``inputs[path]``, the input statistics of each consumer
    layer, and ``grads[(path, tensor)]``, the summed gradient of each tensor the groups own."""

    inputs: dict[str, LayerStats]
    grads: dict[tuple[str, str], torch.Tensor]


def _consumes(model: nn.Module, m: Member) -> bool:
    module = model.get_submodule(m.module)
    if m.tensor != "weight" or m.dim != 1:
        return False
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.groups == 1 and not module.transposed
    return isinstance(module, nn.Linear)


def _param(model: nn.Module, m: Member) -> nn.Parameter | None:
    module = model.get_submodule(m.module)
    return module._parameters.get(m.tensor + "_orig", module._parameters.get(m.tensor))


def _gradients(
    model: nn.Module,
    data: Iterable[Any],
    members: Sequence[Member],
    loss_fn: LossFn | None,
    forward: Forward | None,
) -> dict[tuple[str, str], torch.Tensor]:
    params = list(model.parameters())
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        for i, batch in enumerate(batches(data)):
            try:
                result = run_batch(model, batch, loss_fn=loss_fn, forward=forward)
            except Exception as exc:  # the user's model or data: say which batch, keep the cause
                raise _batch_error(i, model, exc) from exc
            if (
                loss_fn is None
                and forward is None
                and isinstance(result, torch.Tensor)
                and result.numel() != 1
            ):
                raise PruningValueError(
                    "this criterion needs a loss: pass loss_fn (called as loss_fn(model(inputs), target) on "
                    "(inputs, target) batches) or forward(model, batch) returning the loss; the model "
                    f"returned a tensor of shape {tuple(result.shape)}"
                )
            loss_of(result).backward()
        out = {}
        for m in members:
            param = _param(model, m)
            if param is not None and param.grad is not None:
                out[(m.module, m.tensor)] = param.grad.detach().clone()
        return out
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


def gather(
    model: nn.Module,
    data: Iterable[Any],
    groups: Sequence[Group],
    *,
    inputs: bool | str,
    grads: bool,
    loss_fn: LossFn | None = None,
    forward: Forward | None = None,
) -> Attribution:
    """Calibrate what the groups' criteria read (see the module docstring); ``inputs="hessian"`` also
    gathers each consumer's ``X^T X``. The model is not changed (gradients already on its parameters are
    put back)."""
    data = list(batches(data))
    members = [m for g in groups for m in g.members]
    stats: dict[str, LayerStats] = {}
    if inputs:
        consumers = sorted({m.module for m in members if _consumes(model, m)})
        if consumers:
            runs = _batch_runs(model, data, loss_fn, forward)
            stats = _run_pass(
                model, runs, consumers, None, hessian=inputs == "hessian", dtype=torch.float32, bar=None
            )
    found = {}
    if grads:
        found = _gradients(model, data, [m for m in members if is_parameter(model, m)], loss_fn, forward)
    return Attribution(stats, found)


def _mean_normalised(scores: list[torch.Tensor]) -> torch.Tensor | None:
    if not scores:
        return None
    out = [s / s.mean() if s.mean() > 0 else s for s in scores]
    return torch.stack(out).mean(0)


def activation(group: Group, model: nn.Module, att: Attribution) -> torch.Tensor:
    """``sum |W[:, j]| * ||X_j||`` over the unit's input columns at every consumer."""
    scores = []
    for m in group.members:
        stats = att.inputs.get(m.module)
        t = tensor_of(model.get_submodule(m.module), m.tensor)
        if stats is None or t is None or not _consumes(model, m):
            continue
        per_index = reduce_slices(t, 1, 1) * stats.norms.double().to(t.device)
        scores.append(per_unit(m, per_index.cpu(), group.size))
    return _or_l1(_mean_normalised(scores), group, model)


def apoz(group: Group, model: nn.Module, att: Attribution) -> torch.Tensor:
    """One minus the fraction of zeros the unit's activations show at its consumers' inputs."""
    scores = []
    for m in group.members:
        stats = att.inputs.get(m.module)
        if stats is None or stats.zeros is None or not _consumes(model, m) or stats.rows == 0:
            continue
        nonzero = 1.0 - stats.zeros.double().cpu() / stats.rows
        counts = per_unit(m, torch.ones_like(nonzero), group.size).clamp_min(1)
        scores.append(per_unit(m, nonzero, group.size) / counts)
    if not scores:
        return magnitude(group, model, 1)
    return torch.stack(scores).mean(0)


def taylor(group: Group, model: nn.Module, att: Attribution) -> torch.Tensor:
    """``sum |w * dL/dw|`` over every parameter slice of the unit."""
    scores = []
    for m in group.members:
        g = att.grads.get((m.module, m.tensor))
        t = tensor_of(model.get_submodule(m.module), m.tensor)
        if g is None or t is None:
            continue
        scores.append(per_unit(m, reduce_slices(t * g.to(t.device), m.dim, 1).cpu(), group.size))
    return _or_l1(_mean_normalised(scores), group, model)


def hessian(group: Group, model: nn.Module, att: Attribution) -> torch.Tensor:
    """``||W[:, j]||^2 / [(X^T X + damp I)^-1]_jj`` over the unit's input columns at every consumer."""
    scores = []
    for m in group.members:
        stats = att.inputs.get(m.module)
        t = tensor_of(model.get_submodule(m.module), m.tensor)
        if stats is None or stats.xtx is None or t is None or not _consumes(model, m):
            continue
        h = stats.xtx.double().clone()
        diag = torch.diagonal(h)
        dead = diag == 0
        diag[dead] = 1.0  # a column that is always zero: its saliency is 0 through its weights below
        diag += 0.01 * float(diag.mean())
        inverse_diag = torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal()
        weights = reduce_slices(t, 1, 2).cpu()
        weights[dead.cpu()] = 0.0  # it contributes nothing: removing it costs nothing
        scores.append(per_unit(m, weights / inverse_diag.cpu(), group.size))
    return _or_l1(_mean_normalised(scores), group, model)


def _or_l1(scores: torch.Tensor | None, group: Group, model: nn.Module) -> torch.Tensor:
    return scores if scores is not None else magnitude(group, model, 1)


# name -> (score, reads consumer inputs ("hessian": with X^T X), reads gradients)
DATA_CRITERIA: dict[str, tuple[Callable[[Group, nn.Module, Attribution], torch.Tensor], bool | str, bool]] = {
    "activation": (activation, True, False),
    "apoz": (apoz, True, False),
    "hessian": (hessian, "hessian", False),
    "taylor": (taylor, False, True),
}
