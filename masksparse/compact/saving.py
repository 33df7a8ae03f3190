"""Save a compacted model to one safetensors file, and rebuild it from a freshly built model. No pickle.

A compacted model has other shapes than the code that builds it, so its state_dict alone does not load
into a fresh one. :func:`~masksparse.compact.saving.save_compacted` writes the weights together with the
plans compaction applied (:func:`~masksparse.compact.plan.compaction_plans`), as JSON in the file's
string metadata: per module and tensor the indices kept along each dimension, the biases a fold
created, every attribute update (``in_features``, ``num_heads``, ...), every class swap
(``nn.MultiheadAttention`` to :class:`~masksparse.compact.modules.CompactMultiheadAttention`, ...) and the
Hugging Face config changes. :func:`~masksparse.compact.saving.load_compacted` checks all of it against a
freshly built model, replays it with the code that compacted the original
(:mod:`masksparse.compact.apply`), and loads the weights strictly.

A class swap names the class; only classes compaction swaps to (``CompactMultiheadAttention`` and those
of :func:`masksparse.graph.heads.register_head_swap`) are accepted, so a file cannot make
:func:`~masksparse.compact.saving.load_compacted` import or build anything else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from masksparse import prune
from masksparse._errors import MissingDependencyError, PruningTypeError, StateDictError
from masksparse.compact.apply import _apply
from masksparse.compact.huggingface import apply_config
from masksparse.compact.modules import CompactMultiheadAttention
from masksparse.compact.plan import (
    _PLANS,
    AttributeUpdate,
    BiasFold,
    ConfigChange,
    HeadChange,
    Plan,
    TensorCut,
    compaction_plans,
)
from masksparse.graph import heads
from masksparse.prune._reparam import base_class

__all__ = ["load_compacted", "save_compacted"]

PathLike = str | os.PathLike[str]
FORMAT_VERSION = 1
# The metadata entry holding the record; its presence marks a file written by save_compacted.
_RECORD = "masksparse.compacted"
_Shape = tuple[int, ...]


def save_compacted(model: nn.Module, path: PathLike) -> None:
    """Write ``model``'s weights and the compaction that shaped it to one safetensors file.

    Example:
        >>> import os, tempfile, torch
        >>> from torch import nn
        >>> from masksparse import compact, load_compacted, prune_channels, save_compacted
        >>> def build():
        ...     return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> model, x = build(), torch.randn(3, 4)
        >>> _ = prune_channels(model, x, 0.5)
        >>> small = compact(model, x)
        >>> path = os.path.join(tempfile.mkdtemp(), "small.safetensors")
        >>> save_compacted(small, path)
        >>> rebuilt = load_compacted(build(), path)
        >>> rebuilt[0], torch.equal(rebuilt(x), small(x))
        (Linear(in_features=4, out_features=4, bias=True), True)

    The file holds the state_dict's tensors (a tensor tied under several names, such as shared input
    and output embeddings, once, with the other names recorded) and, as JSON string metadata under
    ``"masksparse.compacted"``, the format version and every plan the model was compacted with
    (:func:`~masksparse.compact.plan.compaction_plans`, oldest first). A model that was never compacted
    is saved with an empty record, and loads into a fresh model like a state_dict. It is an ordinary
    safetensors file: ``safetensors.torch.load_file`` reads its tensors.

    Args:
        model: the compacted model (or any model), unpruned: call :func:`masksparse.prune.remove_all`
            first to make masks permanent.
        path: the file to write (by convention ``*.safetensors``).

    Raises:
        StateDictError: the model is pruned, its state_dict holds entries that are not tensors, or a
            compaction changed an attribute to a value the file cannot name (the message says which).
        MissingDependencyError: safetensors is not installed.
    """
    if not isinstance(model, nn.Module):
        raise PruningTypeError(f"save_compacted expects an nn.Module, got {type(model).__name__}")
    if prune.is_pruned(model):
        raise StateDictError(
            f"cannot save {type(model).__name__} as a compacted model: it still has masks; make them "
            f"permanent first with masksparse.prune.remove_all(model)"
        )
    tensors, ties = _untied(model.state_dict())
    record = {
        "version": FORMAT_VERSION,
        "plans": [_encode_plan(p) for p in compaction_plans(model)],
        "ties": ties,
    }
    metadata = {"format": "pt", _RECORD: json.dumps(record, separators=(",", ":"))}
    _safetensors().save_file(tensors, os.fspath(path), metadata)


def load_compacted(model: nn.Module, path: PathLike) -> nn.Module:
    """Cut a freshly built ``model`` to the architecture saved in ``path``, load its weights, return it.

    ``model`` is built by the code (or the config) the saved model was first built by, with any
    weights; it is changed in place and returned: its tensors are cut, biases created, attributes set
    and classes swapped exactly as the saved compactions did (the same code,
    :mod:`masksparse.compact.apply`, does it), a Hugging Face ``model.config`` gets the saved sizes,
    and then every tensor of the file is loaded strictly. The result carries the saved plans
    (:func:`~masksparse.compact.plan.compaction_plans`), so it can be pruned, compacted and saved
    again. Nothing is unpickled.

    Example:
        >>> import os, tempfile, torch
        >>> from torch import nn
        >>> from masksparse import StateDictError, compact, load_compacted, prune_channels, save_compacted
        >>> model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4)
        >>> _ = prune_channels(model, x, 0.5)
        >>> path = os.path.join(tempfile.mkdtemp(), "small.safetensors")
        >>> save_compacted(compact(model, x), path)
        >>> load_compacted(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), path)[2]
        Linear(in_features=4, out_features=2, bias=True)
        >>> wider = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> try:
        ...     load_compacted(wider, path)
        ... except StateDictError as err:
        ...     print(str(err).splitlines()[0].split("the first module that does not fit is ")[1])
        '0': the file expects weight of size 8 along dim 0, the model's weight has shape (16, 4)
        >>> wider[0].out_features  # unchanged
        16

    Everything is checked before anything changes: a file that does not fit the model (a resnet18 file
    loaded into a resnet34, a BERT of four layers into one of two) raises a
    :class:`~masksparse.StateDictError` naming the first module that does not fit, with the shapes or
    values the file expects and those the model holds, and ``model`` is left as it was.

    Args:
        model: a fresh, unpruned model of the architecture the saved model was compacted from.
        path: a file written by :func:`save_compacted`.

    Returns:
        ``model`` itself, compacted and loaded.

    Raises:
        StateDictError: the file is missing, is not a safetensors file, holds no compaction record
            (a plain state_dict: use :func:`masksparse.load_state_dict`) or a newer format, or does not
            fit ``model``; ``model`` is left unchanged.
        MissingDependencyError: safetensors is not installed.
    """
    if not isinstance(model, nn.Module):
        raise PruningTypeError(
            f"load_compacted expects an nn.Module to load into, got {type(model).__name__}"
        )
    path = Path(path)
    file = _read_header(path)
    if prune.is_pruned(model):
        raise StateDictError(f"cannot load {path} into a pruned {type(model).__name__}: pass a fresh model")
    try:
        plans = [_decode_plan(model, p) for p in file.record["plans"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise StateDictError(
            f"{path}: its compaction record is damaged ({type(exc).__name__}: {exc})"
        ) from None
    problems = _Replay(model).check(plans, file)
    if problems:
        raise StateDictError(_describe(path, model, problems))
    for plan in plans:
        _apply(model, plan, None)
        apply_config(model, plan.config)
    model.load_state_dict(_tensors(path, file), strict=True)
    vars(model)[_PLANS] = tuple(plans)
    return model


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as err:
        raise MissingDependencyError(
            "save_compacted and load_compacted need the safetensors package: pip install safetensors "
            "(or the extra: pip install 'masksparse[safetensors]')"
        ) from err
    return safetensors.torch


def _untied(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write, each storage once, and the names tied to a written one (name -> written)."""
    others = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if others:
        raise StateDictError(
            f"cannot save the model as a compacted model: safetensors holds only tensors, and these "
            f"state_dict entries are not: {', '.join(map(repr, others))}"
        )
    written: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    for key, value in state_dict.items():
        t = value.detach()
        identity = (
            t.device,
            t.dtype,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            t.shape,
            t.stride(),
        )
        if t.numel() and identity in written:
            ties[key] = written[identity]
            continue
        written[identity] = key
        storage = t.untyped_storage()
        whole = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.nbytes
        if not whole or storage.data_ptr() in storages:  # a view, or part of a storage already written
            t = t.clone(memory_format=torch.contiguous_format)
        storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    return tensors, ties


