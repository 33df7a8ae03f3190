"""The public API is explicit: sorted ``__all__``, names that resolve and are documented, one version."""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.metadata
import inspect
import pkgutil
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch.nn.utils.prune as torch_prune

import masksparse

ROOT = Path(__file__).resolve().parent.parent


def _public_modules() -> list[str]:
    """masksparse and every module below it whose dotted path has no ``_``-prefixed part."""
    found = ["masksparse"]
    for info in pkgutil.walk_packages(masksparse.__path__, prefix="masksparse."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(info.name)
    return found


PUBLIC_MODULES = _public_modules()
# Modules whose __all__ is the API users import from; the checks below apply to each.
API_MODULES = ["masksparse", "masksparse.prune"]
_DESCRIPTORS = (property, classmethod, staticmethod)


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as err:  # written before some modules exist: fail with the reason, not an error
        pytest.fail(f"cannot import {name}: {err}")


def _public_members(obj: type) -> list[tuple[str, object]]:
    """Methods and properties a class defines itself (inherited ones are documented where defined)."""
    return [
        (name, value)
        for name, value in vars(obj).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, _DESCRIPTORS))
    ]


@pytest.mark.parametrize("name", API_MODULES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = _module(name)
    exported = module.__all__
    assert exported == sorted(exported), f"{name}.__all__ is not sorted: sorted() gives {sorted(exported)}"
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"
    unresolved = [item for item in exported if not hasattr(module, item)]
    assert not unresolved, f"{name}.__all__ names what {name} does not define: {unresolved}"


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_module_all_is_sorted_and_resolves(name: str) -> None:
    """Every public module that declares ``__all__`` keeps it sorted and resolvable, and has a docstring."""
    module = _module(name)
    assert inspect.getdoc(module), f"{name} has no module docstring"
    exported = getattr(module, "__all__", None)
    if exported is None:
        return
    assert list(exported) == sorted(exported), f"{name}.__all__ is not sorted"
    assert all(hasattr(module, item) for item in exported), f"{name}.__all__ names something undefined"


@pytest.mark.parametrize("name", API_MODULES)
def test_public_names_have_docstrings(name: str) -> None:
    module = _module(name)
    undocumented = []
    for item in module.__all__:
        obj = getattr(module, item)
        if item.startswith("_") or not (callable(obj) or inspect.ismodule(obj)):
            continue
        if not inspect.getdoc(obj):
            undocumented.append(item)
        if inspect.isclass(obj):
            undocumented += [
                f"{item}.{member}"
                for member, _ in _public_members(obj)
                if not inspect.getdoc(getattr(obj, member))
            ]
    assert not undocumented, f"{name}: public names without a docstring: {undocumented}"


@pytest.mark.parametrize("name", API_MODULES)
def test_public_functions_open_with_an_example(name: str) -> None:
    """Docstrings of public functions show a runnable example (run by ``pytest --doctest-modules``)."""
    module = _module(name)
    without = [
        item
        for item in module.__all__
        if inspect.isfunction(getattr(module, item))
        and ">>>" not in (inspect.getdoc(getattr(module, item)) or "")
    ]
    assert not without, f"{name}: public functions whose docstring has no '>>>' example: {without}"


def _parameters(function: Callable[..., object]) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_prune_is_a_drop_in_for_torch() -> None:
    """Every public name of torch.nn.utils.prune exists in masksparse.prune with the same parameters."""
    prune = _module("masksparse.prune")
    torch_names = {
        "BasePruningMethod", "PruningContainer", "Identity", "RandomUnstructured", "L1Unstructured",
        "RandomStructured", "LnStructured", "CustomFromMask", "identity", "random_unstructured",
        "l1_unstructured", "random_structured", "ln_structured", "global_unstructured", "custom_from_mask",
        "remove", "is_pruned",
    }  # fmt: skip
    assert torch_names <= set(prune.__all__), sorted(torch_names - set(prune.__all__))
    for item in sorted(torch_names):
        ours, theirs = getattr(prune, item), getattr(torch_prune, item)
        if inspect.isfunction(theirs):
            assert _parameters(ours) == _parameters(theirs), item
        else:
            assert issubclass(ours, torch_prune.BasePruningMethod), item


def test_one_version_string() -> None:
    """The version lives in masksparse/__init__.py only: setup.cfg and the docs read it from there."""
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.dev\d+)?", masksparse.__version__)
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: masksparse.__version__"
    assert "masksparse.__version__" in (ROOT / "docs" / "conf.py").read_text(encoding="utf-8")
    try:
        installed = importlib.metadata.version("masksparse")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("masksparse is not installed, so there is no installed version to compare")
    assert installed == masksparse.__version__, "reinstall: the installed metadata is stale"


def _imported_modules(source: str, module: str, known: set[str]) -> set[str]:
    """Which of the ``known`` modules ``source`` imports anywhere, inside functions included.

    ``from pkg import name`` imports ``pkg.name`` when that is a known module, and ``pkg`` otherwise.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the package that holds ``module``
                anchor = module.split(".")[: -node.level]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return (found & known) - {module}


def _import_cycle(sources: dict[str, str]) -> list[str] | None:
    """A cycle among ``sources`` (dotted module name -> source), as a path, or None."""
    edges = {module: _imported_modules(source, module, set(sources)) for module, source in sources.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(sources):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_the_cycle_finder_sees_lazy_imports() -> None:
    """The check below would fail on the circle masksparse.prune once had: a lazy import inside a method."""
    sources = {
        "pkg": "",
        "pkg.methods": "class Base:\n    def apply(self):\n        from pkg._apply import run\n",
        "pkg._apply": "from pkg import methods as _m\n",
        "pkg.other": "from . import methods\n",
    }
    assert _import_cycle(sources) == ["pkg._apply", "pkg.methods", "pkg._apply"]
    sources["pkg.methods"] = "import pkg.other\n"
    assert _import_cycle(sources) == ["pkg.methods", "pkg.other", "pkg.methods"]
    sources["pkg.other"] = ""
    assert _import_cycle(sources) is None


def test_prune_has_no_import_circle() -> None:
    """No file of masksparse/prune imports another that imports it back, even lazily inside a function."""
    folder = ROOT / "masksparse" / "prune"
    sources = {
        "masksparse.prune" + ("" if path.stem == "__init__" else f".{path.stem}"): path.read_text(
            encoding="utf-8"
        )
        for path in sorted(folder.glob("*.py"))
    }
    assert {"masksparse.prune.methods", "masksparse.prune.functional"} <= set(sources)
    assert _import_cycle(sources) is None, _import_cycle(sources)
