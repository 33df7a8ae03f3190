"""Tests of masksparse.serialization: pruned state_dicts load into fresh models, and files round-trip.

The oracle is torch.nn.utils.prune: a fresh model pruned by hand with torch's ``custom_from_mask`` at the
source's pruned tensors, then loaded with ``Module.load_state_dict``, must hold what ours holds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from masksparse import prune
from masksparse._errors import PruningTypeError, StateDictError
from masksparse.serialization import load_state_dict, save_state_dict

Pruner = Any  # torch.nn.utils.prune or masksparse.prune: the same functions


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)
    )


def bn_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


INPUTS = {mlp: (2, 8), convnet: (2, 3, 8, 8), bn_net: (2, 3, 8, 8)}


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def biases_then_weights(p: Pruner, model: nn.Module) -> None:
    # Biases first: the loaded model must list bias_orig before weight_orig, as the source does.
    for m in layers(model):
        p.random_unstructured(m, "bias", amount=0.5)
        p.l1_unstructured(m, "weight", amount=0.4)


def iterative(p: Pruner, model: nn.Module) -> None:
    for m in layers(model):
        p.l1_unstructured(m, "weight", amount=0.3)
        p.l1_unstructured(m, "weight", amount=0.3)
    p.ln_structured(layers(model)[0], "weight", amount=0.25, n=2, dim=0)


def global_l1(p: Pruner, model: nn.Module) -> None:
    params = [(m, "weight") for m in layers(model)]
    p.global_unstructured(params, pruning_method=p.L1Unstructured, amount=0.6)


def structured(p: Pruner, model: nn.Module) -> None:
    for m in layers(model):
        p.ln_structured(m, "weight", amount=0.5, n=1, dim=0)
    p.random_structured(layers(model)[0], "weight", amount=0.34, dim=1)


def with_batchnorm(p: Pruner, model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            p.l1_unstructured(m, "weight", amount=0.5)
            p.l1_unstructured(m, "bias", amount=0.25)
    p.l1_unstructured(layers(model)[0], "weight", amount=0.5)


CASES = [
    (mlp, biases_then_weights),
    (mlp, iterative),
    (mlp, global_l1),
    (convnet, biases_then_weights),
    (convnet, iterative),
    (convnet, global_l1),
    (convnet, structured),
    (bn_net, with_batchnorm),
    (bn_net, structured),
]
PRUNERS = {"torch": torch_prune, "masksparse": prune}


def pruned_source(
    make: Callable[[], nn.Sequential], how: Callable[[Pruner, nn.Module], None], p: Pruner
) -> Any:
    torch.manual_seed(0)
    model = make()
    how(p, model)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        model.train()
        model(torch.randn(*INPUTS[make]))  # running statistics other than the defaults
    return model.eval()


def fresh(make: Callable[[], nn.Sequential]) -> Any:
    torch.manual_seed(1)
    return make().eval()


def pruned_tensors(model: nn.Module) -> list[tuple[str, str]]:
    return [
        (path, name[: -len("_mask")])
        for path, m in model.named_modules()
        for name in m._buffers
        if name.endswith("_mask") and name[: -len("_mask")] + "_orig" in m._parameters
    ]


def torch_oracle(make: Callable[[], nn.Sequential], state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh model re-pruned by hand with torch at the state_dict's pruned tensors, then loaded."""
    model = fresh(make)
    modules = dict(model.named_modules())
    for key in state_dict:
        if key.endswith("_orig"):
            path, _, name = key[: -len("_orig")].rpartition(".")
            torch_prune.custom_from_mask(modules[path], name, state_dict[f"{key[: -len('_orig')]}_mask"])
    model.load_state_dict(state_dict)
    return model


