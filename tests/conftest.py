"""Shared test set-up: the two-modality toy model of ``tests/workers/toy_model.py``.

The toy model lives beside the subprocess workers, which run it as scripts (their own folder
is then first on ``sys.path``). Test modules import it as ``toy_model`` through the one path
entry added here, or take it from the ``toy`` fixture.
"""

import pathlib
import sys

import pytest

_WORKERS = str(pathlib.Path(__file__).with_name("workers"))
if _WORKERS not in sys.path:
    sys.path.insert(0, _WORKERS)

import toy_model


@pytest.fixture
def toy():
    """The toy model module: ``init_params``, ``make_batch``, ``losses_fn``, ``scores_of``."""
    return toy_model
