"""The Hugging Face zoo of tests/hf_models.py: ``prune_channels(model, inputs, 0.5)``, then ``compact``;
the compacted model must compute what the masked one does (every output leaf) and keep at most a bound
of its parameters (0.75, or the looser bound of a named exception). ``pytest -m "not hf_zoo"`` keeps the
fast subset. benchmarks/hf_zoo.py prints the same as a table."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from masksparse import compact, prune_channels
from masksparse.compact import relative_error
from masksparse.compact.plan import compaction_plans
from tests import hf_models

pytest.importorskip("transformers")

_FAST = ("bert", "gpt2", "llama", "t5", "vit", "whisper")
_BOUND = 0.75
# Looser bounds, each with why the model keeps more; tighten as compaction learns the module.
_BOUNDS = {}
_TOL = 1e-4  # float32 rounding of sums over fewer (all zero) terms


def _leaves(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _leaves(v)]
    if hasattr(out, "to_legacy_cache"):
        return _leaves(out.to_legacy_cache())
    return []


def _zoo() -> list[object]:
    return [n if n in _FAST else pytest.param(n, marks=pytest.mark.hf_zoo) for n in hf_models.NAMES]


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def _check_config(small: nn.Module) -> None:
    """Where every attention module / MLP of the compacted model has one size, the config states it, or
    the plan says why no config value can (``applied=False`` with a reason)."""
    cfg = getattr(small, "config", None)
    if cfg is None:
        return
    left = {c.name: c for c in compaction_plans(small)[0].config if not c.applied}
    owners = [
        m for m in small.modules() if hasattr(m, "attention_head_size") and hasattr(m, "num_attention_heads")
    ]
    # Llama-style attention infers its heads in forward: they are its projections' widths / head_dim
    rotary = [
        m for m in small.modules() if hasattr(m, "k_proj") and isinstance(getattr(m, "head_dim", None), int)
    ]
    counts = {
        "num_attention_heads": _uniform(
            [m.num_attention_heads for m in owners] or [m.q_proj.out_features // m.head_dim for m in rotary]
        ),
        "num_key_value_heads": _uniform([m.k_proj.out_features // m.head_dim for m in rotary]),
    }
    for entry, count in counts.items():
        if count is not None and isinstance(cfg.to_dict().get(entry), int):  # not an alias (BART's)
            if entry in left:
                assert left[entry].reason
            else:
                assert getattr(cfg, entry) == count, (entry, getattr(cfg, entry), count)
    # ".up_proj", not a fused gate_up_proj (twice intermediate_size wide)
    ups = [m.out_features for n, m in small.named_modules() if n.endswith(("intermediate.dense", ".up_proj"))]
    if _uniform(ups) is not None and isinstance(getattr(cfg, "intermediate_size", None), int):
        assert cfg.intermediate_size == ups[0]


@pytest.mark.parametrize("name", _zoo())
def test_hf_model_compacts_exactly(name: str) -> None:
    model = hf_models.build(name)
    x = hf_models.inputs(name)
    before = sum(p.numel() for p in model.parameters())
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    with torch.no_grad():
        ref, got = _leaves(model(**x)), _leaves(small(**x))
    assert len(ref) == len(got) > 0
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        if a.is_floating_point():
            assert relative_error(a, b) <= _TOL
    ratio = sum(p.numel() for p in small.parameters()) / before
    bound = _BOUNDS.get(name, (_BOUND, ""))[0]
    assert ratio <= bound, f"{name} keeps {ratio:.3f} of its parameters (bound {bound})"
    _check_config(small)
    _check_head_sizes(small)


def _check_head_sizes(small: nn.Module) -> None:
    """An attention module that stores heads x head size (BERT's and MobileViT's ``all_head_size``, T5's
    ``inner_dim``) states the width its projections have after the cut."""
    for path, m in small.named_modules():
        heads = next((getattr(m, k) for k in ("num_attention_heads", "n_heads") if hasattr(m, k)), None)
        size = next(
            (getattr(m, k) for k in ("attention_head_size", "key_value_proj_dim") if hasattr(m, k)), None
        )
        for k in ("all_head_size", "inner_dim"):
            if isinstance(heads, int) and isinstance(size, int) and isinstance(getattr(m, k, None), int):
                assert getattr(m, k) == heads * size, (path, k, getattr(m, k), heads, size)


def test_hf_conv1d_stack_compacts_exactly() -> None:
    """transformers' Conv1D (weight (in, out), ``nf`` outputs) is cut like a transposed Linear."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 6), nn.ReLU(), Conv1D(10, 12), nn.ReLU(), Conv1D(3, 10)).eval()
    x = torch.randn(2, 5, 6)
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    with torch.no_grad():
        assert relative_error(model(x), small(x)) <= _TOL
    first, second, last = small[0], small[2], small[4]
    assert (first.nf, second.nf, last.nf) == (6, 5, 3)
    assert first.weight.shape == (6, 6) and second.weight.shape == (6, 5) and last.weight.shape == (5, 3)
    assert second.weight.shape[0] == first.nf and last.weight.shape[0] == second.nf
