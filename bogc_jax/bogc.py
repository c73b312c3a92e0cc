"""BOGC: Bayesian-oriented gradient calibration as an Optax gradient transformation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bogc_jax import evidence as ev
from bogc_jax import validation
from bogc_jax.stats import GradStats

PyTree = Any
Aggregation = Literal["dempster", "precision", "dimension_frame", "sum"]
AGGREGATIONS = ("dempster", "precision", "dimension_frame", "sum")
Noise = Literal["absolute", "relative"]
NOISE_SCALES = ("absolute", "relative")


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
      finite: ``[]`` bool, whether every input of the latest update (``grads`` and the
        statistics of the calibrated leaves) was finite. When it is False the update fell
        back to the incoming ``grads`` and the two fields above kept their previous values.
      nonfinite_count: ``[]`` int32, the number of updates so far whose inputs were not
        finite.
    """

    source_weights: PyTree
    uncertainty: PyTree
    finite: jax.Array
    nonfinite_count: jax.Array


def coordinate_weights(
    mean,
    var,
    count,
    *,
    kappa=1.0,
    gamma=1.0,
    prior_weight=1.0,
    eps=1e-3,
    aggregation: Aggregation = "dempster",
    noise: Noise = "absolute",
):
    """BOGC's per-coordinate source weights for one leaf (see :func:`bogc`).

    Args:
      mean: ``[S, ...]`` per-source mean gradients.
      var: ``[S, ...]`` per-example variances over ``count`` examples.
      count: the number of examples behind the statistics.
      kappa, gamma, prior_weight, eps, aggregation, noise: as in :func:`bogc`
        (``aggregation`` other than ``"sum"``).

    Returns:
      ``(weights, touched, uncertainty)``: ``weights[s, d]`` sums to 1 over the sources
      touching ``d`` and is 0 elsewhere; ``touched`` the ``[S, ...]`` booleans;
      ``uncertainty`` the leaf's scalar fused uncertainty (0 for ``"precision"``).

    Example:
      Source 1's gradient is a tenth of source 0's and its standard deviation 0.3 of it:
      the more precise source in absolute terms, the noisier one relative to its size.

      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> mean = jnp.array([[1.0, 1.0], [0.1, 0.0]])  # source 1 touches coordinate 0 only
      >>> var = jnp.array([[1.0, 1.0], [0.09, 0.0]])
      >>> for noise in ("absolute", "relative"):
      ...   w, touched, u = bj.coordinate_weights(mean, var, 4, noise=noise)
      ...   print(noise, [[round(x, 3) for x in row] for row in w.tolist()])
      absolute [[0.223, 1.0], [0.777, 0.0]]
      relative [[0.766, 1.0], [0.234, 0.0]]
    """
    touched = (mean != 0) | (var != 0)
    num_touching = ev.sum_over_sources(touched.astype(mean.dtype))
    if noise == "relative":
        mean_for_noise, var = ev.relative_to_own_signal(mean, var, touched)
    else:
        mean_for_noise = mean
    lam = ev.precision(var / jnp.asarray(count).astype(var.dtype), mean_for_noise, touched, eps)
    if aggregation == "precision":
        weights = lam / jnp.where(num_touching > 0, ev.sum_over_sources(lam), 1)
        return weights, touched, jnp.zeros((), mean.dtype)
    e = ev.evidence(lam, touched, kappa, gamma)
    if aggregation == "dempster":
        m, m_theta = ev.fuse_simple_supports(e, prior_weight)
        weights = ev.pignistic_weights(m, m_theta, touched)
        any_touch = num_touching > 0
        uncertainty = jnp.sum(jnp.where(any_touch, m_theta, 0)) / jnp.maximum(jnp.sum(any_touch), 1)
        return weights, touched, uncertainty
    # "dimension_frame"
    b, u = ev.dirichlet_opinion(e)
    shares = ev.belief_shares(b, u)
    total = ev.sum_over_sources(shares)
    uniform = touched / jnp.maximum(num_touching, 1)
    weights = jnp.where(total > 0, shares / jnp.where(total > 0, total, 1), uniform)
    flat_b = jnp.reshape(b, (b.shape[0], -1))
    _, uncertainty = ev.dempster_fold(flat_b, jnp.reshape(u, (u.shape[0],)))
    return weights, touched, uncertainty


