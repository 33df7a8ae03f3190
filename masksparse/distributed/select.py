"""The k smallest scores over tensors sharded across ranks, exactly as one process would choose them.

Each rank holds pieces of the score tensors (DTensor shards). The k-th smallest value is found by a
radix select over the scores' bit patterns (non-negative floats order like their bits read as integers):
every round histograms the next 16-bit digit of the local candidates and sums the histograms over the
mesh with ``all_reduce``, so a rank sends O(bins) numbers per round, never scores (two rounds in float32,
four in float64). Everything below the k-th value is chosen; ties at it go, as in one process, to the
earliest tensors and, within a tensor, to the lowest flat indices of the whole tensor, found by bisecting
the index with summed counts. Local passes read the pieces in chunks, so temporaries stay small.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from masksparse._errors import PruningValueError
from masksparse.distributed.tensors import counts_here, flat_global_index

# The radix select's constants, shared with masksparse.prune.select (one process): bits per digit, the
# integer view of each float dtype (with its sign bit), and entries per chunk of a pass (small enough
# that temporaries never grow with the model).
DIGIT_BITS = 16
INT_VIEW = {torch.float32: (torch.int32, 31), torch.float64: (torch.int64, 63)}
CHUNK = 1 << 20


@dataclass
class Traffic:
    """What the selections of this process have sent so far, in collective calls and bytes."""

    calls: int = 0
    bytes: int = 0
    rounds: list[int] = field(default_factory=list)

    def reset(self) -> None:
        """Start counting again from zero."""
        self.calls, self.bytes, self.rounds = 0, 0, []

    def add(self, t: torch.Tensor) -> None:
        """Count one collective call that sends ``t``."""
        self.calls += 1
        self.bytes += t.numel() * t.element_size()


TRAFFIC = Traffic()


@dataclass(frozen=True)
class ShardedScores:
    """One tensor's scores on this rank: ``scores`` (the local piece, absolute values taken when
    ``magnitude``), ``candidates`` (local bool piece, or None for all) and ``ref`` (the DTensor whose
    placement the pieces follow)."""

    scores: torch.Tensor
    candidates: torch.Tensor | None
    ref: Any
    magnitude: bool = True

    def pieces(self, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """``(start, bits, candidates)`` per chunk of the local piece (bits as ordered integers), one
        chunk at a time, so a pass never holds more than one chunk's bits."""
        flat = self.scores.detach().reshape(-1)
        allowed = None if self.candidates is None else self.candidates.reshape(-1)
        for start in range(0, flat.numel(), CHUNK):
            chunk = flat[start : start + CHUNK]
            chunk = chunk.abs() if self.magnitude else chunk
            bits = chunk.to(dtype).contiguous().view(INT_VIEW[dtype][0])
            yield start, bits, None if allowed is None else allowed[start : start + CHUNK]


def _group(refs: Sequence[Any]) -> dist.ProcessGroup | None:
    mesh = refs[0].device_mesh
    for ref in refs[1:]:
        if ref.device_mesh != mesh:
            raise PruningValueError(
                "the sharded tensors chosen from together live on different device meshes "
                f"({mesh} and {ref.device_mesh}); put them on one mesh"
            )
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() != dist.get_world_size():
        raise PruningValueError(
            f"a {mesh.ndim}-dimensional device mesh of {mesh.size()} ranks in a world of "
            f"{dist.get_world_size()}: selecting across such a mesh needs it to span every rank"
        )
    return None


def _sum(t: Any, group: dist.ProcessGroup | None) -> torch.Tensor:
    dist.all_reduce(t, group=group)
    TRAFFIC.add(t)
    return t


def count_candidates(items: Sequence[ShardedScores]) -> int:
    """How many candidates the whole tensors hold, summed over ranks."""
    group = _group([item.ref for item in items])
    here = [
        (item.scores.numel() if item.candidates is None else int(item.candidates.sum()))
        if counts_here(item.ref)
        else 0
        for item in items
    ]
    return int(_sum(torch.tensor(sum(here), dtype=torch.int64), group))


def _threshold(
    items: Sequence[ShardedScores], k: int, dtype: torch.dtype, group: dist.ProcessGroup | None
) -> tuple[int, int]:
    """The k-th smallest candidate's bits and how many entries with exactly those bits to choose."""
    shift, prefix, rank, rounds = INT_VIEW[dtype][1], 0, k, 0
    counting = [counts_here(item.ref) for item in items]
    while shift > 0:
        step = min(DIGIT_BITS, shift)
        hist = torch.zeros(1 << step, dtype=torch.int64)
        for item, counted in zip(items, counting):
            if not counted:
                continue
            for _, bits, allowed in item.pieces(dtype):
                inside = (bits >> shift) == prefix
                if allowed is not None:
                    inside &= allowed
                digits = (bits[inside] >> (shift - step)) & ((1 << step) - 1)
                hist += torch.bincount(digits.long(), minlength=1 << step)
        _sum(hist, group)
        rounds += 1
        cumulative = hist.cumsum(0)
        digit = int(torch.searchsorted(cumulative, rank))
        rank -= int(cumulative[digit - 1]) if digit else 0
        prefix, shift = (prefix << step) | digit, shift - step
    TRAFFIC.rounds.append(rounds)
    return prefix, rank


def _first_ties(
    item: ShardedScores, ties: torch.Tensor, need: int, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Of the local tie positions ``ties`` (flat, local), those among the ``need`` lowest whole-tensor
    indices over all ranks."""
    index = flat_global_index(item.ref, ties)
    counted = counts_here(item.ref)
    lo, hi = 0, math.prod(item.ref.shape)  # the answer t: count(index < t) >= need, smallest such t
    while lo < hi:
        mid = (lo + hi) // 2
        below = torch.tensor(int((index < mid).sum()) if counted else 0, dtype=torch.int64)
        if int(_sum(below, group)) >= need:
            hi = mid
        else:
            lo = mid + 1
    return ties[index < lo]


def select_smallest_sharded(
    items: Sequence[ShardedScores], k: int, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """Mark the ``k`` smallest candidate scores over sharded tensors: one local bool piece per item.

    Every rank must call it with the same tensors in the same order (a collective). The union of the
    pieces is exactly what :func:`masksparse.prune.select.select_smallest` marks on the whole tensors.
    """
    group = _group([item.ref for item in items])
    total = count_candidates(items)
    if not 0 <= k <= total:
        raise PruningValueError(f"cannot select k={k} entries out of {total} candidates")
    chosen = [torch.zeros(item.scores.shape, dtype=torch.bool, device=item.scores.device) for item in items]
    if k == 0:
        return chosen
    value, need = _threshold(items, k, dtype, group)
    tie_counts = torch.zeros(len(items), dtype=torch.int64)
    tie_positions = []
    for i, item in enumerate(items):
        flat_chosen = chosen[i].view(-1)
        positions = []
        for start, bits, allowed in item.pieces(dtype):
            below, tie = bits < value, bits == value
            if allowed is not None:
                below &= allowed
                tie &= allowed
            flat_chosen[start : start + bits.numel()] = below
            positions.append(tie.nonzero().squeeze(1) + start)
        ties = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
        tie_positions.append(ties)
        tie_counts[i] = ties.numel() if counts_here(item.ref) else 0
    cumulative = _sum(tie_counts, group).cumsum(0)
    for i, (item, ties) in enumerate(zip(items, tie_positions)):
        before = int(cumulative[i - 1]) if i else 0
        if before >= need:
            break
        take = ties if int(cumulative[i]) <= need else _first_ties(item, ties, need - before, group)
        chosen[i].view(-1)[take] = True
    return chosen
