"""Pruning while training: :class:`GradualPruner` and the sparsity schedules it follows
(:mod:`masksparse.schedule.curves`), per-layer sensitivity analysis (:func:`masksparse.sensitivity`),
and recovery by distillation (:func:`masksparse.distill`)."""

from masksparse.schedule import curves
from masksparse.schedule.analysis import SensitivityTable, amounts_from_sensitivity, sensitivity
from masksparse.schedule.distillation import distill, distillation_loss
from masksparse.schedule.gradual import GradualPruner, PruningStep

__all__ = [
    "GradualPruner",
    "PruningStep",
    "SensitivityTable",
    "amounts_from_sensitivity",
    "curves",
    "distill",
    "distillation_loss",
    "sensitivity",
]