def _calibrate_leaf(mean, var, count, **hyper):
    """Calibrated gradient and diagnostics for one leaf. ``mean``/``var``: ``[S, ...]``."""
    weights, touched, uncertainty = coordinate_weights(mean, var, count, **hyper)
    num_touching = ev.sum_over_sources(touched.astype(mean.dtype))
    calibrated = num_touching * ev.sum_over_sources(weights * mean)
    relative = num_touching * weights
    per_source = jnp.sum(relative, axis=tuple(range(1, mean.ndim))) / jnp.maximum(
        jnp.sum(touched, axis=tuple(range(1, mean.ndim))), 1
    ).astype(mean.dtype)
    return calibrated, per_source.astype(jnp.float32), uncertainty.astype(jnp.float32)


def bogc(
    num_sources: int,
    *,
    kappa: float = 1.0,
    gamma: float = 1.0,
    prior_weight: float = 1.0,
    eps: float = 1e-3,
    aggregation: Aggregation = "dempster",
    noise: Noise = "absolute",
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Bayesian-oriented gradient calibration of several loss sources.

    Replaces the fixed-weight sum of the sources' gradients, coordinate by coordinate, with
    an uncertainty-weighted combination computed from per-source gradient statistics
    (``grad_stats``: mean ``mu[s, d]`` and per-example variance over ``n`` examples; the
    variance of the batch-mean gradient is ``v = var / n``). For coordinate ``d`` with
    touching sources ``T_d`` (those with a non-zero mean or variance there):

    .. math::

      \lambda_{s,d} = 1 / (v_{s,d} + \epsilon\,\overline{\mu^2}_{d}), \quad
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

    Degenerate and non-finite statistics. Zero variance at a coordinate for every
    touching source (identical examples, or variances below float32's range, e.g. at
    gradient scales under ~1e-19) makes the sources equally precise: the fixed-weight
    sum there. If any input of an update is not finite (a NaN or an infinity in
    ``grads``, in ``grad_stats.mean``/``var`` of a calibrated leaf, or a ``count`` that
    is not a positive finite number; float32 variances overflow at gradient scales above
    ~1e19), the update returns ``grads`` unchanged (the fixed-weight sum, finite if
    ``grads`` are) instead of calibrating, the state keeps its previous diagnostics, and
    ``state.finite`` is False (``state.nonfinite_count`` counts such updates). A NaN in
    ``grads`` therefore reaches the next transform: ``optax.chain(bj.bogc(S),
    optax.apply_if_finite(optax.adam(lr), max_consecutive_errors))`` skips that step, and
    bogc's own state is never poisoned.

    Memory is ``O(S x P)``: every intermediate has at most a leading source axis.

    Args:
      num_sources: ``S``, the number of loss sources in ``grad_stats``.
      kappa: evidence strength, >= 0 (0 recovers the fixed-weight sum).
      gamma: evidence sharpness, >= 0 (0 recovers the fixed-weight sum).
      prior_weight: ``W > 0``, the prior (uncertainty) weight of each opinion.
      eps: weight of the signal-to-noise floor ``eps * mean_T mu**2`` added to every
        variance (no source counts as more precise than a signal-to-noise ratio of
        ``1 / eps``), > 0.
      aggregation: ``"dempster"`` (default), ``"precision"``, ``"dimension_frame"`` or
        ``"sum"``.
      noise: how variances are compared across sources. ``"absolute"`` (default): as
        above, ``v[s, d]`` itself. ``"relative"``: each source's variance in units of its
        own signal on the leaf, ``v[s, d] / p_s`` with ``p_s`` the mean of ``mu[s, .]**2``
        over the leaf's coordinates that ``s`` touches (and the floor from the rescaled
        means): a noise-to-signal ratio. A source whose loss has nearly converged has
        small gradients and so small absolute variances, and ``"absolute"`` trusts it
        most; ``"relative"`` trusts the source whose gradient is least noisy for its
        size. Scaling one source's loss by ``c > 0`` then changes no weight.
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
    validation.check_int(
        "bogc",
        "num_sources",
        num_sources,
        minimum=1,
        fix="It is S, the number of loss sources (rows of losses_fn).",
    )
    validation.check_choice("bogc", "aggregation", aggregation, AGGREGATIONS)
    validation.check_choice("bogc", "noise", noise, NOISE_SCALES)
    validation.check_number(
        "bogc", "kappa", kappa, fix="kappa = 0 gives the fixed-weight sum; 1 is the default."
    )
    validation.check_number(
        "bogc", "gamma", gamma, fix="gamma = 0 gives the fixed-weight sum; 1 is the default."
    )
    validation.check_number(
        "bogc",
        "prior_weight",
        prior_weight,
        strict=True,
        fix="It is the prior weight W of each opinion; 1 is the default.",
    )
    validation.check_number(
        "bogc",
        "eps",
        eps,
        strict=True,
        fix="It is the relative variance floor; 1e-3 is the default.",
    )

    def init_fn(params):
        weights = jax.tree.map(lambda _: jnp.zeros((num_sources,), jnp.float32), params)
        uncertainty = jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)
        return BogcState(weights, uncertainty, *validation.initial_flags())

    def update_fn(
        updates, state, params=None, *, grad_stats: GradStats | None = None, **extra_args
    ):
        del params, extra_args
        if aggregation == "sum":
            ones = jax.tree.map(lambda _: jnp.ones((num_sources,), jnp.float32), updates)
            new_state = BogcState(
                ones,
                jax.tree.map(jnp.zeros_like, state.uncertainty),
                state.finite,
                state.nonfinite_count,
            )
            return updates, validation.guard_state(validation.all_finite(updates), new_state, state)
        flat_grads, treedef = jax.tree.flatten(updates)
        stats_means, stats_vars, calibrate = _check_stats(
            grad_stats, updates, treedef, num_sources, mask
        )
        validation.check_floating(
            "bogc",
            "grads",
            updates,
            only=calibrate,
            fix="Calibrated leaves need floating gradients; set mask to False there.",
        )
        chosen = [x for x, on in zip(stats_means + stats_vars, calibrate + calibrate) if on]
        count = jnp.asarray(grad_stats.count)
        finite = validation.all_finite(updates, chosen, count) & (count > 0)
        new_grads, weights, uncertainties = [], [], []
        for g, mean, var, on in zip(flat_grads, stats_means, stats_vars, calibrate):
            if not on:
                new_grads.append(g)
                weights.append(jnp.zeros((num_sources,), jnp.float32))
                uncertainties.append(jnp.zeros((), jnp.float32))
                continue
            calibrated, w, u = _calibrate_leaf(
                mean,
                var,
                count,
                kappa=kappa,
                gamma=gamma,
                prior_weight=prior_weight,
                eps=eps,
                aggregation=aggregation,
                noise=noise,
            )
            # A non-finite input: fall back to the incoming gradient (see the docstring).
            new_grads.append(jnp.where(finite, calibrated.astype(g.dtype), g))
            weights.append(w)
            uncertainties.append(u)
        new_state = BogcState(
            jax.tree.unflatten(treedef, weights),
            jax.tree.unflatten(treedef, uncertainties),
            state.finite,
            state.nonfinite_count,
        )
        return (
            jax.tree.unflatten(treedef, new_grads),
            validation.guard_state(finite, new_state, state),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_stats(grad_stats, updates, treedef, num_sources, mask):
    """Validate ``grad_stats`` against ``updates``; return per-leaf means, vars, flags."""
    means, variances = validation.grad_stats_leaves("bogc", grad_stats, treedef)
    if mask is None:
        calibrate = [m is not None for m in means]
    else:
        mask_tree = mask(updates) if callable(mask) else mask
        try:
            calibrate = [bool(m) for m in treedef.flatten_up_to(mask_tree)]
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"bogc: mask must be a pytree of booleans with the params' structure "
                f"{treedef}. ({err})"
            ) from err
    validation.check_grad_stats_leaves(
        "bogc",
        validation.leaf_paths(updates),
        jax.tree.leaves(updates),
        means,
        variances,
        calibrate,
        num_sources,
        why="the leaf is calibrated; compute statistics for it or set mask to False there.",
    )
    return means, variances, calibrate
