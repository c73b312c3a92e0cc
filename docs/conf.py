"""Sphinx configuration: API reference built from the docstrings of bogc_jax."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import bogc_jax  # pylint: disable=g-import-not-at-top,wrong-import-position

project = "bogc-jax"
author = "bogc-jax authors"
copyright = "bogc-jax authors"  # pylint: disable=redefined-builtin
release = bogc_jax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

# Guides are Markdown (MyST); formulas in $...$ and $$...$$ are LaTeX, as in the docstrings'
# ``.. math::`` blocks.
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# Google-style docstrings (Args:, Returns:, Example:, References:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_custom_sections = [("References", "notes_style")]

# NamedTuple states document their fields in the class docstring; the generated
# __new__/__init__ (and the field properties) would only repeat them.
autodoc_default_options = {"member-order": "bysource", "exclude-members": "__init__, __new__"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_inherit_docstrings = False
# States are NamedTuples: their fields are described in the class docstring, so the
# class line carries no constructor signature.
autodoc_class_signature = "separated"

nitpicky = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = f"bogc-jax {release}"
html_static_path = []


# Pages of the Methods toctree that a build may not have yet (each is listed as soon as it
# exists): left out of index.rst's toctree instead of failing the build.
OPTIONAL_PAGES = ("representation",)


def _drop_missing_optional_pages(app, docname, source):
    if docname != "index":
        return
    for page in OPTIONAL_PAGES:
        if not any(os.path.exists(os.path.join(app.srcdir, page + ext)) for ext in (".md", ".rst")):
            source[0] = source[0].replace(f"\n   {page}\n", "\n")


def setup(app):
    app.connect("source-read", _drop_missing_optional_pages)
