"""Sparsity reports: how many entries of each weight and bias tensor are zero.

A report reads tensors and masks only. For a pruned tensor it multiplies ``<name>_orig`` by
``<name>_mask`` itself, so the numbers are right even when no forward pass (and so no forward pre-hook)
has run since the last optimizer step, and they are the same for a model and for its state_dict.

Rows and the total are frozen dataclasses; what a table shows is defined once, in ``_COLUMNS``, so a new
per-tensor quantity is a new field with a default plus one entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from tabulate import SEPARATING_LINE, tabulate
from torch import Tensor, nn

from masksparse._errors import PruningTypeError, ShapeMismatchError

__all__ = ["ReportRow", "ReportTotal", "SparsityReport", "sparsity_report"]

_ORIG, _MASK = "_orig", "_mask"


def _fraction_zero(numel: int, nonzero: int) -> float:
    # An empty tensor has nothing pruned in it: 0, not 0/0.
    return 0.0 if numel == 0 else (numel - nonzero) / numel


@dataclass(frozen=True)
class ReportRow:
    """What is zero in one weight or bias tensor.

    Example:
        >>> row = ReportRow("fc.weight", (2, 3), numel=6, nonzero=3, masked=True,
        ...                 zero_slices_dim0=1, zero_slices_dim1=0)
        >>> row.sparsity
        0.5

    Attributes:
        name: the tensor's logical name: ``fc.weight`` also when it is stored as ``fc.weight_orig``.
        shape: the tensor's shape.
        numel: number of entries.
        nonzero: number of entries of the effective tensor (``orig * mask`` when masked) that are not 0.
        sparsity: fraction of entries that are zero, in [0, 1]; 0 for a tensor without entries.
        masked: whether the tensor carries a pruning mask.
        zero_slices_dim0: how many of the ``shape[0]`` slices ``t[i]`` are zero throughout (for a conv or
            linear weight: dead output channels; for a bias: its zero entries); ``None`` for a 0-d tensor.
            A slice without entries counts as zero.
        zero_slices_dim1: the same for the slices ``t[:, j]`` (dead input channels); ``None`` for
            tensors with fewer than 2 dimensions.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    nonzero: int
    sparsity: float = field(init=False)
    masked: bool
    zero_slices_dim0: int | None
    zero_slices_dim1: int | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", _fraction_zero(self.numel, self.nonzero))


@dataclass(frozen=True)
class ReportTotal:
    """The sums over all rows of a report.

    Example:
        >>> ReportTotal(numel=8, nonzero=2).sparsity
        0.75

    Attributes:
        numel: entries in all reported tensors.
        nonzero: nonzero entries in all reported tensors.
        sparsity: fraction of all entries that are zero; 0 when there are none.
    """

    numel: int
    nonzero: int
    sparsity: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", _fraction_zero(self.numel, self.nonzero))


def _percent(fraction: float) -> str:
    # Two decimals, but never round a few pruned (or a few surviving) entries away to 0% (100%).
    if 0.0 < fraction < 0.00005:
        return "<0.01%"
    if 0.99995 <= fraction < 1.0:
        return ">99.99%"
    return f"{fraction:.2%}"


def _slices(row: ReportRow, dim: int) -> str:
    count = row.zero_slices_dim0 if dim == 0 else row.zero_slices_dim1
    return "" if count is None else f"{count:,}/{row.shape[dim]:,}"


@dataclass(frozen=True)
class _Column:
    header: str
    cell: Callable[[ReportRow], str]
    total: Callable[[ReportTotal], str]
    align: Literal["left", "right"]


# The one place that says what a table shows; text, markdown and HTML all render these.
_COLUMNS: tuple[_Column, ...] = (
    _Column("tensor", lambda r: r.name, lambda t: "total", "left"),
    _Column("shape", lambda r: str(r.shape), lambda t: "", "left"),
    _Column("numel", lambda r: f"{r.numel:,}", lambda t: f"{t.numel:,}", "right"),
    _Column("nonzero", lambda r: f"{r.nonzero:,}", lambda t: f"{t.nonzero:,}", "right"),
    _Column("sparsity", lambda r: _percent(r.sparsity), lambda t: _percent(t.sparsity), "right"),
    _Column("masked", lambda r: "yes" if r.masked else "", lambda t: "", "left"),
    _Column("zero dim0", lambda r: _slices(r, 0), lambda t: "", "right"),
    _Column("zero dim1", lambda r: _slices(r, 1), lambda t: "", "right"),
)


