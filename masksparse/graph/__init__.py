"""Trace a model and find the groups of tensor slices that prune together.

:func:`trace` runs the model once on example inputs, records the aten operations that ran, relates
their dimensions with the rules of :mod:`masksparse.graph.rules`, and returns a :class:`Graph` whose
``groups`` list the coupled ``(module path, tensor name, dim, indices)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from masksparse.graph import attention as _attention  # noqa: F401  (registers the attention rules)
from masksparse.graph.groups import Graph, Group, Member, build
from masksparse.graph.record import record
from masksparse.graph.rules import Relations, register_rule

__all__ = ["Graph", "Group", "Member", "Relations", "register_rule", "trace"]


def trace(model: nn.Module, example_inputs: Any) -> Graph:
    """Run ``model`` once on ``example_inputs`` and group the tensor slices that prune together.

    The model runs in eval mode without gradients (its modes are restored afterwards) and is not
    changed. Modules that run only in training mode (auxiliary classifiers) are found by a second,
    side-effect-free run in training mode (see :func:`~masksparse.graph.record.record`), so the layers
    reading the model's channels there shrink with them. ``example_inputs`` is a tensor, a tuple of
    the model's positional arguments, or a mapping of keyword arguments (``model(**inputs)``, as Hugging
    Face models are called).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse.graph import trace
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> graph = trace(model, torch.randn(1, 3, 8, 8))
        >>> group = next(g for g in graph.groups if g.prunable)
        >>> group.size, [(m.module, m.tensor, m.dim) for m in group.members]
        (8, [('0', 'weight', 0), ('0', 'bias', 0), ('1', 'weight', 0), ('1', 'bias', 0), \
('1', 'running_mean', 0), ('1', 'running_var', 0), ('3', 'weight', 1)])
    """
    return build(record(model, example_inputs))
