"""Differential tests: ``masksparse.prune`` against ``torch.nn.utils.prune``, the oracle.

Every case deep-copies one layer (or a few) twice, runs the same pruning calls on both copies with the
global RNG reseeded before each call, and compares everything a user can observe: masks (masksparse
keeps binary ones as bool), the tensors read as ``module.<name>``, parameter/buffer/state_dict names in
order, pruning hooks, forward outputs, gradients, and the RNG state after each call. When torch raises,
masksparse must raise an instance of torch's exception type and leave its model exactly as it was.

Hypothesis runs derandomized with bounded examples. ``CASES`` counts what ran; the last test checks the
counts and records them as junit properties (``--junitxml=FILE``); ``--hypothesis-show-statistics``
shows the examples per test and how often each method and error occurred.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from torch import nn

from masksparse import prune
from tests._diff_helpers import (
    LAYER_KINDS,
    LayerSpec,
    assert_error_parity,
    assert_params_kept,
    assert_same_structure,
    assert_same_values,
    assert_self_consistent,
    assert_unchanged,
    run_seeded,
    seed_cpu,
    snapshot,
    twin,
)

CASES: Counter[str] = Counter()

DIFF_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Fractions whose rounding matters: round() is banker's rounding and 0.35 * 10 is 3.4999999999999996.
SPECIAL_FRACTIONS = (0.0, 1.0, 0.5, 0.25, 0.75, 0.1, 0.15, 0.3, 0.35, 0.45, 0.7, 0.125, 0.375, 1 / 3, 2 / 3)
NORMS: tuple[Any, ...] = (1, 2, math.inf, -math.inf, "fro", 3.5)


@dataclass(frozen=True)
class Step:
    """One call of the public API, described as data so hypothesis can draw and shrink it."""

    method: str  # a functional name, or "remove"
    name: str
    amount: Any = None
    n: Any = None
    dim: int = -1
    scores_seed: int | None = None  # importance_scores drawn from this seed when set
    mask_kind: str = "float"  # custom_from_mask: float / bool / int64 / nonbinary
    via_class: bool = False  # Class.apply(...) instead of the function
    by_torch: bool = False  # both copies pruned by torch.nn.utils.prune (masksparse takes over later)
    positional: bool = False
    rng_seed: int = 0


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------------
# Strategies


@st.composite
def layer_specs(draw: st.DrawFn) -> LayerSpec:
    """A small Linear/Conv/ConvTranspose layer; groups, no bias and float64 now and then."""
    kind = draw(st.sampled_from(LAYER_KINDS))
    seed = draw(st.integers(0, 2**16))
    has_bias = draw(st.booleans())
    dtype = draw(st.sampled_from(("float32",) * 4 + ("float64",)))
    if kind == "Linear":
        n_in, n_out = draw(st.integers(1, 8)), draw(st.integers(1, 6))
        return LayerSpec(kind, n_in, n_out, bias=has_bias, seed=seed, dtype=dtype)
    groups = draw(st.sampled_from((1, 1, 2, 3)))
    in_ch = groups * draw(st.integers(1, 3))
    out_ch = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 2 if kind.endswith("3d") else 3))
    return LayerSpec(kind, in_ch, out_ch, kernel, groups, has_bias, seed, dtype)


def amounts(max_int: int) -> st.SearchStrategy[Any]:
    """Integer counts, special fractions and arbitrary fractions in [0, 1]."""
    return st.one_of(
        st.integers(0, max_int),
        st.sampled_from(SPECIAL_FRACTIONS),
        st.floats(0.0, 1.0, allow_nan=False),
    )


def _structure_key(method: str, dim: int, ndim: int) -> Any:
    """What a step leaves behind in a mask: scattered zeros ("u") or whole slices along a dim."""
    if method in ("random_structured", "ln_structured"):
        return ("s", dim % ndim)
    return None if method == "identity" else "u"


@st.composite
def steps_for(draw: st.DrawFn, spec: LayerSpec) -> list[Step]:
    """1-4 prunings mixing methods and tensors, sometimes a remove() and one more pruning after it."""
    shapes = spec.param_shapes()
    history: dict[str, set[Any]] = {name: set() for name in shapes}
    steps: list[Step] = []
    count = draw(st.integers(1, 4))
    remove_at = draw(st.sampled_from((None, None, None, count - 1, count - 2)))
    for index in range(count):
        if index == remove_at and any(history.values()) and index > 0:
            name = draw(st.sampled_from(sorted(k for k, v in history.items() if v)))
            steps.append(Step("remove", name, positional=draw(st.booleans())))
            history[name] = set()
            continue
        name = draw(st.sampled_from(("weight", "weight", "weight", "bias"))) if "bias" in shapes else "weight"
        steps.append(_draw_step(draw, name, shapes[name], history[name]))
    if draw(st.integers(0, 4)) == 0:
        steps[0] = dataclasses.replace(steps[0], by_torch=True)
    return steps


def _draw_step(draw: st.DrawFn, name: str, shape: tuple[int, ...], history: set[Any]) -> Step:
    ndim = len(shape)
    methods = ("identity", "random_unstructured", "l1_unstructured", "l1_unstructured", "custom_from_mask")
    if ndim > 1:
        methods += ("random_structured",) * 2 + ("ln_structured",) * 4
    else:
        methods += ("random_structured",)  # the 1-D error path, now and then
    method = draw(st.sampled_from(methods))
    in_range = draw(st.integers(0, 9)) > 0  # a dim out of range now and then: an IndexError path
    dim = draw(st.integers(-ndim, ndim - 1) if in_range else st.sampled_from((ndim, -ndim - 1)))
    max_int = shape[dim % ndim] if "structured" in method else math.prod(shape)
    scores = None
    if method in ("l1_unstructured", "ln_structured"):
        scores = draw(st.one_of(st.none(), st.integers(0, 2**16)))
    n = None
    if method == "ln_structured":
        norms = NORMS + (("nuc",) if ndim == 3 else ())
        n = draw(st.sampled_from(norms))
        # -inf ties at 0 on every slice that already holds a pruned entry; torch breaks such ties
        # arbitrarily, so keep -inf to masks made only of whole slices along this dim.
        if n == -math.inf and scores is None and not history <= {("s", dim % ndim)}:
            n = 1
    step = Step(
        method,
        name,
        amount=None if method in ("identity", "custom_from_mask") else draw(amounts(max_int + 1)),
        n=n,
        dim=dim,
        scores_seed=scores,
        mask_kind=draw(st.sampled_from(("float", "bool", "int64", "float", "nonbinary"))),
        via_class=draw(st.booleans()),
        positional=draw(st.booleans()),
        rng_seed=draw(st.integers(0, 2**16)),
    )
    key = _structure_key(method, dim, ndim)
    if key is not None:
        history.add(key)
    return step


# --------------------------------------------------------------------------------------------------------
# Turning a Step into a call


def _scores(seed: int, shape: torch.Size) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _custom_mask(step: Step, shape: torch.Size) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step.rng_seed + 7)
    bits = torch.rand(shape, generator=gen) > 0.4
    if step.mask_kind == "bool":
        return bits
    if step.mask_kind == "int64":
        return bits.long()
    if step.mask_kind == "nonbinary":
        return bits.float() * torch.where(torch.rand(shape, generator=gen) > 0.5, 1.0, 0.5)
    return bits.float()


_CLASSES = {
    "identity": "Identity",
    "random_unstructured": "RandomUnstructured",
    "l1_unstructured": "L1Unstructured",
    "random_structured": "RandomStructured",
    "ln_structured": "LnStructured",
    "custom_from_mask": "CustomFromMask",
}


def step_call(ns: Any, module: nn.Module, step: Step) -> Any:
    """A zero-argument callable running ``step`` with pruning namespace ``ns`` on ``module``."""
    name = step.name
    if step.method == "remove":
        if step.positional:
            return lambda: _check_returns(ns.remove(module, name), module)
        return lambda: _check_returns(ns.remove(module, name=name), module)
    shape = getattr(module, name).shape
    kw: dict[str, Any] = {}
    if step.method in ("random_unstructured", "l1_unstructured", "random_structured", "ln_structured"):
        kw["amount"] = step.amount
    if step.method == "ln_structured":
        kw["n"] = step.n
    if step.method in ("random_structured", "ln_structured"):
        kw["dim"] = step.dim
    if step.method == "custom_from_mask":
        kw["mask"] = _custom_mask(step, shape)
    if step.scores_seed is not None:
        kw["importance_scores"] = _scores(step.scores_seed, shape)
    if step.via_class:
        cls = getattr(ns, _CLASSES[step.method])
        return lambda: cls.apply(module, name, **kw)
    fn = getattr(ns, step.method)
    if step.positional:
        scores = kw.pop("importance_scores", None)
        args = list(kw.values())
        extra = {} if scores is None else {"importance_scores": scores}
        return lambda: _check_returns(fn(module, name, *args, **extra), module)
    return lambda: _check_returns(fn(module, name, **kw), module)


def _check_returns(returned: Any, module: nn.Module) -> None:
    assert returned is module, "the functional API returns the module it pruned"


# --------------------------------------------------------------------------------------------------------
# Tests


def run_steps(spec: LayerSpec, steps: list[Step]) -> None:
    """Apply ``steps`` to twin copies of ``spec``'s layer and compare after every step."""
    tm, mm = twin(spec.build())
    originals = dict(mm.named_parameters())
    x = spec.example_input()
    torch_made: set[str] = set()
    for index, step in enumerate(steps):
        where = f"step {index} {step}"
        if step.by_torch:
            # A model pruned with torch.nn.utils.prune, handed to masksparse for the next steps.
            t_out = run_seeded(step_call(torch_prune, tm, step), step.rng_seed)
            m_out = run_seeded(step_call(torch_prune, mm, step), step.rng_seed)
            if t_out.error is not None:
                return
            torch_made.add(step.name)
            CASES["torch-pruned first"] += 1
            continue
        torch_made.discard(step.name)
        before = snapshot(mm)
        t_out = run_seeded(step_call(torch_prune, tm, step), step.rng_seed)
        m_out = run_seeded(step_call(prune, mm, step), step.rng_seed)
        assert_error_parity(t_out, m_out, where)
        if t_out.error is not None:
            # torch may leave its module half-changed after an error; masksparse must not.
            assert_unchanged(mm, before, where)
            CASES["sequence errors"] += 1
            event(f"error: {type(t_out.error).__name__}")
            return
        CASES["steps"] += 1
        event(f"method: {step.method}")
        assert torch.equal(m_out.rng_after, t_out.rng_after), f"{where}: RNG consumed differently from torch"
        assert_same_structure(tm, mm, prune, where)
        assert_params_kept(mm, originals, where)
        assert_self_consistent(mm, where)
        assert_same_values(tm, mm, x, where, frozenset(torch_made))


