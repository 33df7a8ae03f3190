"""Rule-registry cases for attention forms: small models that tests/test_graph.py prunes with
prune_channels and compacts, exactly, and whose ops count as exercised.

Each entry: name -> (model factory, input shape, whether compaction must shrink the model).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]] = {}
