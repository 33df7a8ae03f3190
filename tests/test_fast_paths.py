"""The fast paths of the analysis and of compaction give what the slow, obvious computations give: the copy
cut while copying, the constants and zeros of static tensors, the conv constants, the joined labels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from masksparse import prune
from masksparse.compact import apply as compact_module
from masksparse.compact import compact, plan_compaction
from masksparse.graph import groups as graph_groups
from masksparse.graph import trace
from masksparse.graph.record import Node, Value
from masksparse.graph.rules import States
from tests.models import assert_same, randomise_bn
from tests.test_heads import X_TOKENS, ViTBlock


def _cut_copy_model() -> nn.Sequential:
    """Masked conv channels that still emit relu(BN shift) fold into a bias-less 1x1 conv (a created
    bias), others die; a masked Linear row with a live bias folds into the classifier."""
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 16, 10), nn.ReLU(), nn.Linear(10, 5),
    ))  # fmt: skip
    with torch.no_grad():
        model[1].bias.fill_(2.0)
    rows = torch.ones(8, dtype=torch.bool)
    rows[[1, 4]] = False
    prune.custom_from_mask(model[0], "weight", rows[:, None, None, None].expand(8, 3, 3, 3))
    prune.custom_from_mask(model[3], "weight", (torch.arange(6) != 2)[:, None, None, None].expand(6, 8, 1, 1))
    prune.custom_from_mask(model[6], "weight", (torch.arange(10) % 3 != 0)[:, None].expand(10, 96))
    return model


def test_the_copy_cut_while_copying_equals_slicing_in_place() -> None:
    """Invariant: compact's copy, cut while copying (folds read from the user's uncut weights), is the
    model that slicing the same plan in place makes; the user's model and its tensors stay as they were."""
    model, x = _cut_copy_model(), torch.randn(2, 3, 6, 6)
    plan = plan_compaction(model, x)
    assert {f.module for f in plan.folds} == {"3", "8"} and any(f.creates_bias for f in plan.folds)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    small = compact(model, x)
    assert {k: id(v) for k, v in model.state_dict(keep_vars=True).items()} == tensors
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    in_place = compact(copy.deepcopy(model), x, inplace=True)  # copies to verify, then slices in place
    assert str(small) == str(in_place)
    expected = in_place.state_dict()
    assert list(small.state_dict()) == list(expected)
    assert all(torch.equal(v, expected[k]) for k, v in small.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in small.parameters())
    assert_same(model, small, x)


def test_a_tensor_two_cut_names_share_is_copied_whole() -> None:
    tied = nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 3))
    tied[1].weight = tied[0].weight
    plan = compact_module.Plan(
        tuple(compact_module.TensorCut(p, "weight", 0, 3, (0, 2)) for p in ("0", "1")), (), (), 0, 0
    )
    assert compact_module._cut_tensors(tied, plan) is None
    copied, cut = compact_module._copy(tied, plan)
    assert not cut and copied[0].weight is copied[1].weight and copied[0].weight.shape == (3, 4)


def _old_slice_constants(t: torch.Tensor, dim: int) -> np.ndarray:
    """Per index along ``dim``: the value its whole slice holds, NaN if none (slice by slice)."""
    out = np.full(t.shape[dim], np.nan)
    for i in range(t.shape[dim]):
        s = t.select(dim, i).reshape(-1).double()
        if s.numel() and bool((s == s[0]).all()):
            out[i] = float(s[0])
    return out


def test_constants_and_zeros_of_static_tensors_in_any_layout() -> None:
    """States reads constants in memory order and zeros off one non-zero map: the same answers as a
    slice-by-slice scan, for transposed views, NaN, -0.0, bool and empty tensors."""
    w = torch.randn(6, 5, 3, 3)
    w[1], w[:, 2], w[3], w[:, 4] = 0.0, 0.0, 0.5, -0.0
    w[4, 0, 0, 0] = float("nan")
    cases = [w, w.transpose(0, 1), w[:, :, 0, 0].t(), w.flatten(1), w != 0, torch.zeros(3, 0, 2), w[0, 0, 0]]
    for t in cases:
        v = Value(0, tuple(t.shape), t.dtype, True, tensor=t)
        for d in range(t.ndim):
            expected = _old_slice_constants(t, d)
            np.testing.assert_array_equal(States().get(v, d), expected)
            np.testing.assert_array_equal(States().zero(v, d), expected == 0)
        if t.ndim >= 2 and t.numel():
            reads = t.reshape(t.shape[0], t.shape[1], -1).ne(0).any(2)
            np.testing.assert_array_equal(States().nonzero(v), reads.numpy())


def _old_conv_constants(node: Node, states: States) -> np.ndarray:
    """The conv transfer as a per-(row, input) min/max scan: the oracle of its fast path."""
    x, w, b, groups = node.args[0], node.args[1], node.args[2], node.args[8]
    s = states.get(x, 1)
    n_out, per_group = w.shape[0], w.shape[1]
    t = w.tensor.detach().reshape(n_out, per_group, -1)
    nz = ~((t.amin(2) == 0) & (t.amax(2) == 0)).numpy()
    s_o = s.reshape(groups, per_group)[np.arange(n_out) // (n_out // groups)]
    need = s_o == 0 if any(p != 0 for p in node.args[4]) else np.isfinite(s_o)
    ok = np.all(~nz | need, axis=1)
    use = nz & np.isfinite(s_o) & (s_o != 0)
    contrib = np.where(use, t.sum(-1).double().numpy() * np.nan_to_num(s_o), 0.0).sum(1)
    bias = states.get(b, 0) if isinstance(b, Value) else np.zeros(n_out)
    return np.where(ok, bias + contrib, np.nan)


@pytest.mark.parametrize("masked", [False, True])
def test_conv_constants_match_a_full_scan(masked: bool) -> None:
    """Unmasked (no input channel is a constant: the fast path) and masked (constants flow into plain,
    padded and grouped convs), every conv's output constants are those of a full min/max scan."""
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, groups=2),
    ))  # fmt: skip
    if masked:
        rows = (torch.arange(8) % 3 != 1)[:, None, None, None]
        prune.custom_from_mask(model[0], "weight", rows.expand(8, 3, 3, 3))
        columns = (torch.arange(8) != 5)[None, :, None, None]
        prune.custom_from_mask(model[3], "weight", rows.expand(8, 8, 1, 1) & columns)
    graph = trace(model, torch.randn(2, 3, 8, 8))
    convs = [n for n in graph.trace.nodes if n.op.overloadpacket is torch.ops.aten.convolution]
    assert len(convs) == 4
    known = 0
    for node in convs:
        got = graph.states.get(node.outputs[0], 1)
        np.testing.assert_array_equal(got, _old_conv_constants(node, graph.states))
        known += int(np.isfinite(got).sum())
    assert (known > 0) == masked


def test_labels_joined_after_the_reshape_choices_are_the_components_of_every_tie() -> None:
    torch.manual_seed(0)
    graph = trace(ViTBlock().eval(), X_TOKENS)
    assert any(rel.splits for rel in graph.relations)
    every = graph_groups._labels(graph, [(rel, []) for rel in graph.relations])
    np.testing.assert_array_equal(graph.labels, every)