def _encode_value(value: Any, where: str) -> Any:
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, type):
        cls = getattr(value, "_masksparse_base", value)
        return {"class": _class_name(cls)}
    if isinstance(value, (tuple, list)):
        items = [_encode_value(v, where) for v in value]
        return {"tuple": items} if isinstance(value, tuple) else items
    raise StateDictError(
        f"cannot save the compaction: {where} was set to a {type(value).__name__} ({value!r}), which the "
        f"file cannot hold (it holds numbers, strings, tuples, lists and classes)"
    )


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _encode_plan(plan: Plan) -> dict[str, Any]:
    return {
        "cuts": [[c.module, c.tensor, c.dim, c.size, list(c.keep)] for c in plan.cuts],
        "new_biases": [f.module for f in plan.folds if f.creates_bias],
        "attributes": [
            [a.module, a.name, _encode_value(a.old, f"{a.module}.{a.name}"), _encode_value(a.new, a.module)]
            for a in plan.attributes
        ],
        "config": [[c.name, c.old, c.new] for c in plan.config if c.applied],
        "heads": [[h.module, h.old, h.new] for h in plan.heads],
        "config_mismatch": plan.config_mismatch,
        "params": [plan.params_before, plan.params_after],
    }


@dataclass(frozen=True)
class _Class:
    """A class named in a file, for comparison (the class a module had before a swap)."""

    name: str


