"""BOGC: Bayesian-oriented gradient calibration as an Optax gradient transformation."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bogc_jax import _fused_calibration as _fused
from bogc_jax import _source_reach, validation
from bogc_jax import evidence as ev
from bogc_jax._finite import Step, finite_guarded, initial_flags
from bogc_jax._sources import sum_over_sources
from bogc_jax._types import (
    AGGREGATIONS,
    NOISE_SCALES,
    Aggregation,
    Noise,
    PyTree,
    is_params_placeholder,
)
from bogc_jax.stats import GradStats
from bogc_jax.weightings import WEIGHTINGS


class BogcState(NamedTuple):
    """Diagnostics of the last update, one entry per parameter leaf.

    Attributes:
      source_weights: pytree like params; each leaf ``[S]`` float32: for each source, the
        mean over the leaf's coordinates that it touches of ``|T_d| * w[s, d]``, its weight
        relative to the fixed-weight sum (1 everywhere = the plain sum; 0 where the source
        touches nothing in the leaf, and for leaves that are not calibrated). With
        ``aggregation="sum"`` every entry is 1 (no statistics are read).
      uncertainty: pytree like params; each leaf ``[]`` float32: mean fused uncertainty
        ``m(Theta)`` over the touched coordinates ("dempster"), the fused frame
        uncertainty ("dimension_frame"), 0 for "precision", "sum" and uncalibrated leaves.
      finite: ``[]`` bool, whether the latest update was used: its inputs (``grads``, and
        the statistics of the calibrated leaves) were finite, its variances non-negative and
        its count positive, and its outputs (updates and the fields above) finite. When it
        is False the update returned the incoming ``grads`` and the two fields above kept
        their previous values.
      nonfinite_count: ``[]`` int32, the number of updates so far that were not used.
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

        touched = (mean != 0) | (var != 0)
        lam     = precision(var / count, mean, touched, eps)     (after noise scaling)
        weights, uncertainty = WEIGHTINGS[aggregation](lam, touched, kappa, gamma, W)

    Args:
      mean: ``[S, ...]`` per-source mean gradients.
      var: ``[S, ...]`` per-example variances over ``count`` examples.
      count: the number of examples behind the statistics.
      kappa, gamma, prior_weight, eps, aggregation, noise: as in :func:`bogc`
        (``"sum"`` gives the uniform weights ``1 / |T_d|``; see
        :mod:`bogc_jax.weightings`).

    Returns:
      ``(weights, touched, uncertainty)``: ``weights[s, d]`` sums to 1 over the sources
      touching ``d`` and is 0 elsewhere; ``touched`` the ``[S, ...]`` booleans;
      ``uncertainty`` the leaf's scalar fused uncertainty (0 for ``"precision"``).

    Raises:
      ValueError: ``aggregation`` or ``noise`` is not one of the readings.

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
    validation.check_choice("coordinate_weights", "aggregation", aggregation, AGGREGATIONS)
    validation.check_choice("coordinate_weights", "noise", noise, NOISE_SCALES)
    touched = (mean != 0) | (var != 0)
    if noise == "relative":
        mean_for_noise, var = ev.relative_to_own_signal(mean, var, touched)
    else:
        mean_for_noise = mean
    lam = ev.precision(var / jnp.asarray(count).astype(var.dtype), mean_for_noise, touched, eps)
    weights, uncertainty = WEIGHTINGS[aggregation](
        lam, touched, kappa=kappa, gamma=gamma, prior_weight=prior_weight
    )
    return weights, touched, uncertainty


