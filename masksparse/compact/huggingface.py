"""Keep a Hugging Face model's ``config`` in step with the sizes compaction gives it.

A transformers model is rebuilt from its config (``from_pretrained``), so after :func:`masksparse.compact`
the config's sizes must be the compacted ones. Which config entries hold which module sizes differs
from one architecture to the next (``intermediate_size``, ``n_inner``, ``d_ff``, ``encoder_ffn_dim``,
``num_attention_heads``, ``n_head``, ``num_key_value_heads``, ...), so they are found, not listed: an
entry whose name speaks of heads or of a feed-forward width and whose value some module held before
compaction (``out_features``, ``num_heads``, ...) or that an attention module had as its number of heads
(also when its reshape infers it, as Llama's does) is a candidate for each value those modules hold now;
it is set to that value only when a model built from the changed config (on the meta device, without
memory) has, in every tensor that the change resizes, the compacted model's shape. A size that differs
over the layers, or that the model's code turns into other sizes (BERT derives its head size as
``hidden_size // num_attention_heads``, so no config value gives fewer heads of the same size), is left as
it was and the plan says so; :func:`masksparse.load_compacted` rebuilds such a model all the same.
"""

from __future__ import annotations

import copy
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from masksparse.compact.plan import ConfigChange, Plan
from masksparse.prune._reparam import base_class

__all__ = ["config_changes", "config_mismatch"]

# Config entries that may hold a number of heads or a feed-forward width; others (hidden_size,
# num_hidden_layers, vocab_size, head_dim, ...) are never changed: compaction keeps the residual width,
# the layers and the head size.
_SIZE_NAME = re.compile(
    r"(?<!d_)(?<!_d_)heads?$|(^|_)(intermediate_size|intermediate_dim|ffn_dim|d_ff|n_inner|hidden_dim|mlp_dim|"
    r"inner_dim|ffn_hidden_size)$"
)
_Shapes = Mapping[str, tuple[int, ...]]


def config_changes(model: nn.Module, compacted: nn.Module, plan: Plan) -> tuple[ConfigChange, ...]:
    """The changes to ``model.config`` (a transformers ``PretrainedConfig``) that describe ``compacted``,
    the result of ``plan``: applied ones, and ones left out with the reason. Changes nothing.

    Example:
        >>> import torch, transformers, warnings
        >>> from masksparse import compact, prune_channels
        >>> from masksparse.compact.plan import compaction_plans
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> model = transformers.LlamaModel(config).eval()
        >>> ids = torch.randint(0, 64, (1, 6))
        >>> _ = prune_channels(model, ids, 0.5)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     small = compact(model, ids)
        >>> [(c.name, c.old, c.new, c.applied) for c in compaction_plans(small)[0].config]
        [('intermediate_size', 64, 32, True), ('num_attention_heads', 2, 1, True), \
('num_key_value_heads', 2, 1, True)]
        >>> small.config.intermediate_size, small.layers[0].mlp.up_proj.out_features
        (32, 32)
    """
    if not _has_config(model):
        return ()
    config: Any = model.config
    held: dict[int, set[int]] = {}  # a size modules held -> what they hold now
    sizes = [(a.old, a.new) for a in plan.attributes] + [(h.old, h.new) for h in plan.heads]
    for old, new in sizes:
        if type(old) is int and type(new) is int and old != new:
            held.setdefault(old, set()).add(new)
    candidates = [
        (k, v) for k, v in config.to_dict().items() if type(v) is int and _SIZE_NAME.search(k) and v in held
    ]
    if not candidates:
        return ()
    target = _shapes(compacted)
    try:
        before = _built(model, config)
    except Exception as exc:  # a model whose class cannot be built from its config
        why = f"{type(model).__name__}(config) cannot be built to check it ({type(exc).__name__}: {exc})"
        return tuple(ConfigChange(k, v, v, applied=False, reason=why) for k, v in candidates)
    return tuple(
        c for k, v in candidates for c in _change(model, config, k, v, sorted(held[v]), before, target)
    )


