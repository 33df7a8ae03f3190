"""Example inputs as a model call, and a model's outputs as a flat list of tensors.

Everything that runs a model on the user's example inputs (tracing, verification, the report's MACs)
takes them in one of three forms: a tensor, a tuple or list of positional arguments, or a mapping of
keyword arguments (a dict, a Hugging Face ``BatchEncoding``) that is called as ``model(**inputs)``.
Outputs are compared leaf by leaf, whatever holds them: tuples, lists, dicts, dataclasses and Hugging
Face ``ModelOutput`` objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from masksparse._errors import PruningTypeError

__all__ = ["ModelInputs", "model_inputs", "output_tensors"]


class ModelInputs(NamedTuple):
    """The positional and keyword arguments of one call of a model."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __call__(self, model: nn.Module) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor among the arguments, in order (what the model reads as its inputs)."""
        return output_tensors((self.args, self.kwargs))


def model_inputs(example_inputs: Any) -> ModelInputs:
    """How to call a model on ``example_inputs``: a tensor or a tuple/list of positional arguments, or
    a mapping of keyword arguments (dict, ``BatchEncoding``) passed as ``model(**inputs)``.

    Example:
        >>> import torch
        >>> from masksparse._inputs import model_inputs
        >>> model_inputs({"input_ids": torch.zeros(1, 4, dtype=torch.long)}).kwargs.keys()
        dict_keys(['input_ids'])
        >>> model_inputs(3)
        Traceback (most recent call last):
        ...
        masksparse._errors.PruningTypeError: example_inputs must be a tensor, a tuple or list of the \
model's positional arguments, or a mapping of keyword arguments (a dict or BatchEncoding, passed as \
model(**inputs)); got int
    """
    if isinstance(example_inputs, torch.Tensor):
        return ModelInputs((example_inputs,), {})
    if isinstance(example_inputs, Mapping):
        bad = next((k for k in example_inputs if not isinstance(k, str)), None)
        if bad is not None:
            raise PruningTypeError(
                f"example_inputs as a mapping are keyword arguments for model(**inputs), so their keys must "
                f"be str; got the key {bad!r}"
            )
        return ModelInputs((), dict(example_inputs))
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, (str, bytes)):
        return ModelInputs(tuple(example_inputs), {})
    raise PruningTypeError(
        "example_inputs must be a tensor, a tuple or list of the model's positional arguments, or a mapping "
        "of keyword arguments (a dict or BatchEncoding, passed as model(**inputs)); got "
        f"{type(example_inputs).__name__}"
    )


def output_tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in ``output``, depth first: through tuples, lists, mappings (a ``ModelOutput`` is
    one: its fields that are set) and dataclasses; other objects hold none.

    Example:
        >>> import torch
        >>> from masksparse._inputs import output_tensors
        >>> a, b = torch.zeros(1), torch.ones(2)
        >>> [t.shape[0] for t in output_tensors({"logits": a, "extra": (None, [b])})]
        [1, 2]
    """
    return list(_leaves(output))


def _leaves(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            yield from _leaves(getattr(x, f.name))
