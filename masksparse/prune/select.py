"""Exact selection of the k smallest scores spread over many tensors, without concatenating them.

``torch.nn.utils.prune.global_unstructured`` concatenates every score and runs ``topk`` over the result,
which costs several times the model's size in memory. Here non-negative scores are compared through their
bit patterns (non-negative floats order like their bits read as integers), one tensor at a time:

1. A strided sample of the scores brackets the k-th smallest value between two sample quantiles.
2. One pass over the tensors marks every candidate below the bracket and gathers the few inside it; the
   bracket is checked (k must fall inside it) and the missing entries are the smallest gathered ones.
3. Should the check fail (a sample that misleads, or too many ties inside the bracket), a radix select
   finds the k-th value's bucket exactly from histograms of 16-bit digits, and step 2 runs on it.

Every pass reads the tensors in chunks of ``CHUNK`` entries, so the temporaries stay a few MiB whatever
the model's size; the extra memory is the bool result plus the bracket's few members.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from masksparse._errors import PruningValueError
from masksparse.distributed.select import CHUNK, DIGIT_BITS, INT_VIEW

# Brackets holding more candidates than this are not gathered; the radix select narrows them first.
_GATHER_LIMIT = 1 << 22
# The bracket is chosen from a sample of one score in 256, at least _SAMPLE_SIZE and at most _SAMPLE_MAX
# of them: a bracket then holds about 50 * sqrt(total) candidates, under _GATHER_LIMIT up to ~6e9 scores.
_SAMPLE_SIZE = 1 << 18
_SAMPLE_MAX = 1 << 23


@dataclass(frozen=True)
class MagnitudeScores:
    """The absolute values of a tensor's entries, read chunk by chunk into one reused buffer.

    Example:
        >>> import torch
        >>> MagnitudeScores(torch.tensor([-3.0, 1.0, -2.0])).strided(2)
        tensor([3., 2.])
    """

    tensor: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """The scores' shape."""
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The scores' dtype."""
        return self.tensor.dtype

    def chunks(self, size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, scores)`` for consecutive pieces of at most ``size`` entries, in flat order.

        Each piece lives in the same buffer, overwritten by the next: copy what must outlive a step.
        """
        flat = self.tensor.detach().reshape(-1)
        buffer = torch.empty(min(size, flat.numel()), dtype=flat.dtype)
        for start in range(0, flat.numel(), size):
            piece = flat[start : start + size]
            yield start, torch.abs(piece, out=buffer[: piece.numel()])

    def strided(self, step: int) -> torch.Tensor:
        """The scores of every ``step``-th entry in flat order."""
        return self.tensor.detach().reshape(-1)[::step].abs()


class RandomStream:
    """Uniform numbers for the candidates of several tensors, drawn again identically on every pass.

    They come from torch's global generator, in order, so they are exactly the numbers of one
    ``torch.rand(total)`` call over the concatenated candidates, as torch.nn.utils.prune's global random
    pruning draws them. :meth:`finish` leaves the generator where that single call would.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> stream = RandomStream(torch.float32)
        >>> first = torch.cat([stream.take(2), stream.take(3)])
        >>> stream.restart()
        >>> again = torch.cat([stream.take(4), stream.take(1)])
        >>> stream.mark_end()
        >>> stream.finish()
        >>> _ = torch.manual_seed(0)
        >>> torch.equal(first, torch.rand(5)) and torch.equal(again, first)
        True
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.start = torch.get_rng_state()
        self.end: torch.Tensor | None = None

    def restart(self) -> None:
        """Start a pass: the next numbers taken are the first ones again."""
        torch.set_rng_state(self.start)

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` numbers of this pass."""
        return torch.rand(count, dtype=self.dtype)

    def mark_end(self) -> None:
        """Note, once, where a complete pass leaves the generator."""
        if self.end is None:
            self.end = torch.get_rng_state()

    def finish(self) -> None:
        """Leave the global generator where one complete pass leaves it (as it was, if none ran)."""
        torch.set_rng_state(self.start if self.end is None else self.end)


@dataclass(frozen=True)
class RandomScores:
    """Random scores for one tensor's candidates: ``1 - u`` for the stream's uniform ``u``.

    Choosing the k smallest of ``1 - u`` chooses the k largest ``u``, as torch's ``topk`` over random
    numbers does; ``1 - u`` is exact for floats drawn on a ``2**-24`` (or ``2**-53``) grid. The tensors of
    one stream must be read in order, ``first`` and ``last`` marking the ends of a pass.
    """

    stream: RandomStream
    shape: tuple[int, ...]
    candidates: torch.Tensor | None
    first: bool = False
    last: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """The scores' dtype."""
        return self.stream.dtype

    def chunks(self, size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, scores)`` for consecutive pieces of at most ``size`` entries; non-candidates score 1."""
        if self.first:
            self.stream.restart()
        numel = math.prod(self.shape)
        flat = None if self.candidates is None else self.candidates.reshape(-1)
        for start in range(0, numel, size):
            if flat is None:
                yield start, 1 - self.stream.take(min(size, numel - start))
                continue
            allowed = flat[start : start + size]
            scores = torch.ones(allowed.numel(), dtype=self.dtype)
            scores[allowed] = 1 - self.stream.take(int(torch.count_nonzero(allowed)))
            yield start, scores
        if self.last:
            self.stream.mark_end()

    def strided(self, step: int) -> torch.Tensor:
        """Every ``step``-th score of each chunk (a pass over the stream, so a sample like any other)."""
        return torch.cat([scores[::step] for _, scores in self.chunks(CHUNK)])


Scores = MagnitudeScores | RandomScores


def common_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype in which scores of these dtypes compare exactly: float64 if any is, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _bits(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scores' bit patterns as integers that order like the (non-negative) scores."""
    return scores.to(dtype).contiguous().view(INT_VIEW[dtype][0]).reshape(-1)


def _flat(allowed: torch.Tensor | None) -> torch.Tensor | None:
    return None if allowed is None else allowed.reshape(-1)


def _pieces(
    source: Scores, allowed: torch.Tensor | None, dtype: torch.dtype
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """``(start, bits, allowed)`` for each chunk of one tensor's scores."""
    flat = _flat(allowed)
    for start, chunk in source.chunks(CHUNK):
        yield start, _bits(chunk, dtype), None if flat is None else flat[start : start + chunk.numel()]


def _sample_bracket(
    scores: Sequence[Scores],
    candidates: Sequence[torch.Tensor | None],
    k: int,
    total: int,
    dtype: torch.dtype,
) -> tuple[int, int]:
    """Bit bounds ``[lo, hi)`` that very likely hold the k-th smallest candidate score."""
    everything = (0, 1 << INT_VIEW[dtype][1])
    size = min(max(total // 256, _SAMPLE_SIZE), _SAMPLE_MAX)
    if total <= size:  # a sample would be everything: gather it all and sort
        return everything
    step = max(1, total // size)
    pieces = []
    for source, allowed in zip(scores, candidates):
        bits = _bits(source.strided(step), dtype)
        flat = _flat(allowed)
        pieces.append(bits if flat is None else bits[flat[::step]])
    sample = torch.sort(torch.cat(pieces)).values
    if sample.numel() == 0:
        return everything
    # Four binomial standard deviations around the k-th value's expected position in the sample.
    q = k / total
    centre, margin = q * sample.numel(), 4 * math.sqrt(sample.numel() * q * (1 - q)) + 16
    low, high = math.floor(centre - margin), math.ceil(centre + margin)
    lo = int(sample[low]) if low > 0 else everything[0]
    hi = int(sample[high]) + 1 if high < sample.numel() else everything[1]
    return lo, hi


def _narrow(
    scores: Sequence[Scores], candidates: Sequence[torch.Tensor | None], k: int, dtype: torch.dtype
) -> tuple[int, int]:
    """Exact bit bounds ``[lo, hi)`` of the k-th value's bucket: small, or a single value.

    Each pass histograms the next 16-bit digit of the scores inside the current bucket.
    """
    shift, prefix, rank, size = INT_VIEW[dtype][1], 0, k, None
    while shift > 0 and (size is None or size > _GATHER_LIMIT):
        step = min(DIGIT_BITS, shift)
        hist = torch.zeros((1 << step) + 1, dtype=torch.int64)
        for source, allowed in zip(scores, candidates):
            for _, bits, flat in _pieces(source, allowed, dtype):
                if size is None:  # first pass: every candidate; non-candidates go to the spare last bin
                    digits = bits >> (shift - step)
                    if flat is not None:
                        digits = torch.where(flat, digits, 1 << step)
                else:
                    inside = (bits >> shift) == prefix
                    if flat is not None:
                        inside &= flat
                    digits = (bits[inside] >> (shift - step)) & ((1 << step) - 1)
                hist += torch.bincount(digits, minlength=(1 << step) + 1)
        cumulative = hist[:-1].cumsum(0)
        digit = int(torch.searchsorted(cumulative, rank))
        rank -= int(cumulative[digit - 1]) if digit else 0
        size = int(hist[digit])
        prefix, shift = (prefix << step) | digit, shift - step
    return prefix << shift, (prefix + 1) << shift


def _in_range(
    bits: torch.Tensor, lo: int, hi: int, dtype: torch.dtype, scratch: torch.Tensor
) -> torch.Tensor:
    """``lo <= bits < hi`` with one subtraction and one comparison, ``scratch`` holding the difference.

    The unsigned test ``(bits - lo) mod 2**w < hi - lo`` is done in signed arithmetic by shifting both
    sides down by ``2**(w-1)`` (w the integer width), which keeps their order; the subtraction wraps.
    """
    half = 1 << (INT_VIEW[dtype][1])
    difference = torch.sub(bits, lo - half, out=scratch[: bits.numel()])
    return difference < (hi - lo - half)


def _select_in_bracket(
    scores: Sequence[Scores],
    candidates: Sequence[torch.Tensor | None],
    k: int,
    dtype: torch.dtype,
    bracket: tuple[int, int],
) -> list[torch.Tensor] | None:
    """Choose everything below the bracket plus the smallest members inside it; None if k is not inside."""
    lo, hi = bracket
    single_value = hi - lo == 1  # all members tie: only the first ones in order can be needed
    # The results first, in one go: allocated between the passes' temporaries they would pin the heap.
    chosen = [torch.empty(source.shape, dtype=torch.bool) for source in scores]
    members: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (tensor, flat indices, bits) per chunk
    below_total = gathered = 0
    scratch = torch.empty(CHUNK, dtype=INT_VIEW[dtype][0])
    for i, (source, allowed) in enumerate(zip(scores, candidates)):
        below = chosen[i].view(-1)
        for start, bits, flat in _pieces(source, allowed, dtype):
            part = below[start : start + bits.numel()]
            torch.lt(bits, lo, out=part)
            inside = _in_range(bits, lo, hi, dtype, scratch)
            if flat is not None:
                part &= flat
                inside &= flat
            below_total += int(torch.count_nonzero(part))
            if below_total > k:
                return None
            index = inside.nonzero().squeeze(1)
            if single_value:
                index = index[: max(k - below_total - gathered, 0)]
            gathered += index.numel()
            if gathered > _GATHER_LIMIT and not single_value:
                return None
            members.append((i, index + start, bits[index]))
    rank = k - below_total
    if rank > gathered:
        return None
    if rank:
        # The rank smallest members; ties in tensor order, then index order (a stable sort keeps it).
        order = torch.sort(torch.cat([b for _, _, b in members]), stable=True).indices[:rank]
        owner = torch.cat([torch.full_like(index, i) for i, index, _ in members])[order]
        flat_index = torch.cat([index for _, index, _ in members])[order]
        for i, mask in enumerate(chosen):
            mask.view(-1)[flat_index[owner == i]] = True
    return chosen


def select_smallest(
    scores: Sequence[Scores],
    candidates: Sequence[torch.Tensor | None],
    k: int,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Mark the ``k`` smallest candidate scores across several tensors.

    Args:
        scores: one score source per tensor (:class:`MagnitudeScores` or :class:`RandomScores`) giving
            non-negative floats; scores are recomputed on each pass, so none is kept alive between passes.
        candidates: one bool tensor per score tensor (same shape), True where an entry may be chosen,
            or None where every entry may.
        k: how many entries to choose, at most the number of candidates.
        dtype: float32 or float64, the precision in which scores compare (see :func:`common_dtype`).

    Returns:
        One bool tensor per score tensor, True where chosen: exactly ``k`` in all, and every chosen score
        ``<=`` every candidate left out. Ties at the threshold go to the earliest tensors and entries.

    Example:
        >>> import torch
        >>> a, b = torch.tensor([0.5, -0.1, 0.9]), torch.tensor([[0.3, -0.2]])
        >>> sources = [MagnitudeScores(a), MagnitudeScores(b)]
        >>> chosen = select_smallest(sources, [None, torch.tensor([[True, True]])], k=3)
        >>> [c.tolist() for c in chosen]
        [[False, True, False], [[True, True]]]
    """
    if len(scores) != len(candidates):
        raise PruningValueError(f"got {len(scores)} score tensors but {len(candidates)} candidate masks")
    if dtype not in INT_VIEW:
        raise PruningValueError(f"scores compare in float32 or float64, not {dtype}")
    total = sum(math.prod(s.shape) if c is None else int(c.sum()) for s, c in zip(scores, candidates))
    if not 0 <= k <= total:
        raise PruningValueError(f"cannot select k={k} entries out of {total} candidates")
    chosen = _select_in_bracket(
        scores, candidates, k, dtype, _sample_bracket(scores, candidates, k, total, dtype)
    )
    if chosen is None:
        chosen = _select_in_bracket(scores, candidates, k, dtype, _narrow(scores, candidates, k, dtype))
    if chosen is None:  # the radix bracket always holds the k-th value
        raise AssertionError("internal error: the exact bracket did not hold the k-th smallest score")
    return chosen
