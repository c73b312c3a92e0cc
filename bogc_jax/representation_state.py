"""The state of representation-space calibration: head posteriors and full-data sums.

Each head keeps the full-data posterior used as the prior of its batch posterior, and the
sums (GGN, gradient carried to any head, example count) from which the next full-data
posterior is formed (summed per epoch, or decayed per step). See
:func:`bogc_jax.representation_bogc`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bogc_jax import head_posterior as hp

Array = jax.Array


class HeadState(NamedTuple):
    """One head's posterior state.

    Attributes:
      prior_mean: ``[K, D]`` the full-data posterior's mean (0 before the first refresh).
      prior_precision: its precision in the form (``N(0, gamma I)``'s before).
      ggn_sum: the GGN summed since the last refresh (same form), possibly decayed.
      offset_sum: ``[K, D]`` ``sum_t (grad_t - ggn_t theta_t)``: each batch's gradient
        carried to any head by its GGN (``grad(theta) ~ grad_t + ggn_t (theta - theta_t)``).
      num_examples: ``[]`` examples accumulated (decayed for ``"ema"``).
    """

    prior_mean: Array
    prior_precision: Array
    ggn_sum: Array
    offset_sum: Array
    num_examples: Array


class RepresentationState(NamedTuple):
    """The method's state: an optax-style NamedTuple with fixed shapes and dtypes.

    Attributes:
      step: ``[]`` int32 steps taken.
      heads: one :class:`HeadState` per head.
      finite: ``[]`` bool, whether the latest step's calibration was finite (if not, its
        encoder cotangent fell back to the fixed-weight sum and the heads' state was kept).
      nonfinite_count: ``[]`` int32 such steps so far.
    """

    step: Array
    heads: tuple[HeadState, ...]
    finite: Array
    nonfinite_count: Array


def init_head(loss: str, form: str, prior_variance: float, kernel, bias) -> HeadState:
    """A head's state at the start: the prior ``N(0, gamma I)`` and empty sums."""
    del bias
    num_out = kernel.shape[1]
    dim = kernel.shape[0] + (0 if loss == "mse" else 1)
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    prior = hp.isotropic_prior(loss, form, num_out, dim, prior_variance, dtype)
    return HeadState(
        prior.mean,
        prior.precision,
        jnp.zeros_like(prior.precision),
        jnp.zeros((num_out, dim), dtype),
        jnp.zeros((), dtype),
    )


def posterior_from_sums(
    loss: str, form: str, prior_variance: float, theta: Array, state: HeadState
) -> hp.HeadPosterior:
    """The full-data posterior from the sums, at the current head ``theta``.

    grad(theta) = offset_sum + ggn_sum theta,   then a Newton step from N(0, gamma I)
    """
    num_out, dim = theta.shape
    prior = hp.isotropic_prior(loss, form, num_out, dim, prior_variance, theta.dtype)
    grad = state.offset_sum + hp.precision_matvec(loss, form, state.ggn_sum, theta)
    stats = hp.CurvatureStats(state.ggn_sum, grad, state.num_examples)
    return hp.newton_posterior(loss, form, theta, stats, prior)


def refresh_head(
    loss: str, form: str, prior_variance: float, keep_sums: bool, theta, state: HeadState, when
) -> HeadState:
    """At ``when``: prior <- the full-data posterior of the sums (sums reset unless kept)."""

    def refreshed(s):
        post = posterior_from_sums(loss, form, prior_variance, theta, s)
        if keep_sums:
            return s._replace(prior_mean=post.mean, prior_precision=post.precision)
        zero = jax.tree.map(jnp.zeros_like, (s.ggn_sum, s.offset_sum, s.num_examples))
        return HeadState(post.mean, post.precision, *zero)

    return jax.lax.cond(when, refreshed, lambda s: s, state)


def accumulate(
    loss: str, form: str, decay: float, theta, state: HeadState, stats: hp.CurvatureStats
) -> HeadState:
    """Add a batch's sums at ``theta`` (after decaying the old ones by ``decay``).

    offset_t = grad_t - ggn_t theta_t    (so that grad(theta) ~ offset_t + ggn_t theta)
    """
    offset = stats.grad - hp.precision_matvec(loss, form, stats.ggn, theta)
    return state._replace(
        ggn_sum=decay * state.ggn_sum + stats.ggn,
        offset_sum=decay * state.offset_sum + offset,
        num_examples=decay * state.num_examples + stats.num_examples,
    )
