"""Calibration: per-layer input statistics gathered with hooks while the model runs over data.

:func:`~masksparse.criteria.calibrate` runs the dense model over every batch once and returns a
:class:`LayerStats` per layer (input sums and squared norms per column, and ``X^T X`` when asked).
:func:`~masksparse.criteria.sequential` is what the pruning functions use: it walks the model's layers
in the order they run, one *stage* at a time (a stage is the layers of one repeated block, or a layer
outside any block), gathers the stage's statistics with everything before it already pruned, hands
them to a callback that prunes the stage, and frees them.

How a stage is fed: when the blocks are chained (each called with the previous one's output and
otherwise the same arguments, checked on the first batch), block 0's inputs are captured once and each
later block is fed the pruned outputs of the one before, as the papers' code does (about ``2 L`` block
passes for ``L`` blocks; memory: one hidden state per batch). Otherwise every stage runs the whole
model, stopping as soon as the stage has run (about ``L^2 / 2`` block passes; memory: one batch).

Rows of a layer's input are tokens (every leading dimension is flattened). For an ``nn.Conv2d`` they
are either every position of every image with one column per input channel (what the structured
criteria read), or, for unstructured pruning, the unfolded patches (``F.unfold``: one column per entry
of ``weight[o].flatten()``, ``in_channels * kh * kw`` of them), so that Wanda and SparseGPT treat a
convolution as the matrix product it is. When a batch is a mapping
with a 2-D ``attention_mask`` and a layer's input has the same two leading dimensions, padding tokens
are left out of the statistics.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from masksparse._errors import PruningTypeError, PruningValueError
from masksparse._feed import Forward, LossFn, batches, run_batch
from masksparse.criteria._blocks import BlockInput, Chain, capture, find_chain
from masksparse.distributed import parallel

__all__ = ["LayerStats", "calibrate", "find_blocks", "sequential"]

_WITH_INPUTS = (nn.Linear,)
# Layers unstructured pruning calibrates (a Conv2d on its unfolded patches), when named in modules=.
UNFOLDED = (nn.Linear, nn.Conv2d)


@dataclasses.dataclass
class LayerStats:
    """What the calibration data showed one layer: ``rows`` input rows (tokens; for a convolution,
    every position of every image), the sum, the sum of squares and the number of exact zeros of every
    input column (``sums``, ``sq_norms``, ``zeros``, shape ``(in_features,)`` or ``(in_channels,)``)
    and, when gathered, ``xtx = X^T X`` (shape ``(in_features, in_features)``), all in ``dtype``.

    Example:
        >>> import torch
        >>> from masksparse.criteria import LayerStats
        >>> stats = LayerStats.empty(3, hessian=True)
        >>> stats.add(torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]]))
        >>> stats.rows, stats.sq_norms.tolist(), stats.xtx[0].tolist()
        (2, [2.0, 4.0, 0.0], [2.0, 2.0, 0.0])
    """

    rows: int
    sums: torch.Tensor
    sq_norms: torch.Tensor
    xtx: torch.Tensor | None = None
    zeros: torch.Tensor | None = None

    @classmethod
    def empty(
        cls, width: int, *, hessian: bool = False, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> LayerStats:
        """Statistics of no rows yet, for inputs of ``width`` columns."""
        xtx = torch.zeros(width, width, dtype=dtype, device=device) if hessian else None
        zeros = torch.zeros(width, dtype=dtype, device=device)
        return cls(0, zeros, zeros.clone(), xtx, zeros.clone())

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the rows of ``x`` (shape ``(rows, width)``)."""
        x = x.to(self.sq_norms.dtype)
        self.rows += x.shape[0]
        self.sums += x.sum(0)
        self.sq_norms += (x * x).sum(0)
        if self.zeros is not None:
            self.zeros += (x == 0).sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)

    @property
    def norms(self) -> torch.Tensor:
        """The L2 norm of every input column over all rows (Wanda's ``||X_j||_2``)."""
        return self.sq_norms.sqrt()


