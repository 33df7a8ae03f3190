"""prune_unstructured and calibrate: masks match the papers' definitions and the reference code, N:M
holds, existing masks are kept, layers are calibrated after the ones before them are pruned, and bad
input or a failure part-way leaves the model as it was."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

import masksparse
from masksparse import LayerStats, PruningTypeError, PruningValueError, calibrate, prune, prune_unstructured
from masksparse.criteria import find_blocks, sparsegpt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import _reference  # noqa: E402


def _data(width: int = 12, n: int = 3, rows: int = 40, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, width, generator=g) for _ in range(n)]


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_calibrate_gathers_norms_and_xtx_of_each_layer_input():
    model, data = _mlp(), _data()
    stats = calibrate(model, data, [model[0], "2"], hessian=True)
    x = torch.cat(data)
    h = torch.relu(model[0](x))
    assert stats["0"].rows == 120 and torch.allclose(stats["0"].sq_norms, (x * x).sum(0), atol=1e-4)
    assert torch.allclose(stats["2"].xtx, h.T @ h, atol=1e-3)
    assert torch.allclose(stats["2"].sums, h.sum(0), atol=1e-4)


def test_wanda_prunes_the_lowest_weight_times_input_norm_in_each_row():
    model, data = _mlp(), _data()
    norms = torch.cat(data).norm(dim=0)
    score = model[0].weight.detach().abs() * norms
    prune_unstructured(model, data, 0.25, method="wanda", modules=[model[0]], progress=False)
    expected = torch.ones_like(score, dtype=torch.bool)
    expected.scatter_(1, score.argsort(dim=1)[:, :3], False)  # 25% of 12 inputs per row
    assert torch.equal(model[0].weight_mask, expected)


def test_magnitude_matches_torch_l1_unstructured():
    model = _mlp()
    oracle = copy.deepcopy(model)
    prune_unstructured(model, None, 0.4, method="magnitude", modules=["0", "2"], progress=False)
    for i in (0, 2):
        torch.nn.utils.prune.l1_unstructured(oracle[i], "weight", amount=0.4)
        assert torch.equal(model[i].weight_mask, oracle[i].weight_mask.bool())


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_sparsegpt_matches_the_reference_code_on_one_layer(pattern):
    """With an N:M pattern (no threshold ties to break), our SparseGPT picks the reference's mask and
    reaches its weights."""
    n, m = (int(v) for v in pattern.split(":"))
    torch.manual_seed(0)
    layer, x = nn.Linear(16, 6), torch.randn(200, 16) @ torch.randn(16, 16)
    ref = _reference._SparseGPT(copy.deepcopy(layer))
    ref.add_batch(x)
    ref.fasterprune(0.5, prunen=m - n, prunem=m)
    new, keep, _ = sparsegpt(layer.weight, x.T @ x, 0.5, pattern=(n, m))
    assert torch.equal(keep, ref.layer.weight != 0)
    assert torch.allclose(new, ref.layer.weight, atol=1e-4)


def test_sparsegpt_output_error_below_the_same_mask_without_reconstruction():
    torch.manual_seed(0)
    w, x = torch.randn(8, 32), torch.randn(256, 32) @ torch.randn(32, 32)
    new, keep, _ = sparsegpt(w, x.T @ x, 0.5)
    assert int(keep.sum()) == 128
    err = ((x @ (new - w).T) ** 2).sum()
    assert err < 0.75 * ((x @ (w * keep - w).T) ** 2).sum()


def test_sparsegpt_bias_refit_lowers_the_error_on_inputs_with_a_mean():
    torch.manual_seed(0)
    w, b, x = torch.randn(8, 32), torch.randn(8), torch.randn(256, 32) + 2.0
    out = x @ w.T + b
    plain, keep, _ = sparsegpt(w, x.T @ x, 0.6)
    new, keep2, nb = sparsegpt(w, x.T @ x, 0.6, bias=b, sums=x.sum(0), rows=256)
    assert nb is not None and int(keep2.sum()) == int(keep.sum())
    assert ((x @ new.T + nb - out) ** 2).sum() < ((x @ plain.T + b - out) ** 2).sum()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_holds_in_every_group_along_the_inputs(method, pattern):
    n, m = (int(v) for v in pattern.split(":"))
    model, layers = _mlp(), [0, 2] if m == 4 else [2]  # 12 inputs do not split into groups of 8
    prune_unstructured(
        model, _data(), method=method, pattern=pattern, modules=[model[i] for i in layers], progress=False
    )
    for i in layers:
        mask = model[i].weight_mask
        assert torch.equal(
            mask.view(mask.shape[0], -1, m).sum(-1), torch.full((mask.shape[0], mask.shape[1] // m), n)
        )
        assert torch.equal(model[i].weight, model[i].weight_orig * mask)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruning_again_keeps_what_was_pruned_and_reaches_the_new_amount(method):
    model, data = _mlp(), _data()
    prune.random_unstructured(model[0], "weight", amount=0.3)
    before = model[0].weight_mask.clone()
    prune_unstructured(model, data, 0.6, method=method, modules=["0"], progress=False)
    after = model[0].weight_mask
    assert not (after & ~before).any()
    assert int((~after).sum()) == round(0.6 * after.numel()) or method != "magnitude"
    assert (~after).float().mean() >= 0.6 - 1 / 12
    (hook,) = model[0]._forward_pre_hooks.values()
    assert getattr(hook, "mask", after) is after  # one mask, no stacked container


def test_default_layers_are_every_linear_but_the_output_layer():
    model = _mlp()
    prune_unstructured(model, _data(), 0.5, progress=False)
    assert hasattr(model[0], "weight_mask") and hasattr(model[2], "weight_mask")
    assert not hasattr(model[4], "weight_mask")


def test_stages_see_the_layers_before_them_pruned():
    """Each layer is calibrated on what the already pruned layers before it output: the same result
    as calibrating and pruning one layer at a time by hand."""
    model, data = _mlp(), _data()
    by_hand = copy.deepcopy(model)
    prune_unstructured(model, data, 0.5, method="sparsegpt", modules=["0", "2"], progress=False)
    for name in ("0", "2"):
        stats = calibrate(by_hand, data, [name], hessian=True)
        prune_unstructured(by_hand, stats, 0.5, method="sparsegpt", modules=[name], progress=False)
    for i in (0, 2):
        assert torch.equal(model[i].weight_mask, by_hand[i].weight_mask)
        assert torch.allclose(model[i].weight_orig, by_hand[i].weight_orig, atol=1e-6)


def test_result_is_torch_style_and_loads_into_a_fresh_model():
    model = _mlp()
    prune_unstructured(model, _data(), 0.5, method="sparsegpt", progress=False)
    fresh = _mlp(seed=5)
    masksparse.load_state_dict(fresh, model.state_dict())
    x = torch.randn(3, 12)
    assert torch.equal(fresh(x), model(x))
    prune.remove(model[0], "weight")
    assert float((model[0].weight == 0).float().mean()) == 0.5


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _bert_batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[0, 4:] = 0
        out.append({"input_ids": torch.randint(0, 50, (3, 7), generator=g), "attention_mask": mask})
    return out


def test_hugging_face_batches_are_called_with_keywords_and_padding_is_left_out():
    model, data = _bert(), _bert_batches()
    assert find_blocks(model) == "encoder.layer"
    stats = calibrate(model, data, ["encoder.layer.0.attention.self.query"])
    assert stats["encoder.layer.0.attention.self.query"].rows == sum(
        int(b["attention_mask"].sum()) for b in data
    )
    prune_unstructured(model, data, 0.5, method="sparsegpt", pattern="2:4", progress=False)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 12 and all(float(m.weight_mask.float().mean()) == 0.5 for m in linears)
    assert torch.isfinite(model(**data[0]).last_hidden_state).all()


def test_bad_input_raises_before_anything_changes():
    model, data = _mlp(), _data()
    state = _state(model)
    cases = [
        ({"data": []}, PruningValueError, "gave no batches"),
        ({"data": torch.randn(4, 12)}, PruningTypeError, "iterable of batches"),
        ({"data": [torch.randn(4, 5)]}, PruningValueError, "first calibration batch.*mat1 and mat2"),
        ({"method": "obs"}, PruningValueError, "method must be one of"),
        ({"amount": 1.0}, PruningValueError, "amount"),
        ({"amount": True}, PruningValueError, "amount"),
        ({"pattern": "2:5", "modules": ["0"]}, PruningValueError, "'0'.*12 inputs, not a multiple of 5"),
        ({"pattern": "4:2"}, PruningValueError, "0 < N < M"),
        ({"modules": ["nope"]}, PruningValueError, "no submodule 'nope'"),
        ({"modules": [nn.Linear(2, 2)]}, PruningTypeError, "submodules of the model"),
        ({"modules": ["1"]}, PruningTypeError, "'1' is a ReLU"),
        ({"data": None, "method": "wanda"}, PruningValueError, "needs calibration data"),
        (
            {"data": {"0": LayerStats.empty(12)}, "method": "sparsegpt", "modules": ["0"]},
            PruningValueError,
            "X\\^T X",
        ),
    ]
    for kwargs, error, match in cases:
        args = {"data": data, "amount": 0.5, "progress": False} | kwargs
        with pytest.raises(error, match=match):
            prune_unstructured(model, args.pop("data"), args.pop("amount"), **args)
        assert _same_state(model, state) and not hasattr(model[0], "weight_mask")


def test_a_failure_part_way_puts_every_layer_back():
    model, data = _mlp(), _data()
    prune.l1_unstructured(model[2], "weight", amount=0.25)
    state = _state(model)
    calls = {"n": 0}

    def forward(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 5:  # fails once the second stage runs: the first is pruned by then
            raise RuntimeError("out of memory")
        return m(batch)

    with pytest.raises(PruningValueError, match="batch .*RuntimeError: out of memory"):
        prune_unstructured(
            model, data, 0.5, method="sparsegpt", modules=["0", "2"], forward=forward, progress=False
        )
    assert _same_state(model, state)
    assert not hasattr(model[0], "weight_orig") and isinstance(model[0].weight, nn.Parameter)


def test_chained_blocks_are_fed_directly_with_the_same_result(monkeypatch):
    """BERT's layers are chained, so each block is fed the pruned output of the one before instead of
    running the whole model again; both ways give the same masks and weights."""
    from masksparse.criteria import _blocks, calibration

    model, data = _bert(), _bert_batches()
    children = list(model.encoder.layer)
    inputs = _blocks.capture(model, children, data[0], lambda m, b: m(**b), stop_after=False)
    assert _blocks.find_chain(children, inputs) is not None
    whole = copy.deepcopy(model)
    prune_unstructured(model, data, 0.5, method="sparsegpt", progress=False)
    monkeypatch.setattr(calibration, "_chain", lambda *args: None)
    prune_unstructured(whole, data, 0.5, method="sparsegpt", progress=False)
    for (name, a), b in zip(model.named_modules(), whole.modules(), strict=True):
        if isinstance(a, nn.Linear):
            assert torch.equal(a.weight_mask, b.weight_mask), name
            assert torch.allclose(a.weight_orig, b.weight_orig, atol=1e-5), name


class _Doubling(nn.Module):
    """Blocks that are not chained: each gets twice what the one before gave."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x) * 2
        return x


