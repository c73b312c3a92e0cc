"""Where the prototypes live: imported first, it puts the repository (``bogc_jax``) and
``benchmarks/`` (``bench``, ``timing``) on ``sys.path``."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
for _path in (ROOT, BENCH):
    if _path not in sys.path:
        sys.path.insert(0, _path)
