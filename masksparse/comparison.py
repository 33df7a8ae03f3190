"""Two sparsity reports side by side: parameters and MACs of every layer before and after, e.g. of a model
before and after compaction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from masksparse._errors import PruningTypeError
from masksparse.report import ReportRow, SparsityReport, _sum, _Table

__all__ = ["LayerComparison", "ReportComparison", "compare_reports"]


_Quantity = Literal["params", "macs", "effective_macs"]


@dataclass(frozen=True)
class LayerComparison:
    """One layer (or the total) in two reports: parameters and MACs before and after.

    Example:
        >>> from masksparse.comparison import LayerComparison
        >>> layer = LayerComparison("fc", params_before=40, params_after=10)
        >>> layer.ratio("params"), layer.ratio("macs")
        (0.25, None)

    Attributes:
        name: the module path (``""`` for the model's own parameters), or ``"total"``.
        params_before: entries of the layer's reported tensors before (zeros included); ``None`` when
            the layer is missing from that report. ``params_after`` likewise.
        macs_before: the layer's MACs before; ``None`` when missing or not counted. ``macs_after``
            likewise, and ``effective_macs_before`` / ``effective_macs_after`` for effective MACs.
    """

    name: str
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    effective_macs_before: int | None = None
    effective_macs_after: int | None = None

    def ratio(self, quantity: _Quantity) -> float | None:
        """``after / before`` of ``"params"``, ``"macs"`` or ``"effective_macs"``; None if either is
        unknown or before is 0."""
        before, after = getattr(self, f"{quantity}_before"), getattr(self, f"{quantity}_after")
        return None if before is None or after is None or before == 0 else after / before


def _change(layer: LayerComparison, quantity: _Quantity) -> str:
    values = [getattr(layer, f"{quantity}_{side}") for side in ("before", "after")]
    present = [layer.params_before is not None, layer.params_after is not None]
    if values == [None, None] and all(present):
        return ""  # a layer without MACs (a norm, a bias-only module)
    sides = (f"{v:,}" if v is not None else "-" if p else "missing" for v, p in zip(values, present))
    return " -> ".join(sides)


def _ratio(layer: LayerComparison, quantity: _Quantity) -> str:
    ratio = layer.ratio(quantity)
    return "" if ratio is None else f"{ratio:.3g}x"


_Cell = Callable[[LayerComparison], str]


def _quantity_columns(header: str, quantity: _Quantity) -> list[tuple[str, _Cell]]:
    return [(header, lambda c: _change(c, quantity)), ("ratio", lambda c: _ratio(c, quantity))]


def _comparison_columns(macs: bool) -> list[tuple[str, _Cell]]:
    columns = [("layer", lambda c: c.name or "<model>"), *_quantity_columns("params", "params")]
    if macs:
        columns += _quantity_columns("MACs", "macs") + _quantity_columns("effective MACs", "effective_macs")
    return columns


@dataclass(frozen=True, repr=False)
class ReportComparison(_Table):
    """Two sparsity reports side by side, layer by layer and in total; prints as a table.

    Build one with :func:`compare_reports`. ``str()`` gives a plain-text table, :meth:`to_markdown` a
    Markdown one, and Jupyter shows HTML. MACs columns appear when either report has MACs.

    Example:
        >>> from masksparse.comparison import compare_reports
        >>> from masksparse.report import ReportRow, SparsityReport
        >>> before = SparsityReport((ReportRow("fc.weight", (4, 2), 8, 4, True, 2, 0, 24, 12),))
        >>> after = SparsityReport((ReportRow("fc.weight", (2, 2), 4, 4, False, 0, 0, 12, 12),))
        >>> print(compare_reports(before, after))
        layer      params    ratio      MACs    ratio    effective MACs    ratio
        -------  --------  -------  --------  -------  ----------------  -------
        fc         8 -> 4     0.5x  24 -> 12     0.5x          12 -> 12       1x
        -------  --------  -------  --------  -------  ----------------  -------
        total      8 -> 4     0.5x  24 -> 12     0.5x          12 -> 12       1x

    Attributes:
        layers: one :class:`LayerComparison` per layer, in the first report's order, then the layers
            only the second report has.
        total: the :class:`LayerComparison` of the reports' totals, named ``"total"``.
    """

    layers: tuple[LayerComparison, ...]
    total: LayerComparison

    def __getitem__(self, name: str) -> LayerComparison:
        """The comparison of the layer at module path ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(
            f"no layer {name!r} in this comparison; its layers are: "
            + ", ".join(layer.name for layer in self.layers)
        )

    def _cells(self, total_label: str) -> tuple[list[str], list[str], list[list[str]]]:
        columns = _comparison_columns(self.total.macs_before is not None or self.total.macs_after is not None)
        body = [[cell(layer) for _, cell in columns] for layer in self.layers]
        body.append([total_label] + [cell(self.total) for _, cell in columns[1:]])
        return [header for header, _ in columns], ["left"] + ["right"] * (len(columns) - 1), body

    def to_markdown(self) -> str:
        """The comparison as a Markdown (pipe) table whose last row, in bold, is the total.

        Example:
            >>> from masksparse.comparison import compare_reports
            >>> from masksparse.report import SparsityReport
            >>> compare_reports(SparsityReport(()), SparsityReport(())).to_markdown().splitlines()[0]
            '| layer   |   params |   ratio |'
        """
        return self._table("pipe", "**total**", separate_total=False)


def _layers(report: SparsityReport) -> dict[str, tuple[int, int | None, int | None]]:
    """Module path -> (parameters, MACs, effective MACs) summed over the path's rows."""
    rows: dict[str, list[ReportRow]] = {}
    for row in report.rows:
        rows.setdefault(row.name.rpartition(".")[0], []).append(row)
    return {
        path: (
            sum(row.numel for row in group),
            _sum(row.macs for row in group),
            _sum(row.effective_macs for row in group),
        )
        for path, group in rows.items()
    }


def compare_reports(before: SparsityReport, after: SparsityReport) -> ReportComparison:
    """Parameters and MACs (dense and effective) of two reports side by side, with ratios.

    Meant for a model before and after :func:`masksparse.compact` (report both on the same example
    inputs), but any two reports compare: layers are matched by module path, and a layer that only one
    report has shows ``missing`` on the other side.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse import compact, prune
        >>> from masksparse.comparison import compare_reports
        >>> from masksparse.report import sparsity_report
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> _ = prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
        >>> x = torch.randn(5, 8)
        >>> comparison = compare_reports(sparsity_report(model, x), sparsity_report(compact(model, x), x))
        >>> comparison["0"].macs_before, comparison["0"].macs_after, comparison["0"].effective_macs_before
        (240, 120, 120)
        >>> comparison.total.params_before, comparison.total.params_after
        (68, 35)

    Args:
        before: the first report, e.g. of the masked model.
        after: the second report, e.g. of the compacted model.

    Returns:
        The :class:`ReportComparison`; ``print`` it, or read its numbers.

    Raises:
        PruningTypeError: either argument is not a :class:`~masksparse.report.SparsityReport`.
    """
    for label, report in (("before", before), ("after", after)):
        if not isinstance(report, SparsityReport):
            raise PruningTypeError(
                f"compare_reports compares two SparsityReports (from sparsity_report); {label} is a "
                f"{type(report).__name__}"
            )
    old, new = _layers(before), _layers(after)
    missing = (None, None, None)
    layers = tuple(
        LayerComparison(
            path, *(value for pair in zip(old.get(path, missing), new.get(path, missing)) for value in pair)
        )
        for path in [*old, *(path for path in new if path not in old)]
    )
    b, a = before.total, after.total
    total = LayerComparison("total", b.numel, a.numel, b.macs, a.macs, b.effective_macs, a.effective_macs)
    return ReportComparison(layers, total)
