"""Exact k-smallest selection over many tensors (masksparse.prune.select) against a brute-force oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masksparse import PruningValueError
from masksparse.prune import select
from masksparse.prune.select import ElementwiseScores, RandomScores, common_dtype, select_smallest


@st.composite
def score_sets(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[torch.Tensor | None], int, torch.dtype]:
    """A few score tensors with many ties (values drawn from a small pool), random candidates and k."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    pool = draw(st.lists(st.floats(0, 1e6, allow_subnormal=True, width=32), min_size=1, max_size=6))
    scores, candidates = [], []
    for _ in range(draw(st.integers(1, 4))):
        size = draw(st.integers(0, 30))
        values = draw(st.lists(st.sampled_from(pool), min_size=size, max_size=size))
        scores.append(
            torch.tensor(values, dtype=dtype).reshape(-1, 1) if size else torch.zeros(0, dtype=dtype)
        )
        if draw(st.booleans()):
            allowed = draw(st.lists(st.booleans(), min_size=size, max_size=size))
            candidates.append(torch.tensor(allowed, dtype=torch.bool).reshape(scores[-1].shape))
        else:
            candidates.append(None)
    total = sum(s.numel() if c is None else int(c.sum()) for s, c in zip(scores, candidates))
    return scores, candidates, draw(st.integers(0, total)), dtype


def _check(
    scores: list[torch.Tensor], candidates: list[torch.Tensor | None], k: int, dtype: torch.dtype
) -> None:
    chosen = select_smallest([ElementwiseScores(s) for s in scores], candidates, k, dtype)
    allowed = [torch.ones_like(s, dtype=torch.bool) if c is None else c for s, c in zip(scores, candidates)]
    assert sum(int(c.sum()) for c in chosen) == k
    picked = torch.cat([s[c] for s, c in zip(scores, chosen)])
    left = torch.cat([s[a & ~c] for s, a, c in zip(scores, allowed, chosen)])
    assert all(not bool((c & ~a).any()) for c, a in zip(chosen, allowed)), "chose a non-candidate"
    if picked.numel() and left.numel():
        assert picked.max() <= left.min()
    # Ties at the threshold go to the earliest entries: the k smallest under a stable sort, exactly.
    flat = torch.cat([torch.where(a, s, torch.inf).reshape(-1) for s, a in zip(scores, allowed)])
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[torch.sort(flat, stable=True).indices[:k]] = True
    assert torch.equal(torch.cat([c.reshape(-1) for c in chosen]), expected)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(score_sets())
def test_selects_exactly_the_k_smallest_with_ties_in_order(case: tuple) -> None:
    """Exactly k entries, all <= every candidate left, ties broken by tensor then index order."""
    _check(*case)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(case=score_sets(), limit=st.sampled_from([0, 1, 4, 16]), sample=st.sampled_from([1, 4, 64]))
def test_sampled_brackets_and_radix_refinement_agree(case: tuple, limit: int, sample: int) -> None:
    """With tiny gather limits and samples, the sampled bracket or the radix fallback agrees."""
    saved = select._GATHER_LIMIT, select._SAMPLE_SIZE
    select._GATHER_LIMIT, select._SAMPLE_SIZE = limit, sample
    try:
        _check(*case)
    finally:
        select._GATHER_LIMIT, select._SAMPLE_SIZE = saved


def test_misleading_sample_falls_back_to_the_exact_bracket() -> None:
    """A strided sample that sees only one kind of value still leads to the exact answer."""
    saved = select._GATHER_LIMIT, select._SAMPLE_SIZE
    select._GATHER_LIMIT, select._SAMPLE_SIZE = 8, 4
    try:
        periodic = torch.zeros(64)
        periodic[1::2] = torch.arange(1.0, 33.0)  # every sample lands on an even index: all zeros
        _check([periodic], [None], 40, torch.float32)
        _check([torch.full((50,), 2.0), torch.ones(30)], [None, None], 45, torch.float32)
    finally:
        select._GATHER_LIMIT, select._SAMPLE_SIZE = saved


def test_random_scores_are_reproducible_and_uniform() -> None:
    """RandomScores regenerate the same values on every pass; strided() is a view of full()."""
    source = RandomScores((10, 10), seed=3)
    assert torch.equal(source.full(), source.full())
    assert torch.equal(source.strided(7), source.full().reshape(-1)[::7])
    assert source.numel() == 100 and float(source.full().min()) >= 0 and float(source.full().max()) < 1


def test_continuous_scores_match_topk() -> None:
    """Without ties the selection is the set torch.topk(largest=False) returns."""
    torch.manual_seed(0)
    scores = [torch.rand(50, 7), torch.rand(300), torch.rand(3, 4, 5)]
    k = 123
    chosen = select_smallest([ElementwiseScores(s) for s in scores], [None] * 3, k)
    flat = torch.cat([s.reshape(-1) for s in scores])
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[torch.topk(flat, k, largest=False).indices] = True
    assert torch.equal(torch.cat([c.reshape(-1) for c in chosen]), expected)


def test_float64_scores_are_not_rounded_to_float32() -> None:
    """Two scores equal in float32 but different in float64 are ordered by their float64 values."""
    a = torch.tensor([1.0 + 2**-40, 1.0], dtype=torch.float64)
    chosen = select_smallest([ElementwiseScores(a)], [None], 1, torch.float64)
    assert chosen[0].tolist() == [False, True]
    assert common_dtype([torch.float16, torch.float64]) == torch.float64
    assert common_dtype([torch.bfloat16, torch.float32]) == torch.float32


def test_invalid_requests_raise() -> None:
    """k beyond the candidates, a negative k, mismatched lists and unsupported dtypes are refused."""
    s = [ElementwiseScores(torch.rand(4))]
    with pytest.raises(PruningValueError, match="k=5"):
        select_smallest(s, [None], 5)
    with pytest.raises(PruningValueError, match="k=-1"):
        select_smallest(s, [None], -1)
    with pytest.raises(PruningValueError, match="2 candidate"):
        select_smallest(s, [None, None], 1)
    with pytest.raises(PruningValueError, match="float16"):
        select_smallest(s, [None], 1, torch.float16)
