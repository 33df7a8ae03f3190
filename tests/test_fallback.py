"""Never failing on a model that runs: units a module cannot lose are kept, with the reason, and the rest
still prunes and compacts exactly."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from masksparse import (
    CompactionError,
    KeptUnitsWarning,
    compact,
    plan_compaction,
    prune,
    prune_channels,
)
from masksparse.compact import apply as compact_module
from masksparse.examples import LeNet
from tests.models import assert_same, params

pytestmark = pytest.mark.usefixtures("one_thread")


def _kept(call: object, *args: object, **kwargs: object) -> tuple[object, list[KeptUnitsWarning]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call(*args, **kwargs)  # type: ignore[operator]
    return result, [w.message for w in caught if isinstance(w.message, KeptUnitsWarning)]


class CumsumThenMLP(nn.Module):
    """conv a -> cumsum over channels (no rule) -> conv b -> relu -> conv c."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.cumsum(self.a(x), dim=1))))


X_IMG = torch.randn(2, 3, 4, 4)


def test_prune_channels_leaves_what_an_op_without_a_rule_reads_and_prunes_the_rest() -> None:
    model = CumsumThenMLP()
    _, found = _kept(prune_channels, model, X_IMG, 0.5)
    assert len(found) == 1 and "aten.cumsum" in str(found[0]) and "4 units of a.weight" in str(found[0])
    assert not hasattr(model.a, "weight_mask")
    assert int(model.b.weight_mask.flatten(1).any(1).sum()) == 3
    small, found = _kept(compact, model, X_IMG)
    assert not found and small.b.out_channels == 3 and small.a.out_channels == 4
    assert_same(model, small, X_IMG)


def test_compact_keeps_dead_channels_an_op_without_a_rule_reads() -> None:
    """User masks zero channels 1 and 3 of conv a, which cumsum reads: they stay, exactly."""
    model = CumsumThenMLP()
    keep = torch.tensor([True, False, True, False])
    prune.custom_from_mask(model.a, "weight", keep[:, None, None, None].expand(4, 3, 1, 1))
    prune.custom_from_mask(model.a, "bias", keep)
    prune.ln_structured(model.b, "weight", amount=0.5, n=1, dim=0)
    plan = plan_compaction(model, X_IMG)
    assert [(k.module, k.units) for k in plan.kept] == [("", 2)]
    assert "kept: 2 dead unit(s) of <model>: aten.cumsum" in str(plan)
    small, found = _kept(compact, model, X_IMG)
    assert len(found) == 1 and found[0].plan.kept == plan.kept
    assert small.a.out_channels == 4 and small.b.out_channels == 3
    assert_same(model, small, X_IMG)


class HardCoded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).permute(0, 2, 3, 1).reshape(-1, 8))


def test_a_forward_with_hard_coded_sizes_keeps_what_it_hard_codes() -> None:
    """``reshape(-1, 8)`` in the model's own forward: the Linear that fails was handed the wrong width
    by the model's code, so the model keeps those units (here all of them), exactly."""
    model = HardCoded()
    x = torch.randn(1, 3, 2, 2)
    prune_channels(model, x, 0.5)
    small, found = _kept(compact, model, x, inplace=True)
    assert small is model and params(model) == 8 * 3 + 8 + 8 * 3 + 3
    assert len(found) == 1
    reason = found[0].plan.kept[0].reason
    assert "could not run" in reason and "'fc'" in reason and "cannot be multiplied" in reason


class DerivedHeadSize(nn.Module):
    """DINO's attention: the head size is ``C // num_heads``, derived from the input width."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.num_heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class MergedToWidth(DerivedHeadSize):
    """The head size is stored, but the heads are merged back to the input width ``C``."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__(dim, heads)
        self.head_dim = dim // heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, attention: type[nn.Module]) -> None:
        super().__init__()
        self.attn = attention()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


