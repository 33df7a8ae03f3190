"""Check that a compacted model computes what the masked one did, naming the first module that differs.

A plan with normalisation changes (``allow_inexact=True``) is checked against the masked model run with
those normalisations reducing over the kept units only (``_KeptUnits``), which is what the
compacted model computes; :func:`deviation` then measures how far that is from the masked model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from masksparse._errors import CompactionError, MaskSparseError
from masksparse._inputs import ModelInputs, model_inputs, output_tensors
from masksparse.compact.plan import NormalisationChange, Plan
from masksparse.graph.record import _eval_mode

__all__ = ["RTOL", "deviation", "relative_error", "verify"]

aten = torch.ops.aten

RTOL = 1e-4


def _run(
    model: nn.Module, args: ModelInputs, record: bool, changes: Sequence[NormalisationChange] = ()
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``model``; with ``record``, also every module's first output tensor, in execution order.
    ``changes``: normalisations to run over their kept units only."""
    seen: dict[str, torch.Tensor] = {}
    stack: list[str] = []
    handles = []
    for path, m in model.named_modules() if record else ():
        handles.append(m.register_forward_pre_hook(lambda mod, a, p=path: stack.append(p)))
        handles.append(m.register_forward_hook(lambda mod, a, out, p=path: _keep(seen, stack, p, out)))
    try:
        kept = _KeptUnits(changes) if changes else contextlib.nullcontext()
        with _eval_mode(model), torch.no_grad(), kept:
            out = args(model)
    except Exception as exc:
        where = stack[-1] if stack else ""
        raise CompactionError(
            f"the compacted model fails in module {where or '<model>'!r}: {exc}", module=where
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return output_tensors(out), seen


def _keep(seen: dict[str, torch.Tensor], stack: list[str], path: str, out: Any) -> None:
    stack.pop()
    first = next(iter(output_tensors(out)), None)
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
    outputs on ``example_inputs`` when already known.

    With normalisation changes in ``plan`` (``allow_inexact=True``), the reference is the masked model
    with those normalisations reducing over the kept units only, and ``reference`` is not used.
    """
    args = model_inputs(example_inputs)
    changes = plan.normalisations
    if reference is None or changes:
        reference = _run(masked, args, record=False, changes=changes)[0]
    ref = reference
    try:
        got, _ = _run(compacted, args, record=False)
    except MaskSparseError:
        _run(compacted, args, record=True)  # again, to name the module that fails
        raise
    worst = _worst(ref, got)
    if worst <= rtol:
        return worst
    _, ref_modules = _run(masked, args, record=True, changes=changes)
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
                f"the first module whose output diverges is {path or '<model>'!r} (relative error {err:.3g})",
                module=path,
                ran=False,
            )
    raise CompactionError(
        f"compaction changed the model's output (max relative error {worst:.3g} > {rtol:g})"
    )


def deviation(compacted: nn.Module, example_inputs: Any, reference: list[torch.Tensor]) -> float:
    """The largest relative error between ``compacted``'s outputs and ``reference`` (the masked
    model's outputs on ``example_inputs``): what an inexact compaction changed.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 1, bias=False)
        >>> _ = torch.nn.init.ones_(layer.weight)
        >>> deviation(layer, torch.tensor([[1.0, 1.0]]), [torch.tensor([[2.5]])])
        0.2
    """
    got, _ = _run(compacted, model_inputs(example_inputs), record=False)
    return _worst(reference, got)


def _worst(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """The largest :func:`relative_error` over the outputs (inf when their numbers differ)."""
    if len(ref) != len(got):
        return math.inf
    return max((relative_error(a, b) for a, b in zip(ref, got)), default=0.0)


class _KeptUnits(TorchDispatchMode):
    """Runs the planned normalisations over their kept units only, as the compacted model will; the
    outputs at removed units stay as the masked model computes them (nothing reads them)."""

    def __init__(self, changes: Sequence[NormalisationChange]) -> None:
        super().__init__()
        self.keeps: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
        for c in changes:
            self.keeps.setdefault((c.op, c.call), {})[c.dim] = torch.tensor(c.keep, dtype=torch.long)
        self.ops = {op for op, _ in self.keeps}
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        if name in self.ops:
            call = self.calls[name] = self.calls.get(name, -1) + 1
            keeps = self.keeps.get((name, call))
            simulate = _SIMULATIONS.get(func.overloadpacket)
            if keeps and simulate is not None:
                return simulate(func, args, kwargs, keeps)
        return func(*args, **kwargs)


def _layer_norm(func: Any, args: Any, kwargs: Any, keeps: dict[int, torch.Tensor]) -> Any:
    x, shape, weight, bias, eps = args
    out, _, _ = func(*args, **kwargs)
    k = len(shape)
    dims = list(range(x.ndim - k, x.ndim))
    kept = torch.ones(x.shape[-k:], dtype=torch.bool, device=x.device)
    for d, keep in keeps.items():
        drop = torch.ones(x.shape[d], dtype=torch.bool, device=x.device).index_fill_(
            0, keep.to(x.device), False
        )
        kept.index_fill_(d - (x.ndim - k), torch.nonzero(drop).flatten(), False)
    n = kept.sum()
    x64 = x.double()
    mean = (x64 * kept).sum(dims, keepdim=True) / n
    rstd = torch.rsqrt(((x64 - mean) * kept).pow(2).sum(dims, keepdim=True) / n + eps)
    y = (x64 - mean) * rstd
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return torch.where(kept, y.to(out.dtype), out), mean.to(out.dtype), rstd.to(out.dtype)


def _group_norm(func: Any, args: Any, kwargs: Any, keeps: dict[int, torch.Tensor]) -> Any:
    x, weight, bias, n, c, hw, groups, eps = args
    out, _, _ = func(*args, **kwargs)
    keep = keeps[1].to(x.device)
    w = None if weight is None else weight.index_select(0, keep)
    b = None if bias is None else bias.index_select(0, keep)
    small, mean, rstd = func(x.index_select(1, keep), w, b, n, len(keep), hw, groups, eps)
    return out.clone().index_copy_(1, keep, small), mean, rstd


def _mean(func: Any, args: Any, kwargs: Any, keeps: dict[int, torch.Tensor]) -> Any:
    x = args[0]
    for d, keep in keeps.items():
        x = x.index_select(d, keep.to(x.device))
    return func(x, *args[1:], **kwargs)


_SIMULATIONS: dict[Any, Callable[..., Any]] = {
    aten.native_layer_norm: _layer_norm,
    aten.native_group_norm: _group_norm,
    aten.mean: _mean,
}