@settings(DIFF_SETTINGS, max_examples=700)
@given(data=st.data())
def test_sequences_match_torch(data: st.DataObject) -> None:
    """Any sequence of 1-4 prunings (and remove) gives what torch gives, step by step."""
    spec = data.draw(layer_specs(), label="layer")
    steps = data.draw(steps_for(spec), label="steps")
    CASES["sequences"] += 1
    run_steps(spec, steps)


# --------------------------------------------------------------------------------------------------------
# global_unstructured over several modules


@dataclass(frozen=True)
class GlobalCase:
    """A global_unstructured call over mixed weights and biases of a few layers, some already pruned."""

    specs: tuple[LayerSpec, ...]
    targets: tuple[tuple[int, str], ...]  # (layer index, tensor name), in the order passed
    pre: tuple[tuple[int, Step], ...]  # prunings applied to both copies first
    method: str  # "L1Unstructured" or "RandomUnstructured"
    amount: Any
    scores: tuple[tuple[int, str, int, bool], ...]  # (layer, tensor, seed, tied): importance_scores
    torch_class: bool  # hand masksparse torch's own method class
    pre_by_torch: bool  # masksparse's copy too was pre-pruned by torch.nn.utils.prune
    rng_seed: int


@st.composite
def global_cases(draw: st.DrawFn) -> GlobalCase:
    specs = tuple(draw(st.lists(layer_specs(), min_size=1, max_size=3)))
    pairs = [(i, name) for i, spec in enumerate(specs) for name in spec.param_shapes()]
    order = draw(st.permutations(pairs))
    targets = tuple(order[: draw(st.integers(1, len(order)))])
    pre = []
    for i, name in pairs:
        if draw(st.integers(0, 2)) == 0:
            shape = specs[i].param_shapes()[name]
            methods = ["l1_unstructured", "random_unstructured", "identity", "custom_from_mask"]
            method = draw(st.sampled_from(methods + (["ln_structured"] if len(shape) > 1 else [])))
            step = Step(
                method,
                name,
                amount=None
                if method in ("identity", "custom_from_mask")
                else draw(st.sampled_from(SPECIAL_FRACTIONS)),
                n=2,
                dim=draw(st.integers(0, len(shape) - 1)),
                mask_kind=draw(st.sampled_from(("float", "bool"))),
                rng_seed=draw(st.integers(0, 2**16)),
            )
            pre.append((i, step))
    total = sum(math.prod(specs[i].param_shapes()[name]) for i, name in targets)
    # importance_scores: none, continuous ones for some targets, or small integers for every target (ties)
    mode = draw(st.sampled_from(("none", "some", "tied")))
    scores = tuple(
        (i, name, draw(st.integers(0, 2**16)), mode == "tied")
        for i, name in targets
        if mode == "tied" or (mode == "some" and draw(st.booleans()))
    )
    return GlobalCase(
        specs=specs,
        targets=targets,
        pre=tuple(pre),
        method=draw(st.sampled_from(("L1Unstructured", "L1Unstructured", "RandomUnstructured"))),
        amount=draw(amounts(total + 1)),
        scores=scores,
        torch_class=draw(st.booleans()),
        pre_by_torch=draw(st.booleans()),
        rng_seed=draw(st.integers(0, 2**16)),
    )


