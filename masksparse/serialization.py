"""Load pruned state_dicts into fresh models, and save state_dicts in safe formats.

A pruned state_dict holds ``<name>_orig`` and ``<name>_mask`` where an unpruned model expects ``<name>``, so
``fresh_model.load_state_dict(pruned_model.state_dict())`` fails with unexpected keys. :func:`load_state_dict`
re-creates the reparametrisation with :func:`masksparse.prune.custom_from_mask` first, then lets torch load
the values. It reads files written by masksparse and by ``torch.nn.utils.prune`` (whose masks are float).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from masksparse import prune
from masksparse._errors import MissingDependencyError, PruningTypeError, StateDictError
from masksparse.distributed.tensors import is_dtensor, placed_like
from masksparse.prune.methods import is_binary

__all__ = ["load_state_dict", "save_state_dict"]

PathLike = str | os.PathLike[str]
_Shape = tuple[int, ...]
# safetensors files list tensors in their own order; this metadata entry keeps the state_dict's, which
# decides the order of re-pruned Parameters (and so of ``model.parameters()`` and optimizer state).
_KEY_ORDER = "masksparse.key_order"


def load_state_dict(
    model: nn.Module, source: Mapping[str, Any] | PathLike, *, strict: bool = True
) -> _IncompatibleKeys:
    """Load a state_dict, pruned or not, into ``model``, pruning ``model`` where the state_dict is pruned.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse import prune
        >>> from masksparse.serialization import load_state_dict
        >>> pruned = prune.l1_unstructured(nn.Linear(4, 2), "weight", amount=0.5)
        >>> fresh = nn.Linear(4, 2)
        >>> load_state_dict(fresh, pruned.state_dict())
        <All keys matched successfully>
        >>> prune.is_pruned(fresh), fresh.weight_mask.dtype, torch.equal(fresh.weight, pruned.weight)
        (True, torch.bool, True)

    For every pair ``<path>.<name>_orig``, ``<path>.<name>_mask`` in the state_dict where the submodule at
    ``<path>`` has an ordinary Parameter ``<name>``, the tensor is pruned with ``custom_from_mask`` (a
    binary mask is stored as bool; any other mask is kept in the Parameter's dtype), in the order the
    ``_orig`` keys appear, so the model's state_dict comes out with the source's keys in the source's order.
    Then every value is loaded by ``model.load_state_dict``: ``<name>_orig`` receives the source's original,
    unmasked values. Tensors the model already prunes (with masksparse or torch) are loaded as they are; a
    tensor pruned by ``torch.nn.utils.prune`` gets its stored ``<name>`` recomputed, so it is not stale.

    A state_dict holding a dense ``<name>`` where the model is pruned is *not* loaded into ``<name>_orig``
    with an all-ones mask: that would silently drop the model's masks, and rewinding weights under the
    existing masks (lottery tickets) wants the opposite. Such a tensor is reported like torch reports it:
    ``<name>`` unexpected, ``<name>_orig`` and ``<name>_mask`` missing. Remove the pruning first
    (``masksparse.prune.remove_all``) to load dense weights, or rename the key to ``<name>_orig`` to keep
    the masks.

    Args:
        model: the module to load into, pruned or not.
        source: a state_dict, or the path of a file holding one: ``*.safetensors`` is read with
            ``safetensors.torch.load_file`` (``pip install 'masksparse[safetensors]'``), anything else with
            ``torch.load(path, map_location="cpu", weights_only=True)``.
        strict: as in ``torch.nn.Module.load_state_dict``: with ``True`` any missing or unexpected key is an
            error; with ``False`` they are returned. A shape mismatch is an error either way.

    Returns:
        What ``torch.nn.Module.load_state_dict`` returns: a named tuple ``(missing_keys, unexpected_keys)``,
        both empty when ``strict`` is ``True``.

    Raises:
        StateDictError: a key is missing or unexpected (with ``strict``), a shape does not match, a file
            does not hold a state_dict, or a non-binary mask would be loaded into a bool mask buffer. The
            message names every offending key with the expected and found shapes, and ``model`` is left
            exactly as it was. Only if torch's own loader fails after these checks passed (a custom
            ``_load_from_state_dict`` or load hook) may values already be copied, as with torch; the
            pruning added here is removed again in that case.
        PruningTypeError: ``model`` is not a Module, or ``source`` is neither a mapping nor a path.
        MissingDependencyError: a ``.safetensors`` file is given but safetensors is not installed.
    """
    if not isinstance(model, nn.Module):
        raise PruningTypeError(
            f"load_state_dict expects an nn.Module to load into, got {type(model).__name__}"
        )
    if isinstance(source, (str, os.PathLike)) and (Path(source) / ".metadata").is_file():
        return _load_distributed_checkpoint(model, Path(source), strict)
    state_dict = _read(source)
    plan, problems = _plan(model, state_dict)
    missing, unexpected, problems = _check(model, state_dict, plan, problems)
    if problems or (strict and (missing or unexpected)):
        raise StateDictError(_describe(model, missing, unexpected, problems))
    snapshots = [_Snapshot(module) for module in {id(r.module): r.module for r in plan}.values()]
    try:
        for repair in plan:
            prune.custom_from_mask(repair.module, repair.name, repair.mask)
        result = model.load_state_dict(_placed_like_model(model, state_dict), strict=strict)
    except BaseException as err:
        for snapshot in reversed(snapshots):
            snapshot.restore()
        if isinstance(err, StateDictError) or not isinstance(err, Exception):
            raise
        raise StateDictError(
            f"loading the state_dict into {type(model).__name__} failed after the checks passed: {err}. "
            f"The pruning added for it was removed; values torch had already copied, if any, stay loaded."
        ) from err
    _refresh_torch_pruned(model)
    return result


def _placed_like_model(model: nn.Module, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state_dict with each whole tensor cut to the shard of the model's DTensor it loads into."""
    targets = model.state_dict(keep_vars=True)
    if not any(is_dtensor(t) for t in targets.values()):
        return state_dict
    placed = OrderedDict(
        (key, placed_like(value, targets[key]) if is_dtensor(targets.get(key)) else value)
        for key, value in state_dict.items()
    )
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        placed._metadata = metadata  # type: ignore[attr-defined]
    return placed


