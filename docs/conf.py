"""Sphinx configuration: the API reference from the docstrings, and the Markdown pages."""

import os

# Importing the package imports torch; one thread keeps the build off the other cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import bayessparse

project = "bayessparse"
author = "bayessparse contributors"
copyright = "bayessparse contributors"
release = version = bayessparse.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]

# The docstrings are Google style (Args:, Returns:, Raises:, Example:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    # Layers' forward() has no docstring of its own and would show torch's generic one.
    "exclude-members": "forward",
}

# Markdown pages: $...$ and $$...$$ maths, and ::: fences.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"bayessparse {release}"
