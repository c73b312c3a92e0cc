"""Precision -> evidence -> opinion, and the reduced Dempster-Shafer rule.

Every function here is pure and elementwise over parameter coordinates (except
:func:`relative_to_own_signal`, which pools each source over a leaf): arrays carry the
sources on axis 0 (``[S, ...]``) and any coordinate shape after it. A boolean ``touched``
array of the same shape marks, for each coordinate ``d``, the set ``T_d`` of sources whose
gradient reaches ``d``; the others are *vacuous* there (no evidence, full uncertainty).

The chain, for coordinate ``d`` and source ``s`` in ``T_d``:

    floor_d  = eps * mean_{T_d} mu[., d]**2
    lam[s,d] = 1 / (v[s, d] + floor_d)          (up to a factor common to T_d)   precision
    e[s,d]   = kappa * (lam[s, d] / mean_{T_d} lam[., d]) ** gamma     evidence
    b[s,d]   = e / (e + W),   u[s,d] = W / (e + W)                    opinion

Each source's opinion is a simple support function on the frame ``T_d``: mass ``b`` on
the singleton ``{s}`` and ``u`` on the whole frame ``Theta``; opinions are fused with the
reduced Dempster rule (Han et al., ICLR 2021). :func:`log_evidence` and the ``*_log``
fusions compute the same chain in log space, where no evidence overflows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bogc_jax import validation
from bogc_jax._scale import log_of
from bogc_jax._sources import max_over_sources as _max_over_sources
from bogc_jax._sources import sum_over_sources

Array = jax.Array


def _count(touched: Array, dtype) -> Array:
    return sum_over_sources(touched.astype(dtype))


def touched_mean(x: Array, touched: Array) -> Array:
    """``mean_{s in T_d} x[s, d]`` over the sources touching each coordinate (0 if none).

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> x = jnp.array([[1.0, 2.0], [3.0, 5.0]])
      >>> touched = jnp.array([[True, True], [True, False]])
      >>> bj.evidence.touched_mean(x, touched).tolist()
      [2.0, 2.0]
    """
    total = sum_over_sources(jnp.where(touched, x, 0))
    return total / jnp.maximum(_count(touched, x.dtype), 1)


def _magnitude(mean: Array, var: Array, touched: Array) -> Array:
    """``max(|mu|, sqrt(v))`` where touched, 0 elsewhere: a unit that keeps squares finite."""
    return jnp.where(touched, jnp.maximum(jnp.abs(mean), jnp.sqrt(var)), 0)


def relative_to_own_signal(mean: Array, var: Array, touched: Array) -> tuple[Array, Array]:
    """Each source's statistics in units of its own signal on the leaf.

    With ``p_s = mean_{d: s touches d} mu[s, d]**2`` (the source's mean squared gradient
    over the leaf, the last axes), returns ``(mu / sqrt(p_s), v / p_s)``: the variance
    becomes a noise-to-signal ratio, which no longer depends on the source's gradient
    scale. A source that touches the leaf with zero mean everywhere (pure noise) gets
    ``p_s = 1e-30`` in units of its own largest standard deviation squared: no trust.
    ``bogc(noise="relative")`` feeds the result to :func:`precision`.

    Args:
      mean: ``[S, ...]`` mean gradients.
      var: ``[S, ...]`` variances.
      touched: ``[S, ...]`` booleans.

    Returns:
      ``(mean, var)`` rescaled per source, same shapes.

    Example:
      Source 1 is source 0 scaled by 10: the same statistics in its own units.

      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> mean = jnp.array([[1.0, 3.0], [10.0, 30.0]])
      >>> var = jnp.array([[2.0, 4.0], [200.0, 400.0]])
      >>> m, v = bj.evidence.relative_to_own_signal(mean, var, jnp.ones((2, 2), bool))
      >>> [[round(x, 3) for x in row] for row in v.tolist()]
      [[0.4, 0.8], [0.4, 0.8]]
    """
    axes = tuple(range(1, mean.ndim))
    # In units of each source's largest |mean| (or std): the squares neither overflow nor
    # underflow.
    unit = jnp.max(_magnitude(mean, var, touched), axis=axes, keepdims=True)
    unit = jnp.where(unit > 0, unit, 1)
    scaled = mean / unit
    count = jnp.maximum(jnp.sum(touched, axis=axes, keepdims=True), 1).astype(mean.dtype)
    power = jnp.sum(jnp.where(touched, jnp.square(scaled), 0), axis=axes, keepdims=True) / count
    power = jnp.maximum(power, 1e-30)
    return scaled / jnp.sqrt(power), var / unit / unit / power


def precision(var: Array, mean: Array, touched: Array, eps: float = 1e-3) -> Array:
    """Per-coordinate precision with a signal-to-noise floor, relative to its mean.

    ``lam[s, d] = 1 / (v[s, d] + floor_d)`` with ``floor_d = eps * mean_{s in T_d}
    mu[s, d]**2``: no source is trusted beyond a signal-to-noise ratio of ``1 / eps``. The
    floor depends on the means only, so raising one source's variance lowers its own
    precision and leaves every other source's unchanged (a source's weight then never
    rises, for any evidence sharpness). Only ratios of precisions between sources enter
    the calibration, so this returns the dimensionless

        lam[s, d] * nbar_d = nbar_d / (v[s, d] + floor_d),
        nbar_d = mean_{s in T_d} (v[s, d] + floor_d),

    which does not overflow or underflow whatever the gradient scale (it is clamped at
    ``1e30``). Multiplying every mean by ``c`` and every variance by ``c**2`` leaves it
    unchanged. Where every touching source has zero variance, all are equally precise.
    A touched source has a non-zero mean or variance, so ``v + floor > 0``. Untouched
    entries are 0.

    Args:
      var: ``[S, ...]`` non-negative variances (of the batch-mean gradients).
      mean: ``[S, ...]`` mean gradients.
      touched: ``[S, ...]`` booleans, the sources touching each coordinate.
      eps: the floor's weight (an inverse signal-to-noise ratio), > 0.

    Returns:
      ``[S, ...]`` precisions relative to ``1 / nbar_d``, 0 where not touched.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> var = jnp.array([[1.0, 4.0], [3.0, 4.0]])  # 2 sources, 2 coordinates
      >>> mean = jnp.ones((2, 2))
      >>> lam = bj.evidence.precision(var, mean, jnp.ones((2, 2), bool))
      >>> [[round(x, 3) for x in row] for row in lam.tolist()]
      [[1.999, 1.0], [0.667, 1.0]]
    """
    validation.check_number(
        "precision",
        "eps",
        eps,
        strict=True,
        fix="It weighs the signal-to-noise floor; 1e-3 is the default.",
    )
    # In units of the largest |mean| or std at the coordinate: the squares below neither
    # overflow nor underflow at any gradient scale, and the ratios are unchanged.
    unit = _max_over_sources(_magnitude(mean, var, touched))
    unit = jnp.where(unit > 0, unit, 1)
    floor = eps * touched_mean(jnp.square(mean / unit), touched)
    noise = jnp.square(jnp.sqrt(var) / unit) + floor  # not var / unit**2: unit**2 may underflow
    mean_noise = touched_mean(noise, touched)
    noise_ratio = noise / jnp.where(mean_noise > 0, mean_noise, 1)
    return jnp.where(touched, 1.0 / jnp.maximum(noise_ratio, 1e-30), 0.0)


def evidence(lam: Array, touched: Array, kappa: float = 1.0, gamma: float = 1.0) -> Array:
    """Evidence from relative precision.

    ``e[s, d] = kappa * (lam[s, d] / mean_{s' in T_d} lam[s', d]) ** gamma`` for ``s`` in
    ``T_d``, 0 otherwise. Equal precisions give every source the same evidence ``kappa``.

    Args:
      lam: ``[S, ...]`` precisions (0 where not touched).
      touched: ``[S, ...]`` booleans.
      kappa: strength, >= 0.
      gamma: sharpness, >= 0.

    Returns:
      ``[S, ...]`` non-negative evidence. It overflows float32 once
      ``gamma * log |T_d|`` passes 88; :func:`log_evidence` does not.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> lam = jnp.array([[3.0, 1.0], [1.0, 1.0]])
      >>> bj.evidence.evidence(lam, jnp.ones((2, 2), bool), kappa=2.0).tolist()
      [[3.0, 2.0], [1.0, 2.0]]
    """
    validation.check_number("evidence", "kappa", kappa, finite=True)
    validation.check_number("evidence", "gamma", gamma, finite=True)
    mean_lam = touched_mean(lam, touched)
    ratio = lam / jnp.where(mean_lam > 0, mean_lam, 1)
    return jnp.where(touched, kappa * jnp.power(ratio, gamma), 0.0)


def log_evidence(lam: Array, touched: Array, kappa: float = 1.0, gamma: float = 1.0) -> Array:
    """The logarithm of :func:`evidence`, which cannot overflow.

    ``log e[s, d] = log kappa + gamma * log(lam[s, d] / mean_{s' in T_d} lam[s', d])`` for
    ``s`` in ``T_d``, ``-inf`` otherwise (and everywhere when ``kappa = 0``). ``e`` overflows
    float32 once ``gamma * log |T_d|`` passes 88 (``S = 3, gamma = 100``) and underflows for
    ``kappa`` below 1e-38 (:func:`~bogc_jax._scale.log_of`); its logarithm stays finite.

    Args:
      lam: ``[S, ...]`` precisions (0 where not touched).
      touched: ``[S, ...]`` booleans.
      kappa: strength, >= 0 and finite.
      gamma: sharpness, >= 0 and finite.

    Returns:
      ``[S, ...]`` log-evidence, ``-inf`` where there is none.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> lam = jnp.array([[3.0, 1.0], [1.0, 1.0]])
      >>> log_e = bj.evidence.log_evidence(lam, jnp.ones((2, 2), bool), gamma=300.0)
      >>> [[round(x, 2) for x in row] for row in log_e.tolist()]  # e[0, 0] = 1.5**300
      [[121.64, 0.0], [-207.94, 0.0]]
    """
    validation.check_number("log_evidence", "kappa", kappa, finite=True)
    validation.check_number("log_evidence", "gamma", gamma, finite=True)
    mean_lam = touched_mean(lam, touched)
    ratio = lam / jnp.where(mean_lam > 0, mean_lam, 1)
    positive = touched & (ratio > 0)
    log_ratio = jnp.log(jnp.where(positive, ratio, 1))
    sharpness = jnp.asarray(gamma, lam.dtype)
    scaled = jnp.where(positive, sharpness * log_ratio, jnp.where(sharpness == 0, 0.0, -jnp.inf))
    return jnp.where(touched, log_of(kappa, lam.dtype) + scaled, -jnp.inf)


def simple_support_opinion(e: Array, prior_weight: float = 1.0) -> tuple[Array, Array]:
    """Subjective-logic opinion of one source: ``b = e / (e + W)``, ``u = W / (e + W)``.

    Zero evidence gives the vacuous opinion ``b = 0, u = 1``.

    Returns:
      ``(b, u)``, each shaped like ``e``; ``b + u = 1``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> b, u = bj.evidence.simple_support_opinion(jnp.array([0.0, 1.0, 3.0]))
      >>> b.tolist(), u.tolist()
      ([0.0, 0.5, 0.75], [1.0, 0.5, 0.25])
    """
    validation.check_number("simple_support_opinion", "prior_weight", prior_weight, strict=True)
    total = e + prior_weight
    return e / total, prior_weight / total


def dempster_combine(b1: Array, u1: Array, b2: Array, u2: Array) -> tuple[Array, Array]:
    """Reduced Dempster rule for two opinions on the same frame of ``K`` singletons.

    ``b1, b2``: ``[K, ...]`` masses on the singletons; ``u1, u2``: ``[...]`` masses on the
    whole frame. With conflict ``C = sum_{i != j} b1_i b2_j``, computed from sums as
    ``C = (sum_i b1_i)(sum_j b2_j) - sum_i b1_i b2_i`` (no ``K x K`` array):

        b = (b1 * b2 + b1 * u2 + b2 * u1) / (1 - C)
        u = u1 * u2 / (1 - C)

    The rule is commutative and associative.

    Returns:
      ``(b, u)`` of the fused opinion.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> b1, u1 = jnp.array([0.5, 0.0]), jnp.array(0.5)  # belief on singleton 0
      >>> b2, u2 = jnp.array([0.0, 0.5]), jnp.array(0.5)  # belief on singleton 1
      >>> b, u = bj.evidence.dempster_combine(b1, u1, b2, u2)
      >>> [round(x, 4) for x in b.tolist()], round(float(u), 4)
      ([0.3333, 0.3333], 0.3333)
    """
    conflict = jnp.sum(b1, axis=0) * jnp.sum(b2, axis=0) - jnp.sum(b1 * b2, axis=0)
    norm = 1.0 - conflict
    b = (b1 * b2 + b1 * u2 + b2 * u1) / norm
    u = u1 * u2 / norm
    return b, u


def dempster_fold(beliefs: Array, uncertainties: Array) -> tuple[Array, Array]:
    """Fuse ``S`` opinions on a shared frame by folding :func:`dempster_combine`.

    Args:
      beliefs: ``[S, K, ...]``: source ``s``'s masses on the ``K`` singletons.
      uncertainties: ``[S, ...]``: source ``s``'s mass on the whole frame.

    Returns:
      ``(b, u)``: ``[K, ...]`` fused singleton masses and ``[...]`` fused frame mass.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> beliefs = jnp.array([[0.5, 0.0], [0.0, 0.5], [0.25, 0.25]])  # [S=3, K=2]
      >>> b, u = bj.evidence.dempster_fold(beliefs, jnp.array([0.5, 0.5, 0.5]))
      >>> [round(x, 4) for x in b.tolist()], round(float(u), 4)
      ([0.4, 0.4], 0.2)
    """
    fused_b, fused_u = beliefs[0], uncertainties[0]
    for s in range(1, beliefs.shape[0]):
        fused_b, fused_u = dempster_combine(fused_b, fused_u, beliefs[s], uncertainties[s])
    return fused_b, fused_u


def simple_supports_on_sources(beliefs: Array) -> Array:
    """Belief vectors of simple support opinions on the frame of sources.

    Source ``s`` commits ``beliefs[s]`` to its own singleton ``{s}``: its vector over the
    ``K = S`` singletons is ``beliefs[s] * onehot(s)``. The result is ``[S, S, ...]``; it is
    meant for checking :func:`fuse_simple_supports` against :func:`dempster_fold`, not for
    the calibration itself, which never builds it.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> bj.evidence.simple_supports_on_sources(jnp.array([0.5, 0.25])).tolist()
      [[0.5, 0.0], [0.0, 0.25]]
    """
    num_sources = beliefs.shape[0]
    onehot = jnp.eye(num_sources, dtype=beliefs.dtype).reshape(
        (num_sources, num_sources) + (1,) * (beliefs.ndim - 1)
    )
    return beliefs[:, None] * onehot


def fuse_simple_supports(e: Array, prior_weight: float = 1.0) -> tuple[Array, Array]:
    """Closed form of :func:`dempster_fold` for simple support opinions.

    Folding the reduced Dempster rule over opinions ``b_s = e_s / (e_s + W)``,
    ``u_s = W / (e_s + W)`` on distinct singletons leaves, on ``{s}``, the unnormalised
    mass ``b_s prod_{t != s} u_t`` and on ``Theta`` the mass ``prod_t u_t``; dividing both
    by ``prod_t u_t`` (and using ``b_s / u_s = e_s / W``) gives

        m({s})   = e_s / (W + sum_t e_t)
        m(Theta) = W / (W + sum_t e_t)

    This equals :func:`dempster_fold` of :func:`simple_supports_on_sources` exactly,
    costs ``O(S)`` per coordinate, and stays finite for any
    evidence (the fold divides by ``1 - C``, which underflows when beliefs approach 1).

    Args:
      e: ``[S, ...]`` non-negative evidence (0 for vacuous sources).
      prior_weight: ``W > 0``.

    Returns:
      ``(m, m_theta)``: ``[S, ...]`` fused singleton masses ``m({s})`` and ``[...]`` the
      fused frame mass ``m(Theta)``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> e = jnp.array([1.0, 3.0])
      >>> m, m_theta = bj.evidence.fuse_simple_supports(e)
      >>> [round(x, 4) for x in m.tolist()], round(float(m_theta), 4)
      ([0.2, 0.6], 0.2)
      >>> b, u = bj.evidence.simple_support_opinion(e)
      >>> fb, fu = bj.evidence.dempster_fold(bj.evidence.simple_supports_on_sources(b), u)
      >>> bool(jnp.allclose(fb, m)), bool(jnp.allclose(fu, m_theta))
      (True, True)
    """
    validation.check_number("fuse_simple_supports", "prior_weight", prior_weight, strict=True)
    total = prior_weight + sum_over_sources(e)
    return e / total, prior_weight / total


def fuse_log_simple_supports(log_e: Array, prior_weight: float = 1.0) -> tuple[Array, Array]:
    """:func:`fuse_simple_supports` from log-evidence (:func:`log_evidence`), overflow-free.

    With ``c = max(log W, max_t log e_t)``:

        m({s})   = exp(log e_s - c) / (exp(log W - c) + sum_t exp(log e_t - c))
        m(Theta) = exp(log W - c)   / (exp(log W - c) + sum_t exp(log e_t - c))

    the same masses as ``e_s / (W + sum_t e_t)`` and ``W / (W + sum_t e_t)``; every
    exponent is <= 0 and the denominator >= 1, so nothing overflows.

    Args:
      log_e: ``[S, ...]`` log-evidence (``-inf`` for vacuous sources).
      prior_weight: ``W > 0``.

    Returns:
      ``(m, m_theta)``: ``[S, ...]`` and ``[...]``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> m, m_theta = bj.evidence.fuse_log_simple_supports(jnp.log(jnp.array([1.0, 3.0])))
      >>> [round(x, 4) for x in m.tolist()], round(float(m_theta), 4)
      ([0.2, 0.6], 0.2)
    """
    validation.check_number(
        "fuse_log_simple_supports", "prior_weight", prior_weight, strict=True, finite=True
    )
    log_w = log_of(prior_weight, log_e.dtype)
    top = jnp.maximum(_max_over_sources(log_e), log_w)
    supports = jnp.exp(log_e - top)
    theta = jnp.exp(log_w - top)
    total = theta + sum_over_sources(supports)
    return supports / total, theta / total


def pignistic_weights(m: Array, m_theta: Array, touched: Array) -> Array:
    """Pignistic source weights ``w[s, d] = m_d({s}) + m_d(Theta) / |T_d|`` on ``T_d``.

    They sum to 1 over the sources touching ``d`` and are 0 elsewhere (all 0 where no
    source touches ``d``).

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> m, m_theta = jnp.array([0.2, 0.6]), jnp.array(0.2)
      >>> w = bj.evidence.pignistic_weights(m, m_theta, jnp.array([True, True]))
      >>> [round(x, 4) for x in w.tolist()]
      [0.3, 0.7]
    """
    count = _count(touched, m.dtype)
    share = m_theta / jnp.maximum(count, 1)
    return jnp.where(touched, m + share, 0.0)


def dirichlet_opinion(e: Array) -> tuple[Array, Array]:
    """Opinion of each source over a frame of ``K`` coordinates (a Dirichlet).

    For source ``s`` the frame is every coordinate of ``e[s]`` (``K = e[s].size``):
    ``alpha = e + 1``, ``S_s = sum alpha = sum_d e[s, d] + K``, ``b[s, d] = e[s, d] / S_s``,
    ``u_s = K / S_s``. No evidence gives the vacuous opinion ``b = 0, u = 1``.

    Args:
      e: ``[S, ...]`` non-negative evidence.

    Returns:
      ``(b, u)``: ``b`` shaped like ``e``; ``u`` shaped ``[S, 1, ...]`` (frame axes kept as
      size 1, so it broadcasts against ``b``).

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> b, u = bj.evidence.dirichlet_opinion(jnp.array([[2.0, 0.0], [0.0, 0.0]]))
      >>> b.tolist(), u.tolist()
      ([[0.5, 0.0], [0.0, 0.0]], [[0.5], [1.0]])
    """
    frame_axes = tuple(range(1, e.ndim))
    frame_size = e[0].size
    strength = jnp.sum(e, axis=frame_axes, keepdims=True) + frame_size
    return e / strength, frame_size / strength


def dirichlet_opinion_from_log(log_e: Array, *, in_logs: bool = False) -> tuple[Array, Array]:
    """:func:`dirichlet_opinion` from log-evidence (:func:`log_evidence`), overflow-free.

    With ``K`` the frame size, ``log Z_s = logsumexp(log e[s, :], log K)`` (the strength
    ``sum_d e[s, d] + K``): ``log b[s, d] = log e[s, d] - log Z_s``, ``log u_s = log K -
    log Z_s``. ``in_logs=True`` returns these logarithms, which stay finite where ``b`` or
    ``u`` underflow float32 (sharp evidence); otherwise their exponentials.

    Args:
      log_e: ``[S, ...]`` log-evidence.
      in_logs: return ``(log b, log u)`` instead of ``(b, u)``.

    Returns:
      ``(b, u)`` as :func:`dirichlet_opinion` (or their logarithms).

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> b, u = bj.evidence.dirichlet_opinion_from_log(jnp.log(jnp.array([[2.0, 0.0]])))
      >>> [round(x, 6) for x in b[0].tolist()], round(float(u[0, 0]), 6)
      ([0.5, 0.0], 0.5)
    """
    frame_axes = tuple(range(1, log_e.ndim))
    log_k = jnp.log(jnp.asarray(log_e[0].size, log_e.dtype))
    log_z = jnp.logaddexp(jax.nn.logsumexp(log_e, axis=frame_axes, keepdims=True), log_k)
    log_b, log_u = log_e - log_z, log_k - log_z
    return (log_b, log_u) if in_logs else (jnp.exp(log_b), jnp.exp(log_u))


def belief_shares(beliefs: Array, uncertainties: Array) -> Array:
    """Each source's share of the fused (unnormalised) Dempster belief on a coordinate.

    Folding the reduced Dempster rule over ``S`` opinions ``(b_s, u_s)`` on a shared frame
    puts, on singleton ``d``, the unnormalised mass
    ``sum_{A != {}} prod_{s in A} b_s[d] prod_{s not in A} u_s`` (``A`` the sources that
    commit to ``d``). Splitting each term equally among the sources in ``A`` gives source
    ``s`` the share::

        share_s[d] = sum_{A containing s} (1/|A|) prod_{t in A} b_t[d] prod_{t not in A} u_t
                   = b_s[d] * integral_0^1 prod_{t != s} (u_t + x b_t[d]) dx,

    using ``1/|A| = integral_0^1 x**(|A|-1) dx``. The polynomial in ``x`` is expanded
    exactly, source by source, so the cost is ``O(S**2)`` per coordinate and memory
    ``O(S)`` arrays. Shares sum to the fused belief before normalisation by ``1 - C``.

    Args:
      beliefs: ``[S, ...]`` per-source belief on each coordinate.
      uncertainties: ``[S, ...]`` per-source uncertainty, broadcastable to ``beliefs``.

    Returns:
      ``[S, ...]`` non-negative shares.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> beliefs = jnp.array([[0.5], [0.5]])
      >>> shares = bj.evidence.belief_shares(beliefs, jnp.array([[0.5], [0.5]]))
      >>> shares[:, 0].tolist()  # b1 u2 + b1 b2 / 2 each: symmetric sources, equal shares
      [0.375, 0.375]
    """
    uncertainties = jnp.broadcast_to(uncertainties, beliefs.shape)
    shares = []
    for s in range(beliefs.shape[0]):
        # Coefficients c_k of prod_{t != s} (u_t + x b_t) = sum_k c_k x**k.
        coeffs = [jnp.ones_like(beliefs[0])]
        for t in (t for t in range(beliefs.shape[0]) if t != s):
            nxt = [coeffs[0] * uncertainties[t]]
            for k in range(1, len(coeffs)):
                nxt.append(coeffs[k] * uncertainties[t] + coeffs[k - 1] * beliefs[t])
            nxt.append(coeffs[-1] * beliefs[t])
            coeffs = nxt
        integral = sum(c / (k + 1) for k, c in enumerate(coeffs))
        shares.append(beliefs[s] * integral)
    return jnp.stack(shares)
