"""Cached reads of masked tensors while a model is recorded, and the faster cut of masks."""

from __future__ import annotations

import torch
from torch import nn

from masksparse import prune
from masksparse.compact.apply import _select
from masksparse.graph.record import record
from masksparse.prune._reparam import reads_cached


def _pruned_attention() -> nn.MultiheadAttention:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    prune.l1_unstructured(attn, "in_proj_weight", 0.5)
    prune.l1_unstructured(attn.out_proj, "weight", 0.5)
    return attn


def test_reads_cached_gives_one_tensor_until_orig_or_mask_change() -> None:
    """Within ``reads_cached`` a masked tensor is computed once; writing to ``_orig`` or the mask (a
    new version) computes it again, and outside every read is a fresh product, as before."""
    lin = nn.Linear(4, 3)
    prune.random_unstructured(lin, "weight", 0.5)
    assert lin.weight is not lin.weight
    with reads_cached():
        first = lin.weight
        assert lin.weight is first
        with torch.no_grad():
            lin.weight_orig.add_(1.0)
        second = lin.weight
        assert second is not first
        torch.testing.assert_close(second, lin.weight_orig.detach() * lin.weight_mask, rtol=0, atol=0)
        lin.weight_mask.zero_()
        assert lin.weight is not second
        assert not lin.weight.any()
        with reads_cached():  # nested: the outer cache holds
            assert lin.weight is lin.weight
    assert lin.weight is not lin.weight


def test_record_computes_each_masked_tensor_once() -> None:
    """nn.MultiheadAttention reads ``in_proj_weight`` more than once per forward; the recorded run
    computes each pruned tensor once, off the record (one static value holding the product, no node
    reading a mask), and its output is the plain forward's."""
    attn = _pruned_attention()
    x = torch.randn(2, 5, 8)
    trace = record(attn, (x, x, x))
    products = [v for v in trace.values if v.source is not None and v.source[1].endswith("_orig")]
    assert sorted(v.source for v in products) == [("", "in_proj_weight_orig"), ("out_proj", "weight_orig")]
    for v in products:
        module = attn.get_submodule(v.source[0])
        name = v.source[1].removesuffix("_orig")
        assert v.tensor is not None
        expected = getattr(module, name + "_orig").detach() * getattr(module, name + "_mask")
        torch.testing.assert_close(v.tensor, expected, rtol=0, atol=0)
    assert not [n for n in trace.nodes for v in n.inputs if v.source and v.source[1].endswith("_mask")]
    with torch.no_grad():
        expected = attn(x, x, x)[0]
    torch.testing.assert_close(trace.output_tensors[0], expected, rtol=0, atol=0)


def test_select_equals_index_select_for_masks() -> None:
    """The gather path for bool tensors gives index_select's result, on every dim of 2-D and 4-D."""
    torch.manual_seed(0)
    for shape in [(6, 5), (4, 6, 3, 3), (3, 7, 1, 1)]:
        for t in (torch.rand(shape) > 0.5, torch.randn(shape)):
            for dim in range(len(shape)):
                index = torch.tensor([i for i in range(shape[dim]) if i % 2 == 0])
                got = _select(t, dim, index)
                assert got.is_contiguous()
                assert torch.equal(got, t.index_select(dim, index))