def test_blocks_that_are_not_chained_are_fed_through_the_whole_model():
    from masksparse.criteria import _blocks

    torch.manual_seed(0)
    model, data = _Doubling(), _data(width=8)
    children = list(model.blocks)
    assert (
        _blocks.find_chain(
            children, _blocks.capture(model, children, data[0], nn.Module.__call__, stop_after=False)
        )
        is None
    )
    by_hand = copy.deepcopy(model)
    prune_unstructured(
        model, data, 0.5, method="sparsegpt", modules=[f"blocks.{i}.0" for i in range(3)], progress=False
    )
    for i in range(3):
        name = f"blocks.{i}.0"
        stats = calibrate(by_hand, data, [name], hessian=True)
        prune_unstructured(by_hand, stats, 0.5, method="sparsegpt", modules=[name], progress=False)
    for i in range(3):
        assert torch.equal(model.blocks[i][0].weight_mask, by_hand.blocks[i][0].weight_mask)


def test_input_target_batches_get_a_hint_and_work_with_a_loss_fn():
    model = _mlp()
    pairs = [(x, torch.zeros(len(x), dtype=torch.long)) for x in _data()]
    with pytest.raises(PruningValueError, match=r"forward=lambda model, batch: model\(batch\[0\]\)"):
        prune_unstructured(model, pairs, 0.5, progress=False)
    assert not hasattr(model[0], "weight_mask")
    prune_unstructured(model, pairs, 0.5, loss_fn=nn.functional.cross_entropy, progress=False)
    expected = copy.deepcopy(_mlp())
    prune_unstructured(expected, [x for x, _ in pairs], 0.5, progress=False)
    assert torch.equal(model[0].weight_mask, expected[0].weight_mask)