def _global_scores(case: GlobalCase, model: nn.ModuleList) -> dict[tuple[nn.Module, str], torch.Tensor]:
    scores = {}
    for i, name, seed, tied in case.scores:
        shape = getattr(model[i], name).shape
        gen = torch.Generator().manual_seed(seed)
        value = (
            torch.randint(0, 3, shape, generator=gen).float() if tied else torch.randn(shape, generator=gen)
        )
        scores[(model[i], name)] = value
    return scores


def _flat_masks(model: nn.ModuleList, targets: tuple[tuple[int, str], ...]) -> torch.Tensor:
    parts = []
    for i, name in targets:
        mask = getattr(model[i], name + "_mask", None)
        parts.append(torch.ones(getattr(model[i], name).numel()) if mask is None else mask.flatten().float())
    return torch.cat(parts)


def assert_valid_k_smallest(
    scores: torch.Tensor, prior: torch.Tensor, t_new: torch.Tensor, m_new: torch.Tensor
) -> bool:
    """masksparse pruned as many entries as torch, all among the smallest candidate scores.

    Returns whether torch's choice was decided by a tie, that is, whether another valid answer exists.
    """
    candidates = prior == 1
    assert bool(((m_new == 0) | (m_new == 1)).all()), "global masks are binary"
    assert bool((m_new[~candidates] == 0).all()), "an entry pruned before global_unstructured was revived"
    assert int((m_new == 0).sum()) == int((t_new == 0).sum()), (
        "pruned a different number of entries than torch"
    )
    pruned, kept = candidates & (m_new == 0), candidates & (m_new == 1)
    if pruned.any() and kept.any():
        assert scores[pruned].max() <= scores[kept].min(), "a pruned entry scores above a kept one"
    t_pruned, t_kept = candidates & (t_new == 0), candidates & (t_new == 1)
    return bool(t_pruned.any() and t_kept.any() and scores[t_pruned].max() == scores[t_kept].min())


