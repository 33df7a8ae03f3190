"""Data-driven unstructured and N:M pruning of a model's ``nn.Linear`` layers (and the ``nn.Conv2d``
layers named, as matrices over their unfolded patches): magnitude, Wanda and SparseGPT-style
reconstruction, written as torch-style masks.

A method is a score (``magnitude``: ``|W|``; ``wanda``: ``|W| * ||X_j||_2``, Sun et al. 2023) and a
scope to rank in (the whole tensor for magnitude, each output row for Wanda, as the papers do), or
a reconstruction (``sparsegpt``, :func:`masksparse.criteria.sparsegpt`). Layers are calibrated and
pruned stage by stage (:func:`masksparse.criteria.sequential`): each block's statistics come from inputs
that already went through the pruned blocks before it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from masksparse import prune
from masksparse._errors import PruningValueError
from masksparse._feed import Forward, LossFn
from masksparse.criteria.calibration import UNFOLDED, LayerStats, resolve_layers, sequential
from masksparse.criteria.reconstruction import sparsegpt
from masksparse.distributed.tensors import refuse_sharded
from masksparse.prune.functional import narrow

__all__ = ["prune_unstructured"]

Score = Callable[[torch.Tensor, LayerStats | None], torch.Tensor]
_SCORES: dict[str, tuple[Score, bool]] = {}  # name -> (score, ranked per output row)


def _score(name: str, *, per_row: bool) -> Callable[[Score], Score]:
    def register(fn: Score) -> Score:
        _SCORES[name] = (fn, per_row)
        return fn

    return register


@_score("magnitude", per_row=False)
def _magnitude(weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    return weight.abs()


@_score("wanda", per_row=True)
def _wanda(weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    assert stats is not None  # guaranteed by prune_unstructured: wanda always calibrates
    return weight.abs() * stats.norms.to(device=weight.device, dtype=torch.float32).unsqueeze(0)


METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclasses.dataclass(frozen=True)
class _Options:
    method: str
    pattern: tuple[int, int] | None
    blocksize: int
    percdamp: float
    update_bias: bool


def _parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    if pattern is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if match is None:
        raise PruningValueError(f"pattern must be None or 'N:M' such as '2:4', got {pattern!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise PruningValueError(f"pattern {pattern!r}: N:M needs 0 < N < M")
    return n, m


def _check_amount(amount: Any, what: str) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise PruningValueError(f"{what} must be a fraction in [0, 1), got {amount!r}")
    return float(amount)


def _default_skip(model: nn.Module) -> str | None:
    """The output layer left alone by default: a Hugging Face model's output embeddings, else the last
    ``nn.Linear`` registered."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        out = getter()
        return next((n for n, m in model.named_modules() if m is out), None) if out is not None else None
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if len(linears) > 1 else None


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)  # nn.Linear or nn.Conv2d, checked by resolve_layers
    return value


def _already_pruned(module: nn.Module) -> torch.Tensor:
    mask = module._buffers.get("weight_mask") if "weight_orig" in module._parameters else None
    if mask is None:
        return torch.zeros_like(_tensor(module, "weight"), dtype=torch.bool)
    return ~mask.bool() if mask.dtype == torch.bool else mask == 0


def _select(score: torch.Tensor, pruned: torch.Tensor, amount: float, per_row: bool) -> torch.Tensor:
    """The bool mask of what to drop: the ``amount`` lowest scores of the tensor (or of each row),
    entries already pruned first and never brought back."""
    score = score.float().masked_fill(pruned, float("-inf"))
    flat = score if per_row else score.reshape(1, -1)
    k = int(round(amount * flat.shape[1]))
    drop = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        drop.scatter_(1, torch.topk(flat, k, dim=1, largest=False).indices, True)
    return drop.view(score.shape) | pruned


def _select_nm(score: torch.Tensor, pruned: torch.Tensor, pattern: tuple[int, int]) -> torch.Tensor:
    n, m = pattern
    groups = score.float().masked_fill(pruned, float("-inf")).reshape(score.shape[0], -1, m)
    drop = torch.zeros_like(groups, dtype=torch.bool)
    drop.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, True)
    return drop.view(score.shape) | pruned