def find_blocks(model: nn.Module, targets: Iterable[str] = ()) -> str | None:
    """The path of the model's repeated blocks: the ``nn.ModuleList`` (or ``nn.Sequential`` of at
    least two children) holding the most target layers, ``targets`` being paths (every ``nn.Linear``
    when empty). None when no container holds targets in two or more of its children.

    Example:
        >>> import transformers
        >>> from masksparse.criteria import find_blocks
        >>> config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2,
        ...                                  num_attention_heads=2, intermediate_size=32)
        >>> find_blocks(transformers.BertModel(config))
        'encoder.layer'
    """
    names = list(targets) or [n for n, m in model.named_modules() if isinstance(m, _WITH_INPUTS)]
    best, best_count = None, 0
    for path, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 2:
            continue
        prefix = path + "." if path else ""
        children_hit = {n[len(prefix) :].split(".")[0] for n in names if n.startswith(prefix)}
        count = sum(n.startswith(prefix) for n in names)
        if len(children_hit) >= 2 and count > best_count:
            best, best_count = path, count
    return best


class _StageDone(Exception):
    """Raised from a hook to stop a pass once the stage being calibrated has run."""


@dataclasses.dataclass
class _Pass:
    """The state of one pass over the data: each layer's statistics so far, and the current batch's
    token mask."""

    stats: dict[str, LayerStats]
    hessian: bool
    dtype: torch.dtype
    token_mask: torch.Tensor | None = None
    unfold: bool = False  # a Conv2d's rows are its unfolded patches (see the module docstring)

    def rows(self, module: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
        x = args[0]
        if self.unfold and isinstance(module, nn.Conv2d):
            return patches(module, x)
        if isinstance(module, nn.modules.conv._ConvNd) and x.dim() >= 2:  # one column per input channel
            return x.detach().movedim(1, -1).reshape(-1, x.shape[1])
        mask = self.token_mask
        if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.to(device=x.device)]
        return x.detach().reshape(-1, x.shape[-1])

    def hook(self, name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = self.rows(module, args)
            if name not in self.stats:
                self.stats[name] = LayerStats.empty(
                    x.shape[-1], hessian=self.hessian, dtype=self.dtype, device=x.device
                )
            self.stats[name].add(x)

        return pre_hook


def patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The rows ``conv`` multiplies by ``weight.flatten(1).T``: every patch of ``x`` it reads, unfolded
    (shape ``(images * positions, in_channels * kh * kw)``)."""
    x = x.detach()
    batched = x if x.dim() == 4 else x.unsqueeze(0)
    padding = conv.padding
    if isinstance(padding, str):  # "valid": none; "same": what keeps the size, perhaps one more on the right
        pads: list[int] = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1) if padding == "same" else 0
            pads += [total // 2, total - total // 2]
        batched = nn.functional.pad(batched, pads)
        padding = (0, 0)
    cols = nn.functional.unfold(
        batched, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
    )  # fmt: skip
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _token_mask(batch: Any) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.bool()
    return None


def _raise_done(*_: Any) -> None:
    raise _StageDone


def _feed(model: nn.Module, batch: Any, i: int, loss_fn: LossFn | None, forward: Forward | None) -> None:
    try:
        run_batch(model, batch, loss_fn=loss_fn, forward=forward)
    except _StageDone:
        pass
    except Exception as exc:  # the user's model or data: say which batch, keep the cause
        raise _batch_error(i, model, exc) from exc


def _pair_hint(batch: Any, loss_fn: LossFn | None, forward: Forward | None) -> str:
    """A hint for the commonest mistake: (inputs, target) batches fed without saying so."""
    if loss_fn is None and forward is None and isinstance(batch, (tuple, list)) and len(batch) == 2:
        return (
            " (a batch of two is fed as model(a, b); for (inputs, target) batches pass "
            "forward=lambda model, batch: model(batch[0]), or a loss_fn)"
        )
    return ""


def _batch_error(i: int, module: nn.Module, exc: Exception) -> PruningValueError:
    return PruningValueError(
        f"calibration batch {i} could not be fed to {type(module).__name__}: {type(exc).__name__}: {exc}"
    )


def _hooks(model: nn.Module, names: Iterable[str], stop: str | None, make: Callable[[str], Any]) -> list[Any]:
    handles = [model.get_submodule(n).register_forward_pre_hook(make(n)) for n in names]
    if stop is not None:
        handles.append(model.get_submodule(stop).register_forward_hook(_raise_done))
    return handles


Run = tuple[torch.Tensor | None, Callable[[], None]]  # a batch's token mask, and what feeds it


def _batch_runs(
    model: nn.Module, data: Iterable[Any], loss_fn: LossFn | None, forward: Forward | None
) -> list[Run]:
    return [
        (_token_mask(batch), functools.partial(_feed, model, batch, i, loss_fn, forward))
        for i, batch in enumerate(batches(data))
    ]


def _block_runs(block: nn.Module, inputs: Sequence[BlockInput]) -> list[Run]:
    def feed(item: BlockInput, i: int) -> None:
        try:
            item.run(block)
        except _StageDone:
            pass
        except Exception as exc:  # the user's model: say which batch, keep the cause
            raise _batch_error(i, block, exc) from exc

    return [(item.token_mask, functools.partial(feed, item, i)) for i, item in enumerate(inputs)]


def _run_pass(
    model: nn.Module,
    runs: Sequence[Run],
    names: Sequence[str],
    stop: str | None,
    *,
    hessian: bool,
    dtype: torch.dtype,
    bar: Any,
    unfold: bool = False,
) -> dict[str, LayerStats]:
    state = _Pass({}, hessian, dtype, unfold=unfold)
    handles = _hooks(model, names, stop, state.hook)
    try:
        with torch.no_grad():
            for token_mask, run in runs:
                state.token_mask = token_mask
                run()
                if bar is not None:
                    bar.update(1)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in state.stats]
    if parallel.active() and not missing:
        _sum_over_ranks(state.stats)
    if missing:
        raise PruningValueError(
            f"calibration never ran {', '.join(repr(n) for n in missing[:3])}: the data's batches do not "
            "reach these layers (check forward= or the layers chosen)"
        )
    return state.stats


def _sum_over_ranks(stats: dict[str, LayerStats]) -> None:
    """Every layer's statistics summed over the data-parallel ranks (in one order on every rank)."""
    names = sorted(stats)
    rows = torch.tensor([stats[n].rows for n in names], dtype=torch.int64)
    tensors = [rows]
    for n in names:
        s = stats[n]
        tensors += [t for t in (s.sums, s.sq_norms, s.zeros, s.xtx) if t is not None]
    parallel.sum_over_ranks(tensors)
    for n, count in zip(names, rows.tolist()):
        stats[n].rows = count


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    modules: Sequence[nn.Module | str] | None = None,
    *,
    hessian: bool = False,
    dtype: torch.dtype = torch.float32,
    loss_fn: LossFn | None = None,
    forward: Forward | None = None,
) -> dict[str, LayerStats]:
    """Run ``model`` over every batch of ``data`` once and return each layer's input statistics.

    Args:
        model: the model (not changed).
        data: an iterable of batches (a DataLoader, a list): a mapping is called ``model(**batch)``, a
            tuple positionally, a tensor ``model(batch)``.
        modules: the ``nn.Linear`` layers (modules or paths); every ``nn.Linear`` when None. An
            ``nn.Conv2d`` named here is calibrated on its unfolded patches, as
            :func:`masksparse.prune_unstructured` prunes it.
        hessian: also gather ``X^T X`` (what SparseGPT needs; ``in_features**2`` numbers per layer).
        dtype: the accumulation dtype (``torch.float64`` for very long calibration runs).
        loss_fn: with one, a batch ``(inputs, target)`` is fed as ``model(inputs)``.
        forward: ``forward(model, batch)`` feeds a batch instead, overriding everything above.

    Returns:
        ``{path: LayerStats}``, which :func:`masksparse.prune_unstructured` accepts instead of data.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse import calibrate
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> stats = calibrate(model, [torch.randn(8, 4), torch.randn(8, 4)], hessian=True)
        >>> sorted(stats), stats["0"].rows, tuple(stats["2"].xtx.shape)
        (['0', '2'], 16, (3, 3))
    """
    chosen = resolve_layers(model, modules, "calibrate", allowed=UNFOLDED)
    runs = _batch_runs(model, data, loss_fn, forward)
    return _run_pass(model, runs, list(chosen), None, hessian=hessian, dtype=dtype, bar=None, unfold=True)


