"""The timm zoo of tests/timm_models.py: ``prune_channels(model, x, 0.5)``, then ``compact``; the
compacted model must compute what the masked one does and keep at most a bound of its parameters (0.75,
or the looser bound of a named exception, with the reason). The fast subset runs in ``make test``;
``pytest -m timm_zoo tests/test_timm_zoo.py`` runs every family (about an hour on 2 cores).
benchmarks/timm_zoo.py prints the same as a table, beside Torch-Pruning."""

from __future__ import annotations

import pytest
import torch

from masksparse import compact, prune_channels
from masksparse.compact import relative_error
from tests import timm_models
from tests.models import randomise_bn

pytest.importorskip("timm")

# timm's own test models (tiny, each a real architecture of its family) and two small attention models.
_FAST = (
    "byobnet",
    "convnext",
    "efficientnet",
    "mambaout",
    "maxxvit",
    "nfnet",
    "resnet",
    "vision_transformer",
)
_BOUND = 0.75
_TOL = 1e-4
# Looser bounds, each with why the model keeps more; tighten as compaction learns the module.
_BOUNDS: dict[str, tuple[float, str]] = {
    "nfnet": (0.97, "ScaledStdConv2d standardises each filter over all its inputs: its inputs are kept"),
    # measured with benchmarks/timm_zoo.py; `-v` lists the units each plan kept and why
    "coat": (0.77, "units kept where the compacted model could not run without them"),
    "csatv2": (0.83, "attention heads reshaped with the full width C are kept"),
    "deepseek_vit": (1.0, "nothing prunable outside normalised widths"),
    "efficientformer_v2": (0.80, "its attention token mixers keep their units"),
    "gcvit": (0.76, "RelPosBias reshapes its table with the tuple bias_shape: those heads are kept"),
    "mlp_mixer": (1.0, "nothing prunable outside normalised widths"),
    "mobilenetv5": (0.95, "units kept where the compacted model could not run without them"),
    "pvt_v2": (0.78, "units kept where the compacted model could not run without them"),
    "sequencer": (0.77, "the LSTM token mixers keep their units"),
    "tiny_vit": (0.86, "units kept where the compacted model could not run without them"),
    "vision_transformer_relpos": (0.81, "units kept where the compacted model could not run without them"),
}


def _zoo() -> list[object]:
    return [f if f in _FAST else pytest.param(f, marks=pytest.mark.timm_zoo) for f in timm_models.FAMILIES]


@pytest.mark.parametrize("family", _zoo())
def test_timm_family_compacts_exactly(family: str) -> None:
    model, x = timm_models.build(timm_models.FAMILIES[family][0])
    randomise_bn(model)
    before = sum(p.numel() for p in model.parameters())
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    with torch.no_grad():
        ref, got = model(x), small(x)
    assert ref.shape == got.shape
    assert relative_error(ref, got) <= _TOL
    ratio = sum(p.numel() for p in small.parameters()) / before
    bound = _BOUNDS.get(family, (_BOUND, ""))[0]
    assert ratio <= bound, f"{family} keeps {ratio:.3f} of its parameters (bound {bound})"


def test_timm_attention_loses_whole_heads() -> None:
    """timm's ViT attention (``reshape(B, N, 3, num_heads, head_dim)``, then ``reshape(B, N,
    attn_dim)``) loses whole heads: ``num_heads`` and ``attn_dim`` follow the cut, ``head_dim`` stays."""
    model, x = timm_models.build("test_vit")
    attn = model.blocks[0].attn
    heads, head_dim = attn.num_heads, attn.head_dim
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    with torch.no_grad():
        assert relative_error(model(x), small(x)) <= _TOL
    cut = small.blocks[0].attn
    assert cut.head_dim == head_dim
    assert 0 < cut.num_heads < heads
    assert cut.attn_dim == cut.num_heads * head_dim == cut.proj.in_features
    assert cut.qkv.out_features == 3 * cut.num_heads * head_dim
