"""Per-source, per-sample gradient statistics of a batch.

A *source* is one loss term (the fusion loss, or one modality's unimodal loss). For a
batch of ``n`` examples, source ``s`` and parameter coordinate ``d``, the per-example
gradients ``g[s, i, d] = d loss[s, i] / d params[d]`` have

    mean[s, d] = (1/n) sum_i g[s, i, d]
    var[s, d]  = 1/(n - 1) sum_i (g[s, i, d] - mean[s, d])**2      (ddof = 1)

:class:`GradStats` holds these for every leaf of a parameter pytree, with a leading
source axis. Moments are accumulated as ``(count, mean, m2)`` with
``m2 = sum_i (g_i - mean)**2`` and merged with Chan et al.'s parallel formula, which is
exact and numerically stable whether the batch is streamed in chunks, split over devices
or split into micro-batches:

    n   = n_a + n_b
    mean = mean_a + delta * n_b / n,                 delta = mean_b - mean_a
    m2  = m2_a + m2_b + delta**2 * n_a * n_b / n
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np

from bogc_jax import _fast_stats, _moments, _per_example, validation
from bogc_jax._fast_stats.means import fast_means
from bogc_jax._moments import GradStats

PyTree = Any
LossesFn = Callable[[PyTree, PyTree], jax.Array]
Method = Literal["vmap", "fast", "auto"]

_METHODS = ("vmap", "fast", "auto")
_MOMENTS_FNS = {
    "vmap": _per_example.vmap_moments,
    "fast": _fast_stats.fast_moments,
    "auto": _fast_stats.auto_moments,
}
_STACK_HINT = (
    "Stack the loss terms, e.g. jnp.stack([fusion_loss, audio_loss, image_loss]), each of "
    "shape [B] (no mean over the batch)."
)

__all__ = ["GradStats", "Method", "merge_grad_stats", "source_grad_means", "source_grad_stats"]


def merge_grad_stats(a: GradStats, b: GradStats) -> GradStats:
    """Statistics of the union of two disjoint batches, from the statistics of each.

    Exact (Chan's formula); use it to accumulate statistics over micro-batches. With
    ``m2 = var * (count - 1)`` and ``delta = b.mean - a.mean``:

        n    = a.count + b.count
        mean = a.mean + delta * b.count / n
        var  = (m2_a + m2_b + delta**2 * a.count * b.count / n) / (n - 1)

    A leaf that is ``None`` in both (statistics on a subset of the parameters) stays
    ``None``; ``None`` in one only is an error.

    Args:
      a: statistics of one batch.
      b: statistics of another batch, on the same parameters and sources.

    Returns:
      :class:`GradStats` with ``count = a.count + b.count``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> params = {"w": jnp.ones(2)}
      >>> x = jnp.arange(12.0).reshape(6, 2)
      >>> losses_fn = lambda p, x: jnp.stack([x @ p["w"], (x @ p["w"]) ** 2])
      >>> parts = [bj.source_grad_stats(losses_fn, params, x[:2], method="vmap"),
      ...          bj.source_grad_stats(losses_fn, params, x[2:], method="vmap")]
      >>> merged = bj.merge_grad_stats(*parts)
      >>> whole = bj.source_grad_stats(losses_fn, params, x, method="vmap")
      >>> float(merged.count), bool(jnp.allclose(merged.var["w"], whole.var["w"]))
      (6.0, True)

    References:
      Chan, Golub and LeVeque, Updating formulae and a pairwise algorithm for computing
      sample variances, 1979.
    """
    for name, stats in (("a", a), ("b", b)):
        if not isinstance(stats, GradStats):
            raise TypeError(
                f"merge_grad_stats: {name} must be a bogc_jax.GradStats; got "
                f"{type(stats).__name__}. Build it with bj.source_grad_stats."
            )
    is_none = lambda x: x is None
    for field in ("mean", "var"):
        flat_a, treedef = jax.tree_util.tree_flatten_with_path(getattr(a, field), is_leaf=is_none)
        flat_b, treedef_b = jax.tree.flatten(getattr(b, field), is_leaf=is_none)
        if cast(Any, treedef_b) != treedef:
            raise ValueError(
                f"merge_grad_stats: a.{field} and b.{field} have different pytree structures "
                f"({treedef} and {treedef_b}); merge statistics of the same parameters."
            )
        for (path, leaf_a), leaf_b in zip(flat_a, flat_b):
            if (leaf_a is None) != (leaf_b is None):
                which, other = ("a", "b") if leaf_a is None else ("b", "a")
                raise ValueError(
                    f"merge_grad_stats: {which}.{field}{jax.tree_util.keystr(path)} is None but "
                    f"{other}.{field}{jax.tree_util.keystr(path)} is not. Merge statistics taken "
                    "on the same parameters (e.g. bj.laplace_grad_stats with the same mask)."
                )
    moments = _moments.merge_moments(
        _moments.moments_from_grad_stats(a), _moments.moments_from_grad_stats(b)
    )
    return _moments.grad_stats_from_moments(moments)


# ----------------------------------------------------------------------------------------
# Checks of the arguments of source_grad_stats.


def check_losses(owner: str, losses_fn: LossesFn, params: PyTree, batch: PyTree, n: int) -> int:
    """``losses_fn`` gives floating ``[S, B]`` losses, column ``i`` from example ``i``.

    The shape is checked on the batch and on a batch of its first example alone: a
    transposed ``[B, S]`` output has the right shape when ``B = S``, but not on one example.

    Returns:
      the number of sources ``S``.
    """
    losses = jax.eval_shape(losses_fn, params, batch)
    if len(losses.shape) != 2 or losses.shape[1] != n:
        raise ValueError(
            f"{owner}: losses_fn must return per-source, per-example losses of shape "
            f"[S, B] = [S, {n}]; got shape {tuple(losses.shape)}. {_STACK_HINT}"
        )
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        raise TypeError(
            f"{owner}: losses_fn must return floating losses; got dtype {losses.dtype}."
        )
    num_sources = losses.shape[0]
    one = jax.eval_shape(losses_fn, params, _per_example.first_examples(batch, 1))
    if tuple(one.shape) != (num_sources, 1):
        raise ValueError(
            f"{owner}: losses_fn must return per-source, per-example losses of shape [S, B], "
            f"column i from example i; on a batch of {n} it returned {tuple(losses.shape)} "
            f"but on a batch of one example {tuple(one.shape)} instead of ({num_sources}, 1). "
            f"Is the output transposed ([B, S])? {_STACK_HINT}"
        )
    return num_sources


def check_params(owner: str, params: PyTree) -> None:
    """Every parameter leaf must be a floating array."""
    validation.check_floating(
        owner,
        "params",
        params,
        fix="Gradient statistics need floating parameters. Keep integer state (counters, "
        "indices) out of the params tree, e.g. with nnx.state(model, nnx.Param).",
    )


def check_axis_name(owner: str, params: PyTree, batch: PyTree, axis_name) -> None:
    """Inside ``shard_map``, a batch split over a mapped axis needs that ``axis_name``.

    The batch then varies over the axis while replicated params do not: without
    ``axis_name`` the per-example gradients would be summed over the devices while the
    count stays this device's. (Params that vary over the axis too give the statistics of
    this device's examples, which is allowed.)
    """
    if axis_name is not None:
        return
    batch_axes = frozenset().union(*(_moments.varying_axes(x) for x in jax.tree.leaves(batch)))
    if not batch_axes:
        return
    param_axes = [_moments.varying_axes(x) for x in jax.tree.leaves(params)]
    missing = sorted(a for a in batch_axes if not all(a in axes for axes in param_axes))
    if missing:
        name = missing[0] if len(missing) == 1 else tuple(missing)
        raise ValueError(
            f"{owner}: the batch varies over the mapped axis {name!r} (it is split over "
            "devices inside shard_map or pmap) but axis_name is None, so the statistics would "
            "sum the gradients of the devices and count only this device's examples. Pass "
            f"axis_name={name!r} to get the statistics of the whole batch, merged across "
            "devices."
        )


def check_chunk_size(owner: str, chunk_size, batch: PyTree, n: int) -> int | None:
    """``chunk_size`` is None or a positive int (NumPy ints too, not bools) dividing ``n``
    and, under explicit sharding, a multiple of the devices the batch axis is split over."""
    if chunk_size is None:
        return None
    is_int = isinstance(chunk_size, (int, np.integer)) and not isinstance(
        chunk_size, (bool, np.bool_)
    )
    if not is_int or chunk_size < 1:
        raise ValueError(
            f"{owner}: chunk_size must be a positive int or None; got {chunk_size!r}. Pass the "
            "number of examples per chunk, e.g. chunk_size=32."
        )
    chunk_size = int(chunk_size)
    if n % chunk_size:
        raise ValueError(
            f"{owner}: chunk_size={chunk_size} does not divide the batch size {n}; pick a "
            f"divisor of {n} or pad the batch."
        )
    for leaf in jax.tree.leaves(batch):
        shards = _moments.num_batch_shards(leaf)
        if chunk_size % shards:
            raise ValueError(
                f"{owner}: chunk_size={chunk_size} is not a multiple of the {shards} devices "
                f"the batch axis is sharded over; pick a chunk_size that is (each device then "
                f"streams chunk_size / {shards} of its own examples per chunk)."
            )
    return chunk_size


def _unwrap_module(losses_fn: LossesFn, params) -> tuple[LossesFn, PyTree]:
    """``(losses_fn, params)``, a Flax NNX module replaced by its ``nnx.Param`` state.

    For a module, ``params`` becomes its ``nnx.Param`` state and ``losses_fn`` takes that
    state, rebuilding the module from its parts (``nnx.merge``) before the call; any other
    pytree is returned as it is.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is None or not isinstance(params, nnx.Module):
        return losses_fn, params
    graphdef, param_state, rest = nnx.split(params, nnx.Param, ...)

    def state_losses_fn(state, batch):
        return losses_fn(nnx.merge(graphdef, state, rest), batch)

    return state_losses_fn, param_state


def source_grad_stats(
    losses_fn: LossesFn,
    params: PyTree,
    batch: PyTree,
    *,
    method: Method = "auto",
    chunk_size: int | None = None,
    axis_name: Any = None,
) -> GradStats:
    """Per-source, per-sample gradient mean and variance of a batch.

    For ``losses = losses_fn(params, batch)`` of shape ``[S, B]`` (one row per loss
    source, one column per example) this returns, for every parameter leaf, the mean and
    the unbiased variance over the ``B`` examples of ``d losses[s, i] / d params``:
    ``mean[s] = (1/B) sum_i g[s, i]`` and ``var[s] = sum_i (g[s, i] - mean[s])**2 / (B - 1)``.
    Moments are accumulated in float32 (float64 stays float64) whatever the parameters'
    dtype.

    Examples must be independent: ``losses[:, i]`` may depend only on example ``i`` (no
    batch statistics such as batch normalisation in training mode).

    Args:
      losses_fn: ``(params, batch) -> [S, B]`` per-source, per-example losses.
      params: any pytree of floating arrays, or a Flax NNX module (as for ``nnx.grad``:
        ``losses_fn`` then takes the module, and the statistics are those of its
        ``nnx.Param`` state, shaped like ``nnx.grad``'s result, ready for
        ``nnx.Optimizer.update(model, grads, grad_stats=stats)``).
      batch: pytree of arrays whose leaves share a leading batch axis ``B``; ``B >= 2``
        over all devices (a ddof = 1 variance needs two examples; a batch of one is an
        error).
      method: ``"vmap"`` materialises per-example gradients with ``jax.vmap`` of
        ``jax.jacrev`` (the reference); ``"fast"`` computes exact per-layer moments
        without materialising them; ``"auto"`` uses the fast path for the layers it
        recognises and vmap for the rest.
      chunk_size: stream the batch through ``lax.scan`` in chunks of this many examples
        (must divide ``B``), bounding the memory of the vmap path to ``chunk_size x P``.
      axis_name: when called inside ``shard_map`` or ``pmap`` with the batch split over
        devices, the mapped axis name: counts, means and second moments are merged across
        devices exactly, so every device gets the statistics of the whole batch (forgetting
        it there is an error). Not needed under ``jit`` with sharded global arrays (on a
        mesh with explicit axes, the default of ``jax.make_mesh``, call inside
        ``jax.set_mesh(mesh)``; params not placed on the mesh are replicated on it; there
        ``"auto"`` needs every leaf on the fast path, or a mesh with ``AxisType.Auto``
        axes).

    Returns:
      :class:`GradStats` with ``count = B`` (summed over devices) and ``mean``/``var``
      pytrees shaped like ``params`` with a leading source axis ``S``.

    Example:
      >>> import jax, jax.numpy as jnp, bogc_jax as bj
      >>> params = {"w": jnp.ones(3)}
      >>> batch = jnp.arange(12.0).reshape(4, 3)
      >>> def losses_fn(p, x):
      ...   return jnp.stack([x @ p["w"], 0.5 * (x @ p["w"]) ** 2])
      >>> stats = bj.source_grad_stats(losses_fn, params, batch, method="vmap")
      >>> stats.mean["w"].shape, float(stats.count)
      ((2, 3), 4.0)
    """
    owner = "source_grad_stats"
    validation.check_choice(owner, "method", method, _METHODS)
    losses_fn, params = _unwrap_module(losses_fn, params)
    check_params(owner, params)
    n = _per_example.batch_size_of(batch)
    validation.check_num_examples(owner, n, axis_name)
    check_axis_name(owner, params, batch, axis_name)
    chunk_size = check_chunk_size(owner, chunk_size, batch, n)
    check_losses(owner, losses_fn, params, batch, n)

    params = _moments.replicate_on_context_mesh(params)
    if axis_name is not None:
        # Per-example gradients of this device's examples only (not summed over devices).
        params = _moments.as_varying(params, axis_name)
    if axis_name is None and chunk_size is None and method != "vmap":
        # One batch on one device: the fast rules form the variances themselves (no pass
        # of their own over the [S, P] results); chunks and devices merge m2.
        fallback = method == "auto"
        return _fast_stats.one_batch_grad_stats(losses_fn, params, batch, fallback=fallback)
    moments_fn = _per_example.chunked(_MOMENTS_FNS[method], chunk_size)
    moments = moments_fn(losses_fn, params, batch)
    if axis_name is not None:
        moments = _moments.all_reduce_moments(moments, axis_name)
    return _moments.grad_stats_from_moments(moments)


def source_grad_means(losses_fn: LossesFn, params: PyTree, batch: PyTree) -> GradStats:
    """Per-source mean gradients of a batch, without variances (what MMPareto reads).

    For ``losses = losses_fn(params, batch)`` of shape ``[S, B]``, every parameter leaf gets
    ``mean[s] = (1/B) sum_i d losses[s, i] / d params``, the same as
    :func:`source_grad_stats`'s ``mean``, by one forward pass and one backward pass per
    source over the part of the program its loss depends on (a source built separately,
    e.g. a row of ``jnp.stack``, skips the layers it does not reach); no squared product
    is formed. Means are returned in float32 (float64 stays float64).

    Args:
      losses_fn: ``(params, batch) -> [S, B]`` per-source, per-example losses.
      params: any pytree of floating arrays, or a Flax NNX module (``losses_fn`` then
        takes the module, as for :func:`source_grad_stats`).
      batch: pytree of arrays whose leaves share a leading batch axis ``B`` (``B >= 1``).
        Under ``jit`` with sharded global arrays the means are of the whole batch; inside
        ``shard_map`` or ``pmap`` with the batch split over devices use
        :func:`source_grad_stats` with ``axis_name``.

    Returns:
      :class:`GradStats` with ``count = B``, ``mean`` shaped like ``params`` with a leading
      source axis ``S``, and ``var = None``: accepted by :func:`bogc_jax.mmpareto` and
      ``fixed_weight_grads``, not by transforms that read variances (bogc, cggm).

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> params = {"w": jnp.ones(3)}
      >>> batch = jnp.arange(12.0).reshape(4, 3)
      >>> def losses_fn(p, x):
      ...   return jnp.stack([x @ p["w"], 0.5 * (x @ p["w"]) ** 2])
      >>> means = bj.source_grad_means(losses_fn, params, batch)
      >>> full = bj.source_grad_stats(losses_fn, params, batch, method="vmap")
      >>> means.var is None, bool(jnp.allclose(means.mean["w"], full.mean["w"]))
      (True, True)
    """
    owner = "source_grad_means"
    losses_fn, params = _unwrap_module(losses_fn, params)
    check_params(owner, params)
    n = _per_example.batch_size_of(batch)
    try:
        check_axis_name(owner, params, batch, None)
    except ValueError as err:
        raise ValueError(
            f"{err} source_grad_means takes no axis_name: call bj.source_grad_stats(..., "
            "axis_name=...) there instead."
        ) from None
    num_sources = check_losses(owner, losses_fn, params, batch, n)
    params = _moments.replicate_on_context_mesh(params)
    treedef = jax.tree.structure(params)
    means = fast_means(losses_fn, params, batch, num_sources)
    return GradStats(jnp.asarray(n, jnp.float32), jax.tree.unflatten(treedef, means), None)