@dataclasses.dataclass
class _Undo:
    """What a layer was before this call changed it, so a failure mid-way can put it back."""

    module: nn.Module
    mask: torch.Tensor | None
    orig: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def of(cls, module: nn.Module, keep_weights: bool) -> _Undo:
        mask = module._buffers.get("weight_mask") if "weight_orig" in module._parameters else None
        orig = module._parameters.get("weight_orig", module._parameters.get("weight"))
        bias = module._parameters.get("bias")
        return cls(
            module,
            None if mask is None else mask.clone(),
            orig.detach().clone() if keep_weights and orig is not None else None,
            bias.detach().clone() if keep_weights and bias is not None else None,
        )

    def restore(self) -> None:
        with torch.no_grad():
            if self.mask is None:
                if "weight_orig" in self.module._parameters:
                    _tensor(self.module, "weight_mask").fill_(True)
                    prune.remove(self.module, "weight")
            else:
                _tensor(self.module, "weight_mask").copy_(self.mask)
            if self.orig is not None:
                param = self.module._parameters.get("weight_orig", self.module._parameters.get("weight"))
                assert param is not None  # the weight was a parameter when the snapshot was taken
                param.copy_(self.orig)
            if self.bias is not None:
                _tensor(self.module, "bias").copy_(self.bias)


def _prune_layer(module: nn.Module, stats: LayerStats | None, amount: float, opts: _Options) -> None:
    full = _tensor(module, "weight").detach()
    # A Conv2d is the matrix weight.flatten(1) applied to its unfolded patches: pruned as that matrix.
    weight = full.flatten(1)
    pruned = _already_pruned(module).flatten(1)
    new_bias = None
    if opts.method == "sparsegpt":
        assert stats is not None and stats.xtx is not None  # sparsegpt always calibrates with xtx
        bias = module._parameters.get("bias") if opts.update_bias else None
        new, keep, new_bias = sparsegpt(
            weight, stats.xtx, amount, pruned=pruned, pattern=opts.pattern, blocksize=opts.blocksize,
            percdamp=opts.percdamp, bias=bias, sums=stats.sums, rows=stats.rows,
        )  # fmt: skip
    else:
        fn, per_row = _SCORES[opts.method]
        score = fn(weight, stats)
        if opts.pattern:
            drop = _select_nm(score, pruned, opts.pattern)
        else:
            drop = _select(score, pruned, amount, per_row)
        keep, new = ~drop, None
    keep = keep.reshape(full.shape)
    narrow(module, "weight", keep)
    if new is not None:
        with torch.no_grad():
            orig = _tensor(module, "weight_orig")
            orig.mul_(~keep).add_(new.reshape(full.shape).to(orig.dtype))  # new where kept (zero elsewhere)
            if new_bias is not None:
                _tensor(module, "bias").copy_(new_bias)


def _check_layers(
    chosen: Mapping[str, nn.Module],
    pattern: tuple[int, int] | None,
    stats: Mapping[str, Any] | None,
    method: str,
) -> None:
    for name, module in chosen.items():
        width = _tensor(module, "weight")[0].numel()  # a Conv2d's patch: in_channels * kh * kw
        if pattern is not None and width % pattern[1]:
            raise PruningValueError(
                f"pattern {pattern[0]}:{pattern[1]}: {name!r} ({type(module).__name__}.weight) has "
                f"{width} inputs, not a multiple of {pattern[1]}; leave it out of modules"
            )
        if stats is None:
            continue
        got = stats.get(name)
        if not isinstance(got, LayerStats) or got.sq_norms.shape != (width,):
            raise PruningValueError(
                f"the statistics given have no entry for {name!r} with {width} input columns; calibrate "
                "the same layers of the same model"
            )
        if method == "sparsegpt" and got.xtx is None:
            raise PruningValueError(
                f"sparsegpt needs X^T X: the statistics of {name!r} have none (calibrate(..., hessian=True))"
            )


