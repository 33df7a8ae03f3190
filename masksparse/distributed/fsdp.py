"""Keeping FSDP2 (``fully_shard``) in step when a parameter it manages is renamed ``<name>_orig``.

FSDP2 swaps a module's parameter between its sharded and unsharded forms by name (``setattr(module,
name, ...)``) and reads it back by name. Pruning keeps the same Parameter object but registers it as
``<name>_orig``, computing ``<name>`` on read; FSDP2 must then swap ``<name>_orig``. Its per-parameter
records (``FSDPParam``) are reached through the states it registers for each sharded module.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _fsdp_params() -> list[Any]:
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover - torch without distributed or without FSDP2
        return []
    found: list[Any] = []
    for ref in list(_module_state_mapping.values()):
        state = ref() if callable(ref) else ref
        if isinstance(state, FSDPState):
            for group in state._fsdp_param_groups:
                found.extend(group.fsdp_params)
    return found


def rename_parameter(module: nn.Module, old: str, new: str) -> None:
    """Tell FSDP2, if it manages ``module.<old>``, that the parameter is now called ``new``."""
    for param in _fsdp_params():
        info = param._module_info
        if info.module is module and info.param_name == old:
            info.param_name = new
        for i, (shared, name) in enumerate(zip(info.shared_modules, info.shared_param_names)):
            if shared is module and name == old:
                info.shared_param_names[i] = new
