"""Pruning while training: :class:`GradualPruner` and the sparsity schedules it follows
(:mod:`masksparse.schedule.curves`), per-layer sensitivity analysis (:func:`masksparse.sensitivity`),
recovery by distillation (:func:`masksparse.distill`), and callbacks for the Hugging Face Trainer and
Lightning (:mod:`masksparse.schedule.integrations`, imported on their own)."""

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
