"""BOGC's default reading on one leaf with few passes over the statistics.

:func:`bogc_jax.bogc` with ``aggregation="dempster"``, ``gamma`` 0 or 1 and at most three
sources computes, per coordinate ``d``, the same correction and diagnostics as the chain
:func:`bogc_jax.evidence.precision` -> :func:`bogc_jax.evidence.log_evidence` ->
:func:`bogc_jax.evidence.fuse_log_simple_supports` -> pignistic weights, rewritten so that
XLA evaluates the chain in one elementwise pass that stores the ``S - 1`` shifts below
(two of them as the real and imaginary parts of one complex array), with one division
per coordinate and no logarithm or exponential; one pass forms the correction and a few
light passes the sums over the leaf. The sources are written out one by one.

The algebra. With ``noise_s = v_s / unit**2 + floor`` the precision of
:func:`~bogc_jax.evidence.precision` is ``lam_s = 1 / r_s`` with
``r_s = max(noise_s / nbar, 1e-30)`` (``nbar`` the mean noise over ``T_d``). Evidence at
``gamma = 1`` is ``e_s = kappa * n * lam_s / sum_T lam`` (``n = |T_d|``); multiplying
numerator and denominator by ``prod_T r_t``:

    P_s = prod_{t in T_d, t != s} r_t,     D = sum_{s in T_d} P_s,
    e_s = kappa * n * P_s / D,             sum_T e = kappa * n.

So ``W + sum_T e = W + kappa * n`` depends on ``n`` alone, and with
``c_n = kappa n / (W + kappa n)`` and ``m_theta = W / (W + kappa n) = 1 - c_n``:

    A_s     = |T_d| w_s - 1 = n e_s / (W + kappa n) + m_theta - 1 = c_n (n P_s - D) / D,
    delta_d = sum_{s in T_d} A_s mu_s,       sum_{s in T_d} A_s = 0.

At ``gamma = 0`` (or ``kappa = 0``) every touching source has the same evidence:
``P_s = 1``, ``D = n``, ``A_s = 0``. The values ``r_s`` only enter through ratios, so
any common factor may scale them: the unit and ``nbar`` are taken as powers of two read
from the floats' exponent bits (exact scalings, no division), which keeps every ``r_s``
in ``[1e-30, 2 n)`` with the largest at least 1, so that a product of two never
underflows where it matters (``P_s`` of the least precise source may underflow to 0: its
evidence is then 0 instead of below ``kappa * 1e-30``). Results equal the chain's to
float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bogc_jax import _moments, _scale

MAX_SOURCES = 3
"""The products ``P_s`` of ``S - 1`` factors in ``[1e-30, 2 n)`` stay finite up to here."""

_EXPONENT_MAX = 253  # biased exponents of the scales: powers of two 2**-126 .. 2**126


def applies(num_sources: int, aggregation, gamma, kappa, prior_weight) -> bool:
    """Whether :func:`leaf_calibration` computes this reading (else the general chain)."""
    concrete = all(isinstance(x, (int, float)) for x in (gamma, kappa, prior_weight))
    return (
        aggregation == "dempster"
        and num_sources <= MAX_SOURCES
        and concrete
        and float(gamma) in (0.0, 1.0)
    )


def _reciprocal_power_of_two(biased: jax.Array) -> jax.Array:
    """``2 ** (127 - biased)`` as float32, for a biased exponent clipped to ``[1, 253]``."""
    return _scale.power_of_two(254 - jnp.clip(biased, 1, _EXPONENT_MAX), jnp.float32)


def _per_count(values, count: jax.Array, dtype) -> jax.Array:
    """``values[n - 1]`` where ``count == n`` (n = 1..S), 0 where ``count == 0``."""
    out = jnp.zeros(count.shape, dtype)
    for n, value in enumerate(values, start=1):
        out = jnp.where(count == n, jnp.asarray(value, dtype), out)
    return out


def _products(ratios, touched):
    """``P_s = prod_{t in T, t != s} r_t`` on ``T`` (0 elsewhere), and ``D = sum_s P_s``."""
    products = []
    for s in range(len(ratios)):
        p = jnp.ones_like(ratios[s])
        for t in range(len(ratios)):
            if t != s:
                p = p * ratios[t]
        products.append(jnp.where(touched[s], p, 0.0))
    total = products[0]
    for p in products[1:]:
        total = total + p
    return products, total


def _stored(values: list) -> tuple[list, jax.Array]:
    """``values`` (at most two arrays) written to memory by one pass; the arrays read back
    and the sum of each.

    Two arrays are stored as the real and imaginary parts of one complex array, so that
    the elementwise chain they share is evaluated once per coordinate (XLA writes one
    array per pass). Both sums come from one product of that array with ones: XLA:CPU
    reduces a complex array 2.5x slower than it multiplies it by a vector. (A product
    mixes the parts where one is not finite, so both sums are then NaN; the shifts are
    finite for finite statistics, and otherwise the step is rejected.)
    """
    if len(values) == 2:
        pair = lax.optimization_barrier(lax.complex(values[0], values[1]))
        # A scalar leaf has nothing to sum.
        total = jnp.sum(pair if pair.ndim == 0 else _moments.sum_as_product(pair, pair.ndim - 1))
        return [jnp.real(pair), jnp.imag(pair)], jnp.stack([jnp.real(total), jnp.imag(total)])
    stored = [lax.optimization_barrier(x) for x in values]
    return stored, jnp.stack([jnp.sum(x) for x in stored]) if stored else jnp.zeros((0,))


def _relative_noise(mean, var, touched, count, inv_count, eps, dtype):
    """``r_s`` of the module doc, up to a factor common to the sources, 1 off ``T``."""
    num_sources = len(mean)
    inv_n = _per_count([1.0 / n for n in range(1, num_sources + 1)], count, dtype)
    v = [x * inv_count for x in var]
    # The unit: 2**-k with 2**k the largest |mu| or std at the coordinate, to a factor 2.
    exponent = jnp.zeros(count.shape, jnp.int32)
    for s in range(num_sources):
        from_mean = _scale.biased_exponent(jnp.abs(mean[s]))
        from_var = jnp.where(v[s] > 0, (_scale.biased_exponent(v[s]) + 127) // 2, 0)
        exponent = jnp.maximum(exponent, jnp.where(touched[s], jnp.maximum(from_mean, from_var), 0))
    unit = _reciprocal_power_of_two(exponent)
    square_sum = jnp.zeros(count.shape, dtype)
    for s in range(num_sources):
        square_sum = square_sum + jnp.where(touched[s], jnp.square(mean[s] * unit), 0.0)
    floor = eps * (square_sum * inv_n)
    noise = [v[s] * unit * unit + floor for s in range(num_sources)]
    noise_sum = jnp.zeros(count.shape, dtype)
    for s in range(num_sources):
        noise_sum = noise_sum + jnp.where(touched[s], noise[s], 0.0)
    mean_noise = noise_sum * inv_n
    mean_noise = jnp.where(mean_noise > 0, mean_noise, 1.0)
    # mean_noise * scale in [1, 2)
    scale = _reciprocal_power_of_two(_scale.biased_exponent(mean_noise))
    least = 1e-30 * (mean_noise * scale)  # the clamp r >= 1e-30, in these units
    return [
        jnp.where(touched[s], jnp.maximum(noise[s] * scale, least), 1.0) for s in range(num_sources)
    ]


def leaf_calibration(
    mean, var, count, *, kappa, gamma, prior_weight, eps, noise_stats=None, sources=None
):
    """The correction to the fixed-weight sum, the diagnostics and the input checks.

        A_s      = c_n (n P_s - D) / D on T_d (s < S - 1),  A_{S-1} = -sum_{s < S-1} A_s
        delta_d  = sum_s A_s mu_s                                  (module doc)
        weight_s = (sum_{d in T_s} A_s + |T_s|) / max(|T_s|, 1)   (the mean of |T_d| w_s)
        u        = sum_k m_theta(k) H_k / sum_k H_k,  H_k = #{d : |T_d| = k}

    Args:
      mean: ``[S, ...]`` mean gradients (``S <= 3``), float32.
      var: ``[S, ...]`` per-example variances over ``count`` examples.
      count: the number of examples.
      kappa, gamma, prior_weight, eps: as in :func:`bogc_jax.bogc` (``gamma`` 0 or 1,
        Python numbers).
      noise_stats: ``(mean, var)`` to compute the precisions from instead (the rescaled
        statistics of ``noise="relative"``), one row per source in ``sources`` (all
        ``S`` by default); the touched sets and the correction use ``mean`` and ``var``.
      sources: the sources whose slabs may be nonzero (default: all), known while
        tracing (``bogc_jax._source_reach``). The others are zeros, so they touch no
        coordinate: only the given slabs are read, and the others' weights and touched
        counts are 0, as the full computation gives.

    Returns:
      ``(delta, weights, uncertainty, checks)``: ``delta`` shaped like ``mean[0]``;
      ``weights`` ``[S]`` float32; ``uncertainty`` ``[]`` float32; ``checks`` the
      ``[S]`` touched counts, NaN where an entry of ``mean`` or ``var`` is not finite or
      a variance is negative (the uncertainty is then NaN too, and :func:`bogc_jax.bogc`
      rejects the step).
    """
    present = tuple(range(mean.shape[0])) if sources is None else tuple(sorted(set(sources)))
    num_sources = len(present)
    dtype = mean.dtype
    if not present:  # no coordinate is touched
        weights = jnp.zeros((mean.shape[0],), jnp.float32)
        checks = jnp.zeros((mean.shape[0],), dtype)
        return jnp.zeros(mean.shape[1:], dtype), weights, jnp.zeros((), jnp.float32), checks
    # The statistics as arrays in memory: inside one program with their computation, XLA
    # would otherwise recompute their last elementwise steps in each pass below.
    mean, var = lax.optimization_barrier((mean, var))
    mu, sd = [mean[s] for s in present], [var[s] for s in present]
    touched = [(mu[s] != 0) | (sd[s] != 0) for s in range(num_sources)]
    n = touched[0].astype(dtype)
    for t in touched[1:]:
        n = n + t.astype(dtype)
    if noise_stats is None:
        noise_mean, noise_var = mu, sd
    else:  # one row per present source
        noise_mean, noise_var = ([x[i] for i in range(num_sources)] for x in noise_stats)
    inv_count = 1.0 / jnp.asarray(count).astype(dtype)
    kappa, gamma, prior_weight = float(kappa), float(gamma), float(prior_weight)
    if kappa == 0.0 or gamma == 0.0:
        ratios = [jnp.ones_like(m) for m in mu]
    else:
        ratios = _relative_noise(
            noise_mean,
            noise_var,
            touched,
            n,
            inv_count,
            eps,
            dtype,
        )
    products, total = _products(ratios, touched)
    total = jnp.where(n > 0, total, 1.0)
    sizes = range(1, num_sources + 1)
    c_n = _per_count([kappa * k / (prior_weight + kappa * k) for k in sizes], n, dtype)

    # A_s = |T_d| w_s - 1 = c_n (n P_s - D) / D on T_d, for all sources but the last
    # (sum_T A_s = 0 gives it): one evaluation of the chain, kept in memory for the
    # correction and the sums below.
    shift = [
        jnp.where(touched[s], c_n * (n * products[s] - total) / total, 0.0)
        for s in range(num_sources - 1)
    ]
    shift, shift_sums = _stored(shift)
    rest = sum(shift[1:], shift[0]) if shift else jnp.zeros_like(n)
    shift.append(jnp.where(touched[-1], -rest, 0.0))
    delta = shift[0] * mu[0]
    for s in range(1, num_sources):
        delta = delta + shift[s] * mu[s]

    # Sums over the leaf: sum_d A_s (the last source's is minus the others'); per source,
    # its touched count |T_s| (NaN where an entry is not finite or a variance is
    # negative); and C_k = #{d : |T_d| >= k} for k = 2..S, which give H_k = C_k - C_{k+1}
    # (C_{S+1} = 0) and H_1 = sum_s |T_s| - sum_{k >= 2} k H_k. Each is a sum of an
    # elementwise expression of the statistics, which XLA:CPU evaluates in one vectorised
    # pass without writing it to memory (storing them two to a complex array first was
    # 1.15x slower over the whole calibration).
    shift_sums = jnp.concatenate([shift_sums, -jnp.sum(shift_sums, keepdims=True)])
    summands = []
    for s in range(num_sources):
        ok = jnp.isfinite(mu[s]) & jnp.isfinite(sd[s]) & (sd[s] >= 0)
        summands.append(jnp.where(ok, touched[s].astype(dtype), jnp.nan))
    summands += [(n >= k).astype(dtype) for k in range(2, num_sources + 1)]
    sums = jnp.stack([jnp.sum(x) for x in summands])
    touch_counts, at_least = sums[:num_sources], sums[num_sources:]  # C_2 .. C_S
    multiple = at_least - jnp.concatenate([at_least[1:], jnp.zeros((1,), dtype)])  # H_2 ..
    single = jnp.sum(touch_counts) - jnp.sum(jnp.arange(2, num_sources + 1) * multiple)
    histogram = jnp.concatenate([single[None], multiple])
    weights = jnp.where(
        touch_counts > 0, (shift_sums + touch_counts) / jnp.maximum(touch_counts, 1), 0.0
    )
    thetas = jnp.asarray([prior_weight / (prior_weight + kappa * k) for k in sizes], dtype)
    uncertainty = jnp.sum(thetas * histogram) / jnp.maximum(jnp.sum(histogram), 1)
    checks = touch_counts
    if num_sources < mean.shape[0]:  # the absent sources: weight 0, touched nowhere
        index = jnp.asarray(present)
        weights = jnp.zeros((mean.shape[0],), weights.dtype).at[index].set(weights)
        checks = jnp.zeros((mean.shape[0],), checks.dtype).at[index].set(checks)
    return delta, weights.astype(jnp.float32), uncertainty.astype(jnp.float32), checks
