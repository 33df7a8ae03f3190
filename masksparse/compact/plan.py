"""The plan of a compaction: a frozen, printable description of every change, built before anything is
changed (see :func:`masksparse.compact.planning.plan_compaction`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate

__all__ = ["AttributeUpdate", "BiasFold", "KeptUnits", "NormalisationChange", "Plan", "TensorCut"]


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
class Plan:
    """What compaction will do; building it changes nothing. ``print(plan)`` shows it.

    ``kept`` lists dead units compaction keeps because a module could not follow their removal, and
    why. ``normalisations`` lists the normalisations that will reduce over fewer units (only with
    ``allow_inexact=True``); ``deviation`` is then the measured largest relative error of the
    outputs on the example inputs, measured by :func:`masksparse.compact` (``None`` until then, and in
    an exact plan).
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
        for k in self.kept:
            lines.append(f"kept: {k.units} dead unit(s) of {k.module or '<model>'}: {k.reason}")
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