def resolve_layers(
    model: nn.Module,
    modules: Sequence[nn.Module | str] | None,
    what: str,
    *,
    default_skip: str | None = None,
    allowed: tuple[type[nn.Module], ...] = _WITH_INPUTS,
) -> dict[str, nn.Module]:
    """``{path: module}`` for ``modules`` (modules or paths, each one of ``allowed``), or every
    ``nn.Linear`` of the model but ``default_skip`` when None. Raises before anything is changed."""
    by_id = {id(m): n for n, m in model.named_modules()}
    if modules is None:
        found: dict[str, nn.Module] = {
            n: m for n, m in model.named_modules() if isinstance(m, _WITH_INPUTS) and n != default_skip
        }
        if not found:
            raise PruningValueError(f"{what}: {type(model).__name__} has no nn.Linear layer to prune")
        return found
    if isinstance(modules, (str, nn.Module)):
        modules = [modules]
    chosen: dict[str, nn.Module] = {}
    for item in modules:
        if isinstance(item, str):
            try:
                module = model.get_submodule(item)
            except AttributeError as exc:
                raise PruningValueError(f"{what}: the model has no submodule {item!r}") from exc
            path = item
        elif isinstance(item, nn.Module) and id(item) in by_id:
            module, path = item, by_id[id(item)]
        else:
            raise PruningTypeError(
                f"{what}: modules must be submodules of the model or their paths, got {type(item).__name__}"
            )
        if not isinstance(module, allowed):
            kinds = " and ".join(k.__name__ for k in allowed)
            raise PruningTypeError(
                f"{what}: {path!r} is a {type(module).__name__}; only {kinds} layers are supported here"
            )
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            raise PruningTypeError(
                f"{what}: {path!r} is a Conv2d with groups={module.groups} and padding_mode="
                f"{module.padding_mode!r}; only groups=1 with zero padding is calibrated on its patches"
            )
        chosen[path] = module
    if not chosen:
        raise PruningValueError(f"{what}: modules is empty")
    return chosen