def assert_same_state(loaded: nn.Module, source: nn.Module) -> None:
    ours, theirs = loaded.state_dict(), source.state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        if key.endswith("_mask"):
            assert ours[key].dtype == torch.bool, key
            assert torch.equal(ours[key].to(value.dtype), value), key
        else:
            assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def fingerprint(model: nn.Module) -> dict[str, Any]:
    modules = list(model.named_modules())
    return {
        "parameters": [(n, id(p)) for n, p in model.named_parameters()],
        "buffers": [(n, id(b)) for n, b in model.named_buffers()],
        "classes": [(n, type(m)) for n, m in modules],
        "attributes": [(n, {k: id(v) for k, v in vars(m).items()}) for n, m in modules],
        "containers": [
            (n, list(m._parameters), list(m._buffers), list(m._forward_pre_hooks)) for n, m in modules
        ],
        "values": [(k, v.clone()) for k, v in model.state_dict().items()],
    }


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    after = fingerprint(model)
    for key in ("parameters", "buffers", "classes", "attributes", "containers"):
        assert after[key] == before[key], key
    assert [k for k, _ in after["values"]] == [k for k, _ in before["values"]]
    for (key, new), (_, old) in zip(after["values"], before["values"]):
        assert new.dtype == old.dtype and torch.equal(new, old), key


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
@pytest.mark.parametrize(("make", "how"), CASES, ids=lambda f: f.__name__)
def test_file_loads_into_fresh_model_like_torch(tmp_path: Path, make: Any, how: Any, pruner: str) -> None:
    """A state_dict saved with torch.save loads into a fresh model: torch's keys, values, masks, outputs."""
    source = pruned_source(make, how, PRUNERS[pruner])
    path = tmp_path / "pruned.pt"
    torch.save(source.state_dict(), path)
    model = fresh(make)
    params_before = dict(model.named_parameters())

    result = load_state_dict(model, path)

    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_same_state(model, source)
    assert prune.is_pruned(model) and torch_prune.is_pruned(model)
    assert pruned_tensors(model) == pruned_tensors(source)
    for path_, name in pruned_tensors(model):
        module = model.get_submodule(path_)
        orig = module._parameters[f"{name}_orig"]
        assert isinstance(orig, nn.Parameter)
        # The Parameter object survives, so an optimizer built before loading keeps working.
        assert orig is params_before[f"{path_}.{name}"]
        assert f"{name}_mask" in module._buffers and f"{name}_mask" not in module._parameters
        assert torch.equal(getattr(module, name), getattr(source.get_submodule(path_), name))
    x = torch.randn(*INPUTS[make])
    oracle = torch_oracle(make, torch.load(path, weights_only=True))
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
        assert torch.equal(model(x), oracle(x))
    assert list(model.state_dict()) == list(oracle.state_dict())


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_weights_only_state_dict_loads(tmp_path: Path, pruner: str) -> None:
    """What torch.load(weights_only=True) returns loads as a mapping, _metadata included."""
    source = pruned_source(bn_net, with_batchnorm, PRUNERS[pruner])
    save_state_dict(source, tmp_path / "pruned.pt")
    state_dict = torch.load(tmp_path / "pruned.pt", weights_only=True)
    assert state_dict._metadata == source.state_dict()._metadata

    model = fresh(bn_net)
    load_state_dict(model, state_dict)

    assert_same_state(model, source)


@pytest.mark.parametrize("target", ["torch", "masksparse"])
@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_loads_into_model_pruned_in_the_same_places(tmp_path: Path, pruner: str, target: str) -> None:
    """An already pruned model is loaded as it is: same Parameters and masks objects, values copied."""
    source = pruned_source(convnet, biases_then_weights, PRUNERS[pruner])
    torch.save(source.state_dict(), tmp_path / "pruned.pt")
    model = fresh(convnet)
    biases_then_weights(PRUNERS[target], model)
    ids = [(n, id(t)) for n, t in model.state_dict(keep_vars=True).items()]

    load_state_dict(model, tmp_path / "pruned.pt")

    assert [(n, id(t)) for n, t in model.state_dict(keep_vars=True).items()] == ids
    for path_, name in pruned_tensors(source):
        # Right after loading, before any forward: torch's stored copy must not be stale.
        assert torch.equal(
            getattr(model.get_submodule(path_), name), getattr(source.get_submodule(path_), name)
        )
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_masksparse_file_loads_into_torch_pruned_model_with_plain_torch(tmp_path: Path) -> None:
    """Bool masks written by masksparse load into torch's float masks with Module.load_state_dict."""
    source = pruned_source(mlp, iterative, prune)
    save_state_dict(source, tmp_path / "pruned.pt")
    model = fresh(mlp)
    iterative(torch_prune, model)

    model.load_state_dict(torch.load(tmp_path / "pruned.pt", weights_only=True))

    assert model[0].weight_mask.dtype == torch.float32
    assert torch.equal(model[0].weight_mask.bool(), source[0].weight_mask)
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_safetensors_round_trip(tmp_path: Path, pruner: str) -> None:
    """A .safetensors file keeps bool masks bool and loads into a fresh model."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = pruned_source(bn_net, with_batchnorm, PRUNERS[pruner])
    path = tmp_path / "pruned.safetensors"

    save_state_dict(source, path)
    model = fresh(bn_net)
    load_state_dict(model, path)

    stored = safetensors_torch.load_file(path)
    assert stored["1.weight_mask"].dtype == source[1].weight_mask.dtype
    assert_same_state(model, source)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


class Tied(nn.Module):
    """One Linear reachable at two paths, and its weight tied to a second Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.c = nn.Linear(4, 4)
        self.c.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(x))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_shared_module_and_shared_storage_round_trip(tmp_path: Path, suffix: str) -> None:
    """A module at two paths is pruned once; tied tensors are written (safetensors refuses shared ones)."""
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    source: Any = Tied()
    torch_prune.l1_unstructured(source.a, "weight", amount=0.5)
    save_state_dict(source, tmp_path / f"tied{suffix}")
    torch.manual_seed(1)
    model: Any = Tied()

    load_state_dict(model, tmp_path / f"tied{suffix}")

    assert model.b is model.a and prune.is_pruned(model.a)
    assert model.c.weight is model.a.weight_orig
    assert torch.equal(model.a.weight_mask, source.a.weight_mask.bool())
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_save_copies_views_and_keeps_ties_in_torch_format(tmp_path: Path) -> None:
    """A view is written alone, not with its whole storage; a tensor under two names stays one."""
    big = torch.arange(1000.0)
    tied = torch.ones(3)
    save_state_dict({"view": big[10:12], "t": big.view(10, 100).t(), "x": tied, "y": tied}, tmp_path / "s.pt")

    loaded = torch.load(tmp_path / "s.pt", weights_only=True)

    assert loaded["view"].untyped_storage().nbytes() == 2 * 4
    assert torch.equal(loaded["view"], big[10:12]) and loaded["t"].is_contiguous()
    assert torch.equal(loaded["t"], big.view(10, 100).t())
    assert loaded["x"].untyped_storage().data_ptr() == loaded["y"].untyped_storage().data_ptr()