def prune_unstructured(
    model: nn.Module,
    data: Iterable[Any] | Mapping[str, LayerStats] | None,
    amount: float = 0.5,
    *,
    method: str = "wanda",
    pattern: str | None = None,
    modules: Sequence[nn.Module | str] | None = None,
    amounts: Mapping[nn.Module | str, float] | None = None,
    blocks: str | bool | None = True,
    loss_fn: LossFn | None = None,
    forward: Forward | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    update_bias: bool = True,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> nn.Module:
    """Prune the weights of ``model``'s ``nn.Linear`` layers, choosing with calibration data.

    Args:
        model: pruned in place; every chosen layer gets torch-style ``weight_orig`` / ``weight_mask``
            (a bool buffer), so :func:`masksparse.prune.remove`, the sparsity report and
            :func:`masksparse.load_state_dict` work on the result.
        data: calibration batches (a DataLoader, a list; a mapping batch is called ``model(**batch)``,
            a tuple positionally, a tensor ``model(batch)``), or the ``{path: LayerStats}`` that
            :func:`masksparse.calibrate` returned (then layers are not re-calibrated one stage at a
            time), or None for ``method="magnitude"``.
        amount: the fraction of each layer's weight left zero afterwards, entries already pruned
            included (pruning again only adds zeros). Ignored with a ``pattern``.
        method: ``"magnitude"`` (``|W|`` over the tensor), ``"wanda"`` (``|W| * ||X_j||`` in each
            output row) or ``"sparsegpt"`` (OBS mask per block of columns, and the kept weights
            updated to reconstruct the layer's outputs: ``weight_orig`` changes).
        pattern: ``"N:M"`` (``"2:4"``, ``"4:8"``): every ``M`` consecutive inputs of a row keep ``N``.
        modules: the ``nn.Linear`` layers (modules or paths); by default every one but the output
            layer (a Hugging Face model's output embeddings, otherwise the last ``nn.Linear``).
            ``nn.Conv2d`` layers (``groups=1``) may be named too: each is pruned as the matrix
            ``weight.flatten(1)`` it multiplies its unfolded patches by, so Wanda's ``||X_j||`` and
            SparseGPT's ``X^T X`` are those of the patches and N:M runs along ``in_channels * kh * kw``.
        amounts: per-layer amounts (module or path -> fraction) overriding ``amount``.
        blocks: the repeated blocks layers are calibrated in, one block at a time: True finds them
            (:func:`masksparse.criteria.find_blocks`), a path names them, None calibrates every layer
            on its own (still in the order they run).
        loss_fn: with one, a batch ``(inputs, target)`` is fed as ``model(inputs)`` (the methods here use
            the forward pass only; the loss is for criteria that need gradients).
        forward: ``forward(model, batch)`` feeds a batch instead, overriding everything above.
        blocksize, percdamp: SparseGPT's column block and dampening (fraction of ``mean(diag(X^T X))``).
        update_bias: SparseGPT also refits the bias (an unpruned column whose input is 1), so it
            absorbs the mean shift the pruned weights leave; False updates the kept weights only, as
            the reference does.
        dtype: accumulation dtype of the statistics.
        progress: a tqdm bar over stages and batches (when tqdm is installed).

    Returns:
        ``model``. If anything fails part-way, every layer is put back as it was and the error raised.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse import prune_unstructured
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> data = [torch.randn(32, 8) for _ in range(4)]
        >>> _ = prune_unstructured(model, data, 0.5, method="wanda", progress=False)
        >>> float((model[0].weight == 0).float().mean()), hasattr(model[2], "weight_mask")
        (0.5, False)
        >>> _ = prune_unstructured(model, data, method="sparsegpt", pattern="2:4", progress=False)
        >>> kept = model[0].weight_mask.view(16, 2, 4).sum(-1)  # what Wanda pruned stays pruned
        >>> bool((kept <= 2).all()), float(model[0].weight_mask.float().mean()) <= 0.5
        (True, True)
    """
    refuse_sharded(model, "prune_unstructured")
    if method not in METHODS:
        raise PruningValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    amount = _check_amount(amount, "amount")
    opts = _Options(method, _parse_pattern(pattern), blocksize, percdamp, update_bias)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise PruningValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if not isinstance(percdamp, (int, float)) or not percdamp > 0:
        raise PruningValueError(f"percdamp must be a positive number, got {percdamp!r}")
    chosen = resolve_layers(
        model, modules, "prune_unstructured", default_skip=_default_skip(model), allowed=UNFOLDED
    )
    per_layer = dict.fromkeys(chosen, amount)
    names = {id(m): n for n, m in model.named_modules()}
    for key, value in (amounts or {}).items():
        path = key if isinstance(key, str) else names.get(id(key), "")
        if path not in chosen:
            raise PruningValueError(f"amounts: {key!r} is not one of the layers being pruned")
        per_layer[path] = _check_amount(value, f"amounts[{path!r}]")
    given = (
        data if isinstance(data, Mapping) and all(isinstance(v, LayerStats) for v in data.values()) else None
    )
    if data is None and method != "magnitude":
        raise PruningValueError(f"method {method!r} needs calibration data; only 'magnitude' works without")
    _check_layers(chosen, opts.pattern, given, method)
    undo: list[_Undo] = []  # each layer as it was, taken just before it is written

    def process(stats: Mapping[str, LayerStats | None]) -> None:
        for name, layer_stats in stats.items():
            undo.append(_Undo.of(chosen[name], keep_weights=method == "sparsegpt"))
            _prune_layer(chosen[name], layer_stats, per_layer[name], opts)

    try:
        if data is None or method == "magnitude":
            process(dict.fromkeys(chosen))
        elif given is not None:
            process({n: given[n] for n in chosen})
        else:
            sequential(
                model, data, chosen, process, blocks=blocks, hessian=method == "sparsegpt", dtype=dtype,
                loss_fn=loss_fn, forward=forward, progress=progress, unfold=True,
            )  # fmt: skip
    except BaseException:
        for u in undo:
            u.restore()
        raise
    return model
