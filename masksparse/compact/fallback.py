"""What compaction keeps when the compacted model fails verification: the units of the module that failed, so
that the rest of the model still compacts exactly.

A module whose forward cannot run with fewer units (an attention module that reshapes its heads back to
its input width ``C``, say) fails in every instance of its class, so all of them keep their units at once;
a module that runs but computes something else keeps only its own. A torch layer that fails to run (a
Linear handed an input of the old width) passes the blame to the module around it, whose code made that
input; one that computes something else (a bias a fold went wrong in) keeps its own units. Where the
failing module removes nothing itself (a reshape in its parent's forward), its parent keeps its units, and
so on up to the model, which keeps everything: keeping a dead unit is always exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from masksparse._errors import CompactionError
from masksparse.compact.plan import Plan
from masksparse.compact.planning import cut_units
from masksparse.graph import Graph

__all__ = ["describe", "units_to_keep"]


def _kind(module: nn.Module) -> type:
    """The class a module's pruned class stands for."""
    return getattr(type(module), "_masksparse_base", type(module))


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _culprit(model: nn.Module, path: str) -> str:
    """The module whose code fed the failing one: torch's own layers take whatever shape compaction gives
    them (their slicers update them), so a torch layer that fails was handed a wrong input by the module
    around it (a reshape in an attention module's forward, say)."""
    while path and _kind(model.get_submodule(path)).__module__.startswith("torch."):
        path = _parent(path)
    return path


def _inside(prefixes: list[str]) -> Callable[[str], bool]:
    return lambda path: any(_under(path, p) for p in prefixes)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _output_units(graph: Graph, paths: list[str], removed: set[int]) -> set[int]:
    """The removed units that the outputs of the modules at ``paths`` carry."""
    units: set[int] = set()
    for path in paths:
        v = graph.trace.module_outputs.get(path)
        if v is not None:
            for d in range(v.ndim):
                units.update(removed.intersection(np.unique(graph.labels[graph.slots(v, d)]).tolist()))
    return units


def units_to_keep(model: nn.Module, graph: Graph, plan: Plan, exc: CompactionError) -> tuple[set[int], str]:
    """The units ``plan`` removes that compaction must keep after verification failed with ``exc``, and
    which modules keep them (empty when ``exc`` names no module: then nothing can be kept)."""
    if exc.module is None:
        return set(), ""
    removed = cut_units(graph, plan.cuts, lambda p: True)
    culprit = _culprit(model, exc.module) if exc.ran else exc.module
    paths = [culprit]
    if exc.ran and culprit:
        kind = _kind(model.get_submodule(culprit))
        paths += [p for p, m in model.named_modules() if p != culprit and _kind(m) is kind]
    while True:
        units = cut_units(graph, plan.cuts, _inside(paths))
        units |= _output_units(graph, paths, removed)
        if units or paths == [""]:
            break
        paths = list(dict.fromkeys(_parent(p) for p in paths))
    names = [p or "<model>" for p in paths]
    where = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more like it"
    return units, where


def describe(exc: CompactionError) -> str:
    """The reason a module keeps its units after ``exc``, as the plan prints it."""
    what = "could not run" if exc.ran else "computed something else"
    return f"the compacted model {what} without them ({exc})"
