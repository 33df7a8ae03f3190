"""torchvision's Swin (v1, v2) and MaxViT attention: whole heads prune on every member and compact to the
compact classes of masksparse.compact.torchvision_attention, computing what the masked model computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from masksparse.compact import compact, relative_error, torchvision_attention
from masksparse.structured import prune_channels
from tests.models import assert_same, assert_saves_and_loads, params
from tests.test_attention import X_IMAGES

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_swin(v2: bool = False, **attention: float) -> nn.Module:
    """Two stages of 2 and 4 heads of 8, 4x4 windows on an 8x8 then 4x4 map: block 1 shifts its
    windows (the mask), stage 2's window covers the map (no shift). Biases random, as if trained."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(0)
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    model = SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], **attention, **extra)  # type: ignore[arg-type]
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.normal_(m.bias, std=0.1)
    return model.eval()


def tiny_maxvit() -> nn.Module:
    """Two stages, window and grid attention of 2 and 4 heads of 8 on 2x2 partitions."""
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    model = MaxVit((32, 32), 8, 2, [16, 32], [1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.normal_(m.bias, std=0.1)
    return model.eval()


def attentions(model: nn.Module) -> dict[str, nn.Module]:
    names = ("ShiftedWindowAttention", "RelativePositionalMultiHeadAttention")
    return {n: m for n, m in model.named_modules() if any(k in type(m).__name__ for k in names)}


def projections(attn: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The fused qkv projection and the output projection of a Swin or MaxViT attention."""
    return (attn.qkv, attn.proj) if hasattr(attn, "qkv") else (attn.to_qkv, attn.merge)


def head_masks(attn: nn.Module) -> list[torch.Tensor]:
    """Per head of a masked attention, from each per-head tensor: does it keep any entry?"""
    if hasattr(attn, "logit_scale"):  # Swin v2: a logit scale and a cpb_mlp output row per head
        return [attn.logit_scale_mask.flatten(), attn.cpb_mlp[2].weight_mask.any(1)]
    return [attn.relative_position_bias_table_mask.any(0)]


MODELS = {"swin": tiny_swin, "swin_v2": lambda: tiny_swin(v2=True), "maxvit": tiny_maxvit}


@pytest.fixture(scope="module", params=list(MODELS))
def pruned_vision(request: pytest.FixtureRequest) -> tuple[nn.Module, nn.Module, dict[str, int]]:
    model = MODELS[request.param]()
    heads = {n: getattr(a, "num_heads", None) or a.n_heads for n, a in attentions(model).items()}
    prune_channels(model, X_IMAGES, 0.5)
    return model, compact(model, X_IMAGES), heads


def test_swin_and_maxvit_heads_prune_as_whole_heads_on_every_member(
    pruned_vision: tuple[nn.Module, nn.Module, dict[str, int]],
) -> None:
    """Invariant: the q, k and v rows of a head, its proj (merge) columns and its position-bias column
    (Swin v2: its logit_scale and cpb_mlp output) are all masked, or none; half the heads go."""
    model, _, heads = pruned_vision
    for name, attn in attentions(model).items():
        qkv, proj = projections(attn)
        h = heads[name]
        rows = qkv.weight_mask.all(1).view(3, h, 8)
        alive = rows[0].all(1)
        assert int(alive.sum()) == h // 2, name
        assert bool((rows == alive[None, :, None]).all()) and not bool(
            qkv.weight_mask.view(3, h, 8, -1)[:, ~alive].any()
        )
        assert torch.equal(qkv.bias_mask.view(3, h, 8), rows)
        assert torch.equal(proj.weight_mask.all(0).view(h, 8), alive[:, None].expand(h, 8))
        for kept in head_masks(attn):
            assert torch.equal(kept, alive), name


def test_swin_and_maxvit_compact_to_their_compact_classes_computing_the_same(
    pruned_vision: tuple[nn.Module, nn.Module, dict[str, int]],
) -> None:

    model, small, heads = pruned_vision
    assert_same(model, small, X_IMAGES)
    for name, attn in attentions(small).items():
        assert type(attn) in vars(torchvision_attention).values()
        qkv, proj = projections(attn)
        h = heads[name] // 2
        assert (getattr(attn, "num_heads", None) or attn.n_heads, attn.head_dim) == (h, 8), name
        assert qkv.weight.shape[0] == qkv.out_features == 3 * h * 8 and proj.in_features == h * 8
    assert params(small) < params(model)
    assert set(small.state_dict()) == {k.replace("_orig", "") for k in model.state_dict() if "_mask" not in k}


def test_compacted_swin_and_maxvit_save_and_load(
    pruned_vision: tuple[nn.Module, nn.Module, dict[str, int]],
) -> None:
    _, small, _ = pruned_vision
    assert_saves_and_loads(small, X_IMAGES)


@pytest.mark.parametrize("v2", [False, True])
def test_compact_window_attention_computes_what_torchvision_computes_with_dropout(v2: bool) -> None:
    """Differential with all heads, in training mode: same dropout draws, shifted windows and mask."""
    from masksparse.compact.torchvision_attention import (
        CompactShiftedWindowAttention,
        CompactShiftedWindowAttentionV2,
    )

    model = tiny_swin(v2, dropout=0.2, attention_dropout=0.3).train()
    same = copy.deepcopy(model)
    for attn in attentions(same).values():
        attn.__class__ = CompactShiftedWindowAttentionV2 if v2 else CompactShiftedWindowAttention
    outs = []
    for m in (model, same):
        torch.manual_seed(3)
        with torch.no_grad():
            outs.append(m(X_IMAGES))
    assert relative_error(outs[0], outs[1]) <= 1e-6


def test_compacted_swin_and_maxvit_compile(
    pruned_vision: tuple[nn.Module, nn.Module, dict[str, int]],
) -> None:
    _, small, _ = pruned_vision
    with torch.no_grad():
        assert relative_error(small(X_IMAGES), torch.compile(small, backend="aot_eager")(X_IMAGES)) <= 1e-6


@pytest.mark.parametrize("name", list(MODELS))
def test_a_compacted_swin_or_maxvit_prunes_and_compacts_again(name: str) -> None:
    """The compact classes are registered too: their heads go again, still of 8."""
    model = MODELS[name]()
    prune_channels(model, X_IMAGES, 0.5)
    small = compact(model, X_IMAGES)
    prune_channels(small, X_IMAGES, 0.75)
    smaller = compact(small, X_IMAGES)
    assert_same(small, smaller, X_IMAGES)
    last = list(attentions(smaller).values())[-1]  # 4 heads at first, then 2, now 1
    assert (getattr(last, "num_heads", None) or last.n_heads, last.head_dim) == (1, 8)
    assert projections(last)[0].out_features == 24


def test_a_subclass_of_swin_attention_keeps_its_heads() -> None:
    """Only the registered classes are swapped: a subclass's forward may differ."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    class Own(ShiftedWindowAttention):  # type: ignore[misc]
        pass

    model = tiny_swin()
    for attn in attentions(model).values():
        attn.__class__ = Own
    prune_channels(model, X_IMAGES, 0.5)
    small = compact(model, X_IMAGES)
    assert_same(model, small, X_IMAGES)
    for attn in attentions(small).values():
        assert type(attn) is Own and attn.qkv.out_features == 3 * attn.num_heads * 8
