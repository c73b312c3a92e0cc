"""Gradient distributions from a diagonal Laplace posterior on chosen parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from bogc_jax import _moments, _per_example, validation
from bogc_jax import stats as stats_lib
from bogc_jax._moments import GradStats

PyTree = Any


def _split(params: PyTree, mask: PyTree | Callable[[PyTree], PyTree]):
    """Flat chosen leaves, and a function rebuilding the full params from them."""
    flat, treedef = jax.tree.flatten(params)
    mask_tree = mask(params) if callable(mask) else mask
    try:
        flags = [bool(m) for m in _moments.leaves_up_to(treedef, mask_tree)]
    except (ValueError, TypeError) as err:
        raise ValueError(
            "laplace_grad_stats: mask must be a pytree of booleans with the params' "
            f"structure {treedef}, or a callable params -> such a pytree. ({err})"
        ) from err
    if not any(flags):
        raise ValueError(
            "laplace_grad_stats: mask selects no parameter; mark the last "
            "layer(s) before each modality's output with True."
        )
    chosen = [leaf for leaf, on in zip(flat, flags) if on]

    def rebuild(chosen_leaves):
        it = iter(chosen_leaves)
        return jax.tree.unflatten(
            treedef, [next(it) if on else leaf for leaf, on in zip(flat, flags)]
        )

    def scatter(chosen_leaves):
        it = iter(chosen_leaves)
        return jax.tree.unflatten(treedef, [next(it) if on else None for on in flags])

    return chosen, rebuild, scatter


def _check_key(key) -> None:
    """``key`` is one PRNG key: a typed key (``jax.random.key``) or a raw ``uint32`` one
    (``jax.random.PRNGKey``)."""
    dtype = getattr(key, "dtype", None)
    shape = tuple(getattr(key, "shape", ()))
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype is not None and not typed and dtype == jnp.uint32 and len(shape) == 1
    if (typed and shape == ()) or raw:
        return
    got = (
        f"{type(key).__name__} {key!r}"
        if dtype is None
        else f"an array of dtype {dtype} and shape {shape}"
    )
    raise TypeError(
        f"laplace_grad_stats: key must be one PRNG key, e.g. jax.random.key(0); got {got}. "
        "Pass a single key (split a batch of keys first), the same on every device."
    )


def laplace_grad_stats(
    losses_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    *,
    mask: PyTree | Callable[[PyTree], PyTree],
    num_samples: int = 8,
    damping: float = 1.0,
    dataset_size: int | None = None,
    center: Literal["draws", "batch"] = "draws",
    method: stats_lib.Method = "auto",
    chunk_size: int | None = None,
    axis_name: Any = None,
) -> GradStats:
    r"""Per-source gradient distributions from a diagonal Laplace posterior.

    For each source ``s`` and the chosen parameters ``theta`` (``mask``: typically the last
    layer before each modality's output), with per-example gradients ``g[s, i]`` over the
    ``n`` examples of the batch:

    .. math::

      F_s = \frac{N}{n} \sum_i g_{s,i}^2
          = \frac{N}{n} \big((n - 1)\,\mathrm{var}_s + n\,\mathrm{mean}_s^2\big), \qquad
      q_s(\theta') = \mathcal N(\theta,\ \mathrm{diag}(1 / (F_s + \delta))),

    the diagonal empirical Fisher of the loss summed over ``N`` examples (``N =
    dataset_size``, estimated from the batch; ``N = n`` by default: the batch alone) plus
    damping ``delta`` (the prior precision). ``K`` Monte Carlo draws
    ``theta_{s,k} = theta + eps_{s,k} / sqrt(F_s + delta)``,
    ``eps ~ N(0, I)``, give gradients of the source's batch-mean loss
    ``G_{s,k} = grad (1/n) sum_i loss[s, i](theta_{s,k})`` (vmapped over draws and sources),
    and Gaussian moment matching gives the result: ``mean[s] = mean_k G_{s,k}``,
    ``var[s] = var_k(G_{s,k}, ddof=1)``, ``count = K``. With ``center="batch"`` the mean
    is instead the exact batch-mean gradient at ``theta`` (computed on the way, no extra
    cost) and only the variance comes from the draws.

    Args:
      losses_fn: ``(params, batch) -> [S, B]`` per-source, per-example losses.
      params: the parameter pytree.
      batch: pytree of arrays with a leading batch axis (at least 2 examples over all
        devices: the Fisher comes from :func:`bogc_jax.source_grad_stats`).
      key: a PRNG key for the draws (use the same key on every device).
      mask: pytree of booleans shaped like ``params`` (or ``params -> mask``): the
        parameters that get a posterior. The others are held fixed.
      num_samples: ``K >= 2`` Monte Carlo draws.
      damping: ``delta > 0``, added to the Fisher diagonal.
      dataset_size: ``N``, the number of training examples the posterior is over (the
        batch Fisher is scaled by ``N / n``, so the draws narrow by about
        ``sqrt(N / n)``). ``None`` (default): the batch's own size. With small gradients
        and few examples, ``damping`` dominates a batch-only Fisher and the draws are
        far wider than the parameters; the training set's size gives the posterior of
        the training loss.
      method, chunk_size: how the per-example Fisher is computed (see
        :func:`bogc_jax.source_grad_stats`).
      axis_name: mapped axis when the batch is split over devices (``shard_map``/``pmap``);
        the Fisher and the batch-mean gradients are then those of the whole batch.

    Returns:
      :class:`bogc_jax.GradStats` with ``count = K``; ``mean``/``var`` leaves
      ``[S, *param.shape]`` at the chosen parameters and ``None`` elsewhere, so
      :func:`bogc_jax.bogc` calibrates the chosen leaves and passes the others through.

    Example:
      >>> import jax, jax.numpy as jnp, bogc_jax as bj
      >>> params = {"body": jnp.ones((3, 3)), "head": jnp.ones(3)}
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> def losses_fn(p, x):
      ...   h = jnp.tanh(x @ p["body"])
      ...   return jnp.stack([(h @ p["head"]) ** 2, (h[:, 0] * p["head"][0] - 1) ** 2])
      >>> stats = bj.laplace_grad_stats(losses_fn, params, x, jax.random.key(1),
      ...                               mask={"body": False, "head": True})
      >>> stats.mean["head"].shape, stats.mean["body"] is None
      ((2, 3), True)

    References:
      Multi-Modal Learning with Bayesian-Oriented Gradient Calibration, arXiv 2505.23071
      (Laplace posterior on the last layer, Monte Carlo gradient moment matching).
    """
    validation.check_int(
        "laplace_grad_stats",
        "num_samples",
        num_samples,
        minimum=2,
        fix="A variance needs two Monte Carlo draws; 8 is the default.",
    )
    validation.check_number(
        "laplace_grad_stats",
        "damping",
        damping,
        strict=True,
        fix="It keeps the posterior proper where the Fisher is 0; 1.0 is the default.",
    )
    validation.check_choice("laplace_grad_stats", "center", center, ("draws", "batch"))
    if dataset_size is not None:
        validation.check_int(
            "laplace_grad_stats",
            "dataset_size",
            dataset_size,
            minimum=1,
            fix="It is N, the number of training examples; None uses the batch alone.",
        )
    _check_key(key)
    validation.check_num_examples(
        "laplace_grad_stats", _per_example.batch_size_of(batch), axis_name
    )
    stats_lib.check_axis_name("laplace_grad_stats", params, batch, axis_name)
    chosen, rebuild, scatter = _split(params, mask)

    def chosen_losses(chosen_leaves, b):
        return losses_fn(rebuild(chosen_leaves), b)

    per_example = stats_lib.source_grad_stats(
        chosen_losses, chosen, batch, method=method, chunk_size=chunk_size, axis_name=axis_name
    )
    n = per_example.count
    to_dataset = 1.0 if dataset_size is None else dataset_size / n
    fisher = jax.tree.map(
        lambda m, v: to_dataset * ((n - 1.0) * v + n * jnp.square(m)),
        per_example.mean,
        per_example.var,
    )
    num_sources = per_example.num_sources

    def batch_mean_grad(source, leaves):
        def local_loss(ls):
            return jnp.sum(chosen_losses(ls, batch)[source])

        if axis_name is None:
            return jax.tree.map(lambda g: g / n, jax.grad(local_loss)(leaves))
        # Gradient of this device's examples, then an explicit sum over devices (correct
        # with or without shard_map's check_vma).
        local = jax.grad(local_loss)(_moments.as_varying(leaves, axis_name))
        return jax.tree.map(lambda g: jax.lax.psum(g, axis_name) / n, local)

    keys = jax.random.split(key, len(chosen))

    def draw(leaf, f, k):
        noise = jax.random.normal(k, (num_samples, num_sources) + leaf.shape, f.dtype)
        return leaf.astype(f.dtype) + noise * jax.lax.rsqrt(f + damping)

    draws = [draw(leaf, f, k) for leaf, f, k in zip(chosen, fisher, keys)]  # [K, S, ...]
    sources = jnp.arange(num_sources)
    per_source = jax.vmap(batch_mean_grad, in_axes=(0, 0))  # over sources
    grads = jax.vmap(per_source, in_axes=(None, 0))(sources, draws)  # leaves [K, S, ...]
    grads = [jnp.swapaxes(g, 0, 1) for g in grads]  # [S, K, ...]
    moments = _moments.moments_from_samples(grads, axis=1)
    result = _moments.grad_stats_from_moments(moments)
    mean = per_example.mean if center == "batch" else result.mean
    return GradStats(result.count, scatter(mean), scatter(result.var))
