"""Scale-safe helpers: a divisor that keeps sums of squares finite, powers of two read
from a float's exponent bits, and logarithms of hyper-parameters taken before they are
cast to float32."""

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


def _bit_layout(dtype) -> tuple[int, int, type]:
    """``(mantissa bits, exponent bias, integer type of the same width)`` of a float dtype."""
    int_types = {jnp.dtype(jnp.float32): jnp.int32, jnp.dtype(jnp.float64): jnp.int64}
    if jnp.dtype(dtype) not in int_types:
        raise TypeError(f"exponent bits are read from float32 or float64, got {jnp.dtype(dtype)}")
    info = jnp.finfo(dtype)
    return info.nmant, info.maxexp - 1, int_types[jnp.dtype(dtype)]


def biased_exponent(x: jax.Array) -> jax.Array:
    """The biased exponent field of float32 or float64 ``x`` (0 for zero and subnormals,
    all ones for inf and NaN): ``|x|`` is in ``[2**(e - bias), 2**(e - bias + 1))``."""
    bits, bias, int_type = _bit_layout(x.dtype)
    return (jax.lax.bitcast_convert_type(x, int_type) >> bits) & (2 * bias + 1)


def power_of_two(biased: jax.Array, dtype) -> jax.Array:
    """``2 ** (biased - bias)`` as ``dtype``, built from its bits: exact, no ``pow``.

    ``biased`` must lie in ``[1, 2 * bias]`` (normal numbers: 1 to 254 in float32).
    """
    bits, _, int_type = _bit_layout(dtype)
    return jax.lax.bitcast_convert_type(biased.astype(int_type) << bits, dtype)


def log_of(value, dtype) -> jax.Array:
    """``log value`` as ``dtype``; a Python number's logarithm is taken before the cast.

    So a value below the dtype's range keeps its logarithm (``kappa = 1e-88`` gives
    ``-202.5`` in float32, not ``log 0 = -inf``); 0 gives ``-inf``. Arrays and tracers
    (``optax.inject_hyperparams``) are cast first.
    """
    if isinstance(value, (int, float)):
        return jnp.asarray(math.log(value) if value > 0 else -math.inf, dtype)
    return jnp.log(jnp.asarray(value, dtype))
