"""Exact selection of the k smallest scores spread over many tensors, without concatenating them.

``torch.nn.utils.prune.global_unstructured`` concatenates every score and runs ``topk`` over the result,
which costs several times the model's size in memory. Here the k-th smallest score is found by a radix
select on the scores' bit patterns: non-negative floats order like their bits read as integers, so a
histogram of the top 16 bits (one pass over the tensors, one tensor at a time) finds the bucket holding
the k-th value, the next 16 bits narrow it to the exact value, and a last pass marks the entries below it
plus the first ties in order. Peak extra memory is a few temporaries the size of the largest tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from masksparse._errors import PruningValueError

_DIGIT_BITS = 16
_INT_VIEW = {torch.float32: (torch.int32, 31), torch.float64: (torch.int64, 63)}

Scores = Callable[[], torch.Tensor]


def common_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype in which scores of these dtypes compare exactly: float64 if any is, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _bits(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scores' bit patterns as integers that order like the (non-negative) scores."""
    return scores.to(dtype).contiguous().view(_INT_VIEW[dtype][0]).reshape(-1)


# Buckets up to this many candidates are finished by sorting their members instead of another pass.
_GATHER_LIMIT = 1 << 22


def _narrow(
    scores: Sequence[Scores], candidates: Sequence[torch.Tensor | None], k: int, dtype: torch.dtype
) -> tuple[int, int, int]:
    """Find the bucket of bit patterns that holds the k-th smallest candidate score.

    Returns ``(prefix, shift, rank)``: the k-th value's bits shifted right by ``shift`` equal ``prefix``,
    and it is the ``rank``-th smallest candidate inside that bucket. Usually one histogram pass suffices.
    """
    shift, prefix, rank, size = _INT_VIEW[dtype][1], 0, k, None
    while shift > 0 and (size is None or size > _GATHER_LIMIT):
        step = min(_DIGIT_BITS, shift)
        hist = torch.zeros((1 << step) + 1, dtype=torch.int64)
        for get, allowed in zip(scores, candidates):
            bits = _bits(get(), dtype)
            if size is None:  # first pass: every candidate; non-candidates go to the spare last bin
                digits = bits >> (shift - step)
                if allowed is not None:
                    digits = torch.where(allowed.reshape(-1), digits, 1 << step)
            else:
                inside = (bits >> shift) == prefix
                if allowed is not None:
                    inside &= allowed.reshape(-1)
                digits = (bits[inside] >> (shift - step)) & ((1 << step) - 1)
            hist += torch.bincount(digits, minlength=(1 << step) + 1)
        cumulative = hist[:-1].cumsum(0)
        if size is None and k > int(cumulative[-1]):
            raise PruningValueError(f"cannot select k={k} entries out of {int(cumulative[-1])} candidates")
        digit = int(torch.searchsorted(cumulative, rank))
        rank -= int(cumulative[digit - 1]) if digit else 0
        size = int(hist[digit])
        prefix, shift = (prefix << step) | digit, shift - step
    return prefix, shift, rank


def select_smallest(
    scores: Sequence[Scores],
    candidates: Sequence[torch.Tensor | None],
    k: int,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Mark the ``k`` smallest candidate scores across several tensors.

    Args:
        scores: one callable per tensor returning its scores (non-negative floats, any shape); each is
            called once per pass, so no score tensor is kept alive between passes.
        candidates: one bool tensor per score tensor (same shape), True where an entry may be chosen,
            or None where every entry may.
        k: how many entries to choose, at most the number of candidates.
        dtype: float32 or float64, the precision in which scores compare (see :func:`common_dtype`).

    Returns:
        One bool tensor per score tensor, True where chosen: exactly ``k`` in all, and every chosen score
        ``<=`` every candidate left out. Ties at the threshold go to the earliest tensors and entries.

    Example:
        >>> import torch
        >>> a, b = torch.tensor([0.5, 0.1, 0.9]), torch.tensor([[0.3, 0.2]])
        >>> chosen = select_smallest([lambda: a, lambda: b], [None, torch.tensor([[True, True]])], k=3)
        >>> [c.tolist() for c in chosen]
        [[False, True, False], [[True, True]]]
    """
    if len(scores) != len(candidates):
        raise PruningValueError(f"got {len(scores)} score tensors but {len(candidates)} candidate masks")
    if dtype not in _INT_VIEW:
        raise PruningValueError(f"scores compare in float32 or float64, not {dtype}")
    if k < 0:
        raise PruningValueError(f"cannot select k={k} entries: k must be non-negative")
    if k == 0:
        return [torch.zeros(get().shape, dtype=torch.bool) for get in scores]
    prefix, shift, rank = _narrow(scores, candidates, k, dtype)
    chosen: list[torch.Tensor] = []
    bucket: list[tuple[torch.Tensor, torch.Tensor]] = []  # per tensor: flat indices and bits in the bucket
    for get, allowed in zip(scores, candidates):
        raw = get()
        bits = _bits(raw, dtype)
        below, inside = bits < (prefix << shift), bits < ((prefix + 1) << shift)
        inside ^= below  # below is a subset of the values under the bucket's upper end
        if allowed is not None:
            below &= allowed.reshape(-1)
            inside &= allowed.reshape(-1)
        members = inside.nonzero().squeeze(1)
        chosen.append(below.view(raw.shape))
        bucket.append((members, bits[members]))
    # The rank smallest bucket members, ties in tensor order then index order (a stable sort keeps it).
    order = torch.sort(torch.cat([b for _, b in bucket]), stable=True).indices[:rank]
    owner = torch.cat([torch.full_like(m, i) for i, (m, _) in enumerate(bucket)])[order]
    flat = torch.cat([m for m, _ in bucket])[order]
    for i, mask in enumerate(chosen):
        mask.view(-1)[flat[owner == i]] = True
    return chosen
