"""Sparsity schedules: the fraction of weights pruned at each training step, for
:class:`masksparse.GradualPruner`.

A schedule maps a step to the target fraction of pruned weights. ``cubic`` is Zhu & Gupta (2017):
``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0)) ** 3``, clamped to ``[begin, end]``.
"""

from __future__ import annotations

from masksparse._errors import PruningValueError

__all__ = ["constant", "cubic", "linear"]


def _check(target: float, begin: int, end: int, initial: float) -> None:
    if not 0.0 <= target < 1.0 or not 0.0 <= initial < 1.0:
        raise PruningValueError(f"schedule: target={target} and initial={initial} must lie in [0, 1)")
    if begin > end:
        raise PruningValueError(f"schedule: begin={begin} is after end={end}")


def _progress(step: int, begin: int, end: int) -> float:
    if end == begin:
        return 1.0 if step >= begin else 0.0
    return min(max((step - begin) / (end - begin), 0.0), 1.0)


def cubic(step: int, target: float, begin: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule.

    >>> round(cubic(5, 0.8, 0, 10), 6)
    0.7
    """
    _check(target, begin, end, initial)
    return target + (initial - target) * (1.0 - _progress(step, begin, end)) ** 3


def linear(step: int, target: float, begin: int, end: int, initial: float = 0.0) -> float:
    """Linear ramp from ``initial`` at ``begin`` to ``target`` at ``end``.

    >>> linear(5, 0.8, 0, 10)
    0.4
    """
    _check(target, begin, end, initial)
    return initial + (target - initial) * _progress(step, begin, end)


def constant(step: int, target: float, begin: int, end: int, initial: float = 0.0) -> float:
    """``target`` from ``begin`` on, ``initial`` before.

    >>> constant(3, 0.8, 2, 10)
    0.8
    """
    _check(target, begin, end, initial)
    return target if step >= begin else initial
