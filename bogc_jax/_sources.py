"""Reductions over a short leading source axis, written as ``S - 1`` elementwise steps.

Same values as ``jnp.sum(x, axis=0)`` and ``jnp.max(x, axis=0)``; XLA:CPU reduces a short
leading axis over a long array an order of magnitude slower than it combines ``S`` arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sum_over_sources(x: jax.Array) -> jax.Array:
    """``sum_s x[s]``."""
    total = x[0]
    for s in range(1, x.shape[0]):
        total = total + x[s]
    return total


def max_over_sources(x: jax.Array) -> jax.Array:
    """``max_s x[s]``."""
    top = x[0]
    for s in range(1, x.shape[0]):
        top = jnp.maximum(top, x[s])
    return top
