"""Feeding repeated blocks directly: capture a block's inputs once, then chain pruned outputs onward.

Running the whole model again for every block costs about ``L^2 / 2`` block passes for ``L`` blocks.
When the blocks are chained (block ``k + 1`` is called with block ``k``'s output in one argument
slot and with exactly the same other arguments), the inputs of block 0 are captured once and every
later block's inputs are computed by running the pruned block before it, as the papers' code does:
about ``2 L`` block passes. Whether the model is chained is checked on the first batch of the dense
model, and nothing is assumed: a model whose blocks take anything but tensors and plain values (a
key/value cache object, say) or whose blocks are not chained is fed through the whole model instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["BlockInput", "Chain", "capture", "find_chain"]

_PLAIN = (type(None), bool, int, float, str)


@dataclasses.dataclass
class BlockInput:
    """The arguments one batch gave a block, and the batch's token mask."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    token_mask: torch.Tensor | None

    def run(self, block: nn.Module) -> Any:
        return block(*self.args, **self.kwargs)


@dataclasses.dataclass(frozen=True)
class Chain:
    """Where a block's hidden state goes in: positional ``slot`` (an int) or keyword ``slot``."""

    slot: int | str

    def hidden(self, item: BlockInput) -> Any:
        return item.args[self.slot] if isinstance(self.slot, int) else item.kwargs[self.slot]

    def next_input(self, item: BlockInput, output: Any) -> BlockInput:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(self.slot, int):
            args = item.args[: self.slot] + (hidden,) + item.args[self.slot + 1 :]
            return BlockInput(args, item.kwargs, item.token_mask)
        return BlockInput(item.args, {**item.kwargs, self.slot: hidden}, item.token_mask)


def _plain(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return False


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and (a is b or torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def _slots(item: BlockInput) -> list[int | str]:
    return [i for i, a in enumerate(item.args) if isinstance(a, torch.Tensor)] + [
        k for k, v in item.kwargs.items() if isinstance(v, torch.Tensor)
    ]


def find_chain(blocks: Sequence[nn.Module], inputs: Sequence[BlockInput]) -> Chain | None:
    """The slot through which every block feeds the next (checked by running each block on its
    captured input and comparing with the next block's captured input), or None."""
    if len(inputs) != len(blocks) or not inputs:
        return None
    if not all(_plain(list(i.args)) and _plain(list(i.kwargs.values())) for i in inputs):
        return None
    slot: int | str | None = None
    with torch.no_grad():
        for k in range(len(blocks) - 1):
            out = inputs[k].run(blocks[k])
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            nxt = inputs[k + 1]
            found = [s for s in _slots(nxt) if _same(Chain(s).hidden(nxt), hidden)]
            if not found or (slot is not None and slot not in found):
                return None
            slot = slot if slot is not None else found[0]
            expected = Chain(slot).next_input(inputs[k], out)
            same_rest = len(expected.args) == len(nxt.args) and expected.kwargs.keys() == nxt.kwargs.keys()
            if not same_rest or not _same(list(expected.args), list(nxt.args)):
                return None
            if not all(_same(expected.kwargs[key], nxt.kwargs[key]) for key in nxt.kwargs):
                return None
    return Chain(slot if slot is not None else 0) if len(blocks) > 1 else None


class _Captured(Exception):
    """Raised from the pre-hook once a block's inputs are stored, ending the pass."""


def capture(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batch: Any,
    feed: Callable[[nn.Module, Any], None],
    *,
    stop_after: bool,
) -> list[BlockInput]:
    """The first call's arguments of each of ``blocks`` on one batch (the model run with ``feed``).
    With ``stop_after`` the pass ends as soon as the last block's inputs are stored."""
    store: dict[int, BlockInput] = {}

    def hook(index: int) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            store.setdefault(index, BlockInput(tuple(args), dict(kwargs), None))
            if stop_after and index == len(blocks) - 1:
                raise _Captured

        return pre_hook

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            feed(model, batch)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    return [store[i] for i in sorted(store)]
