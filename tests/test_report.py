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

from masksparse import compact
from masksparse import prune as ms_prune
from masksparse._errors import PruningTypeError, ShapeMismatchError
from masksparse.comparison import LayerComparison, ReportComparison, compare_reports
from masksparse.examples import LeNet
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


# MACs: exact numbers on hand-computed layers.


def _macs(layer: nn.Module, *inputs: Tensor) -> tuple[int | None, int | None]:
    row = sparsity_report(layer, inputs)["weight"]
    return row.macs, row.effective_macs


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((4, 5), 4 * 5 * 3), ((2, 7, 5), 2 * 7 * 5 * 3), ((5,), 5 * 3), ((2, 3, 2, 5), 12 * 5 * 3)],
    ids=["N-in", "N-T-in", "unbatched", "4d"],
)
def test_linear_macs_on_any_leading_dims(shape: tuple[int, ...], expected: int) -> None:
    """A Linear(5, 3) costs in * out MACs per position of the leading dimensions."""
    torch.manual_seed(0)
    assert _macs(nn.Linear(5, 3), torch.randn(shape)) == (expected, expected)


def test_conv_macs_with_stride_padding_groups() -> None:
    # Conv2d(4, 6, 3, stride 2, padding 1, groups 2) on 9x9: 5x5 outputs, each of the 6 channels reads
    # 4/2 input channels x 3x3 = 18 MACs, for a batch of 2.
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    assert _macs(conv, torch.randn(2, 4, 9, 9)) == (2 * 6 * 5 * 5 * 18,) * 2
    assert _macs(conv, torch.randn(4, 9, 9)) == (6 * 5 * 5 * 18,) * 2  # unbatched
    depthwise = nn.Conv2d(4, 8, 3, groups=4)
    assert _macs(depthwise, torch.randn(1, 4, 6, 6)) == (8 * 4 * 4 * 9,) * 2


def test_conv1d_and_conv3d_macs() -> None:
    torch.manual_seed(0)
    assert _macs(nn.Conv1d(3, 4, 3, dilation=2), torch.randn(2, 3, 10)) == (2 * 4 * 6 * 3 * 3,) * 2
    assert _macs(nn.Conv3d(2, 2, 2), torch.randn(1, 2, 3, 3, 3)) == (2 * 8 * 2 * 8,) * 2


def test_transposed_conv_macs() -> None:
    # ConvTranspose2d(4, 6, 3, stride 2, groups 2): each of the 4 x 5 x 5 input entries is multiplied by
    # the 6/2 x 3x3 kernel entries of its group.
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    assert _macs(conv, torch.randn(1, 4, 5, 5)) == (4 * 5 * 5 * 3 * 9,) * 2
    conv1d = nn.ConvTranspose1d(2, 3, 4, padding=1)
    assert _macs(conv1d, torch.randn(3, 2, 7)) == (3 * 2 * 7 * 3 * 4,) * 2


@pytest.mark.parametrize("prune", [torch_prune, ms_prune], ids=["torch", "masksparse"])
def test_effective_macs_count_nonzero_weights(prune: Any) -> None:
    """effective MACs = dense MACs x the weight's nonzero fraction, for unstructured and structured masks."""
    torch.manual_seed(0)
    linear, conv = nn.Linear(6, 4), nn.Conv2d(3, 4, 3, padding=1)
    prune.l1_unstructured(linear, "weight", amount=7)
    prune.ln_structured(conv, "weight", amount=0.5, n=2, dim=0)
    assert _macs(linear, torch.randn(3, 6)) == (3 * 24, 3 * 17)
    assert _macs(conv, torch.randn(2, 3, 4, 4)) == (2 * 16 * 4 * 27, 2 * 16 * 2 * 27)


