"""Gradient accumulation that keeps the batch statistics of every micro-batch.

``optax.MultiSteps`` averages the gradients of ``k`` micro-batches and applies the inner
transform once, on the ``k``-th call; the extra arguments that reach the inner transform
then are those of the ``k``-th micro-batch alone. For :func:`bogc_jax.bogc` and
:func:`bogc_jax.mmpareto` (``grad_stats``) and for :func:`bogc_jax.cggm` and
:func:`bogc_jax.ogm_ge` (``modality_scores``) that would throw away the statistics of
``k - 1`` micro-batches out of ``k``. :func:`multi_steps` accumulates them too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bogc_jax import _moments
from bogc_jax._moments import GradStats

PyTree = Any


class AccumulationState(NamedTuple):
    """State of :func:`multi_steps`; every field keeps its shape and dtype.

    Attributes:
      grad_stats: running moments (``count``, ``mean``, ``m2``) of the micro-batches of the current
        window: ``count`` ``[]`` float32 (examples so far), ``mean`` and ``m2`` pytrees
        like the params with leaves ``[S, *param.shape]`` (float32, or the params' dtype
        when wider); zeros at the start of each window. ``None`` when ``num_sources`` is
        ``None``.
      modality_scores: ``[M]`` float32, running mean of the window's ``modality_scores``;
        ``None`` when ``num_modalities`` is ``None``.
      inner: the ``optax.MultiStepsState`` that accumulates the gradients and holds the
        inner transform's state (``inner.mini_step``, ``inner.gradient_step``,
        ``inner.inner_opt_state``).
    """

    grad_stats: _moments.Moments | None
    modality_scores: jax.Array | None
    inner: optax.MultiStepsState


def _positive_int_or_none(value, name: str) -> int | None:
    """``value`` as an int: None or a positive int (NumPy ints too, not bools)."""
    if value is None:
        return None
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not is_int or value < 1:
        raise ValueError(f"multi_steps: {name} must be a positive int or None; got {value!r}.")
    return int(value)


def _zero_moments(params: PyTree, num_sources: int) -> _moments.Moments:
    def zeros(p):
        dtype = _moments.accumulation_dtype(jnp.result_type(p))
        return jnp.zeros((num_sources,) + tuple(jnp.shape(p)), dtype)

    return _moments.Moments(
        jnp.zeros((), jnp.float32), jax.tree.map(zeros, params), jax.tree.map(zeros, params)
    )


def _merge_stats(acc: _moments.Moments, new: GradStats, num_sources: int):
    """Chan-merge ``new`` into ``acc`` leaf by leaf; ``None`` leaves of ``new`` stay None.

    Returns the merged statistics to hand to the inner transform (with ``new``'s ``None``
    leaves) and the merged moments to keep (``acc``'s where ``new`` has ``None``).
    """
    if not isinstance(new, GradStats):
        raise TypeError(
            f"multi_steps: grad_stats must be a bogc_jax.GradStats; got {type(new).__name__}."
        )
    acc_means, treedef = jax.tree.flatten(acc.mean)
    acc_m2s = _moments.leaves_up_to(treedef, acc.m2)
    try:
        new_means = _moments.leaves_up_to(treedef, new.mean)
        new_vars = _moments.leaves_up_to(treedef, new.var)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "multi_steps: grad_stats.mean/var must have the params' pytree structure "
            f"{treedef} (None leaves allowed). Compute them on the params being optimised. "
            f"({err})"
        ) from err
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(acc.mean)[0]]
    count = acc.count + new.count
    out_means: list = []
    out_vars: list = []
    keep_means: list = []
    keep_m2s: list = []
    for path, a_mean, a_m2, b_mean, b_var in zip(paths, acc_means, acc_m2s, new_means, new_vars):
        if b_mean is None or b_var is None:
            out_means.append(None)
            out_vars.append(None)
            keep_means.append(a_mean)
            keep_m2s.append(a_m2)
            continue
        if tuple(jnp.shape(b_mean)) != a_mean.shape or tuple(jnp.shape(b_var)) != a_mean.shape:
            raise ValueError(
                f"multi_steps: grad_stats leaf {path} has shapes {tuple(jnp.shape(b_mean))} "
                f"(mean) and {tuple(jnp.shape(b_var))} (var); expected {a_mean.shape} "
                f"(num_sources={num_sources} stacked on the parameter's shape). Check "
                "num_sources."
            )
        b_m2 = _moments.m2_from_var(jnp.asarray(b_var, a_mean.dtype), new.count)
        mean, m2 = _moments.merge_leaf(
            acc.count, a_mean, a_m2, new.count, jnp.asarray(b_mean, a_mean.dtype), b_m2
        )
        out_means.append(mean)
        out_vars.append(_moments.var_from_m2(m2, count))
        keep_means.append(mean)
        keep_m2s.append(m2)
    merged = GradStats(
        count, jax.tree.unflatten(treedef, out_means), jax.tree.unflatten(treedef, out_vars)
    )
    kept = _moments.Moments(
        count, jax.tree.unflatten(treedef, keep_means), jax.tree.unflatten(treedef, keep_m2s)
    )
    return merged, kept


def multi_steps(
    inner: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], jax.Array],
    *,
    num_sources: int | None = None,
    num_modalities: int | None = None,
    use_grad_mean: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""``optax.MultiSteps`` that also accumulates ``grad_stats`` and ``modality_scores``.

    Call ``update`` once per micro-batch, with that micro-batch's gradients and extra
    arguments. Within a window of ``k`` calls (the params do not change inside a window),
    after micro-batch ``j`` with ``n_j`` examples:

    .. math::

      N_j = N_{j-1} + n_j, \quad
      \mu_j = \mu_{j-1} + (\bar g_j - \mu_{j-1})\, n_j / N_j, \quad
      M2_j = M2_{j-1} + (n_j - 1)\,\sigma^2_j + (\bar g_j - \mu_{j-1})^2\, N_{j-1} n_j / N_j,

    the exact (Chan et al.) statistics of the union of the micro-batches, passed on as
    ``GradStats(N_j, mu_j, M2_j / (N_j - 1))``;
    ``s_j = s_{j-1} + (\mathrm{scores}_j - s_{j-1}) / j``, the mean of the micro-batches'
    ``modality_scores``; and the gradients are averaged (summed when
    ``use_grad_mean=False``) exactly as by ``optax.MultiSteps``, which this wraps. On the
    ``k``-th call the inner transform sees the accumulated gradients, statistics and
    scores and its updates are returned; the other calls return zeros and leave the
    inner state unchanged.

    So ``k`` micro-batches give the update of their union: exactly (to float rounding)
    for :func:`bogc_jax.bogc` and :func:`bogc_jax.mmpareto` with
    :func:`bogc_jax.source_grad_stats`, and for accuracy-type scores when the
    micro-batches have equal sizes. The scores of a ratio metric over unequal
    micro-batches (or :func:`bogc_jax.metrics.dice`, a mean of per-example ratios over a
    variable count) are averaged with equal weights. Statistics from
    :func:`bogc_jax.laplace_grad_stats` (``count`` = Monte Carlo draws) are pooled as if
    all draws came from one posterior, an approximation. Any other extra argument is
    passed on as given on the ``k``-th call.

    Within one jitted step, ``source_grad_stats(..., chunk_size=c)`` already streams a
    large batch in chunks with the same exact merge; use :func:`multi_steps` when the
    micro-batches arrive in separate steps.

    Args:
      inner: the transform to apply every ``k`` micro-batches, e.g.
        ``optax.chain(bj.bogc(3), optax.adam(1e-3))``.
      every_k_schedule: ``k``, an int or a function of the gradient step (as in
        ``optax.MultiSteps``).
      num_sources: ``S``, the number of sources of the ``grad_stats`` extra argument; it
        fixes the accumulator's shape (``2 x S x P`` floats). ``None``: no statistics are
        expected, and passing ``grad_stats`` is an error rather than a silent loss.
      num_modalities: ``M``, the length of the ``modality_scores`` extra argument.
        ``None``: passing ``modality_scores`` is an error.
      use_grad_mean: average (True) or sum (False) the micro-batches' gradients.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`AccumulationState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, bogc_jax as bj
      >>> params = {"w": jnp.zeros(3)}
      >>> x = jax.random.normal(jax.random.key(0), (16, 3))
      >>> def losses_fn(p, x):
      ...   return jnp.stack([(x @ p["w"] - 1) ** 2, (x[:, 0] - p["w"][0]) ** 2])
      >>> inner = optax.chain(bj.bogc(num_sources=2), optax.sgd(0.1))
      >>> tx = bj.multi_steps(inner, every_k_schedule=2, num_sources=2)
      >>> state = tx.init(params)
      >>> for micro in (x[:8], x[8:]):  # two micro-batches, one update
      ...   stats = bj.source_grad_stats(losses_fn, params, micro, method="vmap")
      ...   updates, state = tx.update(stats.fixed_weight_grads(), state, params,
      ...                              grad_stats=stats)
      >>> stats = bj.source_grad_stats(losses_fn, params, x, method="vmap")  # whole batch
      >>> whole, _ = inner.update(stats.fixed_weight_grads(), inner.init(params), params,
      ...                         grad_stats=stats)
      >>> bool(jnp.allclose(updates["w"], whole["w"], rtol=1e-5, atol=1e-7))
      True

    References:
      Chan, Golub and LeVeque, Updating formulae and a pairwise algorithm for computing
      sample variances, 1979 (the merge).
    """
    num_sources = _positive_int_or_none(num_sources, "num_sources")
    num_modalities = _positive_int_or_none(num_modalities, "num_modalities")
    accumulator = optax.MultiSteps(inner, every_k_schedule, use_grad_mean=use_grad_mean)

    def init_fn(params):
        grad_stats = None if num_sources is None else _zero_moments(params, num_sources)
        scores = None if num_modalities is None else jnp.zeros((num_modalities,), jnp.float32)
        return AccumulationState(grad_stats, scores, accumulator.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        extra = dict(extra_args)
        new_stats = state.grad_stats
        new_scores = state.modality_scores
        if extra.get("grad_stats") is not None:
            if num_sources is None:
                raise ValueError(
                    "multi_steps: got grad_stats but num_sources is None, so the statistics of "
                    "all but the last micro-batch would be lost. Pass num_sources=S (the "
                    "number of sources of the statistics) to multi_steps."
                )
            extra["grad_stats"], new_stats = _merge_stats(
                state.grad_stats, extra["grad_stats"], num_sources
            )
        if extra.get("modality_scores") is not None:
            if num_modalities is None:
                raise ValueError(
                    "multi_steps: got modality_scores but num_modalities is None, so the scores "
                    "of all but the last micro-batch would be lost. Pass num_modalities=M to "
                    "multi_steps."
                )
            scores = jnp.asarray(extra["modality_scores"])
            if scores.shape != (num_modalities,):
                raise ValueError(
                    f"multi_steps: modality_scores must have shape [{num_modalities}] "
                    f"(num_modalities); got shape {scores.shape}."
                )
            seen = state.inner.mini_step.astype(jnp.float32)
            acc = state.modality_scores
            new_scores = acc + (scores.astype(jnp.float32) - acc) / (seen + 1.0)
            extra["modality_scores"] = new_scores
        updates, inner_state = accumulator.update(updates, state.inner, params, **extra)
        window_done = inner_state.mini_step == 0
        reset = lambda x: jnp.where(window_done, jnp.zeros_like(x), x)
        new_stats = jax.tree.map(reset, new_stats)
        new_scores = jax.tree.map(reset, new_scores)
        return updates, AccumulationState(new_stats, new_scores, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
