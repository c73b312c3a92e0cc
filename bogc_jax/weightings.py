"""BOGC's readings as a table of weighting functions: precisions in, source weights out.

A weighting takes, for any arrays with a leading source axis (``[S, ...]``), the relative
precisions ``lam`` of :func:`bogc_jax.evidence.precision` and the booleans ``touched``
(``T_d``: the sources reaching coordinate ``d``), and returns ``(w, u)``: weights
``w[s, d] >= 0`` that sum to 1 over ``T_d`` (0 elsewhere and where no source touches
``d``), and a scalar uncertainty of the fusion (0 for readings without one).

=====================  =================================================  ===========
aggregation            ``w[s, d]`` on ``T_d``                             ``u``
=====================  =================================================  ===========
``"dempster"``         ``m_d({s}) + m_d(Theta) / |T_d|`` (pignistic)       mean ``m(Theta)``
``"precision"``        ``lam[s, d] / sum_{T_d} lam``                       0
``"dimension_frame"``  share of the fused Dirichlet belief on ``d``       fused ``u``
``"sum"``              ``1 / |T_d|`` (the fixed-weight sum)                0
=====================  =================================================  ===========

Equal precisions (or ``kappa = 0`` or ``gamma = 0``) give ``1 / |T_d|`` in every reading.
A new reading is one function with this signature and one entry of :data:`WEIGHTINGS`;
:func:`bogc_jax.coordinate_weights` and :func:`bogc_jax.bogc` look it up by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol

import jax
import jax.numpy as jnp

from bogc_jax import evidence as ev
from bogc_jax._sources import sum_over_sources


class Weighting(Protocol):
    """``(lam, touched, *, kappa, gamma, prior_weight) -> (weights, uncertainty)``."""

    def __call__(
        self,
        lam: jax.Array,
        touched: jax.Array,
        *,
        kappa: float = 1.0,
        gamma: float = 1.0,
        prior_weight: float = 1.0,
    ) -> tuple[jax.Array, jax.Array]: ...


def _num_touching(touched: jax.Array, dtype) -> jax.Array:
    return sum_over_sources(touched.astype(dtype))


def uniform(lam, touched, *, kappa=1.0, gamma=1.0, prior_weight=1.0):
    """The fixed-weight sum: ``w[s, d] = 1 / |T_d|`` on ``T_d``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> touched = jnp.array([[True, True], [True, False]])
      >>> w, u = bj.weightings.uniform(jnp.ones((2, 2)), touched)
      >>> w.tolist(), float(u)
      ([[0.5, 1.0], [0.5, 0.0]], 0.0)
    """
    del kappa, gamma, prior_weight
    count = _num_touching(touched, lam.dtype)
    return jnp.where(touched, 1.0 / jnp.maximum(count, 1), 0.0), jnp.zeros((), lam.dtype)


def precision(lam, touched, *, kappa=1.0, gamma=1.0, prior_weight=1.0):
    """A product of Gaussian experts: ``w[s, d] = lam[s, d] / sum_{t in T_d} lam[t, d]``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> w, u = bj.weightings.precision(jnp.array([[3.0], [1.0]]), jnp.ones((2, 1), bool))
      >>> w[:, 0].tolist()
      [0.75, 0.25]
    """
    del kappa, gamma, prior_weight
    count = _num_touching(touched, lam.dtype)
    lam = jnp.where(touched, lam, 0.0)
    weights = lam / jnp.where(count > 0, sum_over_sources(lam), 1)
    return weights, jnp.zeros((), lam.dtype)


def dempster(lam, touched, *, kappa=1.0, gamma=1.0, prior_weight=1.0):
    """Pignistic weights of the reduced Dempster fusion of simple support opinions::

        log e = log_evidence(lam, touched, kappa, gamma)
        m, m_theta = fuse_log_simple_supports(log e, W)
        w[s, d] = m_d({s}) + m_d(Theta) / |T_d|,   u = mean over touched d of m_d(Theta)

    computed in log space, so no evidence overflows (any ``gamma``).

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> w, u = bj.weightings.dempster(jnp.array([[3.0], [1.0]]), jnp.ones((2, 1), bool))
      >>> [round(x, 4) for x in w[:, 0].tolist()], round(float(u), 4)
      ([0.6667, 0.3333], 0.3333)
    """
    log_e = ev.log_evidence(lam, touched, kappa, gamma)
    m, m_theta = ev.fuse_log_simple_supports(log_e, prior_weight)
    weights = ev.pignistic_weights(m, m_theta, touched)
    any_touch = _num_touching(touched, lam.dtype) > 0
    uncertainty = jnp.sum(jnp.where(any_touch, m_theta, 0)) / jnp.maximum(jnp.sum(any_touch), 1)
    return weights, uncertainty


def dimension_frame(lam, touched, *, kappa=1.0, gamma=1.0, prior_weight=1.0):
    """Shares of the fused belief when each source holds one Dirichlet over all coordinates.

        b[s], u_s = dirichlet_opinion_from_log(log_evidence(lam, touched, kappa, gamma))
        w[s, d]   = belief_shares(b, u)[s, d] / sum_{t in T_d} belief_shares(b, u)[t, d]
        u         = the fused frame mass of dempster_fold(b, u)

    (``1 / |T_d|`` where no touching source has belief on ``d``). ``prior_weight`` is not
    used: the Dirichlet's prior weight is the frame size. Sharp evidence makes ``u_s``
    vanishingly small beside ``b[s]`` (``e**-200`` at ``gamma = 100``), below float32's
    range, so both parts run in log space: the shares at ``d`` do not change when the pair
    ``(b[s, d], u_s)`` of one source is scaled, so each pair is scaled to a largest entry
    of 1 (:func:`_coordinate_shares`), and the fold carries logarithms
    (:func:`_log_fused_frame_mass`). The weights and ``u`` stay finite for every ``gamma``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> lam = jnp.array([[3.0, 1.0], [1.0, 1.0]])
      >>> w, u = bj.weightings.dimension_frame(lam, jnp.ones((2, 2), bool))
      >>> [[round(x, 3) for x in row] for row in w.tolist()]
      [[0.711, 0.5], [0.289, 0.5]]
    """
    del prior_weight
    log_e = ev.log_evidence(lam, touched, kappa, gamma)
    log_b, log_u = ev.dirichlet_opinion_from_log(log_e, in_logs=True)
    weights = _coordinate_shares(log_b, jnp.broadcast_to(log_u, log_b.shape), touched)
    flat_log_b = jnp.reshape(log_b, (log_b.shape[0], -1))
    uncertainty = jnp.exp(_log_fused_frame_mass(flat_log_b, jnp.reshape(log_u, (-1,))))
    return weights, uncertainty


def _coordinate_shares(log_b, log_u, touched):
    """``belief_shares(b, u)`` normalised over the sources at each coordinate, from logs.

    At coordinate ``d`` each source's pair is divided by ``c = max(b[s, d], u_s)``, which
    leaves the normalised shares unchanged; the shares of the scaled pairs cannot all
    vanish unless every scaled belief underflows, and then (every ``u`` being the larger
    entry, each factor ``u_t + x b_t`` is 1) the shares are proportional to the scaled
    beliefs: a softmax of ``log b[s, d] - log c``.
    """
    top = jnp.maximum(log_b, log_u)
    scaled_log_b = log_b - top
    shares = ev.belief_shares(jnp.exp(scaled_log_b), jnp.exp(log_u - top))
    total = sum_over_sources(shares)
    relative_log_b = jnp.where(touched, scaled_log_b, -jnp.inf)
    has_belief = jnp.isfinite(jnp.max(relative_log_b, axis=0))
    limit = jax.nn.softmax(jnp.where(has_belief, relative_log_b, 0.0), axis=0)
    uniform_weights = touched / jnp.maximum(_num_touching(touched, log_b.dtype), 1)
    fallback = jnp.where(has_belief, limit, uniform_weights)
    return jnp.where(total > 0, shares / jnp.where(total > 0, total, 1), fallback)


def _log_fused_frame_mass(log_b, log_u):
    """``log u`` of :func:`bogc_jax.evidence.dempster_fold` over ``[S, K]`` beliefs, in logs.

    Each step of the fold, ``b = b1 b2 + b1 u2 + b2 u1`` and ``u = u1 u2``, is normalised
    by their total ``sum_k b_k + u`` (which equals ``1 - C``), so no mass underflows.
    """
    fused_b, fused_u = log_b[0], log_u[0]
    for s in range(1, log_b.shape[0]):
        unnormalised_b = jnp.logaddexp(
            fused_b + log_b[s], jnp.logaddexp(fused_b + log_u[s], log_b[s] + fused_u)
        )
        unnormalised_u = fused_u + log_u[s]
        log_norm = jnp.logaddexp(jax.nn.logsumexp(unnormalised_b), unnormalised_u)
        fused_b, fused_u = unnormalised_b - log_norm, unnormalised_u - log_norm
    return fused_u


WEIGHTINGS: Mapping[str, Weighting] = MappingProxyType(
    {
        "dempster": dempster,
        "precision": precision,
        "dimension_frame": dimension_frame,
        "sum": uniform,
    }
)
"""Every reading of :func:`bogc_jax.bogc`, by its ``aggregation`` name."""
