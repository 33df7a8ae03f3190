"""Invariants of pruning, each named in its test's docstring and asserted directly.

They are the invariants torch's own test/nn/test_pruning.py states (parameter identity, the
reparametrisation, zero gradients, remove, iterative composition, custom methods), plus what masksparse
adds: bool masks, no stale or dense copy at rest, pickling, dtype moves, remove_all, N:M and compile.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from masksparse import prune
from masksparse._errors import MaskSparseError, PruningTypeError, PruningValueError
from tests._diff_helpers import assert_unchanged, seed_cpu, snapshot
from tests.models import convnet, mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(seed: int = 0, n_in: int = 10, n_out: int = 10) -> nn.Linear:
    seed_cpu(seed)
    return nn.Linear(n_in, n_out)


PRUNINGS: dict[str, Callable[[nn.Module], Any]] = {
    "identity": lambda m: prune.identity(m, "weight"),
    "random_unstructured": lambda m: prune.random_unstructured(m, "weight", amount=0.3),
    "l1_unstructured": lambda m: prune.l1_unstructured(m, "weight", amount=7),
    "random_structured": lambda m: prune.random_structured(m, "weight", amount=0.4, dim=0),
    "ln_structured": lambda m: prune.ln_structured(m, "weight", amount=3, n=2, dim=1),
    "custom_from_mask": lambda m: prune.custom_from_mask(m, "weight", mask=torch.rand(10, 10) > 0.5),
    "global_unstructured": lambda m: prune.global_unstructured(
        [(m, "weight"), (m, "bias")], pruning_method=prune.L1Unstructured, amount=0.5
    ),
    "nm_structured": lambda m: prune.nm_structured(m, "weight", n=2, m=5),
}


def _orig_times_mask(module: nn.Module, name: str = "weight") -> torch.Tensor:
    orig, mask = getattr(module, name + "_orig"), getattr(module, name + "_mask")
    return orig * mask.to(orig.dtype)


@pytest.mark.parametrize("how", list(PRUNINGS))
def test_pruning_keeps_the_parameter_object(how: str) -> None:
    """Pruning keeps the Parameter: ``weight_orig`` is the very object ``weight`` was (optimizers keep it)."""
    module = _linear()
    weight = module.weight
    PRUNINGS[how](module)
    assert module.weight_orig is weight
    expected = ["weight_orig", "bias_orig"] if how == "global_unstructured" else ["bias", "weight_orig"]
    assert [n for n, _ in module.named_parameters()] == expected
    assert module.weight_mask.dtype == torch.bool, "a binary mask is stored as a bool buffer"
    assert "weight_mask" in dict(module.named_buffers())


@pytest.mark.parametrize("how", list(PRUNINGS))
def test_weight_is_orig_times_mask_even_after_optimizer_step(how: str) -> None:
    """``module.weight == weight_orig * weight_mask`` after pruning, and right after ``optimizer.step()``
    with no forward in between (torch's stored copy is stale there; masksparse computes it on read)."""
    module = _linear()
    PRUNINGS[how](module)
    assert torch.equal(module.weight, _orig_times_mask(module))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    module(torch.randn(4, 10)).square().sum().backward()
    optimizer.step()
    assert torch.equal(module.weight, _orig_times_mask(module))
    with torch.no_grad():
        module.weight_orig.add_(1.0)
    assert torch.equal(module.weight, _orig_times_mask(module))


@pytest.mark.parametrize("how", list(PRUNINGS))
def test_masked_entries_get_zero_gradient(how: str) -> None:
    """Entries the mask zeroes get exactly zero gradient in ``weight_orig``; the others get the dense one."""
    module = _linear()
    PRUNINGS[how](module)
    x = torch.randn(4, 10)
    module(x).sum().backward()
    mask = module.weight_mask.bool()
    grad = module.weight_orig.grad
    assert grad is not None
    assert bool((grad[~mask] == 0).all())
    dense_grad = torch.ones(4, 10).t() @ x  # d(sum(x W^T + b))/dW
    assert torch.allclose(grad[mask], dense_grad[mask])


def test_remove_keeps_output_parameter_and_drops_reparametrisation() -> None:
    """remove() keeps the forward output and the same Parameter object, and deletes ``weight_orig``,
    ``weight_mask`` and the pruning hook."""
    module = _linear()
    weight = module.weight
    prune.l1_unstructured(module, "weight", amount=0.5)
    prune.random_unstructured(module, "bias", amount=2)
    x = torch.randn(3, 10)
    expected = module(x)
    assert prune.remove(module, "weight") is module
    assert module.weight is weight and isinstance(module.weight, nn.Parameter)
    assert torch.equal(module(x), expected)
    names = [n for n, _ in module.named_parameters()] + list(module.state_dict())
    assert not any(n.startswith("weight_") for n in names)
    assert [h._tensor_name for h in module._forward_pre_hooks.values()] == ["bias"]
    assert int((module.weight == 0).sum()) == 50
    prune.remove(module, "bias")
    assert not module._forward_pre_hooks and list(module.state_dict()) == ["weight", "bias"]
    assert torch.equal(module(x), expected)


def test_remove_restores_the_original_class() -> None:
    """Once nothing in a module is pruned any more, it is an instance of exactly its original class."""
    module = _linear()
    prune.l1_unstructured(module, "weight", amount=0.5)
    prune.l1_unstructured(module, "bias", amount=0.5)
    assert type(module).__name__ == "Linear" and isinstance(module, nn.Linear)
    prune.remove(module, "weight")
    prune.remove(module, "bias")
    assert type(module) is nn.Linear


def test_is_pruned_before_and_after() -> None:
    """is_pruned is False before pruning, True after (for the module and its parents), False after remove."""
    model = mlp()
    assert not prune.is_pruned(model) and not torch_prune.is_pruned(model)
    prune.ln_structured(model[2], "weight", amount=0.25, n=1, dim=0)
    assert prune.is_pruned(model) and prune.is_pruned(model[2]) and not prune.is_pruned(model[0])
    prune.remove(model[2], "weight")
    assert not prune.is_pruned(model)


def test_iterative_pruning_is_relative_to_what_remains() -> None:
    """Iterative pruning composes: each amount is a fraction of what remains (0.5 twice on 100 leaves 25),
    and entries pruned earlier stay pruned."""
    module = _linear()
    prune.l1_unstructured(module, "weight", amount=0.5)
    first = module.weight_mask.clone()
    prune.l1_unstructured(module, "weight", amount=0.5)
    assert int(module.weight_mask.sum()) == 25
    assert not bool((module.weight_mask & ~first).any())
    prune.random_unstructured(module, "weight", amount=0.2)
    assert int(module.weight_mask.sum()) == 20
    live_rows = int(module.weight_mask.any(dim=1).sum())
    prune.ln_structured(module, "weight", amount=0.5, n=1, dim=0)  # of the rows still alive
    assert int(module.weight_mask.any(dim=1).sum()) == live_rows - round(0.5 * live_rows)
    hook = next(iter(module._forward_pre_hooks.values()))
    assert [type(m).__name__ for m in hook] == [
        "L1Unstructured",
        "L1Unstructured",
        "RandomUnstructured",
        "LnStructured",
    ]


# --------------------------------------------------------------------------------------------------------
# Custom methods written for torch


class FooBarPruningMethod(prune.BasePruningMethod):
    """Prune every other entry in a tensor"""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):  # exactly as torch's tutorial writes it
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask


def foobar_unstructured(module, name):
    FooBarPruningMethod.apply(module, name)
    return module


class TorchFooBarPruningMethod(torch_prune.BasePruningMethod):
    """The same method for torch.nn.utils.prune (the oracle)."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask


class TorchHalvingMethod(torch_prune.BasePruningMethod):
    """A non-binary method: scales every third remaining entry by 0.5."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[::3] = 0.5
        return mask


class HalvingMethod(prune.BasePruningMethod):
    """TorchHalvingMethod, subclassing masksparse's base."""

    PRUNING_TYPE = "unstructured"
    compute_mask = TorchHalvingMethod.compute_mask


def _twins(seed: int = 0) -> tuple[nn.Sequential, nn.Sequential]:
    model = mlp(seed)
    return copy.deepcopy(model), copy.deepcopy(model)


def test_tutorial_custom_method_matches_torch() -> None:
    """A BasePruningMethod subclass written as torch's tutorial shows (FooBarPruningMethod) works through
    masksparse, alone and after other prunings, with the masks torch computes."""
    tm, mm = _twins()
    foobar_unstructured(mm[4], "bias")
    TorchFooBarPruningMethod.apply(tm[4], "bias")
    assert mm[4].bias_mask.tolist() == [False, True, False, True]
    prune.l1_unstructured(mm[0], "weight", amount=0.3)
    torch_prune.l1_unstructured(tm[0], "weight", amount=0.3)
    foobar_unstructured(mm[0], "weight")
    TorchFooBarPruningMethod.apply(tm[0], "weight")
    for name in ("0.weight_mask", "4.bias_mask"):
        m_mask, t_mask = mm.state_dict()[name], tm.state_dict()[name]
        assert m_mask.dtype == torch.bool and torch.equal(m_mask.float(), t_mask)
    x = torch.randn(2, 12)
    assert torch.equal(mm(x), tm(x))