def _load_distributed_checkpoint(model: nn.Module, path: Path, strict: bool) -> _IncompatibleKeys:
    """Load a ``torch.distributed.checkpoint`` directory, written by any number of ranks, into ``model``,
    sharded any way or not at all: masks are set up first (all ones, placed like their tensors), then
    DCP reads every value in place, resharding as it goes."""
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    sizes = {key: tuple(meta.size) for key, meta in stored.items() if hasattr(meta, "size")}
    repairs, problems = [], []
    for module_path, module in model.named_modules():
        prefix = f"{module_path}." if module_path else ""
        for name, param in module._parameters.items():
            key = f"{prefix}{name}_mask"
            if param is None or key not in stored or f"{prefix}{name}_orig" not in stored:
                continue
            dtype = getattr(getattr(stored[key], "properties", None), "dtype", torch.bool)
            if dtype != torch.bool:
                problems.append(f"mask {key!r} is {dtype} in {path}; distributed checkpoints load bool masks")
            repairs.append((module, name))
    snapshots = [_Snapshot(module) for module in {id(m): m for m, _ in repairs}.values()]
    try:
        for module, name in repairs:
            if not problems:
                prune.identity(module, name)
        expected = model.state_dict()
        missing = [key for key in expected if key not in stored]
        unexpected = [key for key in stored if key not in expected]
        problems += [
            f"size mismatch for {key!r}: the model expects shape {_shape(value)}, the checkpoint holds "
            f"shape {sizes[key]}"
            for key, value in expected.items()
            if isinstance(value, torch.Tensor) and key in sizes and tuple(value.shape) != sizes[key]
        ]
        if problems or (strict and (missing or unexpected)):
            raise StateDictError(_describe(model, missing, unexpected, problems))
        dcp.load({key: value for key, value in expected.items() if key in stored}, checkpoint_id=str(path))
    except BaseException:
        for snapshot in reversed(snapshots):
            snapshot.restore()
        raise
    return _IncompatibleKeys(missing, unexpected)


