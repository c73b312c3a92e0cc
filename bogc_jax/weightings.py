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
    used: the Dirichlet's prior weight is the frame size.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> lam = jnp.array([[3.0, 1.0], [1.0, 1.0]])
      >>> w, u = bj.weightings.dimension_frame(lam, jnp.ones((2, 2), bool))
      >>> [[round(x, 3) for x in row] for row in w.tolist()]
      [[0.711, 0.5], [0.289, 0.5]]
    """
    del prior_weight
    log_e = ev.log_evidence(lam, touched, kappa, gamma)
    b, u = ev.dirichlet_opinion_from_log(log_e)
    shares = ev.belief_shares(b, u)
    total = sum_over_sources(shares)
    uniform_weights = touched / jnp.maximum(_num_touching(touched, lam.dtype), 1)
    weights = jnp.where(total > 0, shares / jnp.where(total > 0, total, 1), uniform_weights)
    flat_b = jnp.reshape(b, (b.shape[0], -1))
    _, uncertainty = ev.dempster_fold(flat_b, jnp.reshape(u, (u.shape[0],)))
    return weights, uncertainty


WEIGHTINGS: Mapping[str, Weighting] = MappingProxyType(
    {
        "dempster": dempster,
        "precision": precision,
        "dimension_frame": dimension_frame,
        "sum": uniform,
    }
)
"""Every reading of :func:`bogc_jax.bogc`, by its ``aggregation`` name."""
