"""Moments of a head's loss gradient with respect to the representation, per example.

A head with parameters ``theta ~ N(mean, Lambda^-1)`` (:mod:`bogc_jax.head_posterior`)
makes the gradient of its training loss with respect to the representation ``h`` a random
vector per example. Training losses and their gradients (``W`` the weight rows):

* ``"softmax"``: cross-entropy; ``g = W^T (softmax(l) - onehot(y))`` (one slot);
* ``"sigmoid"``: binary cross-entropy per output; ``g_k = (sigmoid(l_k) - y_k) w_k``;
* ``"mse"``: squared error per output ``(l_k - y_k)**2``; ``g_k = 2 (l_k - y_k) w_k``.

With ``split_outputs`` (BayesAgg-MTL's convention) every output of a ``"sigmoid"`` or
``"mse"`` head is its own slot; otherwise the outputs' gradients are summed into one. Every
function returns :class:`GradMoments` ``[B, slots, d]``: the per-example mean and
(population, ``ddof = 0``) variance of each coordinate of ``g``.

Three ways to the moments:

* :func:`mse_moments`: exact, in closed form (diagonal only: ``O(B K d)`` for the diagonal
  precision, plus one ``d x d`` product for the full one; never a ``[B, K, d, d]`` array);
* :func:`monte_carlo_moments`: ``S`` posterior draws, ``vmap`` over draws and examples,
  streamed in chunks of draws with a ``lax.scan`` that merges per-chunk means and squared
  deviations (Chan et al.'s pairwise update): memory ``O(chunk B slots d)``, never
  ``[S, B, slots, d]``; accepts explicit ``draws`` for testing;
* :func:`linearized_moments`: the delta method for the classifiers under a diagonal
  posterior, in ``O(B K d)``: the mean is the gradient at the posterior mean, the variance
  that of the first-order expansion in the parameter noise ``E``
  (``g ~ g(mu) + E^T r + mu^T G E x``).

References:
  Achituve et al., Bayesian Uncertainty for Gradient Aggregation in Multi-Task Learning,
  ICML 2024 (the moments, Monte Carlo for classification, closed form for regression).
  Chan, Golub, LeVeque, Updating formulae and a pairwise algorithm for computing sample
  variances, 1979.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bogc_jax import _moments
from bogc_jax import head_posterior as hp

Array = jax.Array


class GradMoments(NamedTuple):
    """Per-example moments of a head's representation gradient.

    Attributes:
      mean: ``[B, slots, d]``.
      var: ``[B, slots, d]`` population variance (``ddof = 0``), not clamped.
    """

    mean: Array
    var: Array


def _split(theta: Array, loss: str) -> tuple[Array, Array | None]:
    if loss == "mse":
        return theta, None
    return theta[:, :-1], theta[:, -1]


def input_gradients(
    loss: str,
    theta: Array,
    h: Array,
    y: Array,
    bias: Array | None = None,
    split_outputs: bool = True,
) -> Array:
    """Per-example gradients of the head's training loss w.r.t. ``h``: ``[B, slots, d]``.

    Args:
      loss: ``"softmax"``, ``"sigmoid"`` or ``"mse"``.
      theta: ``[K, d + 1]`` rows of ``[W | b]`` (``[K, d]`` for ``"mse"``).
      h: ``[B, d]``.
      y: labels ``[B]`` or targets ``[B, K]``.
      bias: ``"mse"`` only: the bias ``[K]`` (default 0).
      split_outputs: one slot per output for ``"sigmoid"``/``"mse"``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> theta = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # W = I, b = 0
      >>> g = bj.representation_moments.input_gradients("softmax", theta, jnp.zeros((1, 2)), jnp.array([0]))
      >>> g.tolist()
      [[[-0.5, 0.5]]]
    """
    weight, b = _split(theta, loss)
    logits = h @ weight.T + (b if b is not None else (0.0 if bias is None else bias))
    r, _ = hp.residual(loss, logits, y)
    if loss == "mse":
        r = 2 * r
    if loss == "softmax" or not split_outputs:
        return (r @ weight)[:, None, :]
    return r[:, :, None] * weight[None]


def _merge(a, b):
    """Chan's pairwise merge of ``(count, mean, m2)`` triples (:func:`_moments.merge_leaf`)."""
    return (a[0] + b[0], *_moments.merge_leaf(*a, *b))