def save_state_dict(model_or_state_dict: nn.Module | Mapping[str, Any], path: PathLike) -> None:
    """Save a model's state_dict (or a state_dict) to ``path``, ``*.safetensors`` or torch's format.

    Example:
        >>> import os, tempfile
        >>> from torch import nn
        >>> from masksparse import prune
        >>> from masksparse.serialization import load_state_dict, save_state_dict
        >>> path = os.path.join(tempfile.mkdtemp(), "pruned.pt")
        >>> save_state_dict(prune.random_unstructured(nn.Linear(4, 2), "weight", amount=0.5), path)
        >>> load_state_dict(nn.Linear(4, 2), path)
        <All keys matched successfully>

    Every tensor is detached and written contiguous, and a tensor that views only part of its storage is
    copied, so the file holds no bytes beyond the tensors. ``*.safetensors`` (read with
    ``safetensors.torch.load_file``, needs ``pip install 'masksparse[safetensors]'``) cannot hold two names
    for one storage, so tied tensors are written once per name; it stores bool masks as bool, but no
    non-tensor entries and no ``_metadata`` versions. Any other suffix is written with ``torch.save``, which
    keeps tied tensors tied and the ``_metadata``, and is readable with ``torch.load(weights_only=True)``.

    Args:
        model_or_state_dict: a module, whose ``state_dict()`` is saved, or a state_dict.
        path: the file to write; its suffix picks the format.

    Raises:
        StateDictError: a ``.safetensors`` file is asked for a state_dict with non-tensor entries.
        MissingDependencyError: a ``.safetensors`` file is asked for but safetensors is not installed.
    """
    if isinstance(model_or_state_dict, nn.Module):
        state_dict: Mapping[str, Any] = model_or_state_dict.state_dict()
    else:
        state_dict = model_or_state_dict
    path = os.fspath(path)
    if _is_safetensors(path):
        others = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
        if others:
            raise StateDictError(
                f"cannot write {path!r}: safetensors holds only tensors, and these entries are not: "
                f"{_keys(others)}. Save with a '.pt' suffix to use torch's format."
            )
        metadata = {"format": "pt", _KEY_ORDER: json.dumps(list(state_dict))}
        _safetensors_torch().save_file(dict(_owned(state_dict, keep_shared=False)), path, metadata)
    else:
        torch.save(_owned(state_dict, keep_shared=True), path)


@dataclass(frozen=True)
class _Repair:
    """A Parameter of ``module`` to prune with ``mask`` (bool when binary, else the Parameter's dtype)."""

    module: nn.Module
    path: str
    name: str
    mask: torch.Tensor


# Entries under which training checkpoints commonly keep the model's state_dict.
_NESTED_KEYS = ("state_dict", "model")


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and all(isinstance(key, str) for key in obj)
        and any(isinstance(value, torch.Tensor) for value in obj.values())
    )


def _describe_content(obj: object) -> str:
    if isinstance(obj, Mapping):
        keys = [repr(key) for key in list(obj)[:5]]
        listed = ", ".join(keys) + (", ..." if len(obj) > 5 else "")
        return f"a {type(obj).__name__} without tensors (keys: {listed or 'none'})"
    return f"a {type(obj).__name__}"


def _find_state_dict(obj: object, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if _is_state_dict(obj.get(key)):
                nested: Mapping[str, torch.Tensor] = obj[key]
                return nested
    if _is_state_dict(obj):
        return cast("Mapping[str, torch.Tensor]", obj)
    raise StateDictError(
        f"{path} holds {_describe_content(obj)}, not a state_dict: expected a mapping from names to tensors, "
        f"or a dict with a {' or '.join(repr(k) for k in _NESTED_KEYS)} entry that is one"
    )


def _load_safetensors(path: Path) -> Any:
    safetensors_torch = _safetensors_torch()
    try:
        tensors = safetensors_torch.load_file(str(path), device="cpu")
        with safetensors_torch.safe_open(str(path), framework="pt") as file:
            order = json.loads((file.metadata() or {}).get(_KEY_ORDER, "[]"))
    except Exception as exc:  # safetensors raises its own SafetensorError, not exported stably
        raise StateDictError(f"{path} is not a readable safetensors file ({exc})") from None
    # Keys this file's writer listed first, in its order; any others after them, as stored.
    return {key: tensors[key] for key in [*order, *tensors] if key in tensors}


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch.save writes a zip archive; an archive that weights_only refuses holds pickled objects.
        if not zipfile.is_zipfile(path):
            raise StateDictError(f"{path} is not a PyTorch checkpoint (torch.load cannot read it)") from None
        raise StateDictError(
            f"{path} holds Python objects besides tensors (a whole pickled model?), which are not loaded "
            "because unpickling them can run arbitrary code; save model.state_dict() instead"
        ) from None
    except Exception as exc:  # a corrupt file surfaces as KeyError, RuntimeError, EOFError, ...
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StateDictError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {detail})") from None


