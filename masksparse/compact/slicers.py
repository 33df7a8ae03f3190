"""How each layer type updates its attributes once compaction slices its tensors.

:func:`~masksparse.compact.register_slicer` maps a module class to a function that receives the module
(before slicing) and the new shape of each of its tensors, and returns the attributes to set
(``out_channels``, ``in_features``, ``num_features``, ...). Lookup follows the class's MRO, so subclasses
inherit the slicer of the torch layer they extend."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from torch import nn

from masksparse._errors import CompactionError
from masksparse.graph.heads import head_swap

__all__ = ["register_slicer", "slicer_for", "swap_heads"]

Slicer = Callable[[nn.Module, Mapping[str, tuple[int, ...]]], dict[str, Any]]
_SLICERS: dict[type, Slicer] = {}
# Classes of optional libraries, by "module.QualName", so that masksparse never imports them itself.
_SLICERS_BY_NAME: dict[str, Slicer] = {}


def register_slicer(*types: type) -> Callable[[Slicer], Slicer]:
    """Register how modules of ``types`` update their attributes once their tensors are sliced.

    The function receives the module (before slicing) and the new shape of each of its tensors by
    name, and returns the attributes to set. Lookup follows the class's MRO, so a subclass of
    ``nn.Conv2d`` uses the convolution slicer; plain ``nn.Module`` updates nothing.

    Example:
        >>> from torch import nn
        >>> from masksparse.compact.slicers import register_slicer
        >>> class Scale(nn.Module):
        ...     def __init__(self, n):
        ...         super().__init__()
        ...         self.n = n
        ...         self.scale = nn.Parameter(torch.ones(n))
        >>> @register_slicer(Scale)
        ... def _scale(module, shapes):
        ...     return {"n": shapes["scale"][0]}
    """

    def decorate(fn: Slicer) -> Slicer:
        for t in types:
            _SLICERS[t] = fn
        return fn

    return decorate


def slicer_for(module: nn.Module) -> Slicer:
    for cls in type(module).__mro__:
        if cls in _SLICERS:
            return _SLICERS[cls]
        by_name = _SLICERS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if by_name is not None:
            return by_name
    raise CompactionError(f"no slicer registered for {type(module).__name__}")  # nn.Module has one


@register_slicer(nn.Module)
def _plain(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    return {}


@register_slicer(nn.modules.conv._ConvNd)
def _conv(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    conv = cast(nn.modules.conv._ConvNd, module)
    w, groups = shapes["weight"], conv.groups
    if conv.transposed:
        in_ch, out_ch = w[0], w[1] * groups
    else:
        out_ch, in_ch = w[0], w[1] * groups
    if groups > 1 and groups == conv.in_channels and not conv.transposed:
        # depthwise: one group per input channel, each with the same number of outputs
        groups = out_ch // (conv.out_channels // conv.in_channels)
        in_ch = groups
    return {"in_channels": in_ch, "out_channels": out_ch, "groups": groups}


@register_slicer(nn.Linear)
def _linear(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    return {"in_features": shapes["weight"][1], "out_features": shapes["weight"][0]}


@register_slicer(nn.modules.batchnorm._NormBase)
def _norm(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    shape = shapes.get("weight") or shapes.get("running_mean")
    return {"num_features": shape[0]} if shape else {}


@register_slicer(nn.Embedding)
def _embedding(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    return {"num_embeddings": shapes["weight"][0], "embedding_dim": shapes["weight"][1]}


@register_slicer(nn.PReLU)
def _prelu(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    return {"num_parameters": shapes["weight"][0]}


def _hf_conv1d(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    # transformers' Conv1D holds its weight as (in, out) and reshapes its output to ``nf`` units
    return {"nf": shapes["weight"][1]}


_SLICERS_BY_NAME["transformers.pytorch_utils.Conv1D"] = _hf_conv1d


def swap_heads(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The slicer of an attention class with a registered head swap
    (:func:`masksparse.graph.heads.register_head_swap`) that owns per-head tensors: a module of it whose
    per-head tensors shrink becomes the compact class; the number of heads is updated from the reshapes
    that split them out (see :func:`masksparse.graph.heads.head_attribute`)."""
    swap = head_swap(type(module))
    if swap is None:  # a subclass: its heads are kept (fixed_heads), so nothing per head is cut
        return {}
    return {"__class__": swap.compact}
