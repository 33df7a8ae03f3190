"""Pruning while training: :class:`GradualPruner` and the sparsity schedules it follows
(:mod:`masksparse.schedule.curves`)."""

from masksparse.schedule import curves
from masksparse.schedule.gradual import GradualPruner, PruningStep

__all__ = ["GradualPruner", "PruningStep", "curves"]
