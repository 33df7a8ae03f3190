"""Sparsity reports: how many entries of each weight and bias tensor are zero.

A report reads tensors and masks only. For a pruned tensor it multiplies ``<name>_orig`` by
``<name>_mask`` itself, so the numbers are right even when no forward pass (and so no forward pre-hook)
has run since the last optimizer step, and they are the same for a model and for its state_dict.

Given example inputs, a report also counts multiply-accumulates (MACs) per layer by running the model
once (see :func:`sparsity_report`); :func:`masksparse.comparison.compare_reports` sets two reports side by
side, e.g. of a model before and after compaction.

Rows and the total are frozen dataclasses; what a table shows is defined once, in ``_COLUMNS``, so a new
per-tensor quantity is a new field with a default plus one entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tabulate import SEPARATING_LINE, tabulate
from torch import Tensor, nn

from masksparse._errors import PruningTypeError, ShapeMismatchError
from masksparse._macs import count_uses
from masksparse.distributed.counts import nonzero_counts
from masksparse.distributed.tensors import is_dtensor
from masksparse.prune._reparam import masked_value

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
        macs: multiply-accumulates of the layer owning this weight on the report's example inputs, at
            its current shape (zeros counted); ``None`` without example inputs, for biases and other
            tensors, and for layers that are not convolutions or Linear or did not run.
        effective_macs: the MACs that multiply a nonzero weight entry: ``macs * nonzero / numel``.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    nonzero: int
    sparsity: float = field(init=False)
    masked: bool
    zero_slices_dim0: int | None
    zero_slices_dim1: int | None
    macs: int | None = None
    effective_macs: int | None = None

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
        macs: the sum of the rows' MACs; ``None`` when no row has MACs (no example inputs).
        effective_macs: the sum of the rows' effective MACs; ``None`` like ``macs``.
    """

    numel: int
    nonzero: int
    sparsity: float = field(init=False)
    macs: int | None = None
    effective_macs: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", _fraction_zero(self.numel, self.nonzero))


def _percent(fraction: float) -> str:
    # Two decimals, but never round a few pruned (or a few surviving) entries away to 0% (100%).
    if 0.0 < fraction < 0.00005:
        return "<0.01%"
    if 0.99995 <= fraction < 1.0:
        return ">99.99%"
    return f"{fraction:.2%}"


def _count(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def _slices(row: ReportRow, dim: int) -> str:
    count = row.zero_slices_dim0 if dim == 0 else row.zero_slices_dim1
    return "" if count is None else f"{count:,}/{row.shape[dim]:,}"


@dataclass(frozen=True)
class _Column:
    header: str
    cell: Callable[[ReportRow], str]
    total: Callable[[ReportTotal], str]
    align: Literal["left", "right"]
    macs: bool = False  # shown only when the report has MACs


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
    _Column("MACs", lambda r: _count(r.macs), lambda t: _count(t.macs), "right", macs=True),
    _Column(
        "effective MACs",
        lambda r: _count(r.effective_macs),
        lambda t: _count(t.effective_macs),
        "right",
        True,
    ),
)


def _sum(values: Iterator[int | None]) -> int | None:
    known = [value for value in values if value is not None]
    return sum(known) if known else None


class _Table:
    """Plain text, Markdown and HTML renderings of a table whose last row is a total."""

    def _cells(self, total_label: str) -> tuple[list[str], list[str], list[list[str]]]:
        """Headers, alignments, and the rows with the total last."""
        raise NotImplementedError

    def _table(self, tablefmt: str, total_label: str, separate_total: bool) -> str:
        headers, aligns, body = self._cells(total_label)
        rows: list[object] = list(body)
        if separate_total and len(rows) > 1:
            rows.insert(-1, SEPARATING_LINE)
        return tabulate(
            rows,
            headers=headers,
            tablefmt=tablefmt,
            colalign=aligns,
            disable_numparse=True,  # cells are formatted already ("1,024", "50.00%")
        )

    def __str__(self) -> str:
        table = self._table("simple", "total", separate_total=True)
        return "\n".join(line.rstrip() for line in table.splitlines())  # blank last cells pad lines

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        # Jupyter calls this; tabulate's "html" format escapes the cells.
        return self._table("html", "total", separate_total=False)


@dataclass(frozen=True, repr=False)
class SparsityReport(_Table):
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
        macs = _sum(row.macs for row in self.rows)
        effective = _sum(row.effective_macs for row in self.rows)
        object.__setattr__(self, "total", ReportTotal(numel, nonzero, macs=macs, effective_macs=effective))

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

    def _cells(self, total_label: str) -> tuple[list[str], list[str], list[list[str]]]:
        columns = [column for column in _COLUMNS if not column.macs or self.total.macs is not None]
        body = [[column.cell(row) for column in columns] for row in self.rows]
        body.append([total_label] + [column.total(self.total) for column in columns[1:]])
        return [column.header for column in columns], [column.align for column in columns], body

    def to_markdown(self) -> str:
        """The report as a Markdown (pipe) table whose last row, in bold, is the total.

        Example:
            >>> from masksparse.report import SparsityReport
            >>> SparsityReport(()).to_markdown().splitlines()[-1].startswith("| **total**")
            True
        """
        return self._table("pipe", "**total**", separate_total=False)


