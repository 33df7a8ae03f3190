"""Record the torch operations a model runs on example inputs.

The model really runs (so Python control flow takes the branch the inputs select), under a
``TorchDispatchMode`` that sees every aten operation, while module hooks tell which module is running.
Each tensor that takes part becomes a :class:`Value`; each operation a :class:`Node`. Parameters and
buffers are recognised by identity, so a value can be mapped back to ``(module path, tensor name)``.

The model runs in eval mode. When some parameters take no part in that run (auxiliary classifiers
that only run in training, as GoogLeNet's and Inception v3's do), the model runs once more in training
mode and what that run adds is merged in (see :func:`record`).

A model sharded with FSDP2 runs as it does in training: each module gathers its whole parameters for
its forward and frees them after. Those whole parameters are new tensors that FSDP2 sets on the running
module, and are recognised as that module's parameters; a mask gathered for ``weight_orig *
weight_mask`` is recognised as the mask buffer. What only communication made (collectives, FSDP2's flat
buffers, whatever FSDP2's hooks compute) is opaque: it makes no values and no nodes. Nothing made from
a gathered tensor keeps its contents, so the trace never holds the whole model.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torch.utils._python_dispatch import TorchDispatchMode

from masksparse._errors import CompactionError, MaskSparseError
from masksparse._inputs import ModelInputs, model_inputs, output_tensors
from masksparse.distributed.tensors import gathered_from
from masksparse.distributed.tensors import is_dtensor as _is_dtensor
from masksparse.prune._reparam import masked_value, reads_cached

__all__ = ["Node", "Trace", "Value", "record"]


@dataclass(eq=False)
class Value:
    """One tensor that took part in the run (a new version after every in-place write or restride).

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
    # Where each element lives in storage when this version was made (None: not a strided tensor).
    stride: tuple[int, ...] | None = field(default=None, repr=False)
    storage_offset: int = field(default=0, repr=False)

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
    training: bool = False  # recorded by the training-mode run (see record)
    # issued by torch.chunk, which computes its part size from the tensor (aten sees a split into sizes)
    chunk: bool = False

    def arg(self, position: int, name: str, default: Any = None) -> Any:
        """The argument at ``position`` or keyword ``name``, else ``default``."""
        if position < len(self.args):
            return self.args[position]
        return self.kwargs.get(name, default)

    def __str__(self) -> str:
        return f"{self.op} in {self.module or '<model>'}" + (" (training mode)" if self.training else "")


@dataclass(eq=False)
class Trace:
    """What running a model did: values, nodes in execution order, inputs, outputs.

    ``outputs`` are the model outputs of both runs (the training-mode run's auxiliary logits too);
    ``output_tensors`` the eval-mode run's outputs, the reference compaction verifies against.
    ``unused`` lists the parameters neither run used, which structured pruning leaves as they are.
    """

    values: list[Value]
    nodes: list[Node]
    inputs: list[Value]
    outputs: list[Value]
    module_outputs: dict[str, Value]
    output_tensors: list[torch.Tensor] = field(default_factory=list, repr=False)
    unused: tuple[tuple[str, str], ...] = ()


def _is_mask(source: tuple[str, str] | None) -> bool:
    return source is not None and source[1].endswith("_mask")


