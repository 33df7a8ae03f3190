"""The plan of a compaction: a frozen, printable description of every change, built before anything is
changed (see :func:`masksparse.compact.planning.plan_compaction`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tabulate import tabulate
from torch import nn

__all__ = [
    "AttributeUpdate",
    "BiasFold",
    "ConfigChange",
    "HeadChange",
    "KeptUnits",
    "NormalisationChange",
    "Plan",
    "TensorCut",
    "compaction_plans",
]

# The attribute of a compacted model holding the plans applied to it, oldest first.
_PLANS = "_masksparse_plans"


@dataclass(frozen=True)
class TensorCut:
    """Keep only ``keep`` (of ``size``) along ``dim`` of ``module.tensor``."""

    module: str
    tensor: str
    dim: int
    size: int
    keep: tuple[int, ...]


@dataclass(frozen=True)
class BiasFold:
    """``module.bias += module.weight[:, columns] @ constants`` (summed over a 1x1 kernel)."""

    module: str
    columns: tuple[int, ...]
    constants: tuple[float, ...]
    creates_bias: bool = False


@dataclass(frozen=True)
class AttributeUpdate:
    """``module.name`` changes from ``old`` to ``new``."""

    module: str
    name: str
    old: Any
    new: Any


@dataclass(frozen=True)
class HeadChange:
    """The attention in ``module`` keeps ``new`` of its ``old`` heads (of one reshape splitting them
    out), whether an attribute holds their number (then among the plan's attributes too) or its
    reshape infers it (``view(B, N, -1, head_dim)``)."""

    module: str
    old: int
    new: int


@dataclass(frozen=True)
class KeptUnits:
    """``units`` units the masks make dead that compaction keeps, since ``module`` could not follow their
    removal: ``reason`` says why. Keeping a dead unit is always exact; the rest is still compacted."""

    module: str
    reason: str
    units: int = 0


@dataclass(frozen=True)
class NormalisationChange:
    """A normalisation in ``module`` that will reduce over ``kept`` of ``size`` units along ``dim`` of its
    input (``keep``), not all of them: the one change compaction makes that is not exact (planned only
    with ``allow_inexact=True``). ``op`` is the aten operation, ``call`` its position among the
    eval-mode calls of that operation, which is how verification finds it again."""

    module: str
    op: str
    dim: int
    size: int
    keep: tuple[int, ...]
    call: int

    @property
    def kept(self) -> int:
        """How many units the normalisation still reduces over."""
        return len(self.keep)


@dataclass(frozen=True)
class ConfigChange:
    """A size in a Hugging Face ``model.config`` that compaction changed from ``old`` to ``new``, or, with
    ``applied=False``, left at ``old`` because no single value describes the compacted model (``reason``
    says why: the layers differ, or the model's code derives another size from it)."""

    name: str
    old: Any
    new: Any
    applied: bool = True
    reason: str = ""


@dataclass(frozen=True)
class Plan:
    """What compaction will do; building it changes nothing. ``print(plan)`` shows it.

    ``kept`` lists dead units compaction keeps because a module could not follow their removal, and
    why. ``normalisations`` lists the normalisations that will reduce over fewer units (only with
    ``allow_inexact=True``); ``deviation`` is then the measured largest relative error of the
    outputs on the example inputs, measured by :func:`masksparse.compact` (``None`` until then, and in
    an exact plan). ``config`` lists the sizes of a Hugging Face ``model.config`` that compaction
    updated, or left as they were where the compacted sizes are not one value (set by
    :func:`masksparse.compact`); ``config_mismatch`` says why ``from_pretrained`` would not rebuild the
    compacted model from its updated config (the first tensor it would get wrong), ``""`` when it would
    or the model has no such config (:func:`masksparse.load_compacted` rebuilds it either way).
    """

    cuts: tuple[TensorCut, ...]
    folds: tuple[BiasFold, ...]
    attributes: tuple[AttributeUpdate, ...]
    params_before: int
    params_after: int
    # for diagnosing a failed verification: module path -> kept indices per dim of its output
    activations: tuple[tuple[str, tuple[tuple[int, ...] | None, ...]], ...] = field(repr=False, default=())
    normalisations: tuple[NormalisationChange, ...] = ()
    deviation: float | None = None
    kept: tuple[KeptUnits, ...] = ()
    config: tuple[ConfigChange, ...] = ()
    config_mismatch: str = ""
    heads: tuple[HeadChange, ...] = ()

    @property
    def exact(self) -> bool:
        """Whether the compacted model computes what the masked one does (no normalisation changes)."""
        return not self.normalisations

    def __str__(self) -> str:
        ratio = self.params_after / max(self.params_before, 1)
        lines = [f"Compaction plan: {self.params_before:,} -> {self.params_after:,} parameters ({ratio:.1%})"]
        if not self.cuts:
            lines.append("nothing is dead: the model stays as it is")
        rows = [
            (c.module or "<model>", c.tensor, c.dim, f"{len(c.keep)} of {c.size}", _short(c.keep))
            for c in self.cuts
        ]
        if rows:
            lines.append(tabulate(rows, headers=["module", "tensor", "dim", "kept", "indices kept"]))
        for f in self.folds:
            new = " (new bias)" if f.creates_bias else ""
            lines.append(
                f"fold: {f.module}.bias{new} += {f.module}.weight[:, {_short(f.columns)}] @ constants"
            )
        for a in self.attributes:
            lines.append(f"set: {a.module}.{a.name} = {a.new!r} (was {a.old!r})")
        for h in self.heads:
            lines.append(f"heads: {h.module or '<model>'} keeps {h.new} of {h.old}")
        for k in self.kept:
            lines.append(f"kept: {k.units} dead unit(s) of {k.module or '<model>'}: {k.reason}")
        for c in self.config:
            if c.applied:
                lines.append(f"config: {c.name} = {c.new!r} (was {c.old!r})")
            else:
                lines.append(f"config: {c.name} stays {c.old!r}: {c.reason}")
        if self.config_mismatch:
            lines.append(
                f"config: from_pretrained would not rebuild the compacted model ({self.config_mismatch}); "
                f"masksparse.save_compacted / load_compacted do"
            )
        lines += self._inexact_lines()
        return "\n".join(lines)

    def _inexact_lines(self) -> list[str]:
        if not self.normalisations:
            return []
        measured = (
            "not measured yet (compact measures it)"
            if self.deviation is None
            else f"max relative error {self.deviation:.3g} on the example inputs"
        )
        lines = [f"inexact (allow_inexact=True): outputs change, {measured}"]
        for n in self.normalisations:
            dim = (
                f" (dim {n.dim})"
                if sum((m.op, m.call) == (n.op, n.call) for m in self.normalisations) > 1
                else ""
            )
            lines.append(f"  {n.module or '<model>'}: normalises over {n.kept} of {n.size} channels{dim}")
        return lines


def _short(indices: tuple[int, ...], limit: int = 8) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"


def compaction_plans(model: nn.Module) -> tuple[Plan, ...]:
    """The plans :func:`masksparse.compact` applied to ``model``, oldest first; empty if it never was.

    A compacted model carries them (a model compacted twice, two), and so does a model rebuilt by
    :func:`masksparse.load_compacted`: they are what :func:`masksparse.save_compacted` writes down.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse import compact, prune_channels
        >>> from masksparse.compact.plan import compaction_plans
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(3, 4)
        >>> _ = prune_channels(model, x, 0.5)
        >>> small = compact(model, x)
        >>> [(c.module, c.tensor, c.dim, len(c.keep)) for c in compaction_plans(small)[0].cuts]
        [('0', 'weight', 0, 4), ('0', 'bias', 0, 4), ('2', 'weight', 1, 4)]
        >>> compaction_plans(model)  # the masked model was not compacted itself
        ()
    """
    return tuple(vars(model).get(_PLANS, ()))


def record_plan(model: nn.Module, plan: Plan) -> None:
    """Add ``plan`` to the plans ``model`` carries (see :func:`compaction_plans`), without the
    diagnostics only a failed verification reads."""
    # A class updated from a masked module's class is named by the class it stands for: that one is
    # importable (the model still pickles), and it is the class a fresh model has.
    attributes = tuple(
        replace(a, old=getattr(a.old, "_masksparse_base", a.old)) if isinstance(a.old, type) else a
        for a in plan.attributes
    )
    vars(model)[_PLANS] = (*compaction_plans(model), replace(plan, activations=(), attributes=attributes))