@pytest.mark.parametrize("padding", [0, 1, "same", "valid"])
def test_a_conv_is_its_weight_matrix_times_its_unfolded_patches(padding: int | str) -> None:
    from masksparse.criteria.calibration import patches

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (4, 3), padding=padding, dilation=(1, 2), stride=1 if padding == "same" else 2)
    x = torch.randn(2, 3, 11, 10)
    out = conv(x).detach()
    rows = patches(conv, x)
    again = rows @ conv.weight.detach().flatten(1).T + conv.bias.detach()
    torch.testing.assert_close(again.reshape(2, -1, 5).transpose(1, 2).reshape(out.shape), out)


def _conv_and_its_matrix() -> tuple[nn.Sequential, nn.Linear, list[torch.Tensor], list[torch.Tensor]]:
    """A conv net, the Linear its first conv is on unfolded patches, and the data of each."""
    from masksparse.criteria.calibration import patches

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 3))
    linear = nn.Linear(2 * 9, 6)
    with torch.no_grad():
        linear.weight.copy_(model[0].weight.flatten(1))
        linear.bias.copy_(model[0].bias)
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(4, 2, 6, 6, generator=g) for _ in range(3)]
    return model, linear, images, [patches(model[0], x) for x in images]


@pytest.mark.parametrize(("method", "pattern"), [("wanda", None), ("sparsegpt", None), ("sparsegpt", "3:9")])
def test_a_conv_is_pruned_as_the_linear_layer_it_is_on_its_patches(method: str, pattern: str | None) -> None:
    model, linear, images, rows = _conv_and_its_matrix()
    prune_unstructured(model, images, 0.5, method=method, pattern=pattern, modules=[model[0]], progress=False)
    prune_unstructured(linear, rows, 0.5, method=method, pattern=pattern, modules=[linear], progress=False)
    assert torch.equal(model[0].weight_mask.flatten(1), linear.weight_mask)
    expected = 0.5 if pattern is None else 6 / 9  # 3:9 keeps 3 of every 9 inputs of a row
    assert float((~model[0].weight_mask).float().mean()) == pytest.approx(expected, abs=0.03)
    torch.testing.assert_close(model[0].weight.flatten(1), linear.weight)  # SparseGPT's refit too
    torch.testing.assert_close(model[0].bias, linear.bias)
    assert not hasattr(model[3], "weight_mask")  # only the layers named


def test_calibrate_reads_a_named_conv_on_its_patches() -> None:
    model, _, images, rows = _conv_and_its_matrix()
    stats = calibrate(model, images, modules=["0"], hessian=True)["0"]
    everything = torch.cat(rows)
    assert stats.rows == everything.shape[0]
    torch.testing.assert_close(stats.xtx, everything.T @ everything)


def test_grouped_convs_are_refused_by_name_and_nothing_changes() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4, 2))
    before = _state(model)
    with pytest.raises(PruningTypeError, match=r"'0' is a Conv2d with groups=2 and padding_mode='zeros'"):
        prune_unstructured(model, [torch.randn(2, 4, 6, 6)], 0.5, modules=["0"], progress=False)
    with pytest.raises(PruningTypeError, match=r"'1' is a Flatten; only Linear and Conv2d layers"):
        prune_unstructured(model, [torch.randn(2, 4, 6, 6)], 0.5, modules=["1"], progress=False)
    assert _same_state(model, before) and not prune.is_pruned(model)
