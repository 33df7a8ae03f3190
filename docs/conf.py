"""Sphinx configuration for the masksparse documentation site.

Built strictly (``-W --keep-going``) by ``tests/test_docs.py``: a broken reference or a docstring that does
not parse fails the test suite.
"""

from __future__ import annotations

import sys
from pathlib import Path

import masksparse

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "masksparse"
author = "the masksparse authors"
copyright = "the masksparse authors"
# One version string: the package's.
release = masksparse.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
    "api_module",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_ext"]
# Every reference must resolve (a typo in a cross-reference fails the build), except into the libraries
# masksparse builds on: there is no network at build time for intersphinx, so those stay plain text.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(torch|torchvision|numpy|collections|typing|types|os|pathlib|transformers|timm|lightning)(\..*)?",
    ),
    # Private helpers (e.g. the shared base of the unstructured methods) appear as bases, not as pages.
    (r"py:class", r"masksparse(\.\w+)*\._\w+"),
]

# api.rst documents modules with the api-module directive (docs/_ext/api_module.py); a class shows its
# public methods. Members without docstrings are left out: tests/test_api.py makes sure there are none.
autodoc_default_options = {"members": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True

napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes as :ivar: fields: as directives they would collide with the dataclass fields autodoc lists.
napoleon_use_ivar = True

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"masksparse {release}"
