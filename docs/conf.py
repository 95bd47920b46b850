"""Sphinx configuration of the lore_jax documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
Pages are MyST Markdown; the API reference is generated from the Google-style
docstrings (autodoc + napoleon).
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import lore_jax  # noqa: E402

project = "lore_jax"
author = "the lore_jax authors"
copyright = "2026, the lore_jax authors"  # noqa: A001
release = version = lore_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_default_options = {"members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = "lore_jax"