def test_only_conv_and_linear_weights_carry_macs() -> None:
    """Biases, norms, layers that never ran: None; a layer called twice counts twice."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm, self.unused = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.norm(self.fc(self.fc(x)))

    report = sparsity_report(Twice(), torch.randn(3, 4))
    assert report["fc.weight"].macs == 2 * 3 * 16
    unmeasured = ("fc.bias", "norm.weight", "norm.bias", "unused.weight")
    assert [report[name].macs for name in unmeasured] == [None] * 4
    # 20 + 8 + 10 entries, of which LayerNorm's 4 bias entries start at 0
    assert report.total == ReportTotal(numel=38, nonzero=34, macs=96, effective_macs=96)


def test_without_inputs_there_are_no_macs() -> None:
    report = sparsity_report(_net())
    assert all(row.macs is None and row.effective_macs is None for row in report)
    assert (report.total.macs, report.total.effective_macs) == (None, None)
    assert "MACs" not in str(report) and "MACs" not in report.to_markdown()


def test_convnet_macs_and_table(pruned_report: SparsityReport) -> None:
    net = _prune_net(_net(), torch_prune)
    report = sparsity_report(net, torch.randn(2, 3, 8, 8))
    # conv 3->6 3x3 on 8x8: 6x6 outputs; conv 6->4 3x3: 4x4 outputs; Linear 64 -> 10. Batch 2.
    dense = {"0.weight": 2 * 36 * 162, "3.weight": 2 * 16 * 216, "5.weight": 2 * 640}
    assert {row.name: row.macs for row in report if row.macs is not None} == dense
    assert report["1.weight"].macs is None  # BatchNorm
    assert report["0.weight"].effective_macs == 2 * 36 * 108  # 2 of 6 filters pruned
    assert report["5.weight"].effective_macs == 2 * 160
    assert report.total.macs == sum(dense.values())
    assert report.total.effective_macs == 2 * (36 * 108 + 16 * 108 + 160)  # 3 of 6 input channels of 3
    # without MACs the report is what it was; with them two more columns, also in the totals line
    assert [dataclasses.replace(row, macs=None, effective_macs=None) for row in report] == list(pruned_report)
    lines = str(report).splitlines()
    assert lines[0].split()[-3:] == ["MACs", "effective", "MACs"]
    assert lines[-1].split()[-2:] == [f"{report.total.macs:,}", f"{report.total.effective_macs:,}"]
    assert "|   effective MACs |" in report.to_markdown() and "effective MACs</th>" in report._repr_html_()


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "ids": [id(p) for p in model.parameters()],
        "attrs": [{k: v for k, v in vars(m).items() if isinstance(v, Tensor)} for m in model.modules()],
    }


def _same(before: dict[str, Any], model: nn.Module) -> bool:
    after = _snapshot(model)
    same_state = list(before["state"]) == list(after["state"]) and all(
        torch.equal(before["state"][k], after["state"][k]) for k in before["state"]
    )
    same_attrs = all(  # the same tensor objects, e.g. torch's cached module.weight with its autograd graph
        a.keys() == b.keys() and all(a[k] is b[k] for k in a) for a, b in zip(before["attrs"], after["attrs"])
    )
    return same_state and same_attrs and before["modes"] == after["modes"] and before["ids"] == after["ids"]


@pytest.mark.parametrize("prune", [torch_prune, ms_prune], ids=["torch", "masksparse"])
def test_model_is_unchanged_by_a_report(prune: Any) -> None:
    """State_dict, every module's training mode and the pruned tensors' attributes are as before."""
    net = _prune_net(_net(), prune)
    net.train()
    net[1].eval()  # mixed modes must come back as they were
    before = _snapshot(net)
    assert torch.is_grad_enabled()
    sparsity_report(net, torch.randn(4, 3, 8, 8))
    assert _same(before, net) and torch.is_grad_enabled()
    assert all(not module._forward_hooks for module in net.modules())


def test_model_that_raises_is_restored() -> None:
    net = _net().train()
    before = _snapshot(net)
    with pytest.raises(RuntimeError):
        sparsity_report(net, torch.randn(2, 5, 8, 8))  # wrong channel count
    assert _same(before, net)
    assert all(not module._forward_hooks for module in net.modules())


def test_example_inputs_as_tuple_and_keywordless_args() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: Tensor, y: Tensor) -> Tensor:
            return self.fc(input=x + y)  # the layer's input arrives as a keyword

    x = torch.randn(4, 3)
    assert sparsity_report(Pair(), (x, x))["fc.weight"].macs == 4 * 6
    assert sparsity_report(Pair(), [x, x])["fc.weight"].macs == 4 * 6


@pytest.mark.parametrize(
    ("source", "inputs", "match"),
    [
        ({"fc.weight": torch.ones(2, 2)}, torch.ones(1, 2), "pass the nn.Module"),
        (nn.Linear(2, 2), "x", "a tensor, a tuple or list .* or a mapping of keyword arguments"),
        (nn.Linear(2, 2), 3.0, "a tensor, a tuple or list .* or a mapping of keyword arguments"),
    ],
    ids=["state-dict", "str", "float"],
)
def test_wrong_example_inputs_raise(source: Any, inputs: Any, match: str) -> None:
    with pytest.raises(PruningTypeError, match=match):
        sparsity_report(source, inputs)


# Before and after compaction.


def test_lenet_before_and_after_compaction() -> None:
    """ln_structured halves conv2's filters and fc1/fc2's rows; compaction turns that into MACs saved."""
    torch.manual_seed(0)
    model = LeNet()
    for layer in (model.conv2, model.fc1, model.fc2):
        ms_prune.ln_structured(layer, "weight", amount=0.5, n=2, dim=0)
    x = torch.randn(2, 1, 28, 28)
    before = sparsity_report(model, x)
    small = compact(model, x)
    after = sparsity_report(small, x)
    comparison = compare_reports(before, after)
    # per image: conv1 676 outputs x 6 x 9; conv2 121 x 16 x 54; fc1 400 x 120; fc2 120 x 84; fc3 84 x 10
    expected = {
        "conv1": (60, 60, 36504, 36504, 36504, 36504),
        "conv2": (880, 440, 104544, 52272, 52272, 52272),
        "fc1": (48120, 200 * 60 + 60, 48000, 12000, 24000, 12000),
        "fc2": (10164, 60 * 42 + 42, 10080, 2520, 5040, 2520),
        "fc3": (850, 430, 840, 420, 840, 420),
    }
    for name, (p0, p1, m0, m1, e0, e1) in expected.items():
        assert comparison[name] == LayerComparison(name, p0, p1, 2 * m0, 2 * m1, 2 * e0, 2 * e1), name
    assert [layer.name for layer in comparison.layers] == list(expected)
    assert comparison.total == LayerComparison("total", 60074, 15552, 399936, 207432, 237312, 207432)
    assert comparison.total.ratio("macs") == pytest.approx(207432 / 399936)
    assert all(row.effective_macs == row.macs for row in after)  # a compacted model has no zeros left
    lines = str(comparison).splitlines()
    assert lines[-1].split() == [
        "total",
        "60,074",
        "->",
        "15,552",
        "0.259x",
        "399,936",
        "->",
        "207,432",
        "0.519x",
        "237,312",
        "->",
        "207,432",
        "0.874x",
    ]
    assert "| fc1 " in comparison.to_markdown() and "<td>fc1" in comparison._repr_html_()


def test_comparison_shows_missing_layers() -> None:
    before = SparsityReport(
        (
            ReportRow("fc.weight", (4, 2), 8, 4, True, 2, 0, 24, 12),
            ReportRow("bn.weight", (4,), 4, 4, False, 0, None),
        )
    )
    after = SparsityReport(
        (
            ReportRow("fc.weight", (2, 2), 4, 4, False, 0, 0, 12, 12),
            ReportRow("head", (3,), 3, 3, False, 0, None),
        )
    )
    comparison = compare_reports(before, after)
    assert [layer.name for layer in comparison.layers] == ["fc", "bn", ""]
    assert comparison["bn"] == LayerComparison("bn", params_before=4)
    assert comparison[""] == LayerComparison("", params_after=3)
    assert comparison["fc"].ratio("effective_macs") == 1.0 and comparison["bn"].ratio("params") is None
    table = {line.split()[0]: line.split()[1:] for line in str(comparison).splitlines()[2:]}
    assert table["bn"] == ["4", "->", "missing", "-", "->", "missing", "-", "->", "missing"]
    assert table["<model>"][:3] == ["missing", "->", "3"]
    with pytest.raises(KeyError, match="fc, bn"):
        comparison["nope"]


def test_comparison_without_macs_has_only_parameters() -> None:
    comparison = compare_reports(sparsity_report(_net()), sparsity_report(_prune_net(_net(), torch_prune)))
    assert isinstance(comparison, ReportComparison)
    assert str(comparison).splitlines()[0].split() == ["layer", "params", "ratio"]
    assert comparison.total.ratio("params") == 1.0 and comparison.total.macs_before is None


def test_compare_reports_rejects_other_types() -> None:
    with pytest.raises(PruningTypeError, match="after is a dict"):
        compare_reports(sparsity_report(_net()), {})  # type: ignore[arg-type]
