"""masksparse-specific behaviour of the pruning methods: mask storage, rollback, interop, N:M, RNNs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from masksparse import PruningAttributeError, PruningTypeError, PruningValueError, ShapeMismatchError, prune
from tests.models import convnet, mlp, prunable


def _snapshot(model: nn.Module) -> tuple:
    return (
        [(k, v.clone()) for k, v in model.state_dict().items()],
        [(n, id(p)) for n, p in model.named_parameters()],
        [type(m) for m in model.modules()],
        [list(m._forward_pre_hooks.values()) for m in model.modules()],
    )


def _assert_unchanged(model: nn.Module, before: tuple) -> None:
    after = _snapshot(model)
    assert [k for k, _ in after[0]] == [k for k, _ in before[0]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(after[0], before[0]))
    assert after[1:] == before[1:]


class Soft(prune.BasePruningMethod):
    """A custom method returning a non-binary (soft) mask."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return default_mask * 0.5


class HalfAbove(prune.L1Unstructured):
    """Overrides compute_mask: it must receive float masks, as torch would pass them."""

    seen: list[torch.dtype] = []

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        HalfAbove.seen.append(default_mask.dtype)
        return super().compute_mask(t, default_mask)


def test_binary_masks_are_bool_and_soft_masks_keep_the_weight_dtype() -> None:
    """A 0/1 mask is stored as bool; a soft mask is kept as given, and the weight is orig * mask."""
    layer = prune.l1_unstructured(nn.Linear(4, 3), "weight", amount=0.5)
    assert layer.weight_mask.dtype == torch.bool
    soft = nn.Linear(4, 3).double()
    Soft.apply(soft, "weight")
    assert soft.weight_mask.dtype == torch.float64
    assert torch.equal(soft.weight, soft.weight_orig * 0.5)
    scaled = prune.custom_from_mask(nn.Linear(2, 2), "bias", mask=torch.tensor([0.5, 2.0]))
    assert scaled.bias_mask.tolist() == [0.5, 2.0] and scaled.bias_mask.dtype == torch.float32


def test_overridden_compute_mask_gets_float_masks() -> None:
    """Only masksparse's own compute_mask implementations are handed bool masks."""
    HalfAbove.seen.clear()
    layer = nn.Linear(4, 3)
    HalfAbove.apply(layer, "weight", amount=2)
    HalfAbove.apply(layer, "weight", amount=2)
    assert HalfAbove.seen == [torch.float32, torch.float32]
    assert layer.weight_mask.dtype == torch.bool and int((~layer.weight_mask).sum()) == 4