def config_mismatch(model: nn.Module, compacted: nn.Module, changes: tuple[ConfigChange, ...]) -> str:
    """Why ``from_pretrained`` would not rebuild ``compacted`` from ``model.config`` with the applied
    ``changes`` (the first tensor whose shape it would get wrong), or ``""`` when it would, or when
    ``model`` is no Hugging Face model.

    Example:
        >>> import torch, transformers
        >>> from masksparse.compact.huggingface import config_mismatch
        >>> config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32)
        >>> model = transformers.BertModel(config)
        >>> narrower = transformers.BertModel(transformers.BertConfig(vocab_size=32, hidden_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=24))
        >>> config_mismatch(model, model, ())
        ''
        >>> print(config_mismatch(model, narrower, ()))  # doctest: +NORMALIZE_WHITESPACE
        a model built from the config holds 'encoder.layer.0.intermediate.dense.weight' of shape (32, 16),
        the compacted one (24, 16)
    """
    if not _has_config(model):
        return ""
    config: Any = copy.deepcopy(model.config)
    for c in changes:
        if c.applied:
            setattr(config, c.name, c.new)
    try:
        built = _built(model, config)
    except Exception as exc:
        return f"{type(model).__name__}(config) cannot be built ({type(exc).__name__}: {exc})"
    target = _shapes(compacted)
    for key, shape in target.items():
        if key in built and built[key] != shape:
            held = f"holds {key!r} of shape {built[key]}, the compacted one {shape}"
            return f"a model built from the config {held}"
    return ""


def _has_config(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return (
        transformers is not None
        and isinstance(model, transformers.PreTrainedModel)
        and hasattr(model, "config")
    )


def _change(
    model: nn.Module, config: Any, name: str, old: int, news: list[int], before: _Shapes, target: _Shapes
) -> list[ConfigChange]:
    reasons = []
    for new in news:
        for extra in _head_size_kept(config, name):
            why = _misfit(model, config, [(name, new), *extra], before, target)
            if not why:
                return [
                    ConfigChange(name, old, new),
                    *(ConfigChange(k, getattr(config, k, None), v) for k, v in extra),
                ]
            if not extra:  # the reason is the one without the head size
                reasons.append(why)
    if len(news) > 1:  # the layers differ
        reasons.insert(0, f"modules that held {old} now hold {', '.join(map(str, news))}")
    return [ConfigChange(name, old, old, applied=False, reason="; ".join(reasons))]


def _misfit(
    model: nn.Module, config: Any, entries: list[tuple[str, Any]], before: _Shapes, target: _Shapes
) -> str:
    """Why a model built from ``config`` with ``entries`` set would not have ``target``'s shapes in the
    tensors they resize; "" when it would."""
    name, new = entries[0]
    changed = copy.deepcopy(config)
    for k, v in entries:
        setattr(changed, k, v)
    try:
        after = _built(model, changed)
    except Exception as exc:
        return f"{type(model).__name__} cannot be built with {name}={new} ({type(exc).__name__})"
    resized = [key for key in after if key in before and after[key] != before[key] and key in target]
    wrong = next((key for key in resized if after[key] != target[key]), None)
    if wrong is not None:
        return (
            f"with {name}={new} the model would hold {wrong!r} of shape {after[wrong]}, the compacted one "
            f"holds {target[wrong]}"
        )
    if not resized:
        return (
            f"{name}={new} resizes no tensor of a model built from the config (its code derives other sizes "
            f"from {name}), so no value of it describes the compacted model"
        )
    return ""


def _head_size_kept(config: Any, name: str) -> list[list[tuple[str, int]]]:
    """The config entries to try along with a change of ``name``: none, then, for the number of query
    heads of a config without a ``head_dim``, the head size its models derive
    (``hidden_size // num_attention_heads``) set as ``head_dim``, which models such as Qwen2 read when
    it is there, so that fewer heads keep their size."""
    tries: list[list[tuple[str, int]]] = [[]]
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, name, None)
    if (
        name == "num_attention_heads"
        and getattr(config, "head_dim", None) is None
        and type(hidden) is int
        and type(heads) is int
        and heads > 0
        and hidden % heads == 0
    ):
        tries.append([("head_dim", hidden // heads)])
    return tries


def _built(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of ``model``'s class built from ``config``, on the meta device (no memory)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = base_class(model)(copy.deepcopy(config))
    return _shapes(built)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        k: tuple(t.shape) for k, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)
    }


def apply_config(model: nn.Module, changes: tuple[ConfigChange, ...]) -> None:
    """Set the applied ``changes`` on ``model.config``."""
    for c in changes:
        if c.applied:
            setattr(model.config, c.name, c.new)
