"""Gaussian posteriors over a final linear layer: one Newton (Laplace) step from the head.

A linear head reads a representation ``h`` (``[B, d]``) and has ``K`` outputs. Its
parameters are the rows ``theta[k]`` of ``[W | b]`` (``[K, d + 1]``, the bias last) for
the classifiers and of ``W`` (``[K, d]``) for regression, whose bias is held at its current
value. Vectorised, they are class-major (row ``k`` contiguous). With the design vector
``x = [h; 1]`` (classifiers) or ``x = h`` (regression), logits ``l = theta x (+ b)`` and the
negative log-likelihood ``nll(l, y)``:

* ``"softmax"``: ``nll = -log softmax(l)[y]``, ``r = softmax(l) - onehot(y)``,
  ``G = diag(p) - p p^T``;
* ``"sigmoid"``: ``nll = sum_k BCE(l_k, y_k)``, ``r = sigmoid(l) - y``,
  ``G = diag(p (1 - p))`` (outputs independent);
* ``"mse"``: Gaussian with unit noise, ``nll = sum_k (l_k - y_k)**2 / 2``, ``r = l - y``,
  ``G = I`` (exact Bayesian linear regression).

With a Gaussian prior ``N(mu_0, Lambda_0^-1)`` the posterior is one Newton step from the
current ``theta`` (exact for ``"mse"``, whose likelihood is quadratic):

    a      = sum_n r_n x_n^T + Lambda_0 (theta - mu_0)          (gradient, [K, D])
    Lambda = sum_n G_n (x) x_n x_n^T + Lambda_0                  (GGN + prior)
    mean   = theta - Lambda^-1 a

Precision forms (``form=``), with ``D = d + 1`` (or ``d``):

* ``"full"``: exact. ``"softmax"``: a dense ``[K D, K D]`` matrix, Cholesky ``O((K D)^3)``,
  only for small heads. ``"sigmoid"``: ``K`` blocks ``[K, D, D]`` (exact: its GGN is block
  diagonal). ``"mse"``: one ``[D, D]`` matrix shared by the outputs (exact: ``G = I``).
* ``"diag"``: the diagonal of ``Lambda`` (``[K, D]``), ``O(B K D)`` per batch: the form
  that scales to wide representations with many classes.

Full-data posterior (BayesAgg-MTL's first stage): the same step from ``N(0, gamma I)`` on
stored features. Batch posterior (second stage): the same step on the batch with the
full-data posterior as the prior. The sums (:class:`CurvatureStats`) can be accumulated
over batches and devices before the step.

References:
  Achituve, Diamant, Netzer, Chechik, Fetaya. Bayesian Uncertainty for Gradient Aggregation
  in Multi-Task Learning. ICML 2024, arXiv 2402.04005.
  Immer, Korzepa, Bauer. Improving predictions of Bayesian neural nets via local
  linearization. AISTATS 2021 (the GGN Laplace step).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy import linalg

Array = jax.Array

LOSSES = ("softmax", "sigmoid", "mse")
FORMS = ("full", "diag")
# Above this many parameters a dense softmax precision (P x P) is refused.
MAX_FULL_SOFTMAX_PARAMS = 8192


class HeadPosterior(NamedTuple):
    """A Gaussian over a head's parameters, as mean and precision.

    Attributes:
      mean: ``[K, D]`` rows of ``[W | b]`` (or ``W`` for ``"mse"``).
      precision: ``"diag"``: ``[K, D]``. ``"full"``: ``[K D, K D]`` (``"softmax"``),
        ``[K, D, D]`` (``"sigmoid"``), ``[D, D]`` shared by the outputs (``"mse"``).
    """

    mean: Array
    precision: Array


class CurvatureStats(NamedTuple):
    """Sums over examples that a Newton step needs (they add over batches and devices).

    Attributes:
      ggn: the GGN ``sum_n G_n (x) x_n x_n^T`` in the precision's form.
      grad: ``[K, D]`` the summed negative log-likelihood gradient ``sum_n r_n x_n^T``.
      num_examples: ``[]`` the number of examples.
    """

    ggn: Array
    grad: Array
    num_examples: Array


def _check(loss: str, form: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}; got {loss!r}.")
    if form not in FORMS:
        raise ValueError(
            f"form must be one of {FORMS}; got {form!r}. Use 'diag' for wide heads, "
            "'full' for the exact (small) form."
        )


def design(h: Array, loss: str) -> Array:
    """The design vectors ``x``: ``[h, 1]`` for the classifiers, ``h`` for ``"mse"``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> bj.head_posterior.design(jnp.zeros((2, 3)), "softmax").shape
      (2, 4)
    """
    if loss == "mse":
        return h
    return jnp.concatenate([h, jnp.ones(h.shape[:-1] + (1,), h.dtype)], axis=-1)


def residual(loss: str, logits: Array, y: Array) -> tuple[Array, Array]:
    """``(r, g)``: ``d nll / d logits`` (``[B, K]``) and the GGN's output factor.

    ``g`` is ``p`` (``[B, K]``) for ``"softmax"`` (``G = diag(p) - p p^T``),
    ``p (1 - p)`` for ``"sigmoid"`` and ones for ``"mse"`` (``G = diag(g)``).

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> r, g = bj.head_posterior.residual("softmax", jnp.zeros((1, 2)), jnp.array([1]))
      >>> r.tolist(), g.tolist()
      ([[0.5, -0.5]], [[0.5, 0.5]])
    """
    if loss == "softmax":
        p = jax.nn.softmax(logits, axis=-1)
        return p - jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype), p
    if loss == "sigmoid":
        p = jax.nn.sigmoid(logits)
        return p - y.astype(logits.dtype), p * (1 - p)
    return logits - y.astype(logits.dtype), jnp.ones_like(logits)


def curvature_stats(
    loss: str, form: str, theta: Array, h: Array, y: Array, bias: Array | None = None
) -> CurvatureStats:
    """GGN and gradient sums of a head on a batch, linearised at ``theta``.

        grad = sum_n r_n x_n^T,   ggn = sum_n G_n (x) x_n x_n^T   (in ``form``)

    For ``"softmax"`` the full GGN is ``blockdiag_c(sum_n p_nc x_n x_n^T) - A^T A`` with
    ``A[n, (c, k)] = p_nc x_nk``: no ``[B, P, P]`` array. The diagonal form keeps
    ``sum_n G_n[c, c] x_nk**2``.

    Args:
      loss: ``"softmax"``, ``"sigmoid"`` or ``"mse"``.
      form: ``"full"`` or ``"diag"``.
      theta: ``[K, D]`` the head's rows (see the module docstring).
      h: ``[B, d]`` the representation.
      y: ``[B]`` integer labels (``"softmax"``) or ``[B, K]`` targets.
      bias: ``[K]`` the current bias of an ``"mse"`` head (ignored otherwise; default 0).

    Returns:
      A :class:`CurvatureStats`.

    Example:
      >>> import jax, jax.numpy as jnp, bogc_jax as bj
      >>> h = jax.random.normal(jax.random.key(0), (8, 3))
      >>> s = bj.head_posterior.curvature_stats("softmax", "full", jnp.zeros((4, 4)), h,
      ...                                        jnp.arange(8) % 4)
      >>> s.ggn.shape, s.grad.shape, int(s.num_examples)
      ((16, 16), (4, 4), 8)
    """
    _check(loss, form)
    x = design(h, loss)
    logits = x @ theta.T
    if loss == "mse" and bias is not None:
        logits = logits + bias
    r, g = residual(loss, logits, y)
    grad = r.T @ x
    count = jnp.asarray(x.shape[0], x.dtype)
    num_out, dim = theta.shape
    if form == "diag":
        if loss == "softmax":
            g = g * (1 - g)  # the diagonal of diag(p) - p p^T
        return CurvatureStats(g.T @ jnp.square(x), grad, count)
    if loss == "mse":
        return CurvatureStats(x.T @ x, grad, count)
    blocks = jnp.einsum("nc,nk,nl->ckl", g, x, x)  # [K, D, D]
    if loss == "sigmoid":
        return CurvatureStats(blocks, grad, count)
    eye = jnp.eye(num_out, dtype=x.dtype)
    block_diag = jnp.einsum("ckl,ce->ckel", blocks, eye).reshape(num_out * dim, num_out * dim)
    a = (g[:, :, None] * x[:, None, :]).reshape(x.shape[0], num_out * dim)
    return CurvatureStats(block_diag - a.T @ a, grad, count)


def isotropic_prior(
    loss: str, form: str, num_outputs: int, dim: int, prior_variance: float, dtype=jnp.float32
) -> HeadPosterior:
    """``N(0, gamma I)`` in the given form (``gamma = prior_variance``).

    Example:
      >>> import bogc_jax as bj
      >>> p = bj.head_posterior.isotropic_prior("sigmoid", "full", 3, 5, 0.5)
      >>> p.mean.shape, p.precision.shape, float(p.precision[0, 0, 0])
      ((3, 5), (3, 5, 5), 2.0)
    """
    _check(loss, form)
    if not prior_variance > 0:
        raise ValueError(
            f"prior_variance must be > 0 (the prior N(0, prior_variance I)); got {prior_variance}."
        )
    lam = 1.0 / prior_variance
    mean = jnp.zeros((num_outputs, dim), dtype)
    if form == "diag":
        return HeadPosterior(mean, jnp.full((num_outputs, dim), lam, dtype))
    if loss == "mse":
        return HeadPosterior(mean, lam * jnp.eye(dim, dtype=dtype))
    if loss == "sigmoid":
        return HeadPosterior(
            mean, jnp.broadcast_to(lam * jnp.eye(dim, dtype=dtype), (num_outputs, dim, dim))
        )
    size = num_outputs * dim
    if size > MAX_FULL_SOFTMAX_PARAMS:
        raise ValueError(
            f"form='full' for a softmax head with {size} parameters needs a dense "
            f"{size}x{size} precision (limit {MAX_FULL_SOFTMAX_PARAMS} parameters); use "
            "form='diag'."
        )
    return HeadPosterior(mean, lam * jnp.eye(size, dtype=dtype))


def precision_matvec(loss: str, form: str, precision: Array, v: Array) -> Array:
    """``Lambda vec(v)`` reshaped like ``v`` (``[K, D]``).

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> p = bj.head_posterior.isotropic_prior("sigmoid", "full", 2, 3, 0.5)
      >>> bj.head_posterior.precision_matvec("sigmoid", "full", p.precision, jnp.ones((2, 3))).tolist()
      [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    if form == "diag":
        return precision * v
    if loss == "mse":
        return v @ precision
    if loss == "sigmoid":
        return jnp.einsum("kde,ke->kd", precision, v)
    return (precision @ v.reshape(-1)).reshape(v.shape)


def precision_cholesky(loss: str, form: str, precision: Array) -> Array:
    """The lower Cholesky factor ``L`` (``Lambda = L L^T``) in the form; ``sqrt`` if diagonal.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> p = bj.head_posterior.isotropic_prior("mse", "full", 2, 3, 0.25)
      >>> bj.head_posterior.precision_cholesky("mse", "full", p.precision).diagonal().tolist()
      [2.0, 2.0, 2.0]
    """
    if form == "diag":
        return jnp.sqrt(precision)
    return jnp.linalg.cholesky(precision)


def precision_solve(loss: str, form: str, chol: Array, v: Array) -> Array:
    """``Lambda^-1 vec(v)`` reshaped like ``v``, from :func:`precision_cholesky`.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> hp = bj.head_posterior
      >>> p = hp.isotropic_prior("softmax", "full", 2, 2, 0.5)
      >>> chol = hp.precision_cholesky("softmax", "full", p.precision)
      >>> x = hp.precision_solve("softmax", "full", chol, jnp.ones((2, 2)))
      >>> [[round(v, 4) for v in row] for row in x.tolist()]
      [[0.5, 0.5], [0.5, 0.5]]
    """
    if form == "diag":
        return v / jnp.square(chol)
    if loss == "mse":
        return linalg.cho_solve((chol, True), v.T).T
    if loss == "sigmoid":
        return jax.vmap(lambda c, b: linalg.cho_solve((c, True), b))(chol, v)
    return linalg.cho_solve((chol, True), v.reshape(-1)).reshape(v.shape)


def newton_posterior(
    loss: str, form: str, theta: Array, stats: CurvatureStats, prior: HeadPosterior
) -> HeadPosterior:
    """One Newton step from ``theta`` on ``stats`` with a Gaussian ``prior``.

        a = grad + Lambda_0 (theta - mu_0),  Lambda = ggn + Lambda_0,
        mean = theta - Lambda^-1 a

    Args:
      loss, form: as in :func:`curvature_stats`.
      theta: ``[K, D]`` the point of linearisation (the current head).
      stats: the batch's (or data set's) :class:`CurvatureStats` at ``theta``.
      prior: the prior, in the same form.

    Returns:
      The :class:`HeadPosterior` ``(mean, Lambda)``.

    Example:
      >>> import jax, jax.numpy as jnp, bogc_jax as bj
      >>> hp = bj.head_posterior
      >>> h = jax.random.normal(jax.random.key(0), (16, 3))
      >>> y = h @ jnp.array([[1.0], [2.0], [3.0]])
      >>> prior = hp.isotropic_prior("mse", "full", 1, 3, 100.0)
      >>> theta = jnp.zeros((1, 3))
      >>> post = hp.newton_posterior("mse", "full", theta, hp.curvature_stats("mse", "full", theta, h, y), prior)
      >>> [round(v, 2) for v in post.mean[0].tolist()]
      [1.0, 2.0, 3.0]
    """
    _check(loss, form)
    precision = stats.ggn + prior.precision
    a = stats.grad + precision_matvec(loss, form, prior.precision, theta - prior.mean)
    chol = precision_cholesky(loss, form, precision)
    return HeadPosterior(theta - precision_solve(loss, form, chol, a), precision)


def head_posterior(
    loss: str,
    theta: Array,
    h: Array,
    y: Array,
    prior: HeadPosterior,
    *,
    form: str = "diag",
    bias: Array | None = None,
) -> HeadPosterior:
    """The batch posterior: a Newton step on ``(h, y)`` from ``theta`` with ``prior``.

    Example:
      >>> import jax, jax.numpy as jnp, bogc_jax as bj
      >>> hp = bj.head_posterior
      >>> h = jax.random.normal(jax.random.key(0), (8, 3))
      >>> prior = hp.isotropic_prior("softmax", "diag", 4, 4, 0.5)
      >>> post = hp.head_posterior("softmax", jnp.zeros((4, 4)), h, jnp.arange(8) % 4, prior)
      >>> post.mean.shape, bool((post.precision > 2.0).all())
      ((4, 4), True)
    """
    stats = curvature_stats(loss, form, theta, h, y, bias)
    return newton_posterior(loss, form, theta, stats, prior)


def full_data_posterior(
    loss: str,
    theta: Array,
    h: Array,
    y: Array,
    *,
    prior_variance: float,
    form: str = "diag",
    bias: Array | None = None,
) -> HeadPosterior:
    """BayesAgg-MTL's first stage: a Newton step on stored features from ``N(0, gamma I)``.

    Example:
      >>> import jax, jax.numpy as jnp, bogc_jax as bj
      >>> h = jax.random.normal(jax.random.key(0), (32, 3))
      >>> post = bj.head_posterior.full_data_posterior(
      ...     "sigmoid", jnp.zeros((2, 4)), h, jnp.ones((32, 2)), prior_variance=0.5, form="full")
      >>> post.precision.shape
      (2, 4, 4)
    """
    num_out, dim = theta.shape
    prior = isotropic_prior(loss, form, num_out, dim, prior_variance, theta.dtype)
    return head_posterior(loss, theta, h, y, prior, form=form, bias=bias)


def covariance(loss: str, form: str, posterior: HeadPosterior) -> Array:
    """The dense covariance ``[K D, K D]`` of the class-major vector (for tests and checks).

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> p = bj.head_posterior.isotropic_prior("mse", "full", 2, 3, 0.5)
      >>> bj.head_posterior.covariance("mse", "full", p).shape
      (6, 6)
    """
    num_out, dim = posterior.mean.shape
    if form == "diag":
        return jnp.diag(1.0 / posterior.precision.reshape(-1))
    if loss == "softmax":
        return jnp.linalg.inv(posterior.precision)
    blocks = jnp.linalg.inv(posterior.precision)
    if loss == "mse":
        blocks = jnp.broadcast_to(blocks, (num_out, dim, dim))
    eye = jnp.eye(num_out, dtype=blocks.dtype)
    return jnp.einsum("ckl,ce->ckel", blocks, eye).reshape(num_out * dim, num_out * dim)


def draws_from_noise(
    loss: str, form: str, posterior: HeadPosterior, chol: Array, z: Array
) -> Array:
    """Posterior draws ``mean + L^-T z`` from standard normal ``z`` (``[S, K, D]``).

    ``L`` is :func:`precision_cholesky`'s factor, so the draws have covariance
    ``Lambda^-1``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> hp = bj.head_posterior
      >>> p = hp.isotropic_prior("softmax", "diag", 2, 3, 4.0)
      >>> chol = hp.precision_cholesky("softmax", "diag", p.precision)
      >>> hp.draws_from_noise("softmax", "diag", p, chol, jnp.ones((1, 2, 3))).tolist()
      [[[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]]
    """
    mean = posterior.mean
    if form == "diag":
        return mean + z / chol
    if loss == "sigmoid":
        solve = lambda c, b: linalg.solve_triangular(c, b, lower=True, trans="T")
        u = jax.vmap(solve)(chol, jnp.moveaxis(z, 0, -1))  # [K, D, S]
        return mean + jnp.moveaxis(u, -1, 0)
    # One factor for every vector it covers: each draw's [K D] ("softmax"), each row [D] of
    # every draw ("mse"); solve L^T u = z for all of them at once.
    flat = z.reshape(-1, chol.shape[-1]).T
    u = linalg.solve_triangular(chol, flat, lower=True, trans="T")
    return mean + u.T.reshape(z.shape)


def sample(loss: str, form: str, posterior: HeadPosterior, key: Array, num: int) -> Array:
    """``num`` draws ``[num, K, D]`` from the posterior.

    Example:
      >>> import jax, jax.numpy as jnp, bogc_jax as bj
      >>> p = bj.head_posterior.isotropic_prior("softmax", "full", 2, 3, 0.25)
      >>> draws = bj.head_posterior.sample("softmax", "full", p, jax.random.key(0), 4096)
      >>> draws.shape, round(float(draws.std()), 1)
      ((4096, 2, 3), 0.5)
    """
    chol = precision_cholesky(loss, form, posterior.precision)
    z = jax.random.normal(key, (num,) + posterior.mean.shape, posterior.mean.dtype)
    return draws_from_noise(loss, form, posterior, chol, z)
