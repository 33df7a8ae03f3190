"""Tests of masksparse.report: exact counts, and one answer for a model, its state_dict and its file."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import Tensor, nn

from masksparse import prune as ms_prune
from masksparse._errors import PruningTypeError, ShapeMismatchError
from masksparse.report import ReportRow, ReportTotal, SparsityReport, sparsity_report


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )


def _prune_net(net: nn.Sequential, prune: Any) -> nn.Sequential:
    """The same pruning of ``net`` with either torch.nn.utils.prune or masksparse.prune."""
    prune.ln_structured(net[0], "weight", amount=2, n=2, dim=0)
    prune.ln_structured(net[3], "weight", amount=3, n=1, dim=1)
    prune.l1_unstructured(net[5], "weight", amount=0.75)
    prune.l1_unstructured(net[5], "bias", amount=3)
    return net


def _by_name(report: SparsityReport) -> dict[str, ReportRow]:
    return {row.name: row for row in report}


# Exact numbers on hand-built tensors.


def test_counts_on_hand_built_linear() -> None:
    """A weight with known zeros gives exact nonzero, sparsity and zero-slice counts."""
    layer = nn.Linear(3, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 2.0], [0.0, 0.0, 3.0], [4.0, 0.0, 5.0]]))
        layer.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 2.0]))
    report = sparsity_report(layer)
    assert [row.name for row in report] == ["weight", "bias"]
    weight, bias = report["weight"], report["bias"]
    assert (weight.shape, weight.numel, weight.nonzero) == ((4, 3), 12, 5)
    assert weight.sparsity == pytest.approx(7 / 12)
    assert (weight.zero_slices_dim0, weight.zero_slices_dim1) == (1, 1)
    assert not weight.masked
    assert (bias.numel, bias.nonzero, bias.sparsity) == (4, 2, 0.5)
    assert (bias.zero_slices_dim0, bias.zero_slices_dim1) == (2, None)
    assert report.total == ReportTotal(numel=16, nonzero=7)
    assert report.total.sparsity == pytest.approx(9 / 16)


def test_zero_dimensional_and_empty_tensors() -> None:
    """A 0-d tensor has no slices; an empty tensor has sparsity 0 and its empty slices count as zero."""
    state = {
        "scale.weight": torch.tensor(0.0),
        "empty.weight": torch.zeros(3, 0),
        "none.bias": torch.zeros(0),
    }
    rows = _by_name(sparsity_report(state))
    scalar = rows["scale.weight"]
    assert (scalar.shape, scalar.numel, scalar.nonzero, scalar.sparsity) == ((), 1, 0, 1.0)
    assert (scalar.zero_slices_dim0, scalar.zero_slices_dim1) == (None, None)
    empty = rows["empty.weight"]
    assert (empty.numel, empty.nonzero, empty.sparsity) == (0, 0, 0.0)
    assert (empty.zero_slices_dim0, empty.zero_slices_dim1) == (3, 0)
    assert (rows["none.bias"].sparsity, rows["none.bias"].zero_slices_dim0) == (0.0, 0)
    assert sparsity_report({}).total == ReportTotal(numel=0, nonzero=0)
    assert sparsity_report({}).total.sparsity == 0.0


def test_masked_state_dict_float_and_bool_masks_agree() -> None:
    """orig * mask is what is counted, whatever the mask dtype; the mask itself is not a row."""
    orig = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    float_report = sparsity_report({"fc.weight_orig": orig, "fc.weight_mask": mask})
    bool_report = sparsity_report({"fc.weight_orig": orig, "fc.weight_mask": mask.bool()})
    assert float_report == bool_report
    (row,) = float_report.rows
    assert (row.name, row.numel, row.nonzero, row.masked) == ("fc.weight", 4, 2, True)
    assert (row.zero_slices_dim0, row.zero_slices_dim1) == (0, 1)


def test_state_dict_rows_are_weights_biases_and_masked_tensors() -> None:
    """Buffers are not rows; names ending or starting with weight/bias and any masked tensor are."""
    state = {
        "bn.weight": torch.ones(2),
        "bn.bias": torch.zeros(2),
        "bn.running_mean": torch.zeros(2),
        "bn.running_var": torch.ones(2),
        "bn.num_batches_tracked": torch.tensor(0),
        "attn.in_proj_weight": torch.ones(6, 2),
        "rnn.weight_ih_l0": torch.ones(4, 2),
        "pos_embed_orig": torch.ones(1, 3),
        "pos_embed_mask": torch.tensor([[True, False, True]]),
        "stray_mask": torch.ones(2),
        "head.weight_orig": torch.ones(2),  # no mask: reported under its own key
        "extra._extra_state": "not a tensor",
    }
    rows = _by_name(sparsity_report(state))  # type: ignore[arg-type]
    assert list(rows) == [
        "bn.weight",
        "bn.bias",
        "attn.in_proj_weight",
        "rnn.weight_ih_l0",
        "pos_embed",
        "head.weight_orig",
    ]
    assert rows["pos_embed"].masked and rows["pos_embed"].nonzero == 2
    assert not rows["head.weight_orig"].masked


def test_module_rows_are_every_parameter_but_no_buffer() -> None:
    net = _net()
    net.register_parameter("temperature", nn.Parameter(torch.ones(())))
    names = [row.name for row in sparsity_report(net)]
    assert names == [name for name, _ in net.named_parameters()]
    assert "1.running_mean" not in names


def test_unpruned_model_has_zero_sparsity() -> None:
    net = _net()
    with torch.no_grad():
        net.get_parameter("1.bias").fill_(0.5)  # BatchNorm starts with a zero bias, which is genuinely sparse
    report = sparsity_report(net)
    assert report.total.sparsity == 0.0
    assert report.total.numel == sum(p.numel() for p in net.parameters())
    assert all(row.nonzero == row.numel and not row.masked for row in report)
    assert all(row.zero_slices_dim0 == 0 for row in report)


# Agreement: a pruned model, its state_dict and its file give one report.


def test_torch_pruned_model_exact_counts() -> None:
    net = _prune_net(_net(), torch_prune)
    rows = _by_name(sparsity_report(net))
    assert rows["0.weight"].masked and rows["0.weight"].nonzero == 4 * 3 * 3 * 3
    assert (rows["0.weight"].zero_slices_dim0, rows["0.weight"].zero_slices_dim1) == (2, 0)
    assert (rows["3.weight"].zero_slices_dim0, rows["3.weight"].zero_slices_dim1) == (0, 3)
    assert rows["3.weight"].nonzero == 4 * 3 * 3 * 3
    assert rows["5.weight"].nonzero == 160 and rows["5.weight"].sparsity == 0.75
    assert rows["5.bias"].nonzero == 7 and rows["5.bias"].zero_slices_dim0 == 3
    assert not rows["0.bias"].masked


def test_rows_match_torchs_own_effective_tensors() -> None:
    """Each row counts what torch's forward pre-hook writes into module.<name>, the oracle."""
    net = _prune_net(_net(), torch_prune)
    report = sparsity_report(net)
    net(torch.zeros(1, 3, 8, 8))
    for row in report:
        prefix, _, attr = row.name.rpartition(".")
        tensor = getattr(net.get_submodule(prefix), attr)
        assert (row.shape, row.nonzero) == (tuple(tensor.shape), int((tensor != 0).sum())), row.name