def test_non_binary_custom_mask_is_kept_in_the_weight_dtype() -> None:
    """A custom method whose mask is not binary keeps its values, in the weight's dtype, as torch does."""
    tm, mm = _twins()
    HalvingMethod.apply(mm[0], "weight")
    TorchHalvingMethod.apply(tm[0], "weight")
    assert mm[0].weight_mask.dtype == torch.float32
    assert torch.equal(mm[0].weight_mask, tm[0].weight_mask)
    assert torch.equal(mm[0].weight, tm[0].weight)
    prune.custom_from_mask(mm[2], "weight", mask=torch.full((8, 16), 0.25))
    torch_prune.custom_from_mask(tm[2], "weight", mask=torch.full((8, 16), 0.25))
    assert torch.equal(mm[2].weight_mask, tm[2].weight_mask)
    x = torch.randn(2, 12)
    assert torch.equal(mm(x), tm(x))


class TorchEveryThird(torch_prune.BasePruningMethod):
    """A torch method whose result depends on the global order of the remaining entries."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[1::3] = 0
        return mask


@pytest.mark.parametrize("method", [TorchEveryThird, TorchFooBarPruningMethod, torch_prune.L1Unstructured])
def test_torch_method_classes_work_in_global_unstructured(method: type) -> None:
    """A subclass of torch's own BasePruningMethod passed to masksparse's global_unstructured prunes what
    torch's global_unstructured prunes, over the concatenation of the tensors in the order given."""
    tm, mm = _twins()
    prune.l1_unstructured(mm[2], "weight", amount=0.5)
    torch_prune.l1_unstructured(tm[2], "weight", amount=0.5)
    kwargs = {"amount": 0.4} if method is torch_prune.L1Unstructured else {}

    def params(model: nn.Sequential) -> list[tuple[nn.Module, str]]:
        return [(model[2], "weight"), (model[0], "bias"), (model[0], "weight"), (model[4], "weight")]

    prune.global_unstructured(params(mm), pruning_method=method, **kwargs)
    torch_prune.global_unstructured(params(tm), pruning_method=method, **kwargs)
    for key, value in tm.state_dict().items():
        assert torch.equal(mm.state_dict()[key].to(value.dtype), value), key
    x = torch.randn(2, 12)
    assert torch.equal(mm(x), tm(x))


def test_torch_is_pruned_and_remove_work_on_masksparse_models() -> None:
    """torch.nn.utils.prune.is_pruned sees a masksparse-pruned model, and torch's remove() undoes it."""
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    x = torch.randn(2, 12)
    expected = model(x)
    weight = model[0].weight_orig
    assert torch_prune.is_pruned(model)
    torch_prune.remove(model[0], "weight")
    assert not torch_prune.is_pruned(model) and not prune.is_pruned(model)
    assert model[0].weight is weight and "weight_mask" not in model[0].state_dict()
    assert torch.equal(model(x), expected)


# --------------------------------------------------------------------------------------------------------
# Storage: bool masks, nothing dense at rest, copies, dtype moves, assignment