def run_global(case: GlobalCase) -> None:
    tm, mm = twin(nn.ModuleList(spec.build() for spec in case.specs))
    for i, step in case.pre:
        for ns, model in ((torch_prune, tm), (torch_prune if case.pre_by_torch else prune, mm)):
            out = run_seeded(step_call(ns, model[i], step), step.rng_seed)
            assert out.error is None, f"pre-pruning {step} failed: {out.error!r}"
    originals = [dict(layer.named_parameters()) for layer in mm]
    t_scores, m_scores = _global_scores(case, tm), _global_scores(case, mm)
    flat_scores = torch.cat(
        [t_scores.get((tm[i], n), getattr(tm[i], n)).detach().abs().flatten() for i, n in case.targets]
    )
    prior = _flat_masks(tm, case.targets)
    t_method = getattr(torch_prune, case.method)
    m_method = t_method if case.torch_class else getattr(prune, case.method)
    before = snapshot(mm)

    def call(ns: Any, model: nn.ModuleList, method: Any, scores: dict[Any, torch.Tensor]) -> Any:
        params = [(model[i], n) for i, n in case.targets]
        kwargs: dict[str, Any] = {"importance_scores": scores} if scores else {}
        return lambda: ns.global_unstructured(params, pruning_method=method, amount=case.amount, **kwargs)

    t_out = run_seeded(call(torch_prune, tm, t_method, t_scores), case.rng_seed)
    m_out = run_seeded(call(prune, mm, m_method, m_scores), case.rng_seed)
    assert_error_parity(t_out, m_out, f"global {case}")
    if t_out.error is not None:
        assert_unchanged(mm, before, "global_unstructured")
        CASES["global errors"] += 1
        event(f"global error: {type(t_out.error).__name__}")
        return
    assert torch.equal(m_out.rng_after, t_out.rng_after), "RNG consumed differently from torch"
    t_new, m_new = _flat_masks(tm, case.targets), _flat_masks(mm, case.targets)
    tie = case.method == "L1Unstructured" and assert_valid_k_smallest(flat_scores, prior, t_new, m_new)
    CASES["global"] += 1
    CASES["global with ties"] += tie
    CASES["global with ties, other valid masks"] += tie and not torch.equal(m_new, t_new)
    event(f"global {case.method} tie={tie}")
    for i, (t_layer, m_layer) in enumerate(zip(tm, mm)):
        where = f"global, layer {i} {case.specs[i]}"
        assert_same_structure(t_layer, m_layer, prune, where)
        assert_params_kept(m_layer, originals[i], where)
        assert_self_consistent(m_layer, where)
        torch_made = {s.name for j, s in case.pre if j == i and case.pre_by_torch}
        torch_made -= {name for j, name in case.targets if j == i}
        if not tie or torch.equal(m_new, t_new):
            assert_same_values(t_layer, m_layer, case.specs[i].example_input(), where, frozenset(torch_made))


