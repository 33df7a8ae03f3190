"""Pruning while training: :class:`GradualPruner` raises sparsity on a schedule as the model trains.

Like a learning-rate scheduler, the pruner is an object whose ``step()`` is called after
each ``optimizer.step()``; on the steps its schedule names it prunes the chosen weights up to the
schedule's fraction, counted against their original sizes, and the training in between lets the
model recover. Masks are ordinary ``weight_orig`` / ``weight_mask`` pruning narrowed in place (one bool
mask per tensor however many steps), so masked weights get zero gradient and stay zero, and
the model's state_dict holds them; ``state_dict()`` holds the rest (the step count and
the history), so a resumed run continues the schedule exactly.

With ``structured=True`` the pruner masks whole channel groups instead (:func:`masksparse.prune_channels`
on the schedule's fraction of the units), and with ``compact=True`` it compacts the model in place at
every pruning step (:func:`masksparse.compact` with ``inplace=True``): the same model object and
Parameter objects, sliced, with the optimizer's state (SGD momentum, Adam moments) sliced along, so
training goes on with the same optimizer and learning-rate scheduler and every later step is cheaper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from masksparse._errors import PruningTypeError, PruningValueError
from masksparse.compact.apply import compact as compact_model
from masksparse.importance import Criterion
from masksparse.prune.functional import narrow
from masksparse.prune.select import MagnitudeScores, select_smallest
from masksparse.schedule import curves
from masksparse.structured import compacted_size, prunable_units, prune_channels
from masksparse.unstructured import METHODS, prune_unstructured

__all__ = ["GradualPruner", "PruningStep"]

_CURVES: dict[str, Callable[..., float]] = {
    "cubic": curves.cubic,
    "linear": curves.linear,
    "constant": curves.constant,
}
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class PruningStep(NamedTuple):
    """One pruning step of a :class:`GradualPruner`: the step, the schedule's target, what was reached."""

    step: int
    target: float
    reached: float


def _int(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PruningValueError(f"GradualPruner: {what} must be an int >= {low}, got {value!r}")
    return value


def _layers(model: nn.Module, modules: Sequence[nn.Module | str] | None) -> dict[str, nn.Module]:
    by_id = {id(m): n for n, m in model.named_modules()}
    if modules is None:
        found: dict[str, nn.Module] = {n: m for n, m in model.named_modules() if isinstance(m, _LAYERS)}
        getter = getattr(model, "get_output_embeddings", None)
        out = getter() if callable(getter) else (list(found.values())[-1] if len(found) > 1 else None)
        found = {n: m for n, m in found.items() if m is not out}
        if not found:
            raise PruningValueError(f"GradualPruner: {type(model).__name__} has no Linear or Conv layer")
        return found
    chosen: dict[str, nn.Module] = {}
    for item in modules:
        path = item if isinstance(item, str) else by_id.get(id(item))
        if path is None:
            raise PruningTypeError(
                "GradualPruner: modules must be submodules of the model or their paths, got "
                f"{type(item).__name__}"
            )
        try:
            module = model.get_submodule(path)
        except AttributeError as exc:
            raise PruningValueError(f"GradualPruner: the model has no submodule {path!r}") from exc
        if not isinstance(module, _LAYERS):
            raise PruningTypeError(
                f"GradualPruner: {path!r} is a {type(module).__name__}, not a Linear or Conv"
            )
        chosen[path] = module
    if not chosen:
        raise PruningValueError("GradualPruner: modules is empty")
    return chosen


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)  # the layers are Linear or Conv, checked by _layers
    return weight


def _kept(module: nn.Module) -> torch.Tensor | None:
    """The bool mask of entries still unpruned, or None when the weight is not pruned."""
    mask = module._buffers.get("weight_mask") if "weight_orig" in module._parameters else None
    return None if mask is None else mask.bool() if mask.dtype == torch.bool else mask != 0