def read_state_dict(path: PathLike) -> Mapping[str, torch.Tensor]:
    """Read the state_dict saved in ``path``, safely: no pickled code is run.

    ``*.safetensors`` files are read with safetensors (``pip install 'masksparse[safetensors]'``), anything
    else with ``torch.load(path, map_location="cpu", weights_only=True)``. A training checkpoint whose
    ``"state_dict"`` or ``"model"`` entry is the state_dict works too.

    Example:
        >>> import tempfile, torch
        >>> from masksparse import prune, save_state_dict
        >>> layer = prune.l1_unstructured(torch.nn.Linear(3, 2), "weight", amount=3)
        >>> path = tempfile.mkdtemp() + "/layer.pt"
        >>> save_state_dict(layer, path)
        >>> list(read_state_dict(path))
        ['bias', 'weight_orig', 'weight_mask']

    Raises:
        StateDictError: the file is missing, unreadable, or holds no state_dict (a whole pickled model,
            say); the message says which.
        MissingDependencyError: a ``.safetensors`` file is given but safetensors is not installed.
    """
    path = Path(path)
    if not path.exists():
        raise StateDictError(f"{path}: no such file")
    if not path.is_file():
        raise StateDictError(f"{path} is not a file")
    loaded = _load_safetensors(path) if _is_safetensors(str(path)) else _load_torch(path)
    return _find_state_dict(loaded, path)


def _read(source: Mapping[str, Any] | PathLike) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise PruningTypeError(
            f"load_state_dict expects a state_dict (a mapping of names to tensors) or a file path, "
            f"got {type(source).__name__}"
        )
    return read_state_dict(source)


def _is_safetensors(path: str) -> bool:
    return path.lower().endswith(".safetensors")


def _safetensors_torch() -> ModuleType:
    try:
        import safetensors.torch
    except ImportError as err:
        raise MissingDependencyError(
            "reading or writing '.safetensors' files needs the safetensors package: "
            "pip install safetensors (or the extra: pip install 'masksparse[safetensors]')"
        ) from err
    return safetensors.torch


def _plan(model: nn.Module, state_dict: Mapping[str, Any]) -> tuple[list[_Repair], list[str]]:
    """The Parameters to prune before loading, and the masks that cannot be loaded as they are."""
    position = {key: i for i, key in enumerate(state_dict)}
    plan: dict[tuple[int, str], _Repair] = {}
    problems: list[str] = []
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for name, param in module._parameters.items():
            orig = state_dict.get(f"{prefix}{name}_orig")
            mask = state_dict.get(f"{prefix}{name}_mask")
            if param is None or not isinstance(orig, torch.Tensor) or not isinstance(mask, torch.Tensor):
                continue
            if is_binary(mask):
                mask = mask.to(device=param.device, dtype=torch.bool)
            else:
                mask = mask.to(device=param.device, dtype=param.dtype)
            plan.setdefault((id(module), name), _Repair(module, f"{prefix}{name}", name, mask))
        problems += _bool_mask_problems(module, prefix, state_dict)
    ordered = sorted(plan.values(), key=lambda r: position[f"{r.path}_orig"])
    return ordered, problems


def _bool_mask_problems(module: nn.Module, prefix: str, state_dict: Mapping[str, Any]) -> list[str]:
    """A non-binary mask cannot be copied into a mask the model already holds as bool."""
    problems = []
    for name, buffer in module._buffers.items():
        found = state_dict.get(prefix + name)
        if (
            name.endswith("_mask")
            and name[: -len("_mask")] + "_orig" in module._parameters
            and isinstance(buffer, torch.Tensor)
            and buffer.dtype == torch.bool
            and isinstance(found, torch.Tensor)
            and not is_binary(found)
        ):
            problems.append(
                f"mask {prefix + name!r} holds values other than 0 and 1, but the model stores it as bool; "
                f"load into an unpruned model to keep a non-binary mask"
            )
    return problems