def _decode_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    if isinstance(value, dict):
        if "tuple" in value:
            return tuple(_decode_value(v) for v in value["tuple"])
        return _Class(str(value["class"]))
    return value


def _swap_classes(module: nn.Module | None) -> dict[str, type]:
    """The classes compaction swaps modules to, by name: the only classes a file may name as new."""
    if module is not None:
        heads.head_swap(type(module))  # registers the swaps masksparse ships for this module's library
    classes = [CompactMultiheadAttention, *(s.compact for s in heads._SWAPS.values())]
    return {_class_name(c): c for c in classes}


def _decode_plan(model: nn.Module, data: Mapping[str, Any]) -> Plan:
    def module(path: str) -> nn.Module | None:
        try:
            return model.get_submodule(path)
        except AttributeError:
            return None

    attributes = []
    for path, name, old, new in data["attributes"]:
        new = _decode_value(new)
        if isinstance(new, _Class):  # resolved by name among the swap classes, never imported
            new = _swap_classes(module(path)).get(new.name, new)
        attributes.append(AttributeUpdate(path, name, _decode_value(old), new))
    before, after = data["params"]
    return Plan(
        cuts=tuple(TensorCut(m, t, d, s, tuple(k)) for m, t, d, s, k in data["cuts"]),
        folds=tuple(BiasFold(m, (), (), creates_bias=True) for m in data["new_biases"]),
        attributes=tuple(attributes),
        params_before=before,
        params_after=after,
        config=tuple(ConfigChange(n, o, v) for n, o, v in data["config"]),
        config_mismatch=str(data.get("config_mismatch", "")),
        heads=tuple(HeadChange(m, o, n) for m, o, n in data.get("heads", ())),
    )


