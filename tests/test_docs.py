"""The documentation site builds without a single warning, covers every public module, and its code runs."""

from __future__ import annotations

import contextlib
import io
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import masksparse

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))
# A fenced block that starts with ```python; ```text and ```pycon blocks are shown, not run.
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[str]:
    """The source of every ```python block of a Markdown text, in order."""
    return PYTHON_BLOCK.findall(text)


def public_modules() -> list[str]:
    """masksparse and its public modules at every depth (``masksparse.prune``,
    ``masksparse.compact.planning``, ...).

    Private modules (``_errors``, and everything below a private package), ``__main__`` and the command
    line (``cli``, whose interface is its ``--help``) are not API.
    """
    names = [
        info.name
        for info in pkgutil.walk_packages(masksparse.__path__, prefix="masksparse.")
        if not any(part.startswith("_") for part in info.name.split(".")) and info.name != "masksparse.cli"
    ]
    return ["masksparse", *sorted(names)]


def test_python_blocks_are_found() -> None:
    """The extraction itself: fenced python blocks only, code without the fences."""
    text = "intro\n```python\nx = 1\n```\n```text\nnot code\n```\n```python\ny = x + 1\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = x + 1\n"]


def test_site_builds_strictly(tmp_path: Path) -> None:
    """``sphinx-build -W --keep-going`` succeeds: no broken reference, no docstring that fails to parse."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}\n{result.stderr}"
    for page in ("index", "quickstart", "concepts", "coming-from-torch", "api"):
        assert (tmp_path / "html" / f"{page}.html").is_file(), page
    api = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    for name in masksparse.__all__:
        if not name.startswith("_"):
            assert f"masksparse.{name}" in api, f"masksparse.{name} is missing from the API page"


def test_api_page_lists_every_public_module() -> None:
    """Adding a public module to masksparse means adding its one ``.. api-module::`` line to docs/api.rst."""
    listed = re.findall(r"^\.\. api-module:: (\S+)\s*$", (DOCS / "api.rst").read_text(), re.MULTILINE)
    missing = sorted(set(public_modules()) - set(listed))
    assert not missing, f"add '.. api-module:: NAME' lines to docs/api.rst for {missing}"
    assert len(listed) == len(set(listed)), "a module is listed twice in docs/api.rst"


def test_pages_have_python_examples() -> None:
    assert {page.stem for page in PAGES} >= {"index", "quickstart", "concepts", "coming-from-torch"}
    for stem in ("quickstart", "concepts", "coming-from-torch"):
        assert python_blocks((DOCS / f"{stem}.md").read_text(encoding="utf-8")), stem


@pytest.mark.parametrize("page", PAGES, ids=[page.stem for page in PAGES])
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of a page runs, in order, in one namespace, in an empty working directory."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for number, source in enumerate(python_blocks(page.read_text(encoding="utf-8")), start=1):
        code = compile(source, f"{page.name} (python block {number})", "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, namespace)