def _pruned_mlp() -> nn.Sequential:
    model = mlp()
    seed_cpu(0)
    for layer in (model[0], model[2], model[4]):
        prune.l1_unstructured(layer, "weight", amount=0.5)
        prune.random_unstructured(layer, "bias", amount=1)
    return model


def test_masks_are_bool_buffers() -> None:
    """Binary masks are torch.bool buffers (a quarter of the bytes of float32 weights)."""
    model = _pruned_mlp()
    masks = {n: b for n, b in model.named_buffers() if n.endswith("_mask")}
    assert len(masks) == 6 and all(b.dtype == torch.bool for b in masks.values())
    assert all(model.state_dict()[n].dtype == torch.bool for n in masks)


def test_no_dense_copy_at_rest() -> None:
    """After a forward the module stores no tensor named ``weight``: it is computed when read."""
    model = _pruned_mlp()
    model(torch.randn(2, 12))
    for layer in (model[0], model[2], model[4]):
        assert "weight" not in vars(layer) and "bias" not in vars(layer)
        assert "weight" not in layer._parameters and "weight" not in layer._buffers
        tensors = [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
        assert not tensors, "a tensor is stored as a plain attribute"


def _assert_works(model: nn.Sequential, x: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(model(x), expected)
    for layer in (model[0], model[2], model[4]):
        assert layer.weight_mask.dtype == torch.bool
        assert torch.equal(layer.weight, _orig_times_mask(layer))
    assert prune.is_pruned(model) and torch_prune.is_pruned(model)
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    assert int(model[0].weight_mask.sum()) == 48
    prune.remove(model[0], "weight")
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight is model[0]._parameters["weight"]


def test_deepcopy_keeps_a_working_independent_model() -> None:
    """A deepcopy of a pruned model computes the same, stays pruned, and is independent of the original."""
    model = _pruned_mlp()
    x = torch.randn(2, 12)
    expected = model(x)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone[2].weight_orig.add_(1.0)
    assert torch.equal(model(x), expected)
    assert torch.equal(clone[2].weight, _orig_times_mask(clone[2]))
    _assert_works(copy.deepcopy(model), x, expected)


def test_torch_save_and_load_of_the_whole_model() -> None:
    """torch.save(model) of the full object and torch.load(weights_only=False) give a working model."""
    model = _pruned_mlp()
    x = torch.randn(2, 12)
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded[0]).__name__ == "Linear" and isinstance(loaded[0], nn.Linear)
    _assert_works(loaded, x, expected)


def test_to_float64_keeps_bool_masks_and_forward() -> None:
    """``model.to(torch.float64)`` leaves masks bool and the forward equal to the float64 reference."""
    model = _pruned_mlp()
    x = torch.randn(2, 12, dtype=torch.float64)
    model.to(torch.float64)
    assert all(b.dtype == torch.bool for n, b in model.named_buffers() if n.endswith("_mask"))
    assert model[0].weight.dtype == torch.float64
    reference = x
    for i, layer in enumerate((model[0], model[2], model[4])):
        reference = nn.functional.linear(reference, _orig_times_mask(layer), _orig_times_mask(layer, "bias"))
        reference = reference.relu() if i < 2 else reference
    assert torch.equal(model(x), reference)


@pytest.mark.parametrize(
    "value",
    [torch.zeros(16, 12), nn.Parameter(torch.zeros(16, 12)), None],
    ids=["tensor", "Parameter", "None"],
)
def test_assigning_to_a_pruned_tensor_raises(value: Any) -> None:
    """Assigning to a pruned ``module.weight`` raises a clear error (naming the tensor and ``weight_orig``)
    and leaves the model as it was; assigning to ``weight_orig`` is the way."""
    model = _pruned_mlp()
    before = snapshot(model)
    with pytest.raises(MaskSparseError) as info:
        model[0].weight = value
    assert "weight" in str(info.value) and "weight_orig" in str(info.value)
    with pytest.raises(MaskSparseError):
        del model[0].weight
    assert_unchanged(model, before, "failed assignment")


# --------------------------------------------------------------------------------------------------------
# remove_all


@pytest.mark.parametrize("pruner", [prune, torch_prune], ids=["masksparse-pruned", "torch-pruned"])
@pytest.mark.parametrize("factory", [mlp, convnet], ids=["mlp", "convnet"])
def test_remove_all_makes_every_tensor_permanent(pruner: Any, factory: Callable[[], nn.Module]) -> None:
    """remove_all(model) keeps the outputs, leaves no ``_orig``/``_mask`` key, and the plain state_dict
    loads strictly into a fresh model; it works for masksparse- and torch-pruned models."""
    model = factory()
    targets = [
        (m, n) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) for n in ("weight", "bias")
    ]
    seed_cpu(1)
    pruner.global_unstructured(targets, pruning_method=pruner.L1Unstructured, amount=0.4)
    pruner.ln_structured(targets[0][0], "weight", amount=1, n=2, dim=0)
    model.eval()
    x = torch.randn(2, 12) if factory is mlp else torch.randn(2, 3, 8, 8)
    expected = model(x)
    assert prune.remove_all(model) is model
    assert not prune.is_pruned(model) and not torch_prune.is_pruned(model)
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    assert [type(m) for m in model.modules()] == [type(m) for m in factory().modules()]
    assert torch.equal(model(x), expected)
    fresh = factory().eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh(x), expected)