def test_failures_leave_the_module_unchanged() -> None:
    """Bad names, None tensors, buffers, wrong shapes and a failing compute_mask change nothing."""

    class Boom(prune.BasePruningMethod):
        def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = convnet()
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    before = _snapshot(model)
    cases = [
        (PruningAttributeError, "no parameter named 'weigth'", lambda: prune.identity(model[0], "weigth")),
        (PruningTypeError, "is a buffer", lambda: prune.identity(model[1], "running_mean")),
        (
            ShapeMismatchError,
            r"\(8, 3, 3, 3\)",
            lambda: prune.l1_unstructured(model[0], "weight", 1, torch.ones(3)),
        ),
        (ShapeMismatchError, "mask", lambda: prune.custom_from_mask(model[3], "weight", torch.ones(2))),
        (RuntimeError, "boom", lambda: Boom.apply(model[0], "weight")),
        (RuntimeError, "boom", lambda: Boom.apply(model[3], "weight")),
        (PruningValueError, "amount=1000", lambda: prune.l1_unstructured(model[0], "weight", 1000)),
        (PruningValueError, "has to be pruned", lambda: prune.remove(model[3], "weight")),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
        _assert_unchanged(model, before)
    no_bias = nn.Linear(3, 3, bias=False)
    with pytest.raises(PruningTypeError, match="Linear.bias is None"):
        prune.identity(no_bias, "bias")


def test_global_failure_on_one_entry_changes_no_entry() -> None:
    """global_unstructured validates every (module, name) before pruning any of them."""
    model = mlp()
    before = _snapshot(model)
    params = [*prunable(model), (model[1], "weight")]
    with pytest.raises(PruningAttributeError, match="ReLU has no parameter named 'weight'"):
        prune.global_unstructured(params, prune.L1Unstructured, amount=0.5)
    with pytest.raises(ShapeMismatchError):
        prune.global_unstructured(
            prunable(model),
            prune.L1Unstructured,
            importance_scores={(model[0], "weight"): torch.ones(2)},
            amount=1,
        )
    with pytest.raises(PruningValueError, match="listed twice"):
        prune.global_unstructured([*prunable(model), prunable(model)[0]], prune.L1Unstructured, amount=1)
    _assert_unchanged(model, before)


def test_global_with_a_custom_method_matches_torch_exactly() -> None:
    """Methods that must see all scores at once go through torch's own algorithm."""

    class KeepLargestHalfOfEach(torch_prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
            mask = default_mask.clone()
            mask[t.abs() < t.abs().median()] = 0
            return mask

    ours, theirs = mlp(), mlp()
    prune.l1_unstructured(ours[0], "weight", amount=0.25)
    torch_prune.l1_unstructured(theirs[0], "weight", amount=0.25)
    prune.global_unstructured(prunable(ours), KeepLargestHalfOfEach)
    torch_prune.global_unstructured(prunable(theirs), KeepLargestHalfOfEach)
    for (a, name), (b, _) in zip(prunable(ours), prunable(theirs)):
        assert torch.equal(getattr(a, name + "_mask"), getattr(b, name + "_mask").bool())


def test_global_hooks_keep_no_second_copy_of_the_masks() -> None:
    """The CustomFromMask hooks left by global pruning point at the mask buffers themselves."""
    model = mlp()
    prune.global_unstructured(prunable(model), prune.L1Unstructured, amount=0.5)
    for module, name in prunable(model):
        (hook,) = [h for h in module._forward_pre_hooks.values() if h._tensor_name == name]
        assert isinstance(hook, prune.CustomFromMask)
        assert hook.mask is getattr(module, name + "_mask")


def test_global_random_prunes_the_requested_count_among_remaining() -> None:
    """RandomUnstructured globally: exactly round(amount * remaining) new entries, old ones kept pruned."""
    model = mlp()
    prune.l1_unstructured(model[2], "weight", amount=0.5)
    old = model[2].weight_mask.clone()
    remaining = sum(p.numel() for _, p in model.named_parameters()) - int((~old).sum())
    torch.manual_seed(0)
    prune.global_unstructured(prunable(model), prune.RandomUnstructured, amount=0.3)
    pruned = sum(int((~getattr(m, n + "_mask")).sum()) for m, n in prunable(model))
    assert pruned == int((~old).sum()) + round(0.3 * remaining)
    assert not bool((model[2].weight_mask & ~old).any())


def test_continuing_on_a_tensor_pruned_by_torch() -> None:
    """masksparse takes over a torch-pruned tensor: one container hook, a bool mask, no stale copy."""
    layer = nn.Linear(10, 10)
    reference = copy.deepcopy(layer)  # before pruning: torch-pruned modules cannot be deep-copied
    torch_prune.l1_unstructured(layer, "weight", amount=0.5)
    torch_prune.l1_unstructured(reference, "weight", amount=0.5)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    torch_prune.l1_unstructured(reference, "weight", amount=0.5)
    (hook,) = layer._forward_pre_hooks.values()
    assert isinstance(hook, prune.PruningContainer) and len(hook) == 2
    assert layer.weight_mask.dtype == torch.bool and "weight" not in layer.__dict__
    assert torch.equal(layer.weight_mask, reference.weight_mask.bool())
    torch_prune.remove(layer, "weight")
    assert type(layer) is nn.Linear and list(layer.state_dict()) == ["bias", "weight"]


def test_nm_structured_groups_and_iterations() -> None:
    """2:4 along a conv's input channels keeps the 2 largest of every group; earlier prunes count."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3)
    prune.nm_structured(conv, "weight", n=2, m=4, dim=1)
    groups = conv.weight_mask.movedim(1, -1).reshape(-1, 4)
    assert bool((groups.sum(dim=1) == 2).all())
    magnitudes = conv.weight_orig.detach().abs().movedim(1, -1).reshape(-1, 4)
    kept_min = torch.where(groups, magnitudes, torch.inf).min(dim=1).values
    pruned_max = torch.where(groups, -torch.inf, magnitudes).max(dim=1).values
    assert bool((kept_min >= pruned_max).all())
    layer = prune.l1_unstructured(nn.Linear(8, 4), "weight", amount=0.75)
    earlier = layer.weight_mask.clone()
    prune.nm_structured(layer, "weight", n=2, m=4)
    assert torch.equal(layer.weight_mask, earlier & layer.weight_mask)
    assert bool((layer.weight_mask.reshape(-1, 4).sum(dim=1) <= 2).all())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"n": 3, "m": 2}, PruningValueError, "0 <= n <= m"),
        ({"n": 2.0, "m": 4}, PruningTypeError, "int n"),
        ({"n": 2, "m": 0}, PruningValueError, "m >= 1"),
        ({"n": 2, "m": 3}, PruningValueError, "multiple of 3"),
    ],
)
def test_nm_structured_rejects_bad_options(kwargs: dict, error: type, message: str) -> None:
    """N:M options are checked and name the offending value; the layer stays unpruned."""
    layer = nn.Linear(8, 2)
    with pytest.raises(error, match=message):
        prune.nm_structured(layer, "weight", **kwargs)
    assert not prune.is_pruned(layer) and type(layer) is nn.Linear


def test_lstm_forward_uses_the_masked_weights() -> None:
    """RNN modules cache their weights; the hook refreshes that cache, matching torch's pruned LSTM."""
    torch.manual_seed(0)
    ours = nn.LSTM(4, 6, num_layers=2)
    theirs = copy.deepcopy(ours)
    prune.l1_unstructured(ours, "weight_ih_l1", amount=0.5)
    torch_prune.l1_unstructured(theirs, "weight_ih_l1", amount=0.5)
    x = torch.randn(5, 2, 4)
    assert torch.equal(ours(x)[0], theirs(x)[0])
    copied = copy.deepcopy(ours)
    assert torch.equal(copied(x)[0], theirs(x)[0])


def test_unpickled_module_keeps_pruning() -> None:
    """A full-object torch.save / torch.load round trip keeps the reparametrisation working."""
    import io

    model = mlp()
    prune.global_unstructured(prunable(model), prune.L1Unstructured, amount=0.6)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(3, 12)
    assert torch.equal(loaded(x), model(x))
    assert type(loaded[0]).__name__ == "Linear" and isinstance(loaded[0], nn.Linear)
    with pytest.raises(PruningAttributeError, match="Linear.weight"):
        loaded[0].weight = nn.Parameter(torch.zeros(16, 12))


BOOL_AMOUNT_CALLS = {
    "l1_unstructured": lambda ns, m, a: ns.l1_unstructured(m[0], "weight", amount=a),
    "random_unstructured": lambda ns, m, a: ns.random_unstructured(m[0], "bias", amount=a),
    "ln_structured": lambda ns, m, a: ns.ln_structured(m[0], "weight", amount=a, n=2, dim=0),
    "random_structured": lambda ns, m, a: ns.random_structured(m[0], "weight", amount=a, dim=1),
    "class apply": lambda ns, m, a: ns.L1Unstructured.apply(m[2], "weight", amount=a),
    "global_unstructured": lambda ns, m, a: ns.global_unstructured(
        [(m[0], "weight"), (m[2], "weight")], ns.L1Unstructured, amount=a
    ),
}


@pytest.mark.parametrize("amount", [True, False])
@pytest.mark.parametrize("call", list(BOOL_AMOUNT_CALLS))
def test_bool_amount_is_refused_where_torch_counts_it(call: str, amount: bool) -> None:
    """A deliberate deviation: torch's check takes a bool for an int; masksparse refuses it.

    In torch, False prunes nothing; True prunes one channel in ``ln_structured`` and fails inside
    ``torch.topk``/``kthvalue`` (a bare TypeError) everywhere else.
    """
    theirs = mlp()
    if amount and call != "ln_structured":
        with pytest.raises(TypeError, match="must be int, not bool"):
            BOOL_AMOUNT_CALLS[call](torch_prune, theirs, amount)
    else:
        BOOL_AMOUNT_CALLS[call](torch_prune, theirs, amount)
        pruned = sum(int((m == 0).sum()) for k, m in theirs.state_dict().items() if k.endswith("_mask"))
        assert pruned == (12 if amount else 0)  # one output channel of Linear(12, 16)
    ours = mlp()
    before = _snapshot(ours)
    with pytest.raises(PruningTypeError, match=f"amount={amount} is a bool"):
        BOOL_AMOUNT_CALLS[call](prune, ours, amount)
    _assert_unchanged(ours, before)
    with pytest.raises(PruningTypeError, match="is a bool"):
        prune.LnStructured(amount=amount, n=1)


AMOUNT_MESSAGES = [
    (
        lambda m: prune.l1_unstructured(m[0], "weight", amount=1.5),
        PruningValueError,
        "prune.l1_unstructured(Linear, 'weight'): amount=1.5 should be a float in [0, 1] or a "
        "non-negative int",
    ),
    (
        lambda m: prune.random_unstructured(m[2], "bias", amount=-1),
        PruningValueError,
        "prune.random_unstructured(Linear, 'bias'): amount=-1 should be a float in [0, 1] or a "
        "non-negative int",
    ),
    (
        lambda m: prune.l1_unstructured(m[0], "weight", amount=193),
        PruningValueError,
        "prune.l1_unstructured(Linear, 'weight'): amount=193 is larger than the number of entries left to "
        "prune, numel=192",
    ),
    (
        lambda m: prune.ln_structured(m[2], "weight", amount=9, n=1, dim=0),
        PruningValueError,
        "prune.ln_structured(Linear, 'weight'): amount=9 is larger than the number of channels left along "
        "dim 0, size=8",
    ),
    (
        lambda m: prune.random_structured(m[0], "weight", amount="half", dim=0),
        PruningTypeError,
        "prune.random_structured(Linear, 'weight'): amount='half' should be a float in [0, 1] or a "
        "non-negative int, not str",
    ),
    (
        lambda m: prune.L1Unstructured.apply(m[4], "weight", amount=2.0),
        PruningValueError,
        "prune.L1Unstructured.apply(Linear, 'weight'): amount=2.0 should be a float in [0, 1] or a "
        "non-negative int",
    ),
    (
        lambda m: prune.global_unstructured(
            [(m[0], "bias"), (m[2], "bias")], prune.L1Unstructured, amount=25
        ),
        PruningValueError,
        "prune.global_unstructured(L1Unstructured): amount=25 is larger than the number of entries left to "
        "prune, numel=24",
    ),
]


@pytest.mark.parametrize("index", range(len(AMOUNT_MESSAGES)))
def test_amount_errors_name_the_call_module_and_tensor(index: int) -> None:
    call, error, message = AMOUNT_MESSAGES[index]
    model = mlp()
    before = _snapshot(model)
    with pytest.raises(error) as raised:
        call(model)
    assert str(raised.value) == message
    _assert_unchanged(model, before)


def test_amount_left_after_earlier_pruning_counts_the_unpruned_entries() -> None:
    """An int amount counts the entries still unpruned, as torch's container does; the error says so."""
    layer = nn.Linear(4, 3)
    prune.l1_unstructured(layer, "weight", amount=5)
    with pytest.raises(PruningValueError) as raised:
        prune.l1_unstructured(layer, "weight", amount=8)
    assert str(raised.value).endswith("amount=8 is larger than the number of entries left to prune, numel=7")
    with pytest.raises(ValueError, match="should be smaller than the number of parameters to prune=7"):
        torch_prune.l1_unstructured(torch_prune.l1_unstructured(nn.Linear(4, 3), "weight", 5), "weight", 8)
    prune.l1_unstructured(layer, "weight", amount=7)
    assert not layer.weight_mask.any()


class Blocks(nn.Module):
    """Named and numbered submodules, to check the suggested path is Python that reaches the owner."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.ReLU())])
        self.heads = nn.ModuleDict({"out-1": nn.Linear(6, 2)})


OWNER_CASES = [
    ("l1_unstructured", {"amount": 0.5}, "fc1.weight", "model.fc1", "weight"),
    ("random_unstructured", {"amount": 1}, "fc1.bias", "model.fc1", "bias"),
    ("ln_structured", {"amount": 1, "n": 2, "dim": 0}, "blocks.0.0.weight", "model.blocks[0][0]", "weight"),
    ("random_structured", {"amount": 1, "dim": 1}, "blocks.0.0.weight", "model.blocks[0][0]", "weight"),
    ("identity", {}, "heads.out-1.weight", "model.get_submodule('heads.out-1')", "weight"),
    ("custom_from_mask", {"mask": torch.zeros(6)}, "fc1.bias", "model.fc1", "bias"),
    ("nm_structured", {"n": 2, "m": 4}, "fc1.weight", "model.fc1", "weight"),
]


@pytest.mark.parametrize(("fn", "kwargs", "name", "path", "leaf"), OWNER_CASES)
def test_a_dotted_name_suggests_the_module_that_owns_it(
    fn: str, kwargs: dict, name: str, path: str, leaf: str
) -> None:
    model = Blocks()
    before = _snapshot(model)
    with pytest.raises(PruningAttributeError) as raised:
        getattr(prune, fn)(model, name, **kwargs)
    message = str(raised.value)
    assert message.startswith(f"prune.{fn}(Blocks, {name!r}): Blocks has no parameter named {name!r}")
    assert message.endswith(
        f"the first argument is the module that owns the tensor: did you mean prune.{fn}({path}, {leaf!r})?"
    )
    _assert_unchanged(model, before)
    # The suggested call is real Python and works.
    getattr(prune, fn)(eval(path, {"model": model}), leaf, **kwargs)
    assert hasattr(model.get_submodule(name.rsplit(".", 1)[0]), leaf + "_mask")


def test_dotted_names_in_remove_class_apply_and_global() -> None:
    model = Blocks()
    prune.l1_unstructured(model.fc1, "weight", amount=2)
    with pytest.raises(PruningValueError) as raised:
        prune.remove(model, "fc1.weight")
    assert str(raised.value).endswith("did you mean prune.remove(model.fc1, 'weight')?")
    with pytest.raises(PruningAttributeError) as raised:
        prune.L1Unstructured.apply(model, "blocks.0.0.bias", amount=1)
    assert str(raised.value).endswith("did you mean prune.L1Unstructured.apply(model.blocks[0][0], 'bias')?")
    with pytest.raises(PruningAttributeError) as raised:
        prune.global_unstructured([(model, "heads.out-1.weight")], prune.L1Unstructured, amount=1)
    assert str(raised.value).endswith("did you mean (model.get_submodule('heads.out-1'), 'weight')?")


def test_no_suggestion_without_an_owner() -> None:
    """A dotted name that no submodule owns, or an undotted one, gets the plain message."""
    model = Blocks()
    for name in ("fc2.weight", "fc1.kernel", "weight", "blocks.0.1.weight"):
        with pytest.raises(PruningAttributeError) as raised:
            prune.l1_unstructured(model, name, amount=1)
        assert "did you mean" not in str(raised.value)
        assert str(raised.value).startswith(f"prune.l1_unstructured(Blocks, {name!r}): ")