class _Recorder(TorchDispatchMode):
    """Dispatch mode turning every aten call into a :class:`Node`.

    With ``replay`` set (the training-mode run), a call identical to one the eval-mode run recorded
    (same op, same argument values) is that call again: its outputs map to the recorded values and no
    node is added, so only what the training-mode run does differently joins the trace.
    """

    def __init__(
        self, leaves: dict[int, tuple[torch.Tensor, tuple[str, str]]], sharded: bool = False
    ) -> None:
        super().__init__()
        self.leaves = leaves
        self.sharded = sharded  # the model holds DTensor parameters (FSDP2 swaps whole ones in)
        self.values: list[Value] = []
        self.nodes: list[Node] = []
        # (path, module) of the modules running, innermost last; the model's own run is ("", None)
        self.module_stack: list[tuple[str, nn.Module | None]] = [("", None)]
        # Sources found on the running module rather than among the leaves: the whole parameters an
        # FSDP2 module gathers for its forward (new tensors each run, set on the module by FSDP).
        self.found: set[tuple[str, str]] = set()
        # Values made from whole copies of sharded tensors: their contents are not kept, so a trace of a
        # sharded model never holds the whole model.
        self.unkept: set[int] = set()
        # Values that only communication made (what other ranks sent, and FSDP2's views and copies of it):
        # opaque: no values, and their operations are no nodes (see __torch_dispatch__). id -> weak ref.
        self.opaque: dict[int, weakref.ref[torch.Tensor]] = {}
        # The open profiler ranges, innermost last, True for those FSDP2 opens around its hooks
        # (gathering, freeing): everything made inside one is opaque too.
        self.ranges: list[bool] = []
        # id(tensor) -> (weak reference, value). The weak reference guards against a freed tensor's id
        # being reused by a new one; static tensors are also held strongly by their Value.
        self.live: dict[int, tuple[weakref.ref[torch.Tensor], Value]] = {}
        self.replay: dict[Hashable, Node] | None = None
        self.chunks = 0  # torch.chunk calls running (see _Chunks)
        self.muted = False  # calls made while True are not recorded (see masked_leaf)

    def new_value(self, t: torch.Tensor, static: bool, keep: bool = True, **extra: Any) -> Value:
        v = Value(len(self.values), tuple(t.shape), t.dtype, static, **extra)
        if t.layout == torch.strided:
            v.stride, v.storage_offset = tuple(t.stride()), int(t.storage_offset())
        if static and keep:
            v.tensor = t
        elif static:
            self.unkept.add(v.id)
        self.values.append(v)
        self.live[id(t)] = (weakref.ref(t), v)
        return v

    def lookup(self, t: torch.Tensor) -> Value:
        entry = self.live.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        sharded = gathered_from(t)  # a whole copy of a sharded mask: the mask buffer itself
        if sharded is not None:
            leaf = self.leaves.get(id(sharded))
            if leaf is not None and leaf[0] is sharded:
                return self.new_value(t, True, keep=False, source=leaf[1], origin=leaf[1])
        if self.is_opaque(t):  # a gathered parameter, or a constant from other ranks
            return self.running_source(t) or self.new_value(t, True, keep=False)
        leaf = self.leaves.get(id(t))
        if leaf is not None and leaf[0] is t:
            return self.new_value(t, True, source=leaf[1], origin=leaf[1])
        # A tensor created outside the run (a plain tensor attribute, a global constant).
        return self.running_source(t) or self.new_value(t, True)

    def is_opaque(self, t: torch.Tensor) -> bool:
        """Whether only communication made ``t`` (and it has no value yet)."""
        ref = self.opaque.get(id(t))
        return ref is not None and ref() is t and id(t) not in self.live

    def only_communicated(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is opaque and neither a gathered mask nor a running module's tensor."""
        return self.is_opaque(t) and gathered_from(t) is None and self.running_name(t) is None

    def running_name(self, t: torch.Tensor) -> tuple[str, str] | None:
        """``(path, name)`` if ``t`` is a parameter or buffer of the running module: the whole parameters
        an FSDP2 module gathers for its forward and sets on itself (new tensors, not leaves). Asked only
        of sharded models: in any other, a tensor a module sets on itself while running is a constant."""
        path, module = self.module_stack[-1]
        if not self.sharded or module is None:
            return None
        for name, own in (*module._parameters.items(), *module._buffers.items()):
            if own is t:
                return (path, name)
        return None

    def running_source(self, t: torch.Tensor) -> Value | None:
        """``t`` as the running module's parameter or buffer it is (see running_name), if it is one."""
        source = self.running_name(t)
        if source is None:
            return None
        self.found.add(source)
        return self.new_value(t, True, keep=False, source=source, origin=source)

    def drop_unreadable(self) -> None:
        """Forget the contents of static values that cannot be read after the run: FSDP2 frees the
        storage of the whole parameters it gathered for a forward, and a DTensor's values are spread
        over ranks. Their slots then count as unknown constants, the safe side."""
        for v in self.values:
            t = v.tensor
            if t is None:
                continue
            if _is_dtensor(t) or (
                t.layout == torch.strided and t.numel() > 0 and t.untyped_storage().nbytes() == 0
            ):
                v.tensor = None

    def start_replay(self) -> None:
        """Index the recorded nodes, so that the next run adds only the calls they do not hold."""
        self.replay = {}
        for node in self.nodes:
            key = _key(node.op, node.args, node.kwargs)
            if key is not None:
                self.replay.setdefault(key, node)

    def replayed(self, func: Any, node_args: Any, node_kwargs: Any, out: Any) -> bool:
        """Map the outputs of a call the eval-mode run recorded identically to its values."""
        if self.replay is None or torch.Tag.nondeterministic_seeded in func.tags:
            return False
        key = _key(func, node_args, node_kwargs)
        node = self.replay.get(key) if key is not None else None
        tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if node is None or [v.shape for v in node.outputs] != [tuple(t.shape) for t in tensors]:
            return False
        for t, v in zip(tensors, node.outputs):
            self.live[id(t)] = (weakref.ref(t), v)
        return True

    def masked_leaf(self, orig: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``weight_orig * weight_mask``, computed off the record and entered as one static value: the
        parameter as the model reads it (source and origin ``weight_orig``). The product's contents
        carry what the mask zeroed, and the trace stays as short as the unpruned model's (recorded as
        calls, the cast and the product would add three nodes per masked tensor, half of a pruned
        resnet50's). A sharded tensor's product is recorded as calls (its mask may be gathered)."""
        leaf = self.leaves.get(id(orig))
        if self.sharded or leaf is None or leaf[0] is not orig or _is_dtensor(mask):
            return masked_value(orig, mask)
        self.muted = True
        try:
            value = masked_value(orig, mask)
        finally:
            self.muted = False
        self.found.add(leaf[1])  # weight_orig is read
        self.new_value(value, True, source=leaf[1], origin=leaf[1])
        return value

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.muted:
            return func(*args, **kwargs)
        # Inputs are looked up before the call: an in-place op (a restride) changes them.
        in_leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if func.namespace == "profiler":  # a range marker, not a computation
            if "enter" in func.__name__:
                self.ranges.append(bool(args) and isinstance(args[0], str) and args[0].startswith("FSDP::"))
            elif "exit" in func.__name__ and self.ranges:
                self.ranges.pop()
            return func(*args, **kwargs)
        if (
            any(self.ranges)
            or func.namespace in _COMMUNICATION
            or (in_leaves and all(self.only_communicated(t) for t in in_leaves))
        ):
            # What another rank sent is a constant here (FSDP2 gathering a parameter or a mask), and so
            # is what FSDP2's hooks and operations on such constants alone make: opaque, with no values
            # and no nodes, so FSDP2's flat buffers never join the trace.
            out = func(*args, **kwargs)
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.opaque[id(t)] = weakref.ref(t)
                    self.live.pop(id(t), None)  # an in-place write: the old value is gone
            return out
        inputs = [self.lookup(t) for t in in_leaves]
        out = func(*args, **kwargs)
        by_id = {id(t): v for t, v in zip(in_leaves, inputs)}
        node_args, node_kwargs = pytree.tree_map(
            lambda x: by_id[id(x)] if isinstance(x, torch.Tensor) else x, (args, kwargs)
        )
        if self.replayed(func, node_args, node_kwargs, out):
            return out
        static = all(v.static for v in inputs) and torch.Tag.nondeterministic_seeded not in func.tags
        # What a static result was computed from: the weight of ``weight_orig * weight_mask``.
        origins = [v.origin for v in inputs if v.origin is not None]
        origin = next((o for o in origins if not _is_mask(o)), origins[0] if origins else None)
        index = len(self.nodes)
        keep = not any(v.id in self.unkept for v in inputs)
        outputs = [
            self.new_value(t, static, keep, producer=index, origin=origin if static else None)
            for t in pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor)
        ]
        path, running = self.module_stack[-1]
        kind = nn.Module if running is None else type(running)
        self.nodes.append(
            Node(
                index, func, tuple(node_args), node_kwargs, tuple(inputs), tuple(outputs), path, kind,
                training=self.replay is not None, chunk=self.chunks > 0,
            )
        )  # fmt: skip
        return out


# Operator namespaces of torch.distributed's collectives and FSDP2's copies around them.
_COMMUNICATION = frozenset({"c10d", "_c10d_functional", "_c10d_functional_autograd", "fsdp", "_dtensor"})


def _key(func: Any, args: Any, kwargs: Any) -> Hashable | None:
    """A call as a hashable key: the op and its arguments, values by id (None: not hashable)."""

    def freeze(a: Any) -> Hashable:
        if isinstance(a, Value):
            return ("value", a.id)
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, *(freeze(b) for b in a))
        if isinstance(a, dict):
            return ("dict", *((k, freeze(v)) for k, v in sorted(a.items())))
        return (type(a).__name__, a)

    key = (func, freeze(args), freeze(kwargs))
    try:
        hash(key)
    except TypeError:
        return None
    return key


@contextlib.contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Every module's training flag as it was on entry, restored on exit (mixed modes too)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    with _modes_kept(model):
        model.eval()
        yield


@contextlib.contextmanager
def _training_mode(model: nn.Module, inputs: ModelInputs) -> Iterator[None]:
    """Training mode without side effects (see :func:`record`).

    Normalisation layers and dropout modules stay in eval mode: only which modules run matters here,
    and the constants the analysis computes must be those of eval mode, which compaction verifies.
    """
    buffers = [(b, b._version, b.clone()) for n, b in model.named_buffers() if not n.endswith("_mask")]
    tensors = [*model.parameters(), *model.buffers(), *inputs.tensors()]
    cuda = {t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cuda"}
    with torch.random.fork_rng(devices=sorted(cuda)), _modes_kept(model):
        model.train()
        for m in model.modules():
            if isinstance(m, (_NormBase, _DropoutNd)):
                m.eval()
        try:
            yield
        finally:
            for b, version, saved in buffers:
                if b._version != version:
                    b.copy_(saved)


@contextlib.contextmanager
def _module_hooks(model: nn.Module, recorder: _Recorder, outputs: dict[str, Value]) -> Iterator[None]:
    handles = []

    def pre(path: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            recorder.module_stack.append((path, module))

        return hook

    def post(path: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            recorder.module_stack.pop()
            first = next(iter(output_tensors(output)), None)
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


@contextlib.contextmanager
def _chunks(recorder: _Recorder) -> Iterator[None]:
    """Tell the recorder when ``torch.chunk`` runs: aten sees it as ``split`` into sizes, but chunk
    computes its part size from the tensor, so its parts follow a compacted width, where a size passed
    to ``split`` is written out in the model's code. The two functions are wrapped for the run (a
    TorchFunctionMode would do, but it turns off ``nn.MultiheadAttention``'s fused path)."""
    originals = torch.chunk, torch.Tensor.chunk

    def counted(fn: Any) -> Any:
        @functools.wraps(fn)
        def chunk(*args: Any, **kwargs: Any) -> Any:
            recorder.chunks += 1
            try:
                return fn(*args, **kwargs)
            finally:
                recorder.chunks -= 1

        return chunk

    torch.chunk, torch.Tensor.chunk = counted(originals[0]), counted(originals[1])  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.chunk, torch.Tensor.chunk = originals  # type: ignore[method-assign]


def record(model: nn.Module, example_inputs: Any) -> Trace:
    """Run ``model`` in eval mode without gradients and record what it did.

    When some parameters take no part in that run (an auxiliary classifier that only runs in training,
    as GoogLeNet's and Inception v3's do), the model runs once more in training mode, and the calls that
    run adds (the auxiliary heads, reading the channels of the main branch) join the trace, marked
    ``training``. That run changes nothing: normalisation layers and dropout modules stay in eval mode
    (so running statistics are read, not updated, and batches of one work), buffers and the random
    number generators are restored, and so is every module's mode. Parameters neither run uses are
    listed in ``Trace.unused`` with a warning: nothing tells which channels they would read.

    Example:
        >>> import torch
        >>> from masksparse.graph.record import record
        >>> t = record(torch.nn.Linear(4, 2), torch.randn(3, 4))
        >>> [str(n.op) for n in t.nodes]
        ['aten.t.default', 'aten.addmm.default']
    """
    call = model_inputs(example_inputs)
    leaves: dict[int, tuple[torch.Tensor, tuple[str, str]]] = {}
    params: dict[int, tuple[str, str]] = {}
    for path, module in model.named_modules():
        for name, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and id(t) not in leaves:
                leaves[id(t)] = (t, (path, name))
                if name in module._parameters:
                    params[id(t)] = (path, name)
    recorder = _Recorder(leaves, sharded=any(_is_dtensor(t) for t, _ in leaves.values()))
    # a tensor passed twice (as two keyword arguments, say) is one input
    inputs = [recorder.new_value(t, False) for t in {id(t): t for t in call.tensors()}.values()]
    module_outputs: dict[str, Value] = {}
    # reads_cached: each masked weight is one product per run, however often the model reads it
    with torch.no_grad(), reads_cached(recorder.masked_leaf), _module_hooks(model, recorder, module_outputs):
        with _eval_mode(model), _chunks(recorder), recorder:
            out = _run(model, call, recorder, "")
        out_tensors = output_tensors(out)
        outputs = [recorder.lookup(t) for t in out_tensors]
        unused = _unused(params, recorder)
        if unused:
            recorder.start_replay()
            with _training_mode(model, call), _chunks(recorder), recorder:
                why = (
                    f"parameters {_names(unused)} take no part in the eval-mode run, and the training-mode "
                    f"run that shows which channels they read failed (make model.train() run on the "
                    f"example inputs, or set the modules that never run to None)"
                )
                train_out = _run(model, call, recorder, why)
            for t in output_tensors(train_out):
                v = recorder.lookup(t)
                if v not in outputs:
                    outputs.append(v)
            unused = _unused(params, recorder)
    if unused:
        warnings.warn(
            f"parameters {_names(unused)} take no part in the run on the example inputs, in eval or in "
            f"training mode: nothing tells which channels they read, so structured pruning and compaction "
            f"leave them as they are (a code path that uses them may not fit the compacted model)",
            stacklevel=3,
        )
    recorder.live.clear()
    recorder.drop_unreadable()
    return Trace(recorder.values, recorder.nodes, inputs, outputs, module_outputs, out_tensors, unused)


def _run(model: nn.Module, call: ModelInputs, recorder: _Recorder, why: str) -> Any:
    try:
        return call(model)
    except MaskSparseError:
        raise
    except Exception as exc:
        where = recorder.module_stack[-1][0] or "<model>"
        raise CompactionError(
            f"{why or 'the model raised while running on the example inputs'}: in module {where!r}: {exc}"
        ) from exc


def _unused(params: dict[int, tuple[str, str]], recorder: _Recorder) -> tuple[tuple[str, str], ...]:
    """The parameters no recorded call read (their leaf value was never created)."""
    return tuple(
        source
        for key, source in params.items()
        if source not in recorder.found
        and (key not in recorder.live or recorder.leaves[key][0] is not recorder.live[key][0]())
    )


def _names(sources: Sequence[tuple[str, str]], limit: int = 4) -> str:
    shown = ", ".join(f"{path or '<model>'}.{name.removesuffix('_orig')}" for path, name in sources[:limit])
    return shown + (f" and {len(sources) - limit} more" if len(sources) > limit else "")