# --------------------------------------------------------------------------------------------------------
# N:M sparsity


def test_two_four_keeps_the_two_largest_of_every_four() -> None:
    """2:4 on a Linear (dim=-1): every group of 4 consecutive inputs keeps exactly its 2 largest |w|."""
    module = _linear(n_in=16, n_out=6)
    prune.nm_structured(module, "weight", n=2, m=4, dim=-1)
    groups = module.weight_orig.detach().abs().reshape(6, 4, 4)
    mask = module.weight_mask.reshape(6, 4, 4)
    assert module.weight_mask.dtype == torch.bool
    assert bool((mask.sum(-1) == 2).all())
    top2 = groups.topk(2, dim=-1).indices
    expected = torch.zeros_like(mask).scatter_(-1, top2, True)
    assert torch.equal(mask, expected)
    assert bool(((module.weight.reshape(6, 4, 4) != 0).sum(-1) <= 2).all())


def test_n_m_along_dim_zero_and_with_importance_scores() -> None:
    """N:M along dim 0 groups output rows; importance_scores replace |w| as the criterion."""
    module = _linear(n_in=5, n_out=8)
    scores = torch.arange(40, dtype=torch.float32).reshape(8, 5)
    prune.nm_structured(module, "weight", n=1, m=4, dim=0, importance_scores=scores)
    expected = torch.zeros(8, 5, dtype=torch.bool)
    expected[[3, 7]] = True  # the largest score of rows 0-3 and of rows 4-7
    assert torch.equal(module.weight_mask, expected)


@pytest.mark.parametrize(
    ("n", "m", "error"),
    [
        (5, 4, PruningValueError),  # n > m
        (2, 3, PruningValueError),  # 3 does not divide 16
        (2.0, 4, PruningTypeError),
        (2, "4", PruningTypeError),
        (2, 4.5, PruningTypeError),
    ],
)
def test_n_m_invalid_options_raise_and_change_nothing(n: Any, m: Any, error: type) -> None:
    """Invalid n/m raise PruningValueError / PruningTypeError and leave the module as it was."""
    model = nn.Sequential(_linear(n_in=16, n_out=6))
    prune.l1_unstructured(model[0], "bias", amount=1)
    before = snapshot(model)
    with pytest.raises(error):
        prune.nm_structured(model[0], "weight", n=n, m=m)
    with pytest.raises(error):
        prune.NMStructured.apply(model[0], "weight", n, m)
    assert_unchanged(model, before, f"nm_structured(n={n!r}, m={m!r})")


# --------------------------------------------------------------------------------------------------------
# torch.compile


def test_compiled_masked_model_matches_eager() -> None:
    """torch.compile(model, backend='aot_eager') of a masked model gives eager's outputs and gradients."""
    torch._dynamo.reset()
    model = _pruned_mlp()
    x = torch.randn(3, 12)
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager_out)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], msg=name)
        if name.endswith("weight_orig"):
            mask = dict(model.named_buffers())[name.replace("_orig", "_mask")]
            assert bool((param.grad[~mask] == 0).all())
    torch._dynamo.reset()
