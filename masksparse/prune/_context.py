"""Errors that name the call they came from, and the module that a dotted tensor name points at.

``prune.l1_unstructured(model, "fc1.weight", ...)`` fails inside; the public function adds the call, the
module class and the tensor before re-raising, and a hint when a submodule owns the tensor.
"""

from __future__ import annotations

import contextlib
import keyword
from collections.abc import Iterator
from typing import Any

from torch import nn

from masksparse._errors import MaskSparseError


@contextlib.contextmanager
def error_context(prefix: str) -> Iterator[None]:
    """Prefix a masksparse error raised within by where it came from, e.g. ``prune.f(Linear, 'weight')``.

    Only the outermost context adds its prefix, so a function built on another names itself once.
    """
    try:
        yield
    except MaskSparseError as error:
        if not getattr(error, "_masksparse_call", False):
            error._masksparse_call = True  # type: ignore[attr-defined]
            error.args = (f"{prefix}: {error}", *error.args[1:])
        raise


@contextlib.contextmanager
def call_context(call: str, module: Any, name: Any) -> Iterator[None]:
    """:func:`error_context` for a call on one tensor: ``prune.l1_unstructured(Linear, 'weight'): ...``.

    A dotted ``name`` that a submodule owns (``"fc1.weight"``) adds which call was likely meant.
    """
    with error_context(f"{call}({type(module).__name__}, {name!r})"):
        try:
            yield
        except MaskSparseError as error:
            hint = owner_hint(call, module, name)
            if hint and not getattr(error, "_masksparse_call", False):
                error.args = (f"{error}; {hint}", *error.args[1:])
            raise


def _path_expression(model: nn.Module, path: str) -> str:
    """Python that reaches ``model.get_submodule(path)``: ``model.blocks[0].fc1`` where it can."""
    expression, parent = "model", model
    for part in path.split("."):
        if part.isdigit() and isinstance(parent, (nn.Sequential, nn.ModuleList)):
            expression += f"[{part}]"
        elif part.isidentifier() and not keyword.iskeyword(part):
            expression += f".{part}"
        else:
            return f"model.get_submodule({path!r})"
        parent = parent._modules[part]  # type: ignore[assignment]
    return expression


def owner_of(module: Any, name: Any) -> tuple[str, str] | None:
    """For ``name="fc1.weight"`` owned by ``module.fc1``: ``("model.fc1", "weight")``; else None."""
    if not isinstance(module, nn.Module) or not isinstance(name, str) or "." not in name:
        return None
    path, leaf = name.rsplit(".", 1)
    try:
        owner = module.get_submodule(path)
    except AttributeError:
        return None
    if leaf not in owner._parameters and leaf + "_orig" not in owner._parameters:
        return None
    return _path_expression(module, path), leaf


def owner_hint(call: str, module: Any, name: Any) -> str:
    """The call that was probably meant when a dotted name is a submodule's tensor; else ``""``."""
    found = owner_of(module, name)
    if found is None:
        return ""
    expression, leaf = found
    return (
        f"the first argument is the module that owns the tensor: did you mean {call}({expression}, {leaf!r})?"
    )
