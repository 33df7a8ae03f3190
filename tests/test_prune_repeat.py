"""Repeated pruning: rounds of prune_channels keep one bool mask per tensor; prune.* keeps torch's stack.

The oracles are a single ``prune_channels`` call with the final amount (amounts count against the
original size) and torch.nn.utils.prune itself for repeated calls of the prune functions.
"""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from masksparse import prune, structured
from masksparse.structured import prune_channels

X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
AMOUNTS = (0.125, 0.25, 0.375, 0.5, 0.625)


def chain(seed: int = 0) -> nn.Sequential:
    """conv(3->8) -> BN -> ReLU -> conv(8->6) -> ReLU -> conv(6->4)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1),
    )  # fmt: skip


def _tensors_of(obj: Any) -> list[torch.Tensor]:
    """The tensors a hook holds: its attributes, and those of the methods a container holds."""
    found = [v for v in vars(obj).values() if isinstance(v, torch.Tensor)]
    for method in getattr(obj, "_pruning_methods", ()):
        found += _tensors_of(method)
    return found


def hooks(model: nn.Module) -> list[Any]:
    return [h for m in model.modules() for h in m._forward_pre_hooks.values()]


def bool_bytes(model: nn.Module) -> int:
    """Bytes of distinct bool tensors reachable from the model's buffers and pruning hooks."""
    tensors = list(model.buffers()) + [t for h in hooks(model) for t in _tensors_of(h)]
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.dtype == torch.bool
    }
    return sum(storages.values())


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}


def containers(model: nn.Module) -> int:
    return sum(isinstance(h, (prune.PruningContainer, torch_prune.PruningContainer)) for h in hooks(model))


def mlp(seed: int = 0) -> nn.Sequential:
    """One prunable group (the 16 hidden units), so its scores do not depend on other groups' masks."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def test_rounds_keep_one_mask_per_tensor() -> None:
    model = chain()
    prune_channels(model, X, AMOUNTS[0])
    after_one = (len(hooks(model)), containers(model), bool_bytes(model))
    assert after_one[0] == 7 and after_one[1] == 0  # convs 0 and 3 (weight, bias), BN (both), conv 5
    assert after_one[2] == sum(b.numel() for b in masks(model).values())
    for amount in AMOUNTS[1:]:
        prune_channels(model, X, amount)
        assert (len(hooks(model)), containers(model), bool_bytes(model)) == after_one
    assert int((~model[0].weight_mask.flatten(1).any(1)).sum()) == 5  # 0.625 of 8 output channels


def original_l1(group: Any, model: nn.Module) -> torch.Tensor:
    """Hidden units scored by the L1 norm of their unmasked fc1 rows: the same scores every round.

    (The built-in ``"l1"`` divides by each member's mean norm, which masked units lower, so its
    later rounds rank by other numbers than a single call does.)
    """
    fc1 = model.get_submodule("0")
    weight = fc1._parameters.get("weight_orig", fc1._parameters.get("weight"))
    assert weight is not None and group.size == weight.shape[0]
    return weight.detach().abs().sum(1)


def test_rounds_give_the_masks_of_one_call_with_the_final_amount() -> None:
    stepped, once = mlp(), mlp()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    for amount in AMOUNTS:
        prune_channels(stepped, x, amount, importance=original_l1)
    prune_channels(once, x, AMOUNTS[-1], importance=original_l1)
    got, expected = masks(stepped), masks(once)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert int((~got["0.weight_mask"].any(1)).sum()) == 10  # 0.625 of 16 hidden units


def test_rounds_give_the_masks_stacked_custom_from_mask_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """Narrowing in place computes what torch's ``custom_from_mask`` on every round computes."""
    stepped, stacked = chain(), chain()
    for amount in AMOUNTS:
        prune_channels(stepped, X, amount)
    with monkeypatch.context() as patch:
        patch.setattr(structured, "narrow", torch_prune.custom_from_mask)
        for amount in AMOUNTS:
            prune_channels(stacked, X, amount)
    assert containers(stacked) > 0  # the oracle did stack
    got, expected = masks(stepped), masks(stacked)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key].bool()), key


def test_first_round_hook_holds_the_buffer_not_a_copy() -> None:
    model = chain()
    prune_channels(model, X, 0.5)
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            assert isinstance(hook, prune.CustomFromMask)
            assert hook.mask is module._buffers[hook._tensor_name + "_mask"]


def test_rounds_then_remove_give_the_masked_weight() -> None:
    model = chain().eval()
    for amount in AMOUNTS:
        prune_channels(model, X, amount)
    pruned = [(m, n) for m in model.modules() for n in prune._reparam.masked_names(m)]
    masked = [getattr(m, n).detach().clone() for m, n in pruned]
    out = model(X)
    assert prune.is_pruned(model) and masked
    prune.remove_all(model)
    assert not prune.is_pruned(model)
    for (m, n), value in zip(pruned, masked):
        assert torch.equal(getattr(m, n), value) and isinstance(getattr(m, n), nn.Parameter)
    assert torch.equal(model(X), out)
    assert not any(k.endswith(("_mask", "_orig")) for k in model.state_dict())