@dataclass(frozen=True)
class _File:
    record: dict[str, Any]
    shapes: dict[str, _Shape]  # every state_dict key, tied ones included


def _read_header(path: Path) -> _File:
    """The record and the tensor shapes of a file, without reading the tensors."""
    safetensors = _safetensors()
    if not path.is_file():
        raise StateDictError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise StateDictError(f"{path} is not a readable safetensors file ({exc})") from None
    if _RECORD not in metadata:
        raise StateDictError(
            f"{path} holds no compaction record (it was not written by masksparse.save_compacted): "
            f"load a plain state_dict with masksparse.load_state_dict(model, path)"
        )
    try:
        record = json.loads(metadata[_RECORD])
        version = record["version"]
    except (ValueError, KeyError, TypeError):
        raise StateDictError(
            f"{path}: its compaction record is not valid JSON of masksparse's format"
        ) from None
    if version != FORMAT_VERSION:
        raise StateDictError(
            f"{path} was written in compaction format {version!r}; this masksparse reads {FORMAT_VERSION}"
        )
    for name, written in record.get("ties", {}).items():
        shapes[name] = shapes[written]
    return _File(record, shapes)


def _tensors(path: Path, file: _File) -> dict[str, torch.Tensor]:
    state = dict(_safetensors().load_file(str(path), device="cpu"))
    for name, written in file.record.get("ties", {}).items():
        state[name] = state[written]
    return state