def _calibration(mean, var, count, **hyper):
    """The correction to the fixed-weight sum and the diagnostics, for one leaf.

    delta = sum_s (|T_d| w[s, d] - 1) mu[s, d]   (= calibrated - sum_s mu[s, d])
    """
    weights, touched, uncertainty = coordinate_weights(mean, var, count, **hyper)
    relative = sum_over_sources(touched.astype(mean.dtype)) * weights
    delta = sum_over_sources(jnp.where(touched, relative - 1, 0) * mean)
    axes = tuple(range(1, mean.ndim))
    per_source = jnp.sum(relative, axis=axes) / jnp.maximum(jnp.sum(touched, axis=axes), 1).astype(
        mean.dtype
    )
    return delta, per_source.astype(jnp.float32), uncertainty.astype(jnp.float32)


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

    The calibration is applied as a correction to the incoming gradient ``g``:

    .. math::

      \mathrm{out}_d = g_d + \bigl(\hat g_d - \textstyle\sum_s \mu_{s,d}\bigr)
                     = g_d + \sum_{s \in T_d} (|T_d|\, w_{s,d} - 1)\, \mu_{s,d}.

    With ``g`` the fixed-weight gradient (``grad_stats.fixed_weight_grads()``) the output is
    the calibrated gradient ``hat g``; anything else in ``g`` (an L2 term, CGGM's direction
    loss, an auxiliary loss outside ``losses_fn``, ``optax.add_decayed_weights`` placed
    before bogc) passes through unchanged. Equal precisions (or ``kappa = 0``, or
    ``gamma = 0``) give ``w = 1/|T_d|`` and a zero correction: the identity on any input,
    like ``aggregation="sum"``. A coordinate touched by one source passes unchanged.
    Scaling every loss by ``c > 0`` scales the correction by ``c``.

    Ordering in a chain: the correction is in the units of the raw loss gradients, so
    bogc must see gradients in those units. Put it first, or after transforms that only
    *add* to the gradient (``optax.add_decayed_weights``); transforms that rescale or
    reshape the gradient (clipping, ``optax.scale*``, adam, cggm, ogm_ge, mmpareto) go
    after it.

    Other aggregations (``aggregation=``, the table :data:`bogc_jax.weightings.WEIGHTINGS`):

    * ``"precision"``: ``w[s, d] = lam[s, d] / sum_{T_d} lam`` (a product of Gaussian
      experts; no evidence, no Dempster step).
    * ``"dimension_frame"``: each source holds one Dirichlet opinion over all coordinates
      of a leaf (``b = e / (sum e + K)``, ``u = K / (sum e + K)``); the opinions are fused
      with the reduced Dempster rule and ``w[s, d]`` is source ``s``'s share of the fused
      belief on ``d`` (:func:`bogc_jax.evidence.belief_shares`), normalised over ``T_d``.
      Set ``gamma=0.5`` for the square-root evidence map.
    * ``"sum"``: the fixed-weight baseline; ``grads`` pass through unchanged.

    The evidence is computed in log space (:func:`bogc_jax.evidence.log_evidence`), so no
    ``gamma`` makes it overflow. With ``gamma`` 0 or 1 (Python numbers) and at most three
    sources the same weights come from an equivalent algebraic form with no logarithm,
    exponential or reduction over the source axis (``W + sum_t e_t = W + kappa |T_d|``
    at ``gamma = 1``), computed in a few passes over the statistics.

    Degenerate and non-finite statistics. Zero variance at a coordinate for every
    touching source (identical examples, or variances below float32's range, e.g. at
    gradient scales under ~1e-19) makes the sources equally precise: no correction there.
    An update is not used when an input is not finite (a NaN or an infinity in ``grads``
    or in ``grad_stats.mean``/``var`` of a calibrated leaf; float32 variances overflow at
    gradient scales above ~1e19), when ``grad_stats.count`` is not positive, when a
    variance of a calibrated leaf is negative, or when an output (the updates, the
    diagnostics) is not finite. It then returns ``grads`` unchanged, the state keeps its
    previous diagnostics, and ``state.finite`` is False (``state.nonfinite_count`` counts
    such updates). A NaN in ``grads`` therefore reaches the next transform:
    ``optax.chain(bj.bogc(S), optax.apply_if_finite(optax.adam(lr), max_consecutive_errors))``
    skips that step, and bogc's own state is never poisoned.

    Inside ``optax.masked``, ``optax.multi_transform`` or ``optax.partition`` the
    statistics of the leaves masked out there are ignored (they pass untouched).

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
        "bogc",
        "kappa",
        kappa,
        finite=True,
        fix="kappa = 0 gives the fixed-weight sum; 1 is the default.",
    )
    validation.check_number(
        "bogc",
        "gamma",
        gamma,
        finite=True,
        fix="gamma = 0 gives the fixed-weight sum; 1 is the default.",
    )
    validation.check_number(
        "bogc",
        "prior_weight",
        prior_weight,
        strict=True,
        finite=True,
        fix="It is the prior weight W of each opinion; 1 is the default.",
    )
    validation.check_number(
        "bogc",
        "eps",
        eps,
        strict=True,
        finite=True,
        fix="It is the relative variance floor; 1e-3 is the default.",
    )
    hyper = dict(
        kappa=kappa,
        gamma=gamma,
        prior_weight=prior_weight,
        eps=eps,
        aggregation=aggregation,
        noise=noise,
    )

    two_pass = _fused.applies(num_sources, aggregation, gamma, kappa, prior_weight)

    def _leaf_two_pass(mean, var, count):
        # Sources known (while tracing) not to reach the leaf have zero slabs in both
        # statistics: the calibration leaves them out (bogc_jax._source_reach).
        reaching = _source_reach.reaching(num_sources, mean, var)
        noise_stats = None
        if noise == "relative":  # per source: rescale the reaching slabs alone
            rows = np.asarray(reaching, int)
            mean_r, var_r = mean[rows], var[rows]
            noise_stats = ev.relative_to_own_signal(mean_r, var_r, (mean_r != 0) | (var_r != 0))
        return _fused.leaf_calibration(
            mean,
            var,
            count,
            kappa=kappa,
            gamma=gamma,
            prior_weight=prior_weight,
            eps=eps,
            noise_stats=noise_stats,
            sources=reaching,
        )

    def init_fn(params):
        if is_params_placeholder(params):  # optax.tree.map_params: no parameter copies
            return BogcState(jnp.zeros([]), jnp.zeros([]), *initial_flags())
        weights = jax.tree.map(lambda _: jnp.zeros((num_sources,), jnp.float32), params)
        uncertainty = jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)
        return BogcState(weights, uncertainty, *initial_flags())

    def core(updates, state, params=None, *, grad_stats: GradStats | None = None, **extra_args):
        del params, extra_args
        flat_grads, treedef = jax.tree.flatten(updates, is_leaf=_is_masked)
        if aggregation == "sum":
            weights = [_keep_masked(g, jnp.ones((num_sources,), jnp.float32)) for g in flat_grads]
            uncertainties = [_keep_masked(g, jnp.zeros((), jnp.float32)) for g in flat_grads]
            new_state = state._replace(
                source_weights=jax.tree.unflatten(treedef, weights),
                uncertainty=jax.tree.unflatten(treedef, uncertainties),
            )
            return Step(updates, new_state, inputs=(updates,))
        stats_means, stats_vars, calibrate = _check_stats(
            grad_stats, updates, treedef, num_sources, mask
        )
        validation.check_floating(
            "bogc",
            "grads",
            updates,
            only=calibrate,
            is_leaf=_is_masked,
            fix="Calibrated leaves need floating gradients; set mask to False there.",
        )
        count = jnp.asarray(cast(GradStats, grad_stats).count)  # not None: checked above
        # Inputs checked for finiteness: the statistics of the calibrated leaves (or, on
        # the two-pass path, their extremes, finite exactly when every entry is) and the
        # incoming gradients that the output check does not cover (``g + delta`` is not
        # finite when ``g`` is not).
        checked, chosen_vars = [], []
        new_grads, weights, uncertainties = [], [], []
        for g, mean, var, on in zip(flat_grads, stats_means, stats_vars, calibrate):
            if not on:
                checked.append(g)
                new_grads.append(g)
                weights.append(_keep_masked(g, jnp.zeros((num_sources,), jnp.float32)))
                uncertainties.append(_keep_masked(g, jnp.zeros((), jnp.float32)))
                continue
            if two_pass and mean.dtype == jnp.float32 and var.dtype == jnp.float32:
                delta, w, u, counts = _leaf_two_pass(mean, var, count)
                checked.append(counts)
            else:
                delta, w, u = _calibration(mean, var, count, **hyper)
                checked += [g, mean, var]
                chosen_vars.append(var)
            new_grads.append((g + delta).astype(g.dtype))
            weights.append(w)
            uncertainties.append(u)
        valid = (count > 0) & _all_non_negative(chosen_vars)
        new_state = state._replace(
            source_weights=jax.tree.unflatten(treedef, weights),
            uncertainty=jax.tree.unflatten(treedef, uncertainties),
        )
        new_updates = jax.tree.unflatten(treedef, new_grads)
        return Step(new_updates, new_state, inputs=(checked, count), valid=valid)

    return optax.GradientTransformationExtraArgs(init_fn, finite_guarded(core))