def _execution_order(
    model: nn.Module,
    batch: Any,
    modules: Mapping[str, nn.Module],
    loss_fn: LossFn | None,
    forward: Forward | None,
) -> list[str]:
    order: list[str] = []

    def record(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if name not in order:
                order.append(name)

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            run_batch(model, batch, loss_fn=loss_fn, forward=forward)
    except Exception as exc:
        raise PruningValueError(
            f"the first calibration batch could not be fed to {type(model).__name__}: "
            f"{type(exc).__name__}: {exc}{_pair_hint(batch, loss_fn, forward)}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in modules if n not in order]


def stages(
    model: nn.Module,
    first_batch: Any,
    modules: Mapping[str, nn.Module],
    blocks: str | None,
    *,
    loss_fn: LossFn | None = None,
    forward: Forward | None = None,
) -> list[tuple[list[str], str]]:
    """The layers in the order they run, grouped: the layers of one child of ``blocks`` form one stage
    (stopped after that child), any other layer is a stage of its own (stopped after itself); each
    stage with the path of the module after which its passes stop."""
    order = _execution_order(model, first_batch, modules, loss_fn, forward)
    prefix = blocks + "." if blocks else None
    out: list[tuple[list[str], str]] = []
    current: str | None = None
    for name in order:
        child = name[len(prefix) :].split(".")[0] if prefix and name.startswith(prefix) else None
        if child is not None and child == current:
            out[-1][0].append(name)
            continue
        current = child
        out.append(([name], prefix + child if prefix and child is not None else name))
    return out


def sequential(
    model: nn.Module,
    data: Iterable[Any],
    modules: Mapping[str, nn.Module],
    process: Callable[[dict[str, LayerStats]], None],
    *,
    blocks: str | None | bool = True,
    hessian: bool = False,
    dtype: torch.dtype = torch.float32,
    loss_fn: LossFn | None = None,
    forward: Forward | None = None,
    progress: bool = True,
    unfold: bool = False,
) -> None:
    """Calibrate ``modules`` stage by stage, calling ``process(stats)`` on each stage's statistics
    before the next stage is calibrated (so it sees the stage pruned). ``blocks``: True finds the
    repeated blocks (:func:`find_blocks`), a path names them, False or None treats every layer alone."""
    data = data if isinstance(data, Sequence) else list(batches(data))
    first = next(iter(batches(data)))
    if blocks is True:
        blocks = find_blocks(model, modules)
    elif blocks is not None and blocks is not False and not isinstance(blocks, str):
        raise PruningTypeError(f"blocks must be True, False, None or a module path, got {blocks!r}")
    plan = stages(model, first, modules, blocks or None, loss_fn=loss_fn, forward=forward)
    children = list(model.get_submodule(blocks).children()) if blocks else []
    chain = _chain(model, children, first, loss_fn, forward) if children else None
    bar = _progress_bar(progress, len(plan) * len(data))
    cached: tuple[int, list[BlockInput]] | None = None  # the next block's index and inputs
    try:
        for names, stop in plan:
            if bar is not None:
                bar.set_description(names[0] if len(names) == 1 else names[0].rsplit(".", 1)[0])
            child = _child_index(blocks, stop, len(children))
            if chain is None or child is None:
                cached = None
                runs = _batch_runs(model, data, loss_fn, forward)
                process(
                    _run_pass(model, runs, names, stop, hessian=hessian, dtype=dtype, bar=bar, unfold=unfold)
                )
                continue
            block = children[child]
            if cached is None or cached[0] != child:
                cached = (child, _inputs_of(model, block, data, loss_fn, forward))
            runs = _block_runs(block, cached[1])
            process(_run_pass(model, runs, names, None, hessian=hessian, dtype=dtype, bar=bar, unfold=unfold))
            with torch.no_grad():
                cached = (child + 1, [chain.next_input(item, item.run(block)) for item in cached[1]])
    finally:
        if bar is not None:
            bar.close()


def _child_index(blocks: str | None | bool, stop: str, count: int) -> int | None:
    if not isinstance(blocks, str) or not stop.startswith(blocks + "."):
        return None
    tail = stop[len(blocks) + 1 :]
    return int(tail) if tail.isdigit() and int(tail) < count else None


def _chain(
    model: nn.Module, children: list[nn.Module], batch: Any, loss_fn: LossFn | None, forward: Forward | None
) -> Chain | None:
    def feed(m: nn.Module, b: Any) -> None:
        run_batch(m, b, loss_fn=loss_fn, forward=forward)

    try:
        return find_chain(children, capture(model, children, batch, feed, stop_after=False))
    except Exception:  # a model whose blocks cannot be run alone is fed whole: always correct
        return None


def _inputs_of(
    model: nn.Module, block: nn.Module, data: Sequence[Any], loss_fn: LossFn | None, forward: Forward | None
) -> list[BlockInput]:
    out = []
    for i, batch in enumerate(data):
        try:
            (item,) = capture(
                model, [block], batch, functools.partial(_feed_raw, loss_fn, forward), stop_after=True
            )
        except Exception as exc:  # the user's model or data: say which batch, keep the cause
            raise _batch_error(i, model, exc) from exc
        item.token_mask = _token_mask(batch)
        out.append(item)
    return out


def _feed_raw(loss_fn: LossFn | None, forward: Forward | None, model: nn.Module, batch: Any) -> None:
    run_batch(model, batch, loss_fn=loss_fn, forward=forward)


def _progress_bar(progress: bool, total: int | None, unit: str = "batch") -> Any:
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return None
    return tqdm(total=total, unit=unit, leave=False)