class _Replay:
    """The fresh model's shapes, attributes and classes as the saved compactions would change them,
    simulated without touching the model, and every place where the file does not fit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.shapes: dict[int, _Shape] = {}  # tensor id -> shape
        self.ids: dict[tuple[str, str], int] = {}
        for path, m in self.modules.items():
            for name, t in [*m._parameters.items(), *m._buffers.items()]:
                if t is not None:
                    self.ids[(path, name)] = id(t)
                    self.shapes[id(t)] = tuple(t.shape)
        self.attributes: dict[tuple[str, str], Any] = {}
        self.created: list[str] = []

    def check(self, plans: list[Plan], file: _File) -> list[tuple[str, str]]:
        """(module, what does not fit) in order: the replayed plans first, then the tensors."""
        problems: list[tuple[str, str]] = []
        for number, plan in enumerate(plans, start=1):
            step = f" (compaction {number})" if len(plans) > 1 else ""
            problems += [(m, why + step) for m, why in self._plan(plan)]
            if problems:
                return problems
        return self._tensors(file)

    def _plan(self, plan: Plan) -> Iterator[tuple[str, str]]:
        for fold in plan.folds:
            if fold.module not in self.modules:
                yield fold.module, "the file creates its bias, but the model has no such module"
            elif (fold.module, "bias") not in self.ids and (fold.module, "weight") in self.ids:
                weight = self.shapes[self.ids[(fold.module, "weight")]]
                self.ids[(fold.module, "bias")] = key = -len(self.created) - 1
                self.shapes[key] = (weight[0],)
                self.created.append(fold.module)
        for c in plan.cuts:
            yield from self._cut(c)
        start = dict(self.attributes)  # a plan may set one attribute twice, each time from its old value
        for a in plan.attributes:
            yield from self._attribute(a, start)
        config = getattr(self.model, "config", None)
        for change in plan.config:
            held = getattr(config, change.name, None)
            if held != change.old:
                yield (
                    "<model>",
                    f"the file expects config.{change.name} = {change.old!r}, the model has {held!r}",
                )

    def _cut(self, c: TensorCut) -> Iterator[tuple[str, str]]:
        key = self.ids.get((c.module, c.tensor))
        if c.module not in self.modules:
            yield (
                c.module,
                f"the file cuts its {c.tensor} (dim {c.dim} of {c.size}), but the model has no such module",
            )
            return
        if key is None:
            yield (
                c.module,
                f"the file cuts its {c.tensor} (dim {c.dim} of size {c.size}), but it has no such tensor",
            )
            return
        shape = self.shapes[key]
        if c.dim >= len(shape) or shape[c.dim] != c.size:
            yield (
                c.module,
                (
                    f"the file expects {c.tensor} of size {c.size} along dim {c.dim}, the model's "
                    f"{c.tensor} has shape {shape}"
                ),
            )
            return
        if not all(0 <= k < c.size for k in c.keep):
            yield c.module, f"the file keeps indices of {c.tensor} outside 0..{c.size - 1}"
            return
        self.shapes[key] = shape[: c.dim] + (len(c.keep),) + shape[c.dim + 1 :]

    def _attribute(
        self, a: AttributeUpdate, start: Mapping[tuple[str, str], Any]
    ) -> Iterator[tuple[str, str]]:
        module = self.modules.get(a.module)
        if module is None:
            yield a.module, f"the file sets its {a.name}, but the model has no such module"
            return
        held = start.get((a.module, a.name), getattr(module, a.name, _MISSING))
        if a.name == "__class__":
            cls = base_class(module) if (a.module, a.name) not in start else held
            if not isinstance(a.old, _Class) or _class_name(cls) != a.old.name:
                expected = a.old.name if isinstance(a.old, _Class) else a.old
                yield (
                    a.module,
                    f"the file expects a module of class {expected}, the model's is {_class_name(cls)}",
                )
            elif not isinstance(a.new, type) or not issubclass(a.new, cls):
                new = a.new.name if isinstance(a.new, _Class) else a.new
                yield (
                    a.module,
                    (
                        f"the file swaps it to {new}, which is not a class compaction swaps "
                        f"{_class_name(cls)} to"
                    ),
                )
        elif held is _MISSING:
            yield a.module, f"the file sets its {a.name} from {a.old!r}, but it has no attribute {a.name}"
        elif held != a.old:
            yield a.module, f"the file expects {a.name} = {a.old!r}, the model has {held!r}"
        self.attributes[(a.module, a.name)] = a.new

    def _tensors(self, file: _File) -> list[tuple[str, str]]:
        expected: dict[str, _Shape] = {}
        for key, t in self.model.state_dict(keep_vars=True).items():
            path, _, name = key.rpartition(".")
            tid = self.ids.get((path, name), id(t))
            expected[key] = self.shapes.get(tid, tuple(t.shape))
        for path in self.created:
            module = self.modules[path]
            for other, m in self.modules.items():
                if m is module:
                    expected[f"{other}.bias" if other else "bias"] = self.shapes[self.ids[(path, "bias")]]
        problems = []
        for key, shape in expected.items():
            found = file.shapes.get(key)
            module, _, name = key.rpartition(".")
            if found is None:
                problems.append(
                    (module, f"the model holds {name} of shape {shape}, which the file does not have")
                )
            elif found != shape:
                problems.append(
                    (
                        module,
                        f"the file holds {name} of shape {found}, the model (cut as the file says) {shape}",
                    )
                )
        for key, found in file.shapes.items():
            if key not in expected:
                module, _, name = key.rpartition(".")
                problems.append(
                    (module, f"the file holds {name} of shape {found}, the model has no such tensor")
                )
        return problems


_MISSING = object()


def _describe(path: Path, model: nn.Module, problems: list[tuple[str, str]], limit: int = 5) -> str:
    (module, why), rest = problems[0], problems[1:]
    lines = [
        f"{path} does not fit {type(model).__name__}, which was left unchanged: the first module that "
        f"does not fit is {module or '<model>'!r}: {why}"
    ]
    lines += [f"  also {m or '<model>'!r}: {w}" for m, w in rest[:limit]]
    if len(rest) > limit:
        lines.append(f"  and {len(rest) - limit} more")
    return "\n".join(lines)