def _sum_over_draws(x: Array) -> Array:
    """``sum_s x[s]`` as a matrix-vector product (XLA:CPU reduces a short leading axis slowly)."""
    flat = x.reshape(x.shape[0], -1)
    return (jnp.ones((x.shape[0],), x.dtype) @ flat).reshape(x.shape[1:])


def _chunk_stats(grads_fn, draws):
    g = jax.vmap(grads_fn)(draws)  # [c, B, slots, d]
    count = draws.shape[0]
    mean = _sum_over_draws(g) / count
    m2 = _sum_over_draws(jnp.square(g - mean))
    return jnp.asarray(count, g.dtype), mean, m2


def monte_carlo_moments(
    loss: str,
    h: Array,
    y: Array,
    *,
    posterior: hp.HeadPosterior | None = None,
    form: str = "diag",
    key: Array | None = None,
    num_samples: int | None = None,
    draws: Array | None = None,
    chunk_size: int = 64,
    bias: Array | None = None,
    split_outputs: bool = True,
) -> GradMoments:
    """Monte Carlo moments of the representation gradient, streamed in chunks of draws.

    For draws ``theta_s`` (``s = 1..S``) and ``g_s = g(theta_s; h_n)`` (see
    :func:`input_gradients`):

        mean = (1/S) sum_s g_s,    var = (1/S) sum_s (g_s - mean)**2

    accumulated chunk by chunk (a chunk's mean and sum of squared deviations, merged with
    Chan's pairwise update).

    Args:
      loss: ``"softmax"``, ``"sigmoid"`` or ``"mse"``.
      h: ``[B, d]`` the representation.
      y: labels ``[B]`` or targets ``[B, K]``.
      posterior: the head posterior; with ``key`` and ``num_samples``, the draws are made
        chunk by chunk (``jax.random.fold_in(key, chunk)``).
      form: the posterior's form (``"full"`` or ``"diag"``).
      key: a PRNG key (with ``posterior``).
      num_samples: ``S`` (with ``posterior``).
      draws: ``[S, K, D]`` explicit draws instead (``posterior``/``key`` then unused).
      chunk_size: draws per chunk; memory is ``O(chunk_size B slots d)``.
      bias: ``"mse"`` only, the bias ``[K]``.
      split_outputs: as in :func:`input_gradients`.

    Returns:
      :class:`GradMoments` ``[B, slots, d]``.

    Example:
      >>> import jax, jax.numpy as jnp, bogc_jax as bj
      >>> h = jax.random.normal(jax.random.key(0), (5, 3))
      >>> prior = bj.head_posterior.isotropic_prior("softmax", "diag", 4, 4, 0.1)
      >>> m = bj.representation_moments.monte_carlo_moments(
      ...     "softmax", h, jnp.arange(5) % 4, posterior=prior, key=jax.random.key(1),
      ...     num_samples=256, chunk_size=64)
      >>> m.mean.shape, bool((m.var > 0).all())
      ((5, 1, 3), True)
    """
    grads_fn = lambda th: input_gradients(loss, th, h, y, bias, split_outputs)
    if chunk_size < 1:
        raise ValueError(f"monte_carlo_moments: chunk_size must be >= 1; got {chunk_size}.")
    if draws is not None:
        total = draws.shape[0]
        make = lambda start, size, index: jax.lax.dynamic_slice_in_dim(draws, start, size, 0)
    else:
        if posterior is None or key is None or num_samples is None:
            raise ValueError(
                "monte_carlo_moments: pass draws=, or posterior= with key= and num_samples=."
            )
        total = int(num_samples)
        chol = hp.precision_cholesky(loss, form, posterior.precision)
        shape = posterior.mean.shape

        def make(start, size, index):
            z = jax.random.normal(
                jax.random.fold_in(key, index), (size,) + shape, posterior.mean.dtype
            )
            # Materialise the draws once: XLA would otherwise fuse the generator into
            # each of their uses and draw them again.
            return jax.lax.optimization_barrier(hp.draws_from_noise(loss, form, posterior, chol, z))

    if total < 1:
        raise ValueError(f"monte_carlo_moments: need at least one draw; got {total}.")
    chunk = min(chunk_size, total)
    num_full, rest = divmod(total, chunk)
    first = _chunk_stats(grads_fn, make(0, chunk, 0))
    if num_full > 1:

        def body(acc, index):
            return _merge(acc, _chunk_stats(grads_fn, make(index * chunk, chunk, index))), None

        first, _ = jax.lax.scan(body, first, jnp.arange(1, num_full))
    if rest:
        first = _merge(first, _chunk_stats(grads_fn, make(num_full * chunk, rest, num_full)))
    count, mean, m2 = first
    return GradMoments(mean, m2 / count)


