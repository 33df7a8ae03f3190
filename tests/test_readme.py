"""README.md shows the two set-up commands first, links only to what exists, and its code runs."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
# [text](target) with a relative target: no scheme, no in-page anchor.
RELATIVE_LINK = re.compile(r"\]\((?![a-z][a-z0-9+.-]*:|#)([^)\s]+)\)")


def test_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block runs, in order, in one namespace, in an empty working directory."""
    blocks = PYTHON_BLOCK.findall(README)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    out = io.StringIO()
    for number, source in enumerate(blocks, start=1):
        with contextlib.redirect_stdout(out):
            exec(compile(source, f"README.md (python block {number})", "exec"), namespace)
    # The quickstart prints a sparsity report, whose last line is the total.
    assert "total" in out.getvalue()


def test_setup_commands_come_first() -> None:
    """``make demo`` and ``make test`` come before any code block, and CI runs the latter."""
    head = README.split("```python", 1)[0]
    assert "make demo" in head and "make test" in head
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.MULTILINE), ".ci/run must run the README's test command"


def test_relative_links_exist() -> None:
    targets = {link.split("#", 1)[0] for link in RELATIVE_LINK.findall(README)}
    assert {"docs/", "notebooks/", "benchmarks/README.md"} <= targets
    missing = sorted(target for target in targets if not (ROOT / target).exists())
    assert not missing, f"README.md links to paths that do not exist: {missing}"