def _save_and_load(state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    torch.save(state, path)
    loaded: dict[str, Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return loaded


def test_model_state_dict_and_file_agree(tmp_path: Path) -> None:
    net = _prune_net(_net(), torch_prune)
    report = sparsity_report(net)
    assert sparsity_report(net.state_dict()) == report
    assert sparsity_report(_save_and_load(net.state_dict(), tmp_path / "net.pt")) == report
    assert report.total.nonzero < report.total.numel


def test_masksparse_pruned_model_agrees_with_torch(tmp_path: Path) -> None:
    """Bool masks (masksparse) and float masks (torch) give one report, from models, state_dicts and files."""
    torch_net = _prune_net(_net(), torch_prune)
    ours = _prune_net(_net(), ms_prune)
    assert ours.state_dict()["0.weight_mask"].dtype == torch.bool
    expected = sparsity_report(torch_net)
    assert sparsity_report(ours) == expected
    assert sparsity_report(ours.state_dict()) == expected
    assert sparsity_report(_save_and_load(ours.state_dict(), tmp_path / "ours.pt")) == expected


@pytest.mark.parametrize("prune", [torch_prune, ms_prune], ids=["torch", "masksparse"])
def test_report_reads_orig_times_mask_without_a_forward_pass(prune: Any) -> None:
    """After an in-place change of weight_orig (an optimizer step), the report counts orig * mask."""
    layer = nn.Linear(4, 3)
    prune.l1_unstructured(layer, "weight", amount=5)
    with torch.no_grad():
        layer.get_parameter("weight_orig").fill_(2.0)
    row = sparsity_report(layer)["weight"]
    assert row.nonzero == int(layer.get_buffer("weight_mask").sum()) == 7


# Rendering.


@pytest.fixture
def pruned_report() -> SparsityReport:
    return sparsity_report(_prune_net(_net(), torch_prune))


def test_table_ends_with_totals_line(pruned_report: SparsityReport) -> None:
    lines = str(pruned_report).splitlines()
    total = pruned_report.total
    assert lines[-1].split() == ["total", f"{total.numel:,}", f"{total.nonzero:,}", f"{total.sparsity:.2%}"]
    assert set(lines[-2]) == {"-", " "}  # a rule sets the total apart
    assert all(line == line.rstrip() for line in lines)
    assert len(lines) == len(pruned_report) + 4
    assert repr(pruned_report) == str(pruned_report)


def test_markdown_and_html_name_every_tensor(pruned_report: SparsityReport) -> None:
    markdown, html = pruned_report.to_markdown(), pruned_report._repr_html_()
    for row in pruned_report:
        assert f"| {row.name} " in markdown
        assert f"<td>{row.name}" in html
    assert markdown.splitlines()[-1].startswith("| **total**")
    assert "75.00%" in markdown and "75.00%" in html
    assert html.startswith("<table>") and "total" in html


def test_table_cells() -> None:
    report = SparsityReport((ReportRow("w", (4000, 2), 8000, 7999, True, 0, 0),))
    line = str(report).splitlines()[2].split()
    assert line == ["w", "(4000,", "2)", "8,000", "7,999", "0.01%", "yes", "0/4,000", "0/2"]
    tiny = SparsityReport((ReportRow("w", (100_000,), 100_000, 99_999, False, 1, None),))
    assert "<0.01%" in str(tiny)
    almost = SparsityReport((ReportRow("w", (100_000,), 100_000, 1, False, 99_999, None),))
    assert ">99.99%" in str(almost) and "100.00%" not in str(almost)


# Data model and errors.


def test_rows_and_report_are_frozen(pruned_report: SparsityReport) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        pruned_report.rows[0].nonzero = 0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        pruned_report.rows = ()  # type: ignore[misc]
    assert len(pruned_report) == len(list(pruned_report)) == 8


def test_unknown_name_raises_key_error(pruned_report: SparsityReport) -> None:
    with pytest.raises(KeyError, match="0.weight"):
        pruned_report["nope"]


@pytest.mark.parametrize(
    "source", [[torch.ones(2)], torch.ones(2), "model.pt"], ids=["list", "tensor", "path"]
)
def test_wrong_source_type_raises(source: object) -> None:
    with pytest.raises(PruningTypeError, match="nn.Module or a state_dict"):
        sparsity_report(source)  # type: ignore[arg-type]


def test_non_str_key_raises() -> None:
    with pytest.raises(TypeError, match="str keys"):
        sparsity_report({0: torch.ones(2)})  # type: ignore[dict-item]


@pytest.mark.parametrize("make_mask", [lambda: torch.ones(3), lambda: torch.ones(2, 3, dtype=torch.bool)])
def test_mask_of_wrong_shape_raises(make_mask: Callable[[], Tensor]) -> None:
    state = {"fc.weight_orig": torch.ones(3, 2), "fc.weight_mask": make_mask()}
    expected = r"fc\.weight_mask has shape .* fc\.weight_orig has shape \(3, 2\)"
    with pytest.raises(ShapeMismatchError, match=expected):
        sparsity_report(state)
