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
  channels, with ``H`` over channels (every position a row);
- ``"sensitivity"``: how much the calibration loss rises when the unit alone is removed (every slice it
  owns zeroed, then put back): one pass over the data per unit;
- ``"shapley"``: the unit's Shapley value for the loss (Ancona et al., 2020, as TorchPruner computes
  it), sampled: over random orders of the group's units, the loss each unit adds when it is removed
  after the ones before it, averaged. ``Shapley(samples=...)`` sets the number of orders (default 4;
  each costs one pass over the data per unit), so it suits small groups.

The last two score on the loss itself, so they are comparable across groups as they are and are not
normalised; they need a loss like ``"taylor"``.

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
from masksparse.distributed import parallel
from masksparse.graph import Group, Member
from masksparse.importance import is_parameter, magnitude, per_unit, reduce_slices, tensor_of, unit_indices

__all__ = ["Attribution", "Shapley", "activation", "apoz", "gather", "hessian", "sensitivity", "taylor"]


@dataclasses.dataclass
class Attribution:
    """What the data-driven criteria read: ``inputs[path]``, the input statistics of each consumer
    layer, and ``grads[(path, tensor)]``, the summed gradient of each tensor the groups own."""

    inputs: dict[str, LayerStats]
    grads: dict[tuple[str, str], torch.Tensor]
    loss: Callable[[], float] | None = None  # the summed calibration loss of the model as it is now


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


_NO_LOSS = (
    "this criterion needs a loss: pass loss_fn (called as loss_fn(model(inputs), target) on (inputs, target) "
    "batches) or forward(model, batch) returning the loss"
)


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
                    _NO_LOSS + f"; the model returned a tensor of shape {tuple(result.shape)}"
                )
            loss_of(result).backward()
        out = {}
        for m in members:
            param = _param(model, m)
            if param is not None and param.grad is not None:
                out[(m.module, m.tensor)] = param.grad.detach().clone()
        parallel.sum_over_ranks([out[key] for key in sorted(out)])
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
    return Attribution(stats, found, _loss_closure(model, data, loss_fn, forward))


def _loss_closure(
    model: nn.Module, data: Sequence[Any], loss_fn: LossFn | None, forward: Forward | None
) -> Callable[[], float]:
    def total() -> float:
        training = model.training
        model.eval()  # dropout off: the same loss for the same weights
        try:
            out = 0.0
            with torch.no_grad():
                for i, batch in enumerate(data):
                    try:
                        result = run_batch(model, batch, loss_fn=loss_fn, forward=forward)
                    except Exception as exc:  # the user's model or data: say which batch, keep the cause
                        raise _batch_error(i, model, exc) from exc
                    unreduced = isinstance(result, torch.Tensor) and result.numel() != 1
                    if loss_fn is None and forward is None and unreduced:
                        shape = tuple(result.shape)
                        raise PruningValueError(_NO_LOSS + f"; the model returned a tensor of shape {shape}")
                    out += float(loss_of(result))
            return parallel.sum_float(out)
        finally:
            model.train(training)

    return total


class _Removed:
    """Zero every parameter slice some units of a group own, and put them back on exit."""

    def __init__(self, model: nn.Module, group: Group, units: torch.Tensor) -> None:
        self.saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        chosen = torch.zeros(group.size, dtype=torch.bool)
        chosen[units] = True
        self.targets = []
        for m in group.members:
            param = _param(model, m) if is_parameter(model, m) else None
            if param is None:
                continue
            flat, unit = unit_indices(m)
            index = flat[chosen[unit]].to(param.device)
            if len(index):
                self.targets.append((param, m.dim, index))

    def __enter__(self) -> None:
        with torch.no_grad():
            for param, dim, index in self.targets:
                self.saved.append((param, dim, index, param.index_select(dim, index)))
                param.index_fill_(dim, index, 0.0)

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for param, dim, index, values in reversed(self.saved):
                param.index_copy_(dim, index, values)
        self.saved.clear()


def _needs_loss(att: Attribution) -> Callable[[], float]:
    if att.loss is None:
        raise PruningValueError(
            "this criterion evaluates the calibration loss: build the attribution with gather"
        )
    return att.loss


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


def sensitivity(group: Group, model: nn.Module, att: Attribution) -> torch.Tensor:
    """The rise of the calibration loss when the unit alone is removed."""
    loss = _needs_loss(att)
    base = loss()
    out = torch.zeros(group.size, dtype=torch.float64)
    for u in range(group.size):
        with _Removed(model, group, torch.tensor([u])):
            out[u] = loss() - base
    return out


@dataclasses.dataclass(frozen=True)
class Shapley:
    """The sampled Shapley value of each unit for the calibration loss, as an ``importance``:
    ``prune_channels(..., importance=Shapley(samples=8), data=..., loss_fn=...)``. ``importance="shapley"``
    is ``Shapley()``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse import prune_channels
        >>> from masksparse.criteria.attribution import Shapley
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))]
        >>> _ = prune_channels(model, data[0][0], 0.5, importance=Shapley(samples=2), data=data,
        ...                    loss_fn=nn.functional.cross_entropy)
        >>> int(model[0].weight_mask.any(1).sum())
        3
    """

    samples: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise PruningValueError(f"Shapley: samples must be an int >= 1, got {self.samples!r}")

    def __call__(self, group: Group, model: nn.Module, att: Attribution) -> torch.Tensor:
        loss = _needs_loss(att)
        generator = torch.Generator().manual_seed(self.seed)
        total = torch.zeros(group.size, dtype=torch.float64)
        base = loss()
        for _ in range(self.samples):
            order = torch.randperm(group.size, generator=generator)
            before = base
            for k in range(group.size):
                with _Removed(model, group, order[: k + 1]):
                    after = loss()
                total[order[k]] += after - before
                before = after
        return total / self.samples


def _or_l1(scores: torch.Tensor | None, group: Group, model: nn.Module) -> torch.Tensor:
    return scores if scores is not None else magnitude(group, model, 1)


# name -> (score, reads consumer inputs ("hessian": with X^T X), reads gradients)
DATA_CRITERIA: dict[str, tuple[Callable[[Group, nn.Module, Attribution], torch.Tensor], bool | str, bool]] = {
    "activation": (activation, True, False),
    "apoz": (apoz, True, False),
    "hessian": (hessian, "hessian", False),
    "sensitivity": (sensitivity, False, False),
    "shapley": (Shapley(), False, False),
    "taylor": (taylor, False, True),
}
