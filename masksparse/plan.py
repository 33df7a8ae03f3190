"""The plan of a compaction: a frozen, printable description of every change, built before anything is
changed (see :func:`masksparse.compaction.plan_compaction`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate

__all__ = ["AttributeUpdate", "BiasFold", "Plan", "TensorCut"]


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
class Plan:
    """What compaction will do; building it changes nothing. ``print(plan)`` shows it."""

    cuts: tuple[TensorCut, ...]
    folds: tuple[BiasFold, ...]
    attributes: tuple[AttributeUpdate, ...]
    params_before: int
    params_after: int
    # for diagnosing a failed verification: module path -> kept indices per dim of its output
    activations: tuple[tuple[str, tuple[tuple[int, ...] | None, ...]], ...] = field(repr=False, default=())

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
        return "\n".join(lines)


def _short(indices: tuple[int, ...], limit: int = 8) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"
