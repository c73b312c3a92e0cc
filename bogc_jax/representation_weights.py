"""Calibration at the representation: per example and dimension, weights over the sources.

Sources ``t`` (axis 0) are the head outputs ("slots") whose loss reads a representation
``h``; each has, per example ``n`` and dimension ``j``, a gradient mean ``mu[t, n, j]`` and
variance ``var[t, n, j]`` (:mod:`bogc_jax.representation_moments`). With a power ``p_t``
per source (BayesAgg-MTL's ``sqrt_power``), ``V = max(var, 1e-8) ** p``:

* ``"precision"`` (BayesAgg-MTL): ``w_t = V_t^-1 / sum_s V_s^-1``;
* ``"dempster"`` (BOGC): the chain of :mod:`bogc_jax.evidence` per example and dimension,
  on ``V = var ** p`` with the signal scale ``|mu| ** p``: precision (with its relative
  signal-to-noise floor) ``->`` evidence ``->`` simple support opinions ``->`` reduced
  Dempster-Shafer fusion ``->`` pignistic weights;
* ``"sum"``: ``w_t = 1 / T`` (the fixed-weight baseline).

The calibrated gradient is ``T sum_t w_t mu_t`` (``scale="sum"``: equal precisions give the
fixed-weight sum ``sum_t mu_t`` exactly) or ``sum_t w_t mu_t`` (``scale="mean"``,
BayesAgg-MTL's average). Memory is ``O(T B d)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from bogc_jax import evidence as ev

Array = jax.Array

AGGREGATIONS = ("dempster", "precision", "sum")
SCALES = ("sum", "mean")
VARIANCE_CLAMP = 1e-8  # BayesAgg-MTL's clamp of every variance before the power


def _per_source(power, num_sources: int, ndim: int, dtype) -> Array:
    p = jnp.asarray(power, dtype)
    if p.ndim == 0:
        return p
    if p.shape != (num_sources,):
        raise ValueError(
            f"power must be a number or one per source ({num_sources}); got shape {p.shape}."
        )
    return p.reshape((num_sources,) + (1,) * (ndim - 1))


def source_weights(
    mean: Array,
    var: Array,
    *,
    aggregation: str = "dempster",
    power: float | Sequence[float] | Array = 1.0,
    kappa: float = 1.0,
    gamma: float = 1.0,
    prior_weight: float = 1.0,
    eps: float = 1e-3,
) -> tuple[Array, Array]:
    """Per-example, per-dimension source weights (they sum to 1 over axis 0).

    Args:
      mean: ``[T, ...]`` gradient means of the ``T`` sources.
      var: ``[T, ...]`` their variances.
      aggregation: ``"dempster"``, ``"precision"`` or ``"sum"``.
      power: ``p >= 0``, one number or one per source (``p = 0``: equal weights).
      kappa, gamma, prior_weight, eps: ``"dempster"``'s evidence strength and sharpness,
        opinion prior weight and signal-to-noise floor (see :func:`bogc_jax.bogc`).

    Returns:
      ``(weights [T, ...], uncertainty [...])``: ``uncertainty`` is the fused frame mass
      ``m(Theta)`` for ``"dempster"`` and 0 otherwise.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> mean, var = jnp.ones((2, 3)), jnp.array([[1.0, 1.0, 1.0], [3.0, 1.0, 0.5]])
      >>> w, _ = bj.representation_weights.source_weights(mean, var, aggregation="precision")
      >>> [round(x, 3) for x in w[0].tolist()]
      [0.75, 0.5, 0.333]
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}.")
    num_sources = mean.shape[0]
    zero = jnp.zeros(mean.shape[1:], mean.dtype)
    if aggregation == "sum" or num_sources == 1:
        return jnp.full(mean.shape, 1.0 / num_sources, mean.dtype), zero
    p = _per_source(power, num_sources, mean.ndim, mean.dtype)
    if aggregation == "precision":
        inv = 1.0 / jnp.power(jnp.maximum(var, VARIANCE_CLAMP), p)
        return inv / ev.sum_over_sources(inv), zero
    touched = jnp.ones(mean.shape, bool)
    lam = ev.precision(jnp.power(var, p), jnp.power(jnp.abs(mean), p), touched, eps)
    e = ev.evidence(lam, touched, kappa, gamma)
    m, m_theta = ev.fuse_simple_supports(e, prior_weight)
    return ev.pignistic_weights(m, m_theta, touched), m_theta


def calibrate(
    mean: Array,
    var: Array,
    *,
    scale: str = "sum",
    aggregation: str = "dempster",
    power: float | Sequence[float] | Array = 1.0,
    kappa: float = 1.0,
    gamma: float = 1.0,
    prior_weight: float = 1.0,
    eps: float = 1e-3,
) -> tuple[Array, Array, Array]:
    """The calibrated gradient ``T sum_t w_t mu_t`` (``"sum"``) or ``sum_t w_t mu_t`` (``"mean"``).

    Args:
      mean, var: ``[T, ...]`` per-source moments.
      scale: ``"sum"`` or ``"mean"``.
      aggregation, power, kappa, gamma, prior_weight, eps: as in :func:`source_weights`.

    Returns:
      ``(gradient [...], weights [T, ...], uncertainty [...])``.

    Example:
      Equal variances give the plain sum:

      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> mean = jnp.array([[1.0, 2.0], [3.0, -1.0]])
      >>> g, w, u = bj.representation_weights.calibrate(mean, jnp.ones((2, 2)))
      >>> g.tolist()
      [4.0, 1.0]
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}; got {scale!r}.")
    weights, uncertainty = source_weights(
        mean,
        var,
        aggregation=aggregation,
        power=power,
        kappa=kappa,
        gamma=gamma,
        prior_weight=prior_weight,
        eps=eps,
    )
    out = ev.sum_over_sources(weights * mean)
    if scale == "sum":
        out = mean.shape[0] * out
    return out, weights, uncertainty