def _per_output_slots(mean: Array, var: Array, split_outputs: bool) -> GradMoments:
    """``[B, K, d]`` moments of independent outputs: one slot each, or summed into one."""
    if not split_outputs:
        return GradMoments(
            jnp.sum(mean, axis=1, keepdims=True), jnp.sum(var, axis=1, keepdims=True)
        )
    return GradMoments(mean, var)


def mse_moments(
    posterior: hp.HeadPosterior,
    h: Array,
    y: Array,
    *,
    form: str = "diag",
    bias: Array | None = None,
    split_outputs: bool = True,
) -> GradMoments:
    """Exact moments of ``g_k = 2 (w_k . h + b_k - y_k) w_k`` under ``w_k ~ N(mu_k, Sigma_k)``.

    With ``m = mu_k . h + b_k - y_k``, ``c = Sigma_k h``, ``v = h^T Sigma_k h`` (Gaussian
    fourth moments; the outputs are independent a posteriori):

        E[g_j]   = 2 (m mu_j + c_j)
        Var[g_j] = 4 (m**2 Sigma_jj + v mu_j**2 + v Sigma_jj + 2 m mu_j c_j + c_j**2)

    Only diagonals are formed: ``O(B K d)`` (plus ``Sigma = Lambda^-1``, ``d x d``, for
    the full form).

    Args:
      posterior: ``"mse"`` :class:`~bogc_jax.head_posterior.HeadPosterior` (mean ``[K, d]``).
      h: ``[B, d]``.
      y: ``[B, K]`` targets.
      form: ``"full"`` (one shared ``[d, d]`` precision) or ``"diag"`` (``[K, d]``).
      bias: ``[K]`` the head's bias (default 0).
      split_outputs: one slot per output (else their sum, variances added).

    Returns:
      :class:`GradMoments` ``[B, slots, d]``.

    Example:
      >>> import jax, jax.numpy as jnp, bogc_jax as bj
      >>> prior = bj.head_posterior.isotropic_prior("mse", "full", 2, 3, 0.5)
      >>> m = bj.representation_moments.mse_moments(prior, jnp.ones((4, 3)), jnp.ones((4, 2)), form="full")
      >>> m.mean.shape, round(float(m.var[0, 0, 0]), 4)
      ((4, 2, 3), 6.0)
    """
    mu = posterior.mean  # [K, d]
    m = h @ mu.T - y.astype(h.dtype)  # [B, K]
    if bias is not None:
        m = m + bias
    if form == "full":
        sigma = jnp.linalg.inv(posterior.precision)  # [d, d], shared by the outputs
        c = (h @ sigma)[:, None, :]  # [B, 1, d]
        v = jnp.sum(c[:, 0] * h, axis=-1)[:, None, None]  # [B, 1, 1]
        s_jj = jnp.diagonal(sigma)[None, None, :]  # [1, 1, d]
    else:
        s2 = 1.0 / posterior.precision  # [K, d]
        c = h[:, None, :] * s2[None]  # [B, K, d]
        v = (jnp.square(h) @ s2.T)[:, :, None]  # [B, K, 1]
        s_jj = s2[None]
    m = m[:, :, None]
    mean = 2 * (m * mu[None] + c)
    var = 4 * (
        jnp.square(m) * s_jj
        + v * jnp.square(mu[None])
        + v * s_jj
        + 2 * m * mu[None] * c
        + jnp.square(c)
    )
    return _per_output_slots(mean, jnp.maximum(var, 0.0), split_outputs)


