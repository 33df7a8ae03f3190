"""Record the torch operations a model runs on example inputs.

The model really runs (so Python control flow takes the branch the inputs select), under a
``TorchDispatchMode`` that sees every aten operation, while module hooks tell which module is running.
Each tensor that takes part becomes a :class:`Value`; each operation a :class:`Node`. Parameters and
buffers are recognised by identity, so a value can be mapped back to ``(module path, tensor name)``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from masksparse._errors import CompactionError, MaskSparseError, PruningTypeError

__all__ = ["Node", "Trace", "Value", "record"]


@dataclass(eq=False)
class Value:
    """One tensor that took part in the run (a new version after every in-place write).

    ``static`` values depend on no model input (parameters, buffers, masked weights, constants); their
    tensor is kept because their contents are facts the analysis may use. ``source`` names the parameter
    or buffer a leaf value is, ``origin`` the one a static value was computed from (``weight_orig`` for
    ``weight_orig * weight_mask``; a mask only when nothing else took part).
    """

    id: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    static: bool
    producer: int | None = None
    source: tuple[str, str] | None = None
    origin: tuple[str, str] | None = None
    tensor: torch.Tensor | None = field(default=None, repr=False)

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)


@dataclass(eq=False)
class Node:
    """One aten operation as it ran: its arguments with tensors replaced by :class:`Value` objects."""

    index: int
    op: torch._ops.OpOverload
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    module: str
    module_type: type | None = None

    def arg(self, position: int, name: str, default: Any = None) -> Any:
        """The argument at ``position`` or keyword ``name``, else ``default``."""
        if position < len(self.args):
            return self.args[position]
        return self.kwargs.get(name, default)

    def __str__(self) -> str:
        return f"{self.op} in {self.module or '<model>'}"


@dataclass(eq=False)
class Trace:
    """What one run of a model did: values, nodes in execution order, inputs, outputs."""

    values: list[Value]
    nodes: list[Node]
    inputs: list[Value]
    outputs: list[Value]
    module_outputs: dict[str, Value]
    output_tensors: list[torch.Tensor] = field(default_factory=list, repr=False)


def _is_mask(source: tuple[str, str] | None) -> bool:
    return source is not None and source[1].endswith("_mask")


class _Recorder(TorchDispatchMode):
    """Dispatch mode turning every aten call into a :class:`Node`."""

    def __init__(self, leaves: dict[int, tuple[torch.Tensor, tuple[str, str]]]) -> None:
        super().__init__()
        self.leaves = leaves
        self.values: list[Value] = []
        self.nodes: list[Node] = []
        self.module_stack: list[tuple[str, type]] = [("", nn.Module)]
        # id(tensor) -> (weak reference, value). The weak reference guards against a freed tensor's id
        # being reused by a new one; static tensors are also held strongly by their Value.
        self.live: dict[int, tuple[weakref.ref[torch.Tensor], Value]] = {}

    def new_value(self, t: torch.Tensor, static: bool, **extra: Any) -> Value:
        v = Value(len(self.values), tuple(t.shape), t.dtype, static, **extra)
        if static:
            v.tensor = t
        self.values.append(v)
        self.live[id(t)] = (weakref.ref(t), v)
        return v

    def lookup(self, t: torch.Tensor) -> Value:
        entry = self.live.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        leaf = self.leaves.get(id(t))
        if leaf is not None and leaf[0] is t:
            return self.new_value(t, True, source=leaf[1], origin=leaf[1])
        # A tensor created outside the run (a plain tensor attribute, a global constant).
        return self.new_value(t, True)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        in_leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        inputs = [self.lookup(t) for t in in_leaves]
        static = all(v.static for v in inputs) and torch.Tag.nondeterministic_seeded not in func.tags
        # What a static result was computed from: the weight of ``weight_orig * weight_mask``.
        origins = [v.origin for v in inputs if v.origin is not None]
        origin = next((o for o in origins if not _is_mask(o)), origins[0] if origins else None)
        index = len(self.nodes)
        outputs = [
            self.new_value(t, static, producer=index, origin=origin if static else None)
            for t in pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor)
        ]
        by_id = {id(t): v for t, v in zip(in_leaves, inputs)}
        node_args, node_kwargs = pytree.tree_map(
            lambda x: by_id[id(x)] if isinstance(x, torch.Tensor) else x, (args, kwargs)
        )
        path, kind = self.module_stack[-1]
        self.nodes.append(
            Node(index, func, tuple(node_args), node_kwargs, tuple(inputs), tuple(outputs), path, kind)
        )
        return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _module_hooks(model: nn.Module, recorder: _Recorder, outputs: dict[str, Value]) -> Iterator[None]:
    handles = []

    def pre(path: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            recorder.module_stack.append((path, type(module)))

        return hook

    def post(path: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            recorder.module_stack.pop()
            first = next((t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)), None)
            if first is not None and path not in outputs:
                outputs[path] = recorder.lookup(first)

        return hook

    for path, module in model.named_modules():
        # prepend: the pre-hook of torch.nn.utils.prune computes weight_orig * weight_mask, and that
        # product belongs to the module being called.
        handles.append(module.register_forward_pre_hook(pre(path), prepend=True))
        handles.append(module.register_forward_hook(post(path)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    """Positional arguments for ``model(*args)`` from a tensor or a tuple/list of arguments."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return tuple(example_inputs)
    raise PruningTypeError(
        f"example_inputs must be a tensor or a tuple of the model's positional arguments, "
        f"got {type(example_inputs).__name__}"
    )


def record(model: nn.Module, example_inputs: Any) -> Trace:
    """Run ``model`` once in eval mode without gradients and record what it did.

    Example:
        >>> import torch
        >>> from masksparse.graph.record import record
        >>> t = record(torch.nn.Linear(4, 2), torch.randn(3, 4))
        >>> [str(n.op) for n in t.nodes]
        ['aten.t.default', 'aten.addmm.default']
    """
    args = as_args(example_inputs)
    leaves: dict[int, tuple[torch.Tensor, tuple[str, str]]] = {}
    for path, module in model.named_modules():
        for name, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and id(t) not in leaves:
                leaves[id(t)] = (t, (path, name))
    recorder = _Recorder(leaves)
    inputs = [recorder.new_value(t, False) for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    module_outputs: dict[str, Value] = {}
    with _eval_mode(model), torch.no_grad(), _module_hooks(model, recorder, module_outputs), recorder:
        try:
            out = model(*args)
        except MaskSparseError:
            raise
        except Exception as exc:
            raise CompactionError(
                f"the model raised while running on the example inputs, in module "
                f"{recorder.module_stack[-1][0] or '<model>'!r}: {exc}"
            ) from exc
    out_tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    outputs = [recorder.lookup(t) for t in out_tensors]
    recorder.live.clear()
    return Trace(recorder.values, recorder.nodes, inputs, outputs, module_outputs, out_tensors)