@dataclass(frozen=True, repr=False)
class SparsityReport:
    """Per-tensor sparsity of a model or state_dict, with a total; prints as a table.

    Build one with :func:`sparsity_report`. ``str()`` gives a plain-text table whose last line is the
    total, :meth:`to_markdown` a Markdown table, and Jupyter shows an HTML table.

    Example:
        >>> from masksparse.report import ReportRow, SparsityReport
        >>> report = SparsityReport((ReportRow("fc.weight", (2, 2), 4, 1, True, 1, 0),))
        >>> print(report.to_markdown())
        | tensor    | shape   |   numel |   nonzero |   sparsity | masked   |   zero dim0 |   zero dim1 |
        |:----------|:--------|--------:|----------:|-----------:|:---------|------------:|------------:|
        | fc.weight | (2, 2)  |       4 |         1 |     75.00% | yes      |         1/2 |         0/2 |
        | **total** |         |       4 |         1 |     75.00% |          |             |             |

    Attributes:
        rows: one :class:`ReportRow` per tensor, in state_dict order.
        total: the :class:`ReportTotal` over ``rows``.
    """

    rows: tuple[ReportRow, ...]
    total: ReportTotal = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", tuple(self.rows))
        numel = sum(row.numel for row in self.rows)
        nonzero = sum(row.nonzero for row in self.rows)
        object.__setattr__(self, "total", ReportTotal(numel=numel, nonzero=nonzero))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[ReportRow]:
        return iter(self.rows)

    def __getitem__(self, name: str) -> ReportRow:
        """The row of the tensor called ``name`` (its logical name, e.g. ``conv1.weight``)."""
        for row in self.rows:
            if row.name == name:
                return row
        known = ", ".join(row.name for row in self.rows[:8]) + (", ..." if len(self.rows) > 8 else "")
        raise KeyError(f"no tensor {name!r} in this report; its tensors are: {known or 'none'}")

    def _table(self, tablefmt: str, total_label: str, separate_total: bool) -> str:
        body: list[object] = [[column.cell(row) for column in _COLUMNS] for row in self.rows]
        if separate_total and self.rows:
            body.append(SEPARATING_LINE)
        body.append([total_label] + [column.total(self.total) for column in _COLUMNS[1:]])
        return tabulate(
            body,
            headers=[column.header for column in _COLUMNS],
            tablefmt=tablefmt,
            colalign=[column.align for column in _COLUMNS],
            disable_numparse=True,  # cells are formatted already ("1,024", "50.00%")
        )

    def __str__(self) -> str:
        table = self._table("simple", "total", separate_total=True)
        return "\n".join(line.rstrip() for line in table.splitlines())  # blank last cells pad lines

    __repr__ = __str__

    def to_markdown(self) -> str:
        """The report as a Markdown (pipe) table whose last row, in bold, is the total.

        Example:
            >>> from masksparse.report import SparsityReport
            >>> SparsityReport(()).to_markdown().splitlines()[-1].startswith("| **total**")
            True
        """
        return self._table("pipe", "**total**", separate_total=False)

    def _repr_html_(self) -> str:
        # Jupyter calls this; tabulate's "html" format escapes the cells.
        return self._table("html", "total", separate_total=False)


def _join(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def _effective(name: str, orig: Tensor, mask: Tensor) -> Tensor:
    if mask.shape != orig.shape:
        raise ShapeMismatchError(
            f"{name}{_MASK} has shape {tuple(mask.shape)} but {name}{_ORIG} has shape {tuple(orig.shape)}; "
            "a pruning mask must have the shape of the tensor it masks"
        )
    # Multiplying in orig's dtype (not indexing) gives exactly what the pruned model computes, as torch does.
    return orig.detach() * mask.detach().to(orig.dtype)


def _module_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor, bool]]:
    for key, param in module.named_parameters():
        prefix, _, attr = key.rpartition(".")
        if attr.endswith(_ORIG):
            owner = module.get_submodule(prefix)
            logical = attr[: -len(_ORIG)]
            mask = getattr(owner, logical + _MASK, None)
            if isinstance(mask, Tensor):
                name = _join(prefix, logical)
                yield name, _effective(name, param, mask), True
                continue
        yield key, param.detach(), False