@settings(DIFF_SETTINGS, max_examples=400)
@given(case=global_cases())
def test_global_unstructured_matches_torch(case: GlobalCase) -> None:
    """global_unstructured prunes what torch prunes: equal masks, or a valid k-smallest set under ties."""
    run_global(case)


# --------------------------------------------------------------------------------------------------------
# Invalid input: torch's exception type, and the masksparse model left exactly as it was


def _error_model() -> nn.Sequential:
    seed_cpu(0)
    return nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3), nn.Linear(3, 2, bias=False))


def _pre_prune(ns: Any, model: nn.Sequential) -> None:
    seed_cpu(0)
    ns.l1_unstructured(model[0], "weight", amount=0.25)
    ns.random_unstructured(model[0], "bias", amount=1)
    ns.ln_structured(model[1], "weight", amount=1, n=2, dim=0)
    ns.l1_unstructured(model[0], "weight", amount=2)


def _global(params: Any, method: str, **kwargs: Any) -> Any:
    return lambda ns, m: ns.global_unstructured(params(m), pruning_method=getattr(ns, method), **kwargs)


def _two(m: nn.Sequential) -> list[tuple[nn.Module, str]]:
    return [(m[0], "weight"), (m[1], "weight"), (m[0], "bias")]


ERROR_CASES: dict[str, Any] = {
    "amount negative int": lambda ns, m: ns.l1_unstructured(m[0], "weight", amount=-1),
    "amount negative float": lambda ns, m: ns.random_unstructured(m[0], "weight", amount=-0.1),
    "amount float above 1": lambda ns, m: ns.l1_unstructured(m[0], "weight", amount=1.5),
    "amount just above 1.0": lambda ns, m: ns.ln_structured(m[0], "weight", amount=1.0000001, n=2, dim=0),
    "amount negative, structured": lambda ns, m: ns.random_structured(m[0], "weight", amount=-2, dim=0),
    "amount str": lambda ns, m: ns.l1_unstructured(m[0], "weight", amount="0.5"),
    "amount None": lambda ns, m: ns.random_unstructured(m[0], "weight", amount=None),
    "amount complex": lambda ns, m: ns.l1_unstructured(m[0], "weight", amount=0.5j),
    "amount tensor": lambda ns, m: ns.l1_unstructured(m[0], "weight", amount=torch.tensor(0.5)),
    "amount int above numel": lambda ns, m: ns.l1_unstructured(m[0], "weight", amount=25),
    "amount int above numel, random": lambda ns, m: ns.random_unstructured(m[0], "bias", amount=5),
    "amount int above channels, random": lambda ns, m: ns.random_structured(m[0], "weight", amount=5, dim=0),
    "amount int above channels, ln": lambda ns, m: ns.ln_structured(m[0], "weight", amount=7, n=1, dim=1),
    # m[1].bias stays unpruned: on an already-pruned 1-D tensor torch does not raise (it prunes it whole)
    "structured on 1-D, random": lambda ns, m: ns.random_structured(m[1], "bias", amount=1, dim=0),
    "structured on 1-D, ln": lambda ns, m: ns.ln_structured(m[1], "bias", amount=1, n=1, dim=0),
    "dim too large, ln": lambda ns, m: ns.ln_structured(m[0], "weight", amount=1, n=2, dim=2),
    "dim too negative, ln": lambda ns, m: ns.ln_structured(m[0], "weight", amount=1, n=2, dim=-3),
    "dim too large, random": lambda ns, m: ns.random_structured(m[1], "weight", amount=1, dim=5),
    "importance_scores shape, l1": lambda ns, m: ns.l1_unstructured(
        m[0], "weight", amount=1, importance_scores=torch.ones(6, 4)
    ),
    "importance_scores shape, ln": lambda ns, m: ns.ln_structured(
        m[0], "weight", amount=1, n=2, dim=0, importance_scores=torch.ones(4, 5)
    ),
    "importance_scores shape, class apply": lambda ns, m: ns.L1Unstructured.apply(
        m[1], "weight", amount=1, importance_scores=torch.ones(3)
    ),
    "custom mask shape": lambda ns, m: ns.custom_from_mask(m[0], "weight", mask=torch.ones(4, 5)),
    "global with LnStructured": _global(_two, "LnStructured", amount=0.5, n=2, dim=0),
    "global with RandomStructured": _global(_two, "RandomStructured", amount=0.5),
    "global parameters not iterable": _global(lambda m: 5, "L1Unstructured", amount=0.5),
    "global parameters a module": _global(lambda m: m[0], "L1Unstructured", amount=0.5),
    "global importance_scores not a dict": _global(_two, "L1Unstructured", amount=1, importance_scores=[1.0]),
    "global amount above total": _global(_two, "L1Unstructured", amount=1000),
    "global amount negative": _global(_two, "RandomUnstructured", amount=-0.5),
    "global amount str": _global(_two, "L1Unstructured", amount="all"),
    "no such tensor": lambda ns, m: ns.l1_unstructured(m[0], "kernel", amount=1),
    "tensor is None (bias=False)": lambda ns, m: ns.l1_unstructured(m[2], "bias", amount=1),
    "remove unpruned tensor": lambda ns, m: ns.remove(m[1], "bias"),
    "remove unknown name": lambda ns, m: ns.remove(m[2], "kernel"),
}


