"""Scale-safe helpers: a divisor that keeps sums of squares finite, and logarithms of
hyper-parameters taken before they are cast to float32."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def max_abs(xs: Sequence[jax.Array]) -> jax.Array:
    """The largest ``|entry|`` of the arrays (1 when they are all zero).

    Dividing by it before squaring keeps squares from overflowing (entries near 1e20) or
    underflowing (near 1e-20) in float32, and leaves cosines and norm ratios unchanged.
    """
    top = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in xs]))
    return jnp.where(top > 0, top, 1.0)


def log_of(value, dtype) -> jax.Array:
    """``log value`` as ``dtype``; a Python number's logarithm is taken before the cast.

    So a value below the dtype's range keeps its logarithm (``kappa = 1e-88`` gives
    ``-202.5`` in float32, not ``log 0 = -inf``); 0 gives ``-inf``. Arrays and tracers
    (``optax.inject_hyperparams``) are cast first.
    """
    if isinstance(value, (int, float)):
        return jnp.asarray(math.log(value) if value > 0 else -math.inf, dtype)
    return jnp.log(jnp.asarray(value, dtype))