def test_rounds_then_remove_each_tensor() -> None:
    model = chain()
    for amount in AMOUNTS:
        prune_channels(model, X, amount)
    expected = model[0].weight.detach().clone()
    orig = model[0].weight_orig
    prune.remove(model[0], "weight")
    assert model[0].weight is orig and torch.equal(model[0].weight, expected)


def test_rounds_state_dict_loads_into_torch_pruned_model() -> None:
    """The keys are torch's, so a model pruned by torch with any masks accepts the state_dict."""
    model = chain().eval()
    for amount in AMOUNTS:
        prune_channels(model, X, amount)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    fresh = chain(seed=5).eval()
    for key in state:
        if key.endswith("_mask"):
            path, name = key[: -len("_mask")].rsplit(".", 1)
            torch_prune.identity(fresh.get_submodule(path), name)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(X), model(X))
    again = chain(seed=6).eval()
    prune_channels(again, X, 0.25)
    again.load_state_dict(state)  # a masksparse model pruned once takes the masks of five rounds
    assert torch.equal(again(X), model(X))


def test_rounds_on_top_of_torch_pruning_keep_its_mask() -> None:
    model = chain()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.3)
    torch_mask = model[0].weight_mask.clone()
    for amount in AMOUNTS:
        prune_channels(model, X, amount)
    assert torch.all(model[0].weight_mask <= torch_mask)
    assert torch.equal(model[0].weight, model[0].weight_orig * model[0].weight_mask)


@pytest.mark.parametrize(
    ("fn", "kwargs"),
    [
        ("l1_unstructured", {"amount": 0.3}),
        ("random_unstructured", {"amount": 5}),
        ("ln_structured", {"amount": 1, "n": 2, "dim": 0}),
        ("random_structured", {"amount": 0.25, "dim": 1}),
    ],
)
def test_repeated_prune_functions_stack_like_torch(fn: str, kwargs: dict[str, Any]) -> None:
    ours, theirs = nn.Linear(8, 6), nn.Linear(8, 6)
    theirs.load_state_dict(ours.state_dict())
    for seed in range(4):
        torch.manual_seed(seed)
        getattr(prune, fn)(ours, "weight", **kwargs)
        torch.manual_seed(seed)
        getattr(torch_prune, fn)(theirs, "weight", **kwargs)
        assert torch.equal(ours.weight_mask, theirs.weight_mask.bool())
    (hook,) = ours._forward_pre_hooks.values()
    (oracle,) = theirs._forward_pre_hooks.values()
    assert isinstance(hook, prune.PruningContainer) and len(hook) == len(oracle) == 4
    assert [type(m).__name__ for m in hook] == [type(m).__name__ for m in oracle]


def test_repeated_custom_from_mask_stacks_like_torch_without_copies() -> None:
    """Each CustomFromMask holds the caller's own mask, as torch's does; the buffer is the only copy."""
    ours, theirs = nn.Linear(8, 6), nn.Linear(8, 6)
    theirs.load_state_dict(ours.state_dict())
    generator = torch.Generator().manual_seed(0)
    given = [torch.rand(6, 8, generator=generator) > 0.3 for _ in range(3)]
    for m in given:
        prune.custom_from_mask(ours, "weight", m)
        torch_prune.custom_from_mask(theirs, "weight", m)
    assert torch.equal(ours.weight_mask, theirs.weight_mask.bool())
    (hook,) = ours._forward_pre_hooks.values()
    assert len(hook) == 3 and all(method.mask is m for method, m in zip(hook, given))
    held = {t.untyped_storage().data_ptr() for t in _tensors_of(hook)}
    assert held == {m.untyped_storage().data_ptr() for m in given}
    assert ours.weight_mask.untyped_storage().data_ptr() not in held


def test_hooks_follow_the_buffer_when_the_module_replaces_it() -> None:
    """After ``to_empty`` (or a device move) the buffers are new tensors; the hooks take them at forward."""
    model = chain().eval()
    for amount in AMOUNTS[:3]:
        prune_channels(model, X, amount)
    prune.global_unstructured([(model[5], "bias")], prune.L1Unstructured, amount=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(X)
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    assert torch.equal(model(X), expected)
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            held = hook[-1] if isinstance(hook, prune.PruningContainer) else hook
            assert held.mask is module._buffers[hook._tensor_name + "_mask"]
    assert bool_bytes(model) == sum(m.numel() for m in masks(model).values())
    prune_channels(model, X, AMOUNTS[3])  # narrows the new buffers; the hooks still hold them
    assert bool_bytes(model) == sum(m.numel() for m in masks(model).values())


@pytest.mark.parametrize("copier", ["pickle", "deepcopy"])
def test_copies_of_a_model_pruned_in_rounds_keep_one_mask_per_tensor(copier: str) -> None:
    model = chain().eval()
    for amount in AMOUNTS:
        prune_channels(model, X, amount)
    twin = pickle.loads(pickle.dumps(model)) if copier == "pickle" else copy.deepcopy(model)
    assert torch.equal(twin(X), model(X))
    assert bool_bytes(twin) == bool_bytes(model) == sum(m.numel() for m in masks(twin).values())
    prune_channels(twin, X, 0.75)  # the copy narrows its own masks, not the original's
    assert int((~twin[0].weight_mask.flatten(1).any(1)).sum()) == 6
    assert int((~model[0].weight_mask.flatten(1).any(1)).sum()) == 5
