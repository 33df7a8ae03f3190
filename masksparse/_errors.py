"""The exceptions masksparse raises.

Every error derives from :class:`MaskSparseError`. Where ``torch.nn.utils.prune`` raises a built-in
type for the same mistake, the masksparse error also derives from that type, so ``except ValueError``
written for torch keeps working.
"""

from __future__ import annotations

from typing import Any


class MaskSparseError(Exception):
    """Base class of every error raised by masksparse."""


class PruningValueError(MaskSparseError, ValueError):
    """An option or a tensor has a value that pruning cannot use (an amount out of range, say)."""


class PruningTypeError(MaskSparseError, TypeError):
    """An option has the wrong type (an amount that is neither int nor float, say)."""


class PruningIndexError(MaskSparseError, IndexError):
    """A dimension index is out of range for the tensor it addresses."""


class PruningAttributeError(MaskSparseError, AttributeError):
    """A module has no tensor of that name, or a pruned tensor was assigned to directly."""


class ShapeMismatchError(MaskSparseError, ValueError, AssertionError):
    """Two tensors that must have one shape do not.

    It also derives from ``AssertionError`` because ``torch.nn.utils.prune`` raises that for a mismatched
    ``importance_scores`` tensor.
    """


class StateDictError(MaskSparseError, RuntimeError):
    """A state_dict does not fit the model it is loaded into (``load_state_dict`` raises RuntimeError)."""


class MissingDependencyError(MaskSparseError, ImportError):
    """An optional dependency (safetensors, scikit-learn, ...) is needed and not installed."""


class CompactionError(MaskSparseError, RuntimeError):
    """Tracing, structured pruning or compaction cannot proceed exactly.

    The model fails on its example inputs, a rule does not fit its operation, or the compacted model does
    not compute what the masked model computes however much compaction keeps. The message names the
    operation or the module; ``module`` holds that module's path where one is known (``""``: the model
    itself), and ``ran`` whether the compacted model failed to run there (rather than computing
    something else).
    """

    def __init__(self, message: str, module: str | None = None, ran: bool = True) -> None:
        super().__init__(message)
        self.module = module
        self.ran = ran


class InexactCompactionWarning(UserWarning):
    """``compact(..., allow_inexact=True)`` removed units a normalisation reduces over, so the compacted
    model's outputs differ from the masked model's.

    ``deviation`` is the largest relative error of the outputs on the example inputs
    (``max |masked - compacted| / max |masked|``), and ``plan`` the plan applied, with ``plan.deviation``
    set and ``plan.normalisations`` listing what changed. A warning, not an error: the user asked for it.
    Turn it into an error with ``warnings.simplefilter("error", InexactCompactionWarning)``.
    """

    def __init__(self, message: str, deviation: float, plan: Any = None) -> None:
        super().__init__(message)
        self.deviation = deviation
        self.plan = plan


class KeptUnitsWarning(UserWarning):
    """Pruning or compaction kept units that it would have removed, because a module could not follow
    their removal (an operation without a rule reads them, an attention module derives its head size
    from its width, the compacted module failed to run or changed its output, ...).

    Everything else was still pruned or compacted, exactly. ``plan`` is the compaction plan applied
    (``plan.kept`` lists what was kept and why), or None when ``prune_channels`` warns; the message
    says the same.
    """

    def __init__(self, message: str, plan: Any = None) -> None:
        super().__init__(message)
        self.plan = plan