class GradualPruner:
    """Prune ``model`` gradually to ``target`` between steps ``begin`` and ``end``.

    Args:
        model: pruned in place (torch-style masks, narrowed at each pruning step).
        target: the final fraction of the chosen weights pruned, in [0, 1), counted against their
            original sizes.
        begin, end: the first and last step the schedule moves on (``begin <= end``).
        every: prune every this many steps between ``begin`` and ``end`` (and always at ``end``).
        schedule: ``"cubic"`` (Zhu & Gupta, 2017: fast first, then slower), ``"linear"``,
            ``"constant"``, or ``fn(step) -> fraction``.
        initial: the schedule's fraction at ``begin``.
        modules: the layers whose weights are pruned (modules or paths); by default every Linear and
            Conv but the output layer.
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"`` (the last two calibrate on ``data``
            at every pruning step; see :func:`masksparse.prune_unstructured`).
        scope: ``"global"`` ranks the weights of all chosen layers together (magnitude only; the
            default), ``"layer"`` prunes each layer to the schedule's fraction. With ``structured``,
            ``"layer"`` (the default) prunes each channel group to the fraction and ``"global"`` ranks
            units across groups (``global_ranking=True``).
        data: calibration batches for the data-driven methods (and the data-driven importances).
        structured: prune whole channel groups with :func:`masksparse.prune_channels`: ``target`` and
            the schedule are then fractions of the prunable units, counted against the units the model
            had when the pruner was made (or of its parameters or MACs: see ``budget``).
        budget: with ``structured``, what ``target`` and the schedule count: ``"units"`` (the default),
            ``"params"`` (the fraction of the model's parameters removed) or ``"macs"`` (of the MACs of
            its Linear and Conv layers on ``example_inputs``), counted against the model the pruner
            was made with and as compaction removes them (:func:`masksparse.structured.compacted_size`).
            Each pruning step meets its fraction within one unit per group (``prune_channels`` with
            ``target_params`` / ``target_macs``).
        example_inputs: what to trace the model with (needed with ``structured``).
        importance: the channel importance for ``structured`` (see :func:`masksparse.prune_channels`).
        compact: compact the model in place after every structured pruning step.
        optimizer: the optimizer training the model, whose state ``compact`` slices too.
        adjust_dropout: with ``structured``, multiply every ``nn.Dropout``'s probability by the
            fraction of units a pruning step keeps (``p *= 1 - ratio``, as TorchPruner does), so the
            thinner model is not over-regularised.
        **options: passed on to :func:`masksparse.prune_unstructured` (``pattern``, ``percdamp``...)
            or, with ``structured``, to :func:`masksparse.prune_channels` (``ignored_layers``,
            ``round_to``, ``loss_fn``...).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse import GradualPruner
        >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> pruner = GradualPruner(model, 0.75, begin=0, end=8, every=2)
        >>> for step in range(10):
        ...     opt.zero_grad()
        ...     model(torch.randn(8, 16)).square().mean().backward()
        ...     opt.step()
        ...     _ = pruner.step()
        >>> pruner.sparsity, [round(h.target, 2) for h in pruner.history]
        (0.75, [0.43, 0.66, 0.74, 0.75])

        Structured, compacting in place as it goes (the optimizer keeps training the same Parameters):

        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.01)
        >>> x = torch.randn(8, 16)
        >>> pruner = GradualPruner(
        ...     model, 0.5, begin=0, end=4, every=2, structured=True, example_inputs=x,
        ...     compact=True, optimizer=opt,
        ... )
        >>> for step in range(6):
        ...     opt.zero_grad()
        ...     model(x).square().mean().backward()
        ...     opt.step()
        ...     _ = pruner.step()
        >>> model[0].out_features, opt.state[model[0].weight]["exp_avg"].shape, pruner.sparsity
        (16, torch.Size([16, 16]), 0.5)
    """

    def __init__(
        self,
        model: nn.Module,
        target: float,
        *,
        begin: int = 0,
        end: int,
        every: int = 1,
        schedule: str | Callable[[int], float] = "cubic",
        initial: float = 0.0,
        modules: Sequence[nn.Module | str] | None = None,
        method: str = "magnitude",
        scope: str | None = None,
        data: Iterable[Any] | None = None,
        structured: bool = False,
        example_inputs: Any = None,
        importance: str | Criterion = "l1",
        compact: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        adjust_dropout: bool = False,
        budget: str = "units",
        **options: Any,
    ) -> None:
        self.begin, self.end = _int(begin, "begin", 0), _int(end, "end", 0)
        self.every = _int(every, "every", 1)
        if begin > end:
            raise PruningValueError(f"GradualPruner: begin={begin} is after end={end}")
        for name, value in (("target", target), ("initial", initial)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise PruningValueError(f"GradualPruner: {name} must be a fraction in [0, 1), got {value!r}")
        if not callable(schedule) and schedule not in _CURVES:
            raise PruningValueError(
                f"GradualPruner: schedule must be one of {', '.join(_CURVES)} or fn(step) -> fraction, "
                f"got {schedule!r}"
            )
        if method not in METHODS:
            raise PruningValueError(
                f"GradualPruner: method must be one of {', '.join(METHODS)}; got {method!r}"
            )
        scope = scope if scope is not None else "layer" if structured else "global"
        if scope not in ("global", "layer"):
            raise PruningValueError(f"GradualPruner: scope must be 'global' or 'layer', got {scope!r}")
        _check_structured(
            model, structured, example_inputs, compact, optimizer, adjust_dropout, method, modules
        )
        if budget not in ("units", "params", "macs"):
            raise PruningValueError(
                f"GradualPruner: budget must be 'units', 'params' or 'macs', got {budget!r}"
            )
        if budget != "units" and not structured:
            raise PruningValueError(
                f"GradualPruner: budget={budget!r} counts what removing channels saves and needs "
                "structured=True (unstructured targets are fractions of the chosen weights)"
            )
        clash = sorted({"amount", "target_params", "target_macs", "global_ranking"} & set(options))
        if clash:
            raise PruningValueError(
                f"GradualPruner: {', '.join(clash)} cannot be passed on: the schedule sets how much is "
                "pruned (target, budget=) and scope= sets the ranking ('global' ranks across groups)"
            )
        if scope == "global" and method != "magnitude" and not structured:
            raise PruningValueError(f"GradualPruner: {method} ranks within each layer; use scope='layer'")
        if method != "magnitude" and data is None:
            raise PruningValueError(f"GradualPruner: method {method!r} needs calibration data (data=...)")
        self.model, self.target, self.initial = model, float(target), float(initial)
        self.schedule, self.method, self.scope = schedule, method, scope
        self.data = list(data) if data is not None else None
        self.options = options
        self.structured, self.example_inputs, self.importance = structured, example_inputs, importance
        self.compact, self.optimizer, self.adjust_dropout = compact, optimizer, adjust_dropout
        self.budget = budget
        self.steps_taken = 0
        self.history: list[PruningStep] = []
        if structured:
            self.layers: dict[str, nn.Module] = {}
            units, dead = self._units()
            self.units = units  # the prunable units at the start, which the schedule counts against
            self._size, self._alive = units, units - dead  # now: training changes neither
            if budget != "units":
                # the dense figure the budget counts against; now and after compaction, kept from the
                # last step like self._size (training changes neither)
                self.original, self._left = self._measure()
                self._now = self.original
        else:
            self.layers = _layers(model, modules)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Slice ``optimizer``'s state at every later compaction: for an optimizer made after the pruner
        (a Hugging Face ``Trainer`` or Lightning makes its own; their callbacks in
        :mod:`masksparse.schedule.integrations` call this). Needs ``structured=True, compact=True``."""
        if not (self.structured and self.compact):
            raise PruningValueError(
                "GradualPruner.attach_optimizer: the optimizer is sliced only with structured=True, "
                "compact=True"
            )
        _check_optimizer(self.model, optimizer)
        self.optimizer = optimizer

    def fraction_at(self, step: int) -> float:
        """The schedule's target fraction at ``step``."""
        if callable(self.schedule):
            value = self.schedule(step)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise PruningValueError(
                    f"GradualPruner: schedule({step}) gave {value!r}, not a fraction in [0, 1)"
                )
            return float(value)
        return _CURVES[self.schedule](step, self.target, self.begin, self.end, self.initial)

    def due(self, step: int) -> bool:
        """Whether ``step`` is a pruning step."""
        return self.begin <= step <= self.end and ((step - self.begin) % self.every == 0 or step == self.end)

    @property
    def sparsity(self) -> float:
        """The fraction of the chosen weights pruned now (masked entries over original sizes); with
        ``structured``, the fraction of the prunable units gone (masked or compacted away)."""
        if self.structured:
            if self.budget != "units":
                return 1.0 - self._left / self.original
            return 1.0 - self._alive / self.units
        total = sum(_weight(m).numel() for m in self.layers.values())
        return self._pruned() / total

    def _pruned(self) -> int:
        return sum(int((~kept).sum()) for m in self.layers.values() if (kept := _kept(m)) is not None)

    def step(self) -> PruningStep | None:
        """Advance one step (call it after ``optimizer.step()``); prune when the schedule says so.
        Returns the :class:`PruningStep` taken, or None."""
        self.steps_taken += 1
        if not self.due(self.steps_taken):
            return None
        return self.prune_to(self.fraction_at(self.steps_taken))

    def prune_to(self, fraction: float) -> PruningStep:
        """Prune the chosen weights up to ``fraction`` now (never un-pruning anything)."""
        if self.structured:
            self._prune_channels(fraction)
        elif self.scope == "global":
            self._global_magnitude(fraction)
        else:
            prune_unstructured(
                self.model, self.data, fraction, method=self.method, modules=list(self.layers),
                progress=False, **self.options,
            )  # fmt: skip
        record = PruningStep(self.steps_taken, fraction, self.sparsity)
        self.history.append(record)
        return record

    def _units(self) -> tuple[int, int]:
        keys = ("ignored_layers", "untouched_layers", "allow_inexact")
        return prunable_units(
            self.model, self.example_inputs, **{k: self.options[k] for k in keys if k in self.options}
        )

    def _measure(self) -> tuple[int, int]:
        keys = ("ignored_layers", "untouched_layers", "allow_inexact")
        return compacted_size(
            self.model, self.example_inputs, self.budget,
            **{k: self.options[k] for k in keys if k in self.options},
        )  # fmt: skip

    def _how_much(self, fraction: float) -> dict[str, Any] | None:
        """The ``prune_channels`` argument that leaves ``1 - fraction`` of what the budget counts at the
        start, or None when that is already met."""
        if self.budget == "units":
            # self._size: fewer than self.units once compacted
            return {"amount": min(1.0, max(0.0, 1.0 - (1.0 - fraction) * self.units / self._size))}
        keep = (1.0 - fraction) * self.original
        if self._left <= keep:
            return None
        return {f"target_{self.budget}": keep / self._now}

    def _prune_channels(self, fraction: float) -> None:
        """Mask (and with ``compact``, remove) units until ``1 - fraction`` of the starting units are
        left; in eval mode, so dropout and BatchNorm statistics do not change the verified outputs."""
        training = self.model.training
        self.model.eval()
        try:
            how_much = self._how_much(fraction)
            if how_much is None:
                return
            before = self._alive
            try:
                prune_channels(
                    self.model, self.example_inputs, importance=self.importance,
                    global_ranking=self.scope == "global", data=self.data, **how_much, **self.options,
                )  # fmt: skip
            except PruningValueError as exc:
                if self.budget == "units" or "cannot be met" not in str(exc):
                    raise
                raise PruningValueError(
                    f"GradualPruner: at step {self.steps_taken} the schedule asks for {fraction:.3f} of the "
                    f"{self.budget} removed, which cannot be met ({exc}); lower target"
                ) from exc
            if self.compact:
                keys = ("allow_inexact",)
                compact_model(
                    self.model, self.example_inputs, inplace=True, optimizer=self.optimizer,
                    **{k: self.options[k] for k in keys if k in self.options},
                )  # fmt: skip
            self._size, dead = self._units()
            self._alive = self._size - dead
            if self.budget != "units":
                self._now, self._left = self._measure()
            if self.adjust_dropout and before > 0:
                for m in self.model.modules():
                    if isinstance(m, nn.modules.dropout._DropoutNd):
                        m.p *= self._alive / before
        finally:
            self.model.train(training)

    def _global_magnitude(self, fraction: float) -> None:
        layers = list(self.layers.values())
        total = sum(_weight(m).numel() for m in layers)
        k = round(fraction * total) - self._pruned()
        if k <= 0:
            return
        with torch.no_grad():
            scores = [MagnitudeScores(_weight(m).detach()) for m in layers]
            chosen = select_smallest(scores, [_kept(m) for m in layers], k)
        for module, drop in zip(layers, chosen, strict=True):
            if drop.any() or _kept(module) is None:
                narrow(module, "weight", ~drop.to(_weight(module).device))

    def state_dict(self) -> dict[str, Any]:
        """The step count and history (the masks are in the model's own state_dict); with
        ``structured``, also the starting unit count (a compacted model is saved with
        :func:`masksparse.save_compacted`)."""
        state: dict[str, Any] = {"steps_taken": self.steps_taken, "history": [tuple(h) for h in self.history]}
        if self.structured:
            state["units"] = self.units
            if self.budget != "units":
                state["original"] = self.original
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output."""
        missing = {"steps_taken", "history"} - set(state)
        if missing:
            raise PruningValueError(f"GradualPruner.load_state_dict: missing {sorted(missing)}")
        self.steps_taken = _int(state["steps_taken"], "steps_taken", 0)
        self.history = [PruningStep(*h) for h in state["history"]]
        if self.structured and "units" in state:
            self.units = _int(state["units"], "units", 1)
        if self.structured and self.budget != "units" and "original" in state:
            self.original = _int(state["original"], "original", 1)


def _check_structured(
    model: nn.Module,
    structured: bool,
    example_inputs: Any,
    compact: bool,
    optimizer: torch.optim.Optimizer | None,
    adjust_dropout: bool,
    method: str,
    modules: Sequence[nn.Module | str] | None,
) -> None:
    """The structured options agree with each other and with the model."""
    if not structured:
        for name, value in (("compact", compact), ("adjust_dropout", adjust_dropout)):
            if value:
                raise PruningValueError(f"GradualPruner: {name}=True needs structured=True")
        if optimizer is not None:
            raise PruningValueError(
                "GradualPruner: optimizer is sliced only with structured=True, compact=True"
            )
        return
    if example_inputs is None:
        raise PruningValueError("GradualPruner: structured=True traces the model: pass example_inputs=...")
    if method != "magnitude":
        raise PruningValueError(
            f"GradualPruner: method={method!r} is unstructured; with structured=True choose importance=..."
        )
    if modules is not None:
        raise PruningValueError(
            "GradualPruner: structured=True prunes every channel group; choose with ignored_layers= or "
            "untouched_layers= instead of modules="
        )
    if optimizer is not None and not compact:
        raise PruningValueError("GradualPruner: optimizer is sliced only with compact=True")
    if optimizer is not None:
        _check_optimizer(model, optimizer)


def _check_optimizer(
    model: nn.Module, optimizer: Any, where: str = "GradualPruner", what: str = "model"
) -> None:
    """The optimizer is a torch optimizer over parameters of ``model`` only (its state is what
    compaction slices, and what distillation steps)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise PruningTypeError(
            f"{where}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    own = {id(p) for p in model.parameters()}
    stray = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]
    if stray:
        raise PruningValueError(
            f"{where}: the optimizer holds {len(stray)} parameter(s) not in the {what} (the first of shape "
            f"{tuple(stray[0].shape)}); pass the optimizer that trains the {what}"
        )
