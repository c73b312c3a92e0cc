"""Shared test set-up: fast XLA compiles and the toy model of ``tests/workers/toy_model.py``.

The toy model lives beside the subprocess workers, which run it as scripts (their own folder
is then first on ``sys.path``). Test modules import it as ``toy_model`` through the one path
entry added here, or take it from the ``toy`` fixture.
"""

import os
import pathlib
import sys

import pytest

# The tests check values, not speed: XLA's backend optimisation passes are turned off, which
# halves compile time on CPU (the bulk of the suite's time) and leaves every HLO-level
# transformation, hence every result, as it is. Subprocess workers inherit the flag.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

_WORKERS = str(pathlib.Path(__file__).with_name("workers"))
if _WORKERS not in sys.path:
    sys.path.insert(0, _WORKERS)

import toy_model


@pytest.fixture
def toy():
    """The toy model module: ``init_params``, ``make_batch``, ``losses_fn``, ``scores_of``."""
    return toy_model