def _is_masked(x) -> bool:
    """A leaf that ``optax.masked`` (or ``multi_transform``) hid from this transform."""
    return isinstance(x, optax.MaskedNode)


def _keep_masked(leaf, value):
    return leaf if _is_masked(leaf) else value


def _all_non_negative(trees) -> jax.Array:
    flags = [jnp.all(v >= 0) for v in trees]
    return jnp.stack(flags).all() if flags else jnp.ones([], bool)


def _mask_flags(mask, updates, treedef) -> list[bool]:
    """The user's ``mask`` as one Python bool per leaf (``optax.masked``'s hidden: False)."""
    mask_tree = mask(updates) if callable(mask) else mask
    try:
        flags = treedef.flatten_up_to(mask_tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"bogc: mask must be a pytree of booleans with the params' structure {treedef}. ({err})"
        ) from err
    paths = validation.leaf_paths(updates, is_leaf=_is_masked)
    checked = []
    for path, flag in zip(paths, flags):
        if _is_masked(flag):
            checked.append(False)
            continue
        if isinstance(flag, (bool, np.bool_)) or (
            isinstance(flag, (np.ndarray, jax.Array))
            and np.shape(flag) == ()
            and flag.dtype == bool
            and not validation.is_traced(flag)
        ):
            checked.append(bool(flag))
            continue
        raise TypeError(
            f"bogc: mask{path} is {flag!r} of type {type(flag).__name__}; every leaf of mask "
            "must be a Python bool (True: calibrate the leaf, False: pass it through). A "
            "string such as 'False' is not a bool."
        )
    return checked


def _check_stats(grad_stats, updates, treedef, num_sources, mask):
    """Validate ``grad_stats`` against ``updates``; return per-leaf means, vars, flags."""
    means, variances = validation.grad_stats_leaves("bogc", grad_stats, treedef)
    leaves = treedef.flatten_up_to(updates)
    if mask is None:
        calibrate = [m is not None for m in means]
    else:
        calibrate = _mask_flags(mask, updates, treedef)
    calibrate = [on and not _is_masked(g) for on, g in zip(calibrate, leaves)]
    validation.check_grad_stats_leaves(
        "bogc",
        validation.leaf_paths(updates, is_leaf=_is_masked),
        leaves,
        means,
        variances,
        calibrate,
        num_sources,
        why="the leaf is calibrated; compute statistics for it or set mask to False there.",
    )
    return means, variances, calibrate
