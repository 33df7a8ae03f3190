"""Exact k-smallest selection over many tensors (masksparse.prune.select) against a brute-force oracle."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masksparse.prune import select
from masksparse.prune.select import (
    MagnitudeScores,
    RandomScores,
    RandomStream,
    select_smallest,
)


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
    chosen = select_smallest([MagnitudeScores(s) for s in scores], candidates, k, dtype)
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
@given(
    case=score_sets(),
    limit=st.sampled_from([0, 1, 4, 16]),
    sample=st.sampled_from([1, 4, 64]),
    chunk=st.sampled_from([1, 3, 8, 1 << 20]),
)
def test_sampled_brackets_and_radix_refinement_agree(
    case: tuple, limit: int, sample: int, chunk: int
) -> None:
    """With tiny gather limits, samples and chunks, the sampled bracket or the radix fallback agrees."""
    saved = select._GATHER_LIMIT, select._SAMPLE_SIZE, select.CHUNK
    select._GATHER_LIMIT, select._SAMPLE_SIZE, select.CHUNK = limit, sample, chunk
    try:
        _check(*case)
    finally:
        select._GATHER_LIMIT, select._SAMPLE_SIZE, select.CHUNK = saved


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


def _read(source: MagnitudeScores | RandomScores) -> torch.Tensor:
    return torch.cat([chunk for _, chunk in source.chunks(3)]).view(source.shape)


def test_random_scores_replay_torch_global_generator() -> None:
    """RandomScores redraw the same numbers on every pass: those of one torch.rand over all candidates."""
    candidates = torch.tensor([[True, False, True], [True, True, False]])
    torch.manual_seed(5)
    stream = RandomStream(torch.float32)
    sources = [
        RandomScores(stream, (2, 3), candidates, first=True),
        RandomScores(stream, (7,), None, last=True),
    ]
    first = [_read(source) for source in sources]
    again = [_read(source) for source in sources]
    stream.finish()
    after = torch.rand(1)
    torch.manual_seed(5)
    expected = 1 - torch.rand(11)
    assert torch.equal(first[0][candidates], expected[:4]) and torch.equal(first[1], expected[4:])
    assert bool((first[0][~candidates] == 1).all()), "non-candidates score 1"
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(after, torch.rand(1)), "the generator ends where one torch.rand(11) leaves it"


def test_chunked_draws_equal_one_draw() -> None:
    """torch.rand in pieces gives the numbers of one call (what RandomStream relies on)."""
    torch.manual_seed(0)
    pieces = [torch.rand(n) for n in (1, 7, 1000, 5, 70_000, 3)]
    pieces64 = [torch.rand(n, dtype=torch.float64) for n in (9, 4096, 2)]
    torch.manual_seed(0)
    assert torch.equal(torch.cat(pieces), torch.rand(71_016))
    assert torch.equal(torch.cat(pieces64), torch.rand(4107, dtype=torch.float64))