@pytest.mark.parametrize("pre_pruned", [False, True], ids=["fresh", "pre-pruned"])
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_invalid_input_raises_like_torch(case: str, pre_pruned: bool) -> None:
    """Invalid input raises an instance of torch's exception type and changes nothing."""
    tm, mm = twin(_error_model())
    if pre_pruned:
        _pre_prune(torch_prune, tm)
        _pre_prune(prune, mm)
    before = snapshot(mm)
    t_out = run_seeded(lambda: ERROR_CASES[case](torch_prune, tm), 0)
    m_out = run_seeded(lambda: ERROR_CASES[case](prune, mm), 0)
    assert t_out.error is not None, f"{case}: torch accepted it; the case is not invalid"
    assert_error_parity(t_out, m_out, case)
    assert_unchanged(mm, before, case)
    # The model still computes what it did (rebuilt from scratch: torch's copy may be broken now).
    reference = _error_model()
    if pre_pruned:
        _pre_prune(torch_prune, reference)
    x = torch.randn(3, 6)
    assert torch.equal(mm(x), reference(x))
    CASES["error table"] += 1


# --------------------------------------------------------------------------------------------------------
# Method objects used directly


def _methods(ns: Any, mask: torch.Tensor) -> dict[str, Any]:
    return {
        "Identity": ns.Identity(),
        "RandomUnstructured": ns.RandomUnstructured(amount=0.4),
        "L1Unstructured": ns.L1Unstructured(amount=3),
        "RandomStructured": ns.RandomStructured(amount=0.5, dim=1),
        "LnStructured": ns.LnStructured(amount=2, n=1, dim=0),
        "LnStructured fro dim -1": ns.LnStructured(amount=0.5, n="fro", dim=-1),
        "CustomFromMask": ns.CustomFromMask(mask=mask),
    }


