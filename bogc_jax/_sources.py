"""Reductions over a short leading source axis, written as ``S - 1`` elementwise steps.

Same values as ``jnp.sum(x, axis=0)`` and ``jnp.max(x, axis=0)``; XLA:CPU reduces a short
leading axis over a long array an order of magnitude slower than it combines ``S`` arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def sum_over_sources(x: jax.Array, sources: Sequence[int] | None = None) -> jax.Array:
    """``sum_s x[s]``, over ``sources`` only when given (the other slabs are zeros)."""
    sources = range(x.shape[0]) if sources is None else sources
    if not sources:
        return jnp.zeros(x.shape[1:], x.dtype)
    total = x[sources[0]]
    for s in sources[1:]:
        total = total + x[s]
    return total


def max_over_sources(x: jax.Array) -> jax.Array:
    """``max_s x[s]``."""
    top = x[0]
    for s in range(1, x.shape[0]):
        top = jnp.maximum(top, x[s])
    return top