def linearized_moments(
    loss: str,
    posterior: hp.HeadPosterior,
    h: Array,
    y: Array,
    *,
    split_outputs: bool = True,
) -> GradMoments:
    """Delta-method moments for a classifier under a diagonal posterior, ``O(B K d)``.

    With ``x = [h; 1]``, ``sigma2 = 1 / Lambda`` (``[K, d + 1]``), ``W = mu[:, :d]``, ``p``
    and ``r`` the probabilities and residual at the posterior mean, ``G = d r / d l`` and
    ``a_jc = (W^T G)_jc``, the linear terms ``E^T r + W^T G E x`` give

        mean_j = (W^T r)_j
        var_j  = sum_c [a_jc**2 s2_c + sigma2_cj r_c**2 + 2 h_j sigma2_cj r_c a_jc],
        s2_c   = sum_k sigma2_ck x_k**2

    For ``"softmax"`` ``a_jc = p_c (W_cj - (W^T p)_j)``; for ``"sigmoid"``
    ``a_jc = p_c (1 - p_c) W_cj`` and every output is its own slot (or their sum). Every sum
    over classes is a ``[B, K] @ [K, d]`` product: no ``[B, K, d]`` array for
    ``"softmax"``.

    Args:
      loss: ``"softmax"`` or ``"sigmoid"``.
      posterior: a ``"diag"`` :class:`~bogc_jax.head_posterior.HeadPosterior`.
      h: ``[B, d]``.
      y: labels ``[B]`` or targets ``[B, K]``.
      split_outputs: one slot per output for ``"sigmoid"``.

    Returns:
      :class:`GradMoments` ``[B, slots, d]``.

    Example:
      >>> import jax, jax.numpy as jnp, bogc_jax as bj
      >>> h = jax.random.normal(jax.random.key(0), (5, 3))
      >>> prior = bj.head_posterior.isotropic_prior("softmax", "diag", 4, 4, 0.1)
      >>> m = bj.representation_moments.linearized_moments("softmax", prior, h, jnp.arange(5) % 4)
      >>> m.var.shape
      (5, 1, 3)
    """
    if loss not in ("softmax", "sigmoid"):
        raise ValueError(
            f"linearized_moments: loss must be 'softmax' or 'sigmoid'; got {loss!r} "
            "('mse' has exact moments: mse_moments)."
        )
    if posterior.precision.shape != posterior.mean.shape:
        raise ValueError(
            "linearized_moments: needs a 'diag' posterior (precision shaped like the mean "
            f"{posterior.mean.shape}); got precision {posterior.precision.shape}. Use "
            "monte_carlo_moments for the full form."
        )
    x = hp.design(h, loss)
    sigma2 = 1.0 / posterior.precision
    weight, s2w = posterior.mean[:, :-1], sigma2[:, :-1]
    r, p = hp.residual(loss, x @ posterior.mean.T, y)
    s2 = jnp.square(x) @ sigma2.T  # [B, K]
    if loss == "softmax":
        mean = r @ weight
        pbar = p @ weight  # (W^T p)_j
        w = jnp.square(p) * s2
        t1 = (
            w @ jnp.square(weight)
            - 2 * pbar * (w @ weight)
            + jnp.square(pbar) * jnp.sum(w, -1, keepdims=True)
        )
        t2 = jnp.square(r) @ s2w
        rp = r * p
        t3 = 2 * h * (rp @ (s2w * weight) - pbar * (rp @ s2w))
        return GradMoments(mean[:, None], jnp.maximum(t1 + t2 + t3, 0.0)[:, None])
    # sigmoid: p holds p (1 - p); every output is independent.
    a = p[:, :, None] * weight[None]  # [B, K, d]
    mean = r[:, :, None] * weight[None]
    var = jnp.square(a) * s2[:, :, None] + s2w[None] * (
        jnp.square(r)[:, :, None] + 2 * h[:, None, :] * r[:, :, None] * a
    )
    return _per_output_slots(mean, jnp.maximum(var, 0.0), split_outputs)
