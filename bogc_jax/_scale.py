"""A safe divisor that keeps sums of squares finite at any gradient scale."""

from __future__ import annotations

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