@pytest.mark.parametrize("key", list(_methods(torch_prune, torch.ones(1))))
def test_method_prune_and_compute_mask_match_torch(key: str) -> None:
    """``Method(...).prune(t, default_mask, importance_scores)`` and ``compute_mask`` give torch's values."""
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(5, 4, generator=gen)
    scores = torch.randn(5, 4, generator=gen)
    default = (torch.rand(5, 4, generator=gen) > 0.2).float()
    mask = (torch.rand(5, 4, generator=gen) > 0.5).float()
    t_method, m_method = _methods(torch_prune, mask)[key], _methods(prune, mask.clone())[key]
    assert isinstance(m_method, torch_prune.BasePruningMethod)
    for kwargs in ({}, {"default_mask": default}, {"importance_scores": scores}):
        seed_cpu(11)
        expected = t_method.prune(t, **kwargs)
        seed_cpu(11)
        got = m_method.prune(t.clone(), **{k: v.clone() for k, v in kwargs.items()})
        assert torch.equal(got, expected), f"{key}.prune(t, {list(kwargs)}) differs from torch"
    seed_cpu(11)
    expected = t_method.compute_mask(t, default_mask=default)
    seed_cpu(11)
    got = m_method.compute_mask(t.clone(), default_mask=default.clone())
    assert torch.equal(got.to(expected.dtype), expected), f"{key}.compute_mask differs from torch"


def test_pruning_container_rejects_like_torch() -> None:
    """PruningContainer.add_pruning_method raises torch's TypeError/ValueError for a wrong method."""
    for ns in (torch_prune, prune):
        first = ns.L1Unstructured(amount=1)
        first._tensor_name = "weight"
        container = ns.PruningContainer(first)
        other = ns.L1Unstructured(amount=1)
        other._tensor_name = "bias"
        with pytest.raises(TypeError):
            container.add_pruning_method("not a method")
        with pytest.raises(ValueError):
            container.add_pruning_method(other)
        assert len(container) == 1 and container[0] is first and list(container) == [first]


def test_case_count(record_testsuite_property: Any) -> None:
    """Runs last: the property tests above ran as many cases as designed (see also junit properties)."""
    if not CASES:
        pytest.skip("run together with the tests above")
    for key, value in sorted(CASES.items()):
        record_testsuite_property(f"differential cases: {key}", value)
    if CASES["sequences"]:
        assert CASES["sequences"] >= 500 and CASES["steps"] >= 1000 and CASES["torch-pruned first"] >= 50
    if CASES["global"]:
        assert CASES["global"] >= 250 and CASES["global with ties"] >= 10
    if CASES["error table"]:
        assert CASES["error table"] == 2 * len(ERROR_CASES)