def _blocks(attention: type[nn.Module]) -> nn.Sequential:
    """Two blocks; head 1 of each attention masked (q, k and v rows), half of each hidden layer."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(attention), Block(attention))
    head = torch.ones(48, 16, dtype=torch.bool)
    head[[4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39]] = False
    for block in model:
        prune.custom_from_mask(block.attn.qkv, "weight", head)
        prune.custom_from_mask(block.attn.qkv, "bias", head[:, 0])
        prune.custom_from_mask(block.fc1, "weight", torch.arange(32)[:, None].expand(32, 16) % 2 == 0)
        prune.custom_from_mask(block.fc1, "bias", torch.arange(32) % 2 == 0)
    return model


X_TOKENS = torch.randn(2, 5, 16)


@pytest.mark.parametrize(
    ("attention", "reason"),
    [(DerivedHeadSize, "keeps no head size 4 apart from num_heads"), (MergedToWidth, "could not run")],
)
def test_attention_that_cannot_lose_heads_keeps_them_and_the_rest_compacts(
    attention: type[nn.Module], reason: str
) -> None:
    """A head size derived from the width is refused while planning (each module says so); heads merged
    back to the width are found when the compacted module fails to run, and every module of its class
    keeps its heads at once. The hidden layers still lose half their units."""
    model = _blocks(attention)
    small, found = _kept(compact, model, X_TOKENS)
    assert len(found) == 1
    kept = found[0].plan.kept
    assert all(reason in k.reason for k in kept)
    if attention is MergedToWidth:
        assert [(k.module, k.units) for k in kept] == [("0.attn and 1 more like it", 2)]
    else:
        assert [(k.module, k.units) for k in kept] == [("0.attn", 1), ("1.attn", 1)]
    assert all(b.attn.qkv.out_features == 48 and b.fc1.out_features == 16 for b in small)
    assert_same(model, small, X_TOKENS)


def test_a_wrong_fold_keeps_the_units_of_the_layer_it_went_into(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fold that adds the wrong constants makes fc2 compute something else: fc2's inputs are kept
    (nothing is folded then), the rest compacts, and the result is exact."""
    torch.manual_seed(0)
    lenet = LeNet().eval()
    x = torch.randn(8, 1, 28, 28)
    prune.ln_structured(lenet.fc1, "weight", amount=0.5, n=2, dim=0)  # fc1's masked rows emit a bias
    dead = torch.arange(16) % 2 == 0
    prune.custom_from_mask(lenet.conv2, "weight", dead[:, None, None, None].expand(16, 6, 3, 3))
    prune.custom_from_mask(lenet.conv2, "bias", dead)
    monkeypatch.setattr(compact_module, "_fold_delta", lambda weight, fold: torch.ones(weight.shape[0]))
    small, found = _kept(compact, lenet, x)
    assert len(found) == 1 and found[0].plan.kept[0].module == "fc2"
    assert "computed something else" in found[0].plan.kept[0].reason
    assert small.fc1.out_features == 120 and small.conv2.out_channels < lenet.conv2.out_channels
    assert_same(lenet, small, x)


def test_an_error_remains_when_keeping_cannot_help(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compacted model that is wrong whatever compaction keeps: the error names the module, and the
    model is left as it was."""
    torch.manual_seed(0)
    lenet = LeNet().eval()
    x = torch.randn(8, 1, 28, 28)
    prune.ln_structured(lenet.fc1, "weight", amount=0.5, n=2, dim=0)
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    apply = compact_module._apply

    def broken(m: nn.Module, plan: object, optimizer: object, **kwargs: object) -> None:
        apply(m, plan, optimizer, **kwargs)  # type: ignore[arg-type]
        with torch.no_grad():
            m.fc3.bias.add_(1.0)

    monkeypatch.setattr(compact_module, "_apply", broken)
    for inplace in (False, True):
        with pytest.raises(CompactionError, match="first module whose output diverges is 'fc3'"):
            compact(lenet, x, inplace=inplace)
        assert all(torch.equal(before[k], v) for k, v in lenet.state_dict().items())
        assert lenet.fc1.out_features == 120 and hasattr(lenet.fc1, "weight_mask")