def _check(
    model: nn.Module, state_dict: Mapping[str, Any], plan: list[_Repair], problems: list[str]
) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and problems (shape mismatches first) of loading after ``plan``."""
    expected: dict[str, Any] = dict(model.state_dict(keep_vars=True))
    repaired: dict[int, list[str]] = {}
    for repair in plan:
        repaired.setdefault(id(repair.module), []).append(repair.name)
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for name in repaired.get(id(module), ()):
            param = expected.pop(prefix + name, None)
            if param is not None:
                expected[f"{prefix}{name}_orig"] = expected[f"{prefix}{name}_mask"] = param
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatches = []
    for key, target in expected.items():
        found = state_dict.get(key)
        if key not in state_dict or not isinstance(target, torch.Tensor) or nn.parameter.is_lazy(target):
            continue
        if not isinstance(found, torch.Tensor):
            found_type = type(found).__name__
            mismatches.append(f"{key!r}: the model expects a tensor, the state_dict holds a {found_type}")
        elif found.shape != target.shape and not (target.dim() == 0 and tuple(found.shape) == (1,)):
            mismatches.append(
                f"size mismatch for {key!r}: the model expects shape {_shape(target)}, "
                f"the state_dict holds shape {_shape(found)}"
            )
    return missing, unexpected, mismatches + problems


def _describe(model: nn.Module, missing: list[str], unexpected: list[str], problems: list[str]) -> str:
    lines = [f"cannot load the state_dict into {type(model).__name__}; the model was left unchanged:"]
    lines += [f"  {problem}" for problem in problems]
    if missing:
        lines.append(f"  missing keys: {_keys(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {_keys(unexpected)}")
    dense = [key for key in unexpected if f"{key}_orig" in missing and f"{key}_mask" in missing]
    if dense:
        lines.append(
            f"  {_keys(dense)} dense in the state_dict but pruned in the model: call "
            f"masksparse.prune.remove_all(model) first to load dense values, or rename each key to "
            f"'<name>_orig' to load them under the model's masks"
        )
    return "\n".join(lines)


def _shape(tensor: torch.Tensor) -> _Shape:
    return tuple(tensor.shape)


def _keys(keys: list[str]) -> str:
    return ", ".join(repr(key) for key in keys)


class _Snapshot:
    """A module's class and one level of its ``__dict__``: enough to undo pruning exactly.

    ``prune.remove`` would not do: it multiplies the mask into the values and re-registers the Parameter at
    the end of ``_parameters``, changing both values and order.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.cls = type(module)
        self.attrs = dict(vars(module))
        self.contents = {k: copy.copy(v) for k, v in self.attrs.items() if isinstance(v, (dict, set))}

    def restore(self) -> None:
        self.module.__class__ = self.cls
        attrs = vars(self.module)
        for key in [key for key in attrs if key not in self.attrs]:
            del attrs[key]
        for key, value in self.attrs.items():
            attrs[key] = value
            if key in self.contents:
                # The containers are restored in place: hook handles hold references to them.
                value.clear()
                value.update(self.contents[key])


def _refresh_torch_pruned(model: nn.Module) -> None:
    """Recompute the ``<name>`` that torch.nn.utils.prune stores, which loading left stale."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            name = getattr(hook, "_tensor_name", None)
            if (
                isinstance(hook, torch_prune.BasePruningMethod)
                and isinstance(name, str)
                and name in vars(module)
                and not isinstance(getattr(type(module), name, None), property)
            ):
                setattr(module, name, hook.apply_mask(module))


def _owned(state_dict: Mapping[str, Any], *, keep_shared: bool) -> OrderedDict[str, Any]:
    """Detached contiguous tensors owning their storage; ``keep_shared`` keeps whole tied tensors tied."""
    out: OrderedDict[str, Any] = OrderedDict()
    seen: set[int] = set()
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            storage = value.untyped_storage()
            whole = value.is_contiguous() and value.storage_offset() == 0 and storage.nbytes() == value.nbytes
            shared = storage.data_ptr() != 0 and storage.data_ptr() in seen
            if not whole or (shared and not keep_shared):
                value = value.clone(memory_format=torch.contiguous_format)
            seen.add(storage.data_ptr())
        out[key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out
