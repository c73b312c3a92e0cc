"""BOGC: Bayesian-oriented gradient calibration as an Optax gradient transformation."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bogc_jax import evidence as ev
from bogc_jax.stats import GradStats

PyTree = Any
Aggregation = Literal["dempster", "precision", "dimension_frame", "sum"]
AGGREGATIONS = ("dempster", "precision", "dimension_frame", "sum")


class BogcState(NamedTuple):
  """Diagnostics of the last update, one entry per parameter leaf.

  Attributes:
    source_weights: pytree like params; each leaf ``[S]`` float32: for each source, the
      mean over the leaf's coordinates that it touches of ``|T_d| * w[s, d]``, its weight
      relative to the fixed-weight sum (1 everywhere = the plain sum; 0 where the source
      touches nothing in the leaf, and for leaves that are not calibrated).
    uncertainty: pytree like params; each leaf ``[]`` float32: mean fused uncertainty
      ``m(Theta)`` over the touched coordinates ("dempster"), the fused frame
      uncertainty ("dimension_frame"), 0 for "precision", "sum" and uncalibrated leaves.
  """

  source_weights: PyTree
  uncertainty: PyTree


def _check_hyperparameter(name: str, value, *, positive: bool) -> None:
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    bad = value <= 0 if positive else value < 0
    if bad or value != value:  # pylint: disable=comparison-with-itself
      need = "> 0" if positive else ">= 0"
      raise ValueError(f"bogc: {name} must be {need}; got {value!r}.")


def _leaf_paths(tree: PyTree) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _calibrate_leaf(mean, var, count, *, kappa, gamma, prior_weight, eps, aggregation):
  """Calibrated gradient and diagnostics for one leaf. ``mean``/``var``: ``[S, ...]``."""
  touched = (mean != 0) | (var != 0)
  num_touching = jnp.sum(touched, axis=0).astype(mean.dtype)
  lam = ev.precision(var / count.astype(var.dtype), touched, eps)
  if aggregation == "precision":
    weights = lam / jnp.where(num_touching > 0, jnp.sum(lam, axis=0), 1)
    uncertainty = jnp.zeros((), mean.dtype)
  else:
    e = ev.evidence(lam, touched, kappa, gamma)
    if aggregation == "dempster":
      m, m_theta = ev.fuse_simple_supports(e, prior_weight)
      weights = ev.pignistic_weights(m, m_theta, touched)
      any_touch = num_touching > 0
      uncertainty = jnp.sum(jnp.where(any_touch, m_theta, 0)) / jnp.maximum(
          jnp.sum(any_touch), 1)
    else:  # "dimension_frame"
      b, u = ev.dirichlet_opinion(e)
      shares = ev.belief_shares(b, u)
      total = jnp.sum(shares, axis=0)
      uniform = touched / jnp.maximum(num_touching, 1)
      weights = jnp.where(total > 0, shares / jnp.where(total > 0, total, 1), uniform)
      flat_b = jnp.reshape(b, (b.shape[0], -1))
      _, uncertainty = ev.dempster_fold(flat_b, jnp.reshape(u, (u.shape[0],)))
  calibrated = num_touching * jnp.sum(weights * mean, axis=0)
  relative = num_touching * weights
  per_source = jnp.sum(relative, axis=tuple(range(1, mean.ndim))) / jnp.maximum(
      jnp.sum(touched, axis=tuple(range(1, mean.ndim))), 1).astype(mean.dtype)
  return calibrated, per_source.astype(jnp.float32), uncertainty.astype(jnp.float32)


def bogc(
    num_sources: int,
    *,
    kappa: float = 1.0,
    gamma: float = 1.0,
    prior_weight: float = 1.0,
    eps: float = 1e-3,
    aggregation: Aggregation = "dempster",
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Bayesian-oriented gradient calibration of several loss sources.

  Replaces the fixed-weight sum of the sources' gradients, coordinate by coordinate, with
  an uncertainty-weighted combination computed from per-source gradient statistics
  (``grad_stats``: mean ``mu[s, d]`` and per-example variance over ``n`` examples; the
  variance of the batch-mean gradient is ``v = var / n``). For coordinate ``d`` with
  touching sources ``T_d`` (those with a non-zero mean or variance there):

  .. math::

    \lambda_{s,d} = 1 / (v_{s,d} + \epsilon\,\overline{v}_{d}), \quad
    e_{s,d} = \kappa\,(\lambda_{s,d} / \overline{\lambda}_{d})^{\gamma}, \quad
    m_d(\{s\}) = \frac{e_{s,d}}{W + \sum_t e_{t,d}}, \quad
    m_d(\Theta) = \frac{W}{W + \sum_t e_{t,d}},

  (bars: means over ``T_d``; ``m`` is the reduced Dempster fusion of the sources'
  simple support opinions ``b = e / (e + W)``, ``u = W / (e + W)``, in closed form), then
  the pignistic weights and the calibrated gradient

  .. math::

    w_{s,d} = m_d(\{s\}) + m_d(\Theta) / |T_d|, \qquad
    \hat g_d = |T_d| \sum_{s \in T_d} w_{s,d}\, \mu_{s,d}.

  Equal precisions (or ``kappa = 0``) give ``w = 1/|T_d|``: exactly the fixed-weight sum
  ``sum_s mu[s, d]``. A coordinate touched by one source passes its mean unchanged.
  Scaling every loss by ``c > 0`` scales the output by ``c``.

  Other aggregations (``aggregation=``):

  * ``"precision"``: ``w[s, d] = lam[s, d] / sum_{T_d} lam`` (a product of Gaussian
    experts; no evidence, no Dempster step).
  * ``"dimension_frame"``: each source holds one Dirichlet opinion over all coordinates
    of a leaf (``b = e / (sum e + K)``, ``u = K / (sum e + K)``); the opinions are fused
    with the reduced Dempster rule and ``w[s, d]`` is source ``s``'s share of the fused
    belief on ``d`` (:func:`bogc_jax.evidence.belief_shares`), normalised over ``T_d``.
    Set ``gamma=0.5`` for the square-root evidence map.
  * ``"sum"``: the fixed-weight baseline; ``grads`` pass through unchanged.

  Memory is ``O(S x P)``: every intermediate has at most a leading source axis.

  Args:
    num_sources: ``S``, the number of loss sources in ``grad_stats``.
    kappa: evidence strength, >= 0 (0 recovers the fixed-weight sum).
    gamma: evidence sharpness, >= 0 (0 recovers the fixed-weight sum).
    prior_weight: ``W > 0``, the prior (uncertainty) weight of each opinion.
    eps: relative variance floor, > 0.
    aggregation: ``"dempster"`` (default), ``"precision"``, ``"dimension_frame"`` or
      ``"sum"``.
    mask: pytree of booleans shaped like the params (or a callable ``grads -> mask``):
      True leaves are calibrated, False leaves pass ``grads`` through. By default every
      leaf for which ``grad_stats`` has statistics (a non-``None`` leaf) is calibrated.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``grad_stats=``, a :class:`bogc_jax.GradStats` with ``num_sources`` sources, as a
    keyword extra argument. Other extra arguments are ignored.

  Example:
    >>> import jax, jax.numpy as jnp, optax, bogc_jax as bj
    >>> params = {"w": jnp.zeros(3)}
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> def losses_fn(p, x):  # two sources, one loss per example each
    ...   return jnp.stack([(x @ p["w"] - 1) ** 2, (x[:, :2].sum(1) + p["w"][0]) ** 2])
    >>> stats = bj.source_grad_stats(losses_fn, params, x, method="vmap")
    >>> tx = optax.chain(bj.bogc(num_sources=2), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = stats.fixed_weight_grads()
    >>> updates, state = tx.update(grads, state, params, grad_stats=stats)
    >>> updates["w"].shape
    (3,)

  References:
    Multi-Modal Learning with Bayesian-Oriented Gradient Calibration, arXiv 2505.23071.
    Han et al., Trusted Multi-View Classification, ICLR 2021 (the reduced Dempster rule).
  """
  if not isinstance(num_sources, int) or isinstance(num_sources, bool) or num_sources < 1:
    raise ValueError(f"bogc: num_sources must be a positive int; got {num_sources!r}.")
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"bogc: aggregation must be one of {AGGREGATIONS}; got "
                     f"{aggregation!r}.")
  _check_hyperparameter("kappa", kappa, positive=False)
  _check_hyperparameter("gamma", gamma, positive=False)
  _check_hyperparameter("prior_weight", prior_weight, positive=True)
  _check_hyperparameter("eps", eps, positive=True)

  def init_fn(params):
    weights = jax.tree.map(lambda _: jnp.zeros((num_sources,), jnp.float32), params)
    uncertainty = jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)
    return BogcState(source_weights=weights, uncertainty=uncertainty)

  def update_fn(updates, state, params=None, *, grad_stats: GradStats | None = None,
                **extra_args):
    del params, extra_args
    if aggregation == "sum":
      ones = jax.tree.map(lambda _: jnp.ones((num_sources,), jnp.float32), updates)
      return updates, BogcState(ones, jax.tree.map(jnp.zeros_like, state.uncertainty))
    flat_grads, treedef = jax.tree.flatten(updates)
    stats_means, stats_vars, calibrate = _check_stats(grad_stats, updates, treedef,
                                                      num_sources, mask)
    new_grads, weights, uncertainties = [], [], []
    for g, mean, var, on in zip(flat_grads, stats_means, stats_vars, calibrate):
      if not on:
        new_grads.append(g)
        weights.append(jnp.zeros((num_sources,), jnp.float32))
        uncertainties.append(jnp.zeros((), jnp.float32))
        continue
      calibrated, w, u = _calibrate_leaf(
          mean, var, grad_stats.count, kappa=kappa, gamma=gamma,
          prior_weight=prior_weight, eps=eps, aggregation=aggregation)
      new_grads.append(calibrated.astype(g.dtype))
      weights.append(w)
      uncertainties.append(u)
    new_state = BogcState(
        source_weights=jax.tree.unflatten(treedef, weights),
        uncertainty=jax.tree.unflatten(treedef, uncertainties))
    return jax.tree.unflatten(treedef, new_grads), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_stats(grad_stats, updates, treedef, num_sources, mask):
  """Validate ``grad_stats`` against ``updates``; return per-leaf means, vars, flags."""
  if grad_stats is None:
    raise ValueError(
        "bogc: missing the keyword extra argument grad_stats. Call "
        "tx.update(grads, state, params, grad_stats=bj.source_grad_stats(losses_fn, "
        "params, batch)).")
  if not isinstance(grad_stats, GradStats):
    raise TypeError(f"bogc: grad_stats must be a bogc_jax.GradStats; got "
                    f"{type(grad_stats).__name__}. Build it with bj.source_grad_stats.")
  paths = _leaf_paths(updates)
  try:
    means = treedef.flatten_up_to(grad_stats.mean)
    variances = treedef.flatten_up_to(grad_stats.var)
  except (ValueError, TypeError) as err:
    raise ValueError(
        "bogc: grad_stats.mean/var must have the same pytree structure as the params "
        f"(the updates); params have {treedef}. Compute the statistics on the same "
        f"params tree you optimise. ({err})") from err
  if mask is None:
    calibrate = [m is not None for m in means]
  else:
    mask_tree = mask(updates) if callable(mask) else mask
    try:
      calibrate = [bool(m) for m in treedef.flatten_up_to(mask_tree)]
    except (ValueError, TypeError) as err:
      raise ValueError(
          f"bogc: mask must be a pytree of booleans with the params' structure "
          f"{treedef}. ({err})") from err
  for path, g, mean, var, on in zip(paths, jax.tree.leaves(updates), means, variances,
                                    calibrate):
    if not on:
      continue
    expected = (num_sources,) + tuple(jnp.shape(g))
    for name, leaf in (("mean", mean), ("var", var)):
      if leaf is None:
        raise ValueError(
            f"bogc: grad_stats.{name}{path} is None but the leaf is calibrated; compute "
            "statistics for it or set mask to False there.")
      if tuple(jnp.shape(leaf)) != expected:
        raise ValueError(
            f"bogc: grad_stats.{name}{path} has shape {tuple(jnp.shape(leaf))}; expected "
            f"{expected} (num_sources={num_sources} stacked on the parameter's shape). "
            "Check num_sources and that the statistics match these params.")
  return means, variances, calibrate