def test_safetensors_refuses_non_tensor_entries(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    with pytest.raises(StateDictError, match="'extra'"):
        save_state_dict({"w": torch.ones(2), "extra": 3}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_missing_safetensors_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(ImportError, match=r"masksparse\[safetensors\]"):
        load_state_dict(mlp(), tmp_path / "x.safetensors")
    with pytest.raises(ImportError, match=r"masksparse\[safetensors\]"):
        save_state_dict(mlp(), tmp_path / "x.safetensors")


def source_state(pruner: str) -> dict[str, torch.Tensor]:
    return dict(pruned_source(mlp, biases_then_weights, PRUNERS[pruner]).state_dict())


@pytest.mark.parametrize("target", ["fresh", "torch", "masksparse"])
@pytest.mark.parametrize("pruner", sorted(PRUNERS))
@pytest.mark.parametrize("strict", [True, False])
def test_wrong_shape_raises_and_leaves_model_unchanged(pruner: str, target: str, strict: bool) -> None:
    """A shape mismatch raises, strict or not, naming the key and both shapes, before any change."""
    state_dict = source_state(pruner)
    state_dict["2.weight_orig"] = torch.zeros(4, 17)
    model = fresh(mlp)
    if target != "fresh":
        biases_then_weights(PRUNERS[target], model)
    before = fingerprint(model)

    with pytest.raises(StateDictError, match=r"'2\.weight_orig'.*\(4, 16\).*\(4, 17\)"):
        load_state_dict(model, state_dict, strict=strict)

    assert_unchanged(before, model)


@pytest.mark.parametrize("target", ["fresh", "torch", "masksparse"])
@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_missing_and_unexpected_keys_raise_and_leave_model_unchanged(pruner: str, target: str) -> None:
    state_dict = source_state(pruner)
    del state_dict["0.bias_mask"]
    state_dict["0.scale"] = torch.ones(3)
    model = fresh(mlp)
    if target != "fresh":
        biases_then_weights(PRUNERS[target], model)
    before = fingerprint(model)

    with pytest.raises(
        StateDictError, match=r"(?s)missing keys: .*'0\.bias.*unexpected keys: .*'0\.scale'"
    ) as err:
        load_state_dict(model, state_dict)

    assert isinstance(err.value, RuntimeError)
    assert_unchanged(before, model)


def test_mask_of_wrong_shape_raises() -> None:
    state_dict = source_state("torch")
    state_dict["0.weight_mask"] = torch.ones(16, 9)
    model = fresh(mlp)
    before = fingerprint(model)
    with pytest.raises(StateDictError, match=r"'0\.weight_mask'.*\(16, 8\).*\(16, 9\)"):
        load_state_dict(model, state_dict)
    assert_unchanged(before, model)


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_non_strict_returns_torch_incompatible_keys(pruner: str) -> None:
    """strict=False reports what torch reports for the re-pruned model, and loads everything else."""
    state_dict = source_state(pruner)
    del state_dict["2.bias_orig"], state_dict["2.bias_mask"]
    state_dict["extra"] = torch.ones(1)
    model = fresh(mlp)
    oracle = fresh(mlp)
    for path_, name in [("0", "bias"), ("0", "weight"), ("2", "weight")]:
        torch_prune.custom_from_mask(oracle.get_submodule(path_), name, state_dict[f"{path_}.{name}_mask"])
    expected = oracle.load_state_dict(state_dict, strict=False)

    result = load_state_dict(model, state_dict, strict=False)

    assert type(result) is type(expected) and result == expected
    assert result.missing_keys == ["2.bias"] and result.unexpected_keys == ["extra"]
    assert "bias_orig" not in model[2]._parameters and "bias" in model[2]._parameters
    assert list(model.state_dict()) == list(oracle.state_dict())
    assert torch.equal(model[0].weight_orig, state_dict["0.weight_orig"])
    assert torch.equal(model[2].weight, state_dict["2.weight_orig"] * state_dict["2.weight_mask"])


def test_dense_state_dict_into_pruned_model_is_an_error_with_a_hint() -> None:
    """A dense tensor where the model is pruned is not loaded with all-ones masks (see the docstring)."""
    torch.manual_seed(0)
    dense = mlp().state_dict()
    model = fresh(mlp)
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    before = fingerprint(model)

    with pytest.raises(StateDictError, match=r"'0\.weight' dense in the state_dict but pruned in the model"):
        load_state_dict(model, dense)
    assert_unchanged(before, model)

    result = load_state_dict(model, dense, strict=False)
    assert result.missing_keys == ["0.weight_orig", "0.weight_mask"]
    assert result.unexpected_keys == ["0.weight"]


def test_non_binary_mask_is_kept_as_float() -> None:
    torch.manual_seed(0)
    source: Any = mlp().eval()
    torch_prune.custom_from_mask(source[0], "weight", torch.rand(16, 8))
    model = fresh(mlp)

    load_state_dict(model, source.state_dict())

    assert model[0].weight_mask.dtype == torch.float32
    assert torch.equal(model[0].weight_mask, source[0].weight_mask)
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_non_binary_mask_into_bool_mask_raises() -> None:
    torch.manual_seed(0)
    source = mlp().eval()
    torch_prune.custom_from_mask(source[0], "weight", torch.rand(16, 8))
    model = fresh(mlp)
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    before = fingerprint(model)
    with pytest.raises(StateDictError, match=r"'0\.weight_mask' holds values other than 0 and 1"):
        load_state_dict(model, source.state_dict())
    assert_unchanged(before, model)


def test_failure_while_pruning_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """If re-pruning fails midway, the pruning already added is undone exactly (order, class, hooks)."""
    state_dict = source_state("masksparse")
    model = fresh(mlp)
    before = fingerprint(model)
    calls = []
    real = prune.custom_from_mask

    def failing(module: nn.Module, name: str, mask: torch.Tensor) -> nn.Module:
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(module, name, mask)

    monkeypatch.setattr(prune, "custom_from_mask", failing)
    with pytest.raises(StateDictError, match="boom"):
        load_state_dict(model, state_dict)

    assert len(calls) == 3
    assert_unchanged(before, model)


def test_failure_in_torch_loader_rolls_back() -> None:
    """A load hook that raises after the checks passed: the added pruning is removed again."""
    state_dict = source_state("torch")
    model = fresh(mlp)

    def refuse(*args: Any) -> None:
        raise ValueError("refused by hook")

    model.register_load_state_dict_pre_hook(refuse)
    before = fingerprint(model)

    with pytest.raises(StateDictError, match="refused by hook"):
        load_state_dict(model, state_dict)

    assert_unchanged(before, model)


def test_bad_sources() -> None:
    with pytest.raises(PruningTypeError, match="got int"):
        load_state_dict(mlp(), 3)  # type: ignore[arg-type]
    with pytest.raises(PruningTypeError, match="nn.Module"):
        load_state_dict({}, {})  # type: ignore[arg-type]


def test_file_without_a_state_dict(tmp_path: Path) -> None:
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(StateDictError, match="holds a list"):
        load_state_dict(mlp(), tmp_path / "list.pt")
