"""``.. api-module:: NAME``: one line of ``api.rst`` documents one module, under a heading of its own.

The directive writes the heading, the module's docstring, and then one entry per name in the module's
``__all__``. A name whose object a deeper public module exports (``masksparse.sparsity_report`` is
``masksparse.report.sparsity_report``) becomes a link to that module's entry, so every object is described
once, where it is defined publicly; every other name is documented here with autodoc. Adding a name to an
``__all__`` therefore needs no edit of the docs, and adding a module needs one line. References to a
re-export (``:func:`masksparse.load_state_dict```) resolve to the documented object.
"""

from __future__ import annotations

import importlib
import inspect
import re
from types import ModuleType
from typing import Any

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util.docutils import SphinxDirective


def _home(name: str, obj: Any) -> str | None:
    """The shortest public module path that exports ``obj`` as ``name`` in its ``__all__``, if any."""
    parts = str(getattr(obj, "__module__", "")).split(".")
    for depth in range(2, len(parts) + 1):
        if parts[depth - 1].startswith("_"):
            return None
        module = importlib.import_module(".".join(parts[:depth]))
        if name in getattr(module, "__all__", ()) and getattr(module, name) is obj:
            return module.__name__
    return None


# A cross-reference role (:func:`remove`, :class:`title <target>`), to show as a literal in a summary.
_ROLE = re.compile(r":[\w.:-]+:`(?:([^`<]*?)\s*<[^`>]*>|([^`]*))`")


def _summary(obj: Any) -> str:
    """The first paragraph of the docstring, with cross-references turned into literals.

    The whole paragraph, not its first line: a line break may fall inside inline markup. Literals, because
    a docstring's relative references (:func:`remove`) resolve only within its own module's entry.
    """
    paragraph = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
    return _ROLE.sub(_as_literal, paragraph)


def _as_literal(match: re.Match[str]) -> str:
    title, target = match.groups()
    if title is not None:
        return title
    return f"``{target.rsplit('.', 1)[-1] if target.startswith('~') else target.lstrip('.')}``"


def _autodoc_directive(qualified: str, obj: Any) -> str:
    if not inspect.isclass(obj):
        return f".. {'autofunction' if callable(obj) else 'autodata'}:: {qualified}"
    kind = "autoexception" if issubclass(obj, BaseException) else "autoclass"
    # Bases are worth a line (PruningValueError is a ValueError), "Bases: object" on a dataclass is not.
    inheritance = "\n   :show-inheritance:" if obj.__bases__ != (object,) else ""
    return f".. {kind}:: {qualified}{inheritance}"


def _entries(module: ModuleType) -> tuple[list[str], list[str]]:
    """Links to names documented in other modules, and autodoc directives for the rest."""
    links, here = [], []
    for name in getattr(module, "__all__", ()):
        if name.startswith("_"):
            continue
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            links.append(f"* :py:mod:`{module.__name__}.{name} <{obj.__name__}>`: {_summary(obj)}")
            continue
        home = _home(name, obj)
        if home is None or home == module.__name__:
            here.append(_autodoc_directive(f"{module.__name__}.{name}", obj))
        else:
            links.append(f"* :py:obj:`{module.__name__}.{name} <{home}.{name}>`: {_summary(obj)}")
    return links, here


class ApiModule(SphinxDirective):
    """Document the module named by the directive's argument."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        module = importlib.import_module(self.arguments[0])
        links, here = _entries(module)
        title = f"``{module.__name__}``"
        lines = [title, "-" * len(title), "", f".. automodule:: {module.__name__}", "   :no-members:", ""]
        if links:
            lines += ["Also exported here, documented with their modules:", "", *links, ""]
        lines += [line for directive in here for line in (directive, "")]
        return self.parse_text_to_nodes("\n".join(lines), allow_section_headings=True)


def _resolve_reexport(
    app: Sphinx, env: BuildEnvironment, node: addnodes.pending_xref, contnode: nodes.TextElement
) -> nodes.Element | None:
    """Resolve a reference to a re-export (``masksparse.load_state_dict``) to the documented object."""
    target = str(node.get("reftarget", ""))
    if node.get("refdomain") != "py" or not target.startswith("masksparse."):
        return None
    module_name, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return None
    home = _home(name, obj)
    if home is None or f"{home}.{name}" == target:
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], f"{home}.{name}", node, contnode
    )


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("api-module", ApiModule)
    app.connect("missing-reference", _resolve_reexport)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
