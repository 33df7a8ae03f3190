"""Callbacks that drive a :class:`masksparse.GradualPruner` from the training loops people already use.

- :mod:`masksparse.schedule.integrations.huggingface`: a ``transformers.TrainerCallback`` for ``Trainer``
  (``pip install "masksparse[huggingface]"``);
- :mod:`masksparse.schedule.integrations.lightning`: a Lightning ``Callback`` for ``lightning.Trainer``
  (``pip install "masksparse[lightning]"``).

Each module imports its framework when it is imported; ``import masksparse`` imports neither.
"""

from __future__ import annotations

from typing import Any

import torch

from masksparse._errors import PruningValueError
from masksparse.schedule.gradual import GradualPruner

__all__: list[str] = []


def unwrapped(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside a framework's wrapper (Accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``), whose state compaction slices; None for None."""
    while optimizer is not None and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def attach(pruner: GradualPruner, optimizer: Any, where: str) -> None:
    """Give a compacting pruner the framework's optimizer (made after the pruner was)."""
    if not (pruner.structured and pruner.compact):
        return
    inner = unwrapped(optimizer)
    if inner is None:
        raise PruningValueError(
            f"{where}: the pruner compacts in place and needs the optimizer to slice its state, but the "
            "trainer gave none"
        )
    if inner is not pruner.optimizer:
        pruner.attach_optimizer(inner)


def check_model(pruner: GradualPruner, model: Any, where: str, trainer: str) -> None:
    """The pruner prunes the trained model or a module inside it."""
    if model is None or not isinstance(model, torch.nn.Module):
        return
    if not any(m is pruner.model for m in model.modules()):
        raise PruningValueError(
            f"{where}: the {trainer} trains a {type(model).__name__} that neither is nor holds the pruner's "
            f"model ({type(pruner.model).__name__}); build the GradualPruner on the model given to the "
            f"{trainer}"
        )
