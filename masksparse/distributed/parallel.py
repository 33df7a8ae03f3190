"""Data-parallel calibration: every rank feeds its own batches, statistics are summed over ranks.

Inside :func:`~masksparse.distributed.parallel.data_parallel`, each calibration pass (input norms,
``X^T X``, zero counts, gradients, losses) ends with ``all_reduce`` sums over the process group, so
every rank holds the statistics of all ranks' data together and computes the masks one process would
compute on all of it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from masksparse._errors import PruningValueError


class _Active(threading.local):
    on: bool = False
    group: Any = None


_ACTIVE = _Active()


@contextlib.contextmanager
def data_parallel(group: Any = None) -> Iterator[None]:
    """Within, calibration statistics are summed over the ranks of ``group`` (the default group if None).

    Every rank must run the same pruning calls on its own batches (collectives: a rank that stops early
    leaves the others waiting). Masks then equal those one process computes on every rank's data.

    Example (one process here; with torchrun every rank runs the same lines on its own batches):
        >>> import tempfile, torch, torch.distributed as dist
        >>> from torch import nn
        >>> import masksparse
        >>> dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with masksparse.data_parallel():
        ...     stats = masksparse.calibrate(model, [torch.randn(8, 4)])
        >>> stats["0"].rows  # summed over the ranks: 8 per rank
        8
        >>> dist.destroy_process_group()
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise PruningValueError(
            "data_parallel() sums statistics over ranks: initialise torch.distributed first "
            "(torch.distributed.init_process_group, or launch with torchrun)"
        )
    saved = (_ACTIVE.on, _ACTIVE.group)
    _ACTIVE.on, _ACTIVE.group = True, group
    try:
        yield
    finally:
        _ACTIVE.on, _ACTIVE.group = saved


def active() -> bool:
    """Whether calibration statistics are being summed over ranks."""
    return _ACTIVE.on


def sum_over_ranks(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor in place over the ranks, one ``all_reduce`` per dtype (a no-op outside
    :func:`~masksparse.distributed.parallel.data_parallel`). Every rank must pass tensors of the same
    shapes in the same order."""
    if not _ACTIVE.on or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):
        group = by_dtype[dtype]
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, group=_ACTIVE.group)
        for t, piece in zip(group, torch.split(flat, [t.numel() for t in group])):
            t.copy_(piece.view_as(t))


def sum_float(value: float) -> float:
    """A Python float summed over the ranks (unchanged outside
    :func:`~masksparse.distributed.parallel.data_parallel`)."""
    if not _ACTIVE.on:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=_ACTIVE.group)
    return float(t)