def _join(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def _effective(name: str, orig: Tensor, mask: Tensor) -> Tensor:
    if mask.shape != orig.shape:
        raise ShapeMismatchError(
            f"{name}{_MASK} has shape {tuple(mask.shape)} but {name}{_ORIG} has shape {tuple(orig.shape)}; "
            "a pruning mask must have the shape of the tensor it masks"
        )
    # The product the pruned model computes (in orig's dtype, as torch does), not an indexed copy.
    return masked_value(orig.detach(), mask.detach())


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


def _row(name: str, tensor: Tensor, masked: bool, uses: int | None) -> ReportRow:
    if is_dtensor(tensor):  # the whole tensor's figures, summed over the ranks holding its shards
        count, per_slice = nonzero_counts(tensor)
        slices = [None if s is None else int((s == 0).sum()) for s in per_slice]
    else:
        nonzero = tensor != 0
        count = int(nonzero.sum())
        slices = [_zero_slices(nonzero, 0), _zero_slices(nonzero, 1)]
    return ReportRow(
        name=name,
        shape=tuple(tensor.shape),
        numel=tensor.numel(),
        nonzero=count,
        masked=masked,
        zero_slices_dim0=slices[0],
        zero_slices_dim1=slices[1],
        macs=None if uses is None else uses * tensor.numel(),
        effective_macs=None if uses is None else uses * count,
    )


def sparsity_report(
    source: nn.Module | Mapping[str, Tensor],
    example_inputs: Tensor | Sequence[Any] | Mapping[str, Any] | None = None,
) -> SparsityReport:
    """Count the zero entries of every weight and bias tensor of a model or a state_dict, and the MACs.

    A pruned tensor (``<name>_orig`` with a ``<name>_mask``, float or bool, as written by
    ``torch.nn.utils.prune`` or ``masksparse.prune``) is reported under ``<name>`` with the values
    ``orig * mask``, computed here rather than read from the module, so no forward pass is needed.

    With ``example_inputs`` the model runs once on them, in eval mode and without gradients, and each
    convolution (1d, 2d, 3d, grouped, transposed) and Linear layer counts its multiply-accumulates
    (MACs) on the weight's row: ``macs`` at the layer's current shape, zeros included, and
    ``effective_macs`` only for the weight's nonzero entries. A layer called twice counts twice.
    Other layers with a weight (norms, embeddings, attention's packed projections) and any layer whose
    forward did not run (an unused branch, or ``MultiheadAttention.out_proj``, whose weight its parent
    reads directly) get ``None``; biases are not counted. Afterwards the model is as it was: every
    module's training mode, and for torch-pruned modules even the cached ``module.<name>``.

    Example:
        >>> import torch
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
        >>> report = sparsity_report(layer, torch.randn(3, 4))  # 3 rows x 4 inputs x 2 outputs
        >>> report["weight"].macs, report["weight"].effective_macs, report["bias"].macs
        (24, 12, None)

    Args:
        source: a module, whose every parameter is a row; or a state_dict (a mapping from names to
            tensors, e.g. loaded from a file), whose rows are the tensors whose last name component
            starts or ends with ``weight`` or ``bias`` and every masked tensor. Buffers such as
            ``running_mean`` are not rows of a state_dict.
        example_inputs: a tensor, a tuple of the model's positional arguments or a mapping of keyword
            arguments (``model(**inputs)``) to count MACs on (``source`` must then be a module);
            ``None`` counts none.

    Returns:
        The :class:`SparsityReport`, rows in state_dict order.

    Raises:
        PruningTypeError: ``source`` is neither a module nor a mapping with str keys, or
            ``example_inputs`` come with a state_dict or are neither a tensor, a tuple nor a mapping.
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
    uses: dict[str, int] = {}
    if example_inputs is not None:
        if not isinstance(source, nn.Module):
            raise PruningTypeError(
                f"MACs are counted by running a model: pass the nn.Module, not a {type(source).__name__}, "
                "with example_inputs (a state_dict can be reported without them)"
            )
        # keyed by the weight's row name: conv1.weight, also when stored as conv1.weight_orig
        uses = {_join(path, "weight"): n for path, n in count_uses(source, example_inputs).items()}
    with torch.no_grad():
        return SparsityReport(
            tuple(_row(name, tensor, masked, uses.get(name)) for name, tensor, masked in tensors)
        )
