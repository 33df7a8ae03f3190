"""Multiply-accumulates per layer, counted by running the model once with forward hooks.

Each layer type that has a cost registers a function saying how many times one forward call uses each
entry of its weight (for a Linear: once per position of the leading dimensions; for a convolution: once
per output position, or per input position when transposed). A layer's dense MACs are then that count
times its weight's size, and its effective MACs that count times its weight's nonzero entries, which is
exact because every entry of these weights is used equally often.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from masksparse._inputs import model_inputs

# (module, positional args, output) -> uses of each weight entry in that call
_Uses = Callable[[nn.Module, tuple[Any, ...], Any], int]
_USES: dict[type, _Uses] = {}


def _counts(*types: type) -> Callable[[_Uses], _Uses]:
    def decorate(fn: _Uses) -> _Uses:
        for t in types:
            _USES[t] = fn
        return fn

    return decorate


def uses_counter(module: nn.Module) -> _Uses | None:
    """How ``module``'s weight uses are counted, by its class's MRO; None for layers without a rule."""
    for cls in type(module).__mro__:
        if cls in _USES:
            return _USES[cls]
    return None


def _positions(t: Tensor, channel_dim: int) -> int:
    # Entries of t per channel: batch and spatial positions (or a Linear's leading dimensions).
    return math.prod(size for dim, size in enumerate(t.shape) if dim != channel_dim)


@_counts(nn.Linear)
def _linear(module: nn.Module, args: tuple[Any, ...], output: Any) -> int:
    # Every output entry is a dot product with one weight row: each weight entry is used once per
    # position of the leading dimensions, whatever their number.
    return _positions(output, output.dim() - 1)


@_counts(nn.modules.conv._ConvNd)
def _conv(module: nn.Module, args: tuple[Any, ...], output: Any) -> int:
    conv = cast(nn.modules.conv._ConvNd, module)
    # A convolution applies its whole (grouped) kernel at every output position; a transposed one
    # scatters every input entry through its group's kernel, so it is counted at the input positions.
    # Positions that read padding are counted too: the layer computes them.
    t: Tensor = args[0] if conv.transposed else output
    batched = t.dim() == len(conv.kernel_size) + 2
    return _positions(t, 1 if batched else 0)


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Eval mode for the run; afterwards every module's mode and plain tensor attributes are as before.

    torch.nn.utils.prune's forward pre-hook writes ``module.<name> = orig * mask`` on every call; putting
    the previous tensor back keeps even that attribute (and its autograd history) as it was.
    """
    saved = [
        (m, m.training, {k: v for k, v in vars(m).items() if isinstance(v, Tensor)}) for m in model.modules()
    ]
    model.eval()
    try:
        yield
    finally:
        for m, training, tensors in saved:
            m.training = training
            m.__dict__.update(tensors)


def count_uses(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Run ``model`` once on ``example_inputs`` and count the uses of each weight entry per layer.

    The result maps the path of each module with a rule that ran (once or more: the calls add up) to
    the uses of one entry of its weight.
    """
    call = model_inputs(example_inputs)
    uses: dict[str, int] = {}
    handles = []

    def hook(path: str, counter: _Uses) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def count(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            # forward(input=x) arrives as a keyword: its value is then the first argument
            uses[path] = uses.get(path, 0) + counter(module, args + tuple(kwargs.values()), output)

        return count

    try:
        for path, module in model.named_modules():
            counter = uses_counter(module)
            if counter is not None:
                handles.append(module.register_forward_hook(hook(path, counter), with_kwargs=True))
        with _untouched(model), torch.no_grad():
            call(model)
    finally:
        for handle in handles:
            handle.remove()
    return uses