def _names_weight_or_bias(attr: str) -> bool:
    # "weight", "bias", "in_proj_weight" (MultiheadAttention), "weight_ih_l0" / "bias_k" (RNNs, attention).
    return any(attr.endswith(word) or attr.startswith(word + "_") for word in ("weight", "bias"))


def _state_dict_tensors(state_dict: Mapping[str, object]) -> Iterator[tuple[str, Tensor, bool]]:
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise PruningTypeError(f"a state_dict has str keys; this mapping has the key {key!r}")
        if not isinstance(value, Tensor) or key.endswith(_MASK):
            continue  # masks are read with their tensor; non-tensors (e.g. _extra_state) have no entries
        if key.endswith(_ORIG):
            name = key[: -len(_ORIG)]
            mask = state_dict.get(name + _MASK)
            if isinstance(mask, Tensor):
                yield name, _effective(name, value, mask), True
                continue
        if _names_weight_or_bias(key.rpartition(".")[2]):
            yield key, value.detach(), False


def _zero_slices(nonzero: Tensor, dim: int) -> int | None:
    if nonzero.dim() <= dim:
        return None
    if nonzero.dim() == 1:
        return int((~nonzero).sum())
    # any() over an empty slice is False, so a slice without entries counts as zero.
    alive = nonzero.movedim(dim, 0).flatten(1).any(dim=1)
    return int((~alive).sum())


def _row(name: str, tensor: Tensor, masked: bool) -> ReportRow:
    nonzero = tensor != 0
    return ReportRow(
        name=name,
        shape=tuple(tensor.shape),
        numel=tensor.numel(),
        nonzero=int(nonzero.sum()),
        masked=masked,
        zero_slices_dim0=_zero_slices(nonzero, 0),
        zero_slices_dim1=_zero_slices(nonzero, 1),
    )


def sparsity_report(source: nn.Module | Mapping[str, Tensor]) -> SparsityReport:
    """Count the zero entries of every weight and bias tensor of a model or a state_dict.

    A pruned tensor (``<name>_orig`` with a ``<name>_mask``, float or bool, as written by
    ``torch.nn.utils.prune`` or ``masksparse.prune``) is reported under ``<name>`` with the values
    ``orig * mask``, computed here rather than read from the module, so no forward pass is needed.

    Example:
        >>> from torch import nn
        >>> from masksparse import prune
        >>> from masksparse.report import sparsity_report
        >>> layer = nn.Linear(4, 2)
        >>> _ = prune.l1_unstructured(layer, "weight", amount=0.5)
        >>> report = sparsity_report(layer)
        >>> report["weight"].nonzero, report["weight"].masked
        (4, True)
        >>> report.total.numel, report.total.nonzero
        (10, 6)

    Args:
        source: a module, whose every parameter is a row; or a state_dict (a mapping from names to
            tensors, e.g. loaded from a file), whose rows are the tensors whose last name component
            starts or ends with ``weight`` or ``bias`` and every masked tensor. Buffers such as
            ``running_mean`` are not rows of a state_dict.

    Returns:
        The :class:`SparsityReport`, rows in state_dict order.

    Raises:
        PruningTypeError: ``source`` is neither a module nor a mapping with str keys.
        ShapeMismatchError: a mask's shape differs from its tensor's.
    """
    tensors: Iterator[tuple[str, Tensor, bool]]
    if isinstance(source, nn.Module):
        tensors = _module_tensors(source)
    elif isinstance(source, Mapping):
        tensors = _state_dict_tensors(source)
    else:
        raise PruningTypeError(
            f"sparsity_report reads an nn.Module or a state_dict (a mapping from names to tensors); "
            f"got {type(source).__name__}"
        )
    with torch.no_grad():
        return SparsityReport(tuple(_row(name, tensor, masked) for name, tensor, masked in tensors))
