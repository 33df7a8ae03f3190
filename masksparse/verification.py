"""Check that a compacted model computes what the masked one did, naming the first module that differs."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from masksparse._errors import CompactionError, MaskSparseError
from masksparse.graph.record import _eval_mode, as_args
from masksparse.plan import Plan

__all__ = ["RTOL", "relative_error", "verify"]

RTOL = 1e-4


def _run(
    model: nn.Module, args: tuple[Any, ...], record: bool
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``model``; with ``record``, also every module's first output tensor, in execution order."""
    seen: dict[str, torch.Tensor] = {}
    stack: list[str] = []
    handles = []
    for path, m in model.named_modules() if record else ():
        handles.append(m.register_forward_pre_hook(lambda mod, a, p=path: stack.append(p)))
        handles.append(m.register_forward_hook(lambda mod, a, out, p=path: _keep(seen, stack, p, out)))
    try:
        with _eval_mode(model), torch.no_grad():
            out = model(*args)
    except Exception as exc:
        where = stack[-1] if stack else ""
        raise CompactionError(f"the compacted model fails in module {where or '<model>'!r}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)], seen


def _keep(seen: dict[str, torch.Tensor], stack: list[str], path: str, out: Any) -> None:
    stack.pop()
    first = next((t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)), None)
    if first is not None and path not in seen:
        seen[path] = first.detach().clone()


def relative_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    """``max |ref - got| / max |ref|`` (inf when the shapes differ).

    Example:
        >>> round(relative_error(torch.tensor([2.0, -4.0]), torch.tensor([2.0, -3.9])), 6)
        0.025
    """
    if ref.shape != got.shape:
        return math.inf
    if ref.numel() == 0:
        return 0.0
    ref64, got64 = ref.detach().double(), got.detach().double()
    return float((ref64 - got64).abs().max() / ref64.abs().max().clamp_min(1e-30))


def verify(
    masked: nn.Module,
    compacted: nn.Module,
    example_inputs: Any,
    plan: Plan,
    rtol: float = RTOL,
    reference: list[torch.Tensor] | None = None,
) -> float:
    """The largest relative error between the two models' outputs; raises past ``rtol``, naming the
    first module whose output (the part compaction keeps) diverges. ``reference``: the masked model's
    outputs on ``example_inputs`` when already known."""
    args = as_args(example_inputs)
    ref = reference if reference is not None else _run(masked, args, record=False)[0]
    try:
        got, _ = _run(compacted, args, record=False)
    except MaskSparseError:
        _run(compacted, args, record=True)  # again, to name the module that fails
        raise
    errors = [relative_error(a, b) for a, b in zip(ref, got)] if len(ref) == len(got) else [math.inf]
    worst = max(errors, default=0.0)
    if worst <= rtol:
        return worst
    _, ref_modules = _run(masked, args, record=True)
    _, got_modules = _run(compacted, args, record=True)
    keeps = dict(plan.activations)
    for path, r in ref_modules.items():
        if path not in got_modules:
            continue
        for dim, keep in enumerate(keeps.get(path, ())):
            if keep is not None and dim < r.ndim:
                r = r.index_select(dim, torch.tensor(keep, dtype=torch.long))
        err = relative_error(r, got_modules[path])
        if err > rtol:
            raise CompactionError(
                f"compaction changed what the model computes (max relative error {worst:.3g} > {rtol:g}); "
                f"the first module whose output diverges is {path or '<model>'!r} (relative error {err:.3g})"
            )
    raise CompactionError(
        f"compaction changed the model's output (max relative error {worst:.3g} > {rtol:g})"
    )
