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
]

# Google-style docstrings (Args:, Returns:, Example:, References:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_custom_sections = [("References", "notes_style")]

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_inherit_docstrings = False
# States are NamedTuples: their fields are described in the class docstring.
autodoc_class_signature = "separated"

nitpicky = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = f"bogc-jax {release}"
html_static_path = []
