"""Calibration data fed to a model: one rule for every form a batch takes.

Everything that runs a model over data (calibration, data-driven criteria, reconstruction) feeds its
batches through :func:`run_batch`, so a batch means the same thing everywhere:

- a user ``forward(model, batch)`` overrides everything below and returns the output (or the loss);
- with a ``loss_fn``, a ``(inputs, target)`` pair gives ``loss_fn(model(inputs), target)`` (``inputs``
  taken as :func:`masksparse._inputs.model_inputs` takes example inputs), and a mapping batch gives
  ``loss_fn(model(**batch), batch)``;
- without one, a mapping (dict, ``BatchEncoding``) is called ``model(**batch)``, a tuple or list
  positionally, a tensor as ``model(batch)``;

and :func:`loss_of` turns what came back into a scalar loss: a tensor with one element, or a Hugging
Face output's ``.loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from masksparse._errors import PruningTypeError, PruningValueError
from masksparse._inputs import model_inputs

__all__ = ["Forward", "LossFn", "batches", "loss_of", "run_batch"]

LossFn = Callable[[Any, Any], torch.Tensor]
Forward = Callable[[nn.Module, Any], Any]


def batches(data: Iterable[Any], what: str = "data") -> Iterator[Any]:
    """The batches of ``data`` (a DataLoader, a list, any iterable but a tensor or a string), one at a
    time; raises PruningValueError once the iterable is exhausted without having given one.

    Example:
        >>> import torch
        >>> from masksparse._feed import batches
        >>> len(list(batches([torch.zeros(2, 3), torch.ones(2, 3)])))
        2
        >>> list(batches([]))
        Traceback (most recent call last):
        ...
        masksparse._errors.PruningValueError: data gave no batches: calibration needs at least one \
(a DataLoader, a list of batches, any iterable)
    """
    if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise PruningTypeError(
            f"{what} must be an iterable of batches (a DataLoader, a list of batches); got "
            f"{type(data).__name__}" + (": wrap a single batch in a list, [batch]" if _is_batch(data) else "")
        )
    n = 0
    for batch in data:
        n += 1
        yield batch
    if n == 0:
        raise PruningValueError(
            f"{what} gave no batches: calibration needs at least one (a DataLoader, a list of batches, any "
            "iterable)"
        )


def _is_batch(data: Any) -> bool:
    return isinstance(data, (torch.Tensor, Mapping))


def run_batch(
    model: nn.Module, batch: Any, *, loss_fn: LossFn | None = None, forward: Forward | None = None
) -> Any:
    """Call ``model`` on one batch as the module docstring says; returns the output, or the loss when
    a ``loss_fn`` is given.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse._feed import run_batch
        >>> model = nn.Linear(3, 2)
        >>> run_batch(model, torch.zeros(4, 3)).shape
        torch.Size([4, 2])
        >>> loss = run_batch(model, (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)),
        ...                  loss_fn=nn.functional.cross_entropy)
        >>> loss.dim()
        0
    """
    if forward is not None:
        return forward(model, batch)
    if loss_fn is None:
        return model_inputs(batch)(model)
    if isinstance(batch, Mapping):
        return loss_fn(model(**batch), batch)
    if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)) or len(batch) != 2:
        raise PruningTypeError(
            "with a loss_fn, each batch must be an (inputs, target) pair or a mapping of keyword arguments; "
            f"got {_describe(batch)}"
        )
    inputs, target = batch
    return loss_fn(model_inputs(inputs)(model), target)


def loss_of(result: Any) -> torch.Tensor:
    """The scalar loss in what :func:`run_batch` returned: a one-element tensor, or ``result.loss``
    (a Hugging Face output called with labels). Raises PruningValueError otherwise.

    Example:
        >>> import torch
        >>> from masksparse._feed import loss_of
        >>> float(loss_of(torch.tensor(2.0)))
        2.0
        >>> loss_of(torch.zeros(3))
        Traceback (most recent call last):
        ...
        masksparse._errors.PruningValueError: the loss must be a scalar tensor; got a tensor of shape \
(3,): reduce it (mean or sum) in loss_fn
    """
    loss = getattr(result, "loss", None) if not isinstance(result, torch.Tensor) else result
    if loss is None and isinstance(result, Mapping):
        loss = result.get("loss")
    if not isinstance(loss, torch.Tensor):
        raise PruningValueError(
            "this criterion needs a loss: pass loss_fn (called as loss_fn(model(inputs), target) on "
            "(inputs, target) batches) or forward(model, batch) returning the loss, or feed a Hugging Face "
            f"model batches with labels so that its output has .loss; the model returned {_describe(result)}"
        )
    if loss.numel() != 1:
        raise PruningValueError(
            f"the loss must be a scalar tensor; got a tensor of shape {tuple(loss.shape)}: reduce it (mean "
            "or sum) in loss_fn"
        )
    return loss.reshape(())


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}"
    return f"a {type(x).__name__}"
