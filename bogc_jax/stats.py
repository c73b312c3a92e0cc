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

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
LossesFn = Callable[[PyTree, PyTree], jax.Array]
Method = Literal["vmap", "fast", "auto"]

_METHODS = ("vmap", "fast", "auto")


class GradStats(NamedTuple):
    """Per-source gradient mean and variance over the examples of a batch.

    Attributes:
      count: ``[]`` float32, number of examples the moments were taken over (summed over
        devices when the batch was split).
      mean: pytree shaped like the parameters; each leaf ``[S, *param.shape]`` holds the
        mean per-example gradient of each of the ``S`` sources. A leaf may be ``None`` when
        the statistics were taken on a subset of the parameters.
      var: like ``mean``: the unbiased (ddof = 1) variance of the per-example gradients.
        The variance of the batch-mean gradient is ``var / count``.
    """

    count: jax.Array
    mean: PyTree
    var: PyTree

    @property
    def num_sources(self) -> int:
        """The number of sources ``S`` (the leading axis of every leaf)."""
        leaves = jax.tree.leaves(self.mean)
        if not leaves:
            raise ValueError("GradStats.mean has no leaves; it holds no sources.")
        return leaves[0].shape[0]

    def fixed_weight_grads(self) -> PyTree:
        """The fixed-weight gradient ``sum_s mean[s]``: the gradient of the summed losses."""
        return jax.tree.map(lambda m: jnp.sum(m, axis=0), self.mean)


class Moments(NamedTuple):
    """Running moments of per-example gradients, mergeable with Chan's formula.

    Attributes:
      count: ``[]`` number of examples.
      mean: pytree of ``[S, *param.shape]`` means.
      m2: pytree of ``[S, *param.shape]`` sums of squared deviations from the mean.
    """

    count: jax.Array
    mean: PyTree
    m2: PyTree


def accumulation_dtype(dtype) -> jnp.dtype:
    """The dtype statistics are kept in: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def moments_from_samples(per_example: PyTree, axis: int = 1) -> Moments:
    """Moments of per-example gradients stacked along ``axis`` (``[S, n, ...]`` leaves)."""
    leaves = jax.tree.leaves(per_example)
    n = leaves[0].shape[axis]

    def mean_and_m2(g):
        g = g.astype(accumulation_dtype(g.dtype))
        mean = jnp.mean(g, axis=axis)
        m2 = jnp.sum(jnp.square(g - jnp.expand_dims(mean, axis)), axis=axis)
        return mean, m2

    # Leaf by leaf, not with tree.map + is_leaf=tuple: the params may hold tuples.
    flat, treedef = jax.tree.flatten(per_example)
    pairs = [mean_and_m2(g) for g in flat]
    mean = jax.tree.unflatten(treedef, [p[0] for p in pairs])
    m2 = jax.tree.unflatten(treedef, [p[1] for p in pairs])
    return Moments(jnp.asarray(n, jnp.float32), mean, m2)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan's parallel merge of two sets of moments over disjoint sets of examples."""
    count = a.count + b.count
    frac_b = jnp.where(count > 0, b.count / jnp.maximum(count, 1.0), 0.0)
    cross = jnp.where(count > 0, a.count * b.count / jnp.maximum(count, 1.0), 0.0)

    def merge_leaf(mean_a, m2_a, mean_b, m2_b):
        delta = mean_b - mean_a
        mean = mean_a + delta * frac_b.astype(delta.dtype)
        m2 = m2_a + m2_b + jnp.square(delta) * cross.astype(delta.dtype)
        return mean, m2

    # Leaf by leaf, not with tree.map + is_leaf=tuple: the params may hold tuples.
    flat_mean_a, treedef = jax.tree.flatten(a.mean)
    others = [treedef.flatten_up_to(t) for t in (a.m2, b.mean, b.m2)]
    pairs = [merge_leaf(*leaves) for leaves in zip(flat_mean_a, *others)]
    mean = jax.tree.unflatten(treedef, [p[0] for p in pairs])
    m2 = jax.tree.unflatten(treedef, [p[1] for p in pairs])
    return Moments(count, mean, m2)


def all_reduce_moments(moments: Moments, axis_name) -> Moments:
    """Merge moments held by every device along ``axis_name`` (exact, Chan's formula).

    With per-device counts ``n_k``, means ``mu_k`` and ``m2_k``: ``N = sum n_k``,
    ``mu = sum n_k mu_k / N``, ``m2 = sum (m2_k + n_k (mu_k - mu)**2)``.
    """
    count = jax.lax.psum(moments.count, axis_name)
    safe = jnp.maximum(count, 1.0)

    def mean_leaf(mean):
        return jax.lax.psum(mean * moments.count.astype(mean.dtype), axis_name) / safe.astype(
            mean.dtype
        )

    mean = jax.tree.map(mean_leaf, moments.mean)

    def m2_leaf(local_mean, local_m2, global_mean):
        spread = moments.count.astype(local_mean.dtype) * jnp.square(local_mean - global_mean)
        return jax.lax.psum(local_m2 + spread, axis_name)

    m2 = jax.tree.map(m2_leaf, moments.mean, moments.m2, mean)
    return Moments(count, mean, m2)


def as_varying(tree: PyTree, axis_name) -> PyTree:
    """Mark every leaf as varying over ``axis_name`` (inside ``shard_map``).

    Differentiating with respect to a value that is invariant over a mapped axis (e.g.
    replicated params) makes JAX sum the gradient over that axis; per-device (per-example)
    gradients need the value marked varying first. Leaves already varying are left as is;
    without ``check_vma`` this is the identity.
    """
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)

    def one(x):
        aval = jax.typeof(x)
        mat = getattr(aval, "mat", None)
        varying = getattr(mat, "varying", None) if mat is not None else getattr(aval, "vma", ())
        missing = tuple(a for a in axes if a not in (varying or ()))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(one, tree)


def grad_stats_from_moments(moments: Moments) -> GradStats:
    """Finalise moments into :class:`GradStats` (unbiased variance, ddof = 1)."""
    denom = jnp.maximum(moments.count - 1.0, 1.0)
    var = jax.tree.map(lambda m2: m2 / denom.astype(m2.dtype), moments.m2)
    return GradStats(moments.count, moments.mean, var)


def moments_from_grad_stats(stats: GradStats) -> Moments:
    """Inverse of :func:`grad_stats_from_moments`: ``m2 = var * (count - 1)``."""
    factor = jnp.maximum(stats.count - 1.0, 0.0)
    m2 = jax.tree.map(lambda v: v * factor.astype(v.dtype), stats.var)
    return Moments(stats.count, stats.mean, m2)


def merge_grad_stats(a: GradStats, b: GradStats) -> GradStats:
    """Statistics of the union of two disjoint batches, from the statistics of each.

    Exact (Chan's formula); use it to accumulate statistics over micro-batches.

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
    """
    return grad_stats_from_moments(
        merge_moments(moments_from_grad_stats(a), moments_from_grad_stats(b))
    )


def batch_size_of(batch: PyTree) -> int:
    """The common leading dimension of every leaf of ``batch``."""
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError(
            "batch has no array leaves; expected a pytree of arrays with a leading batch axis."
        )
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [jnp.shape(x) for x in leaves]
        raise ValueError(
            f"batch: every leaf needs the same leading batch axis; got leaf shapes {shapes}. "
            "Give each array the examples along axis 0."
        )
    return sizes.pop()


def _per_example_loss_fn(losses_fn: LossesFn) -> Callable[[PyTree, PyTree], jax.Array]:
    """``(params, example) -> [S]`` from ``losses_fn(params, batch) -> [S, B]``."""

    def one(params, example):
        batch_of_one = jax.tree.map(lambda x: jnp.expand_dims(x, 0), example)
        losses = losses_fn(params, batch_of_one)
        return losses[:, 0]

    return one


def _vmap_moments(losses_fn: LossesFn, params: PyTree, batch: PyTree) -> Moments:
    """Moments from per-example gradients materialised with ``vmap(jacrev)``."""
    jac = jax.jacrev(_per_example_loss_fn(losses_fn))
    per_example = jax.vmap(jac, in_axes=(None, 0))(params, batch)  # leaves [n, S, ...]
    per_example = jax.tree.map(lambda g: jnp.swapaxes(g, 0, 1), per_example)
    return moments_from_samples(per_example, axis=1)


def _num_batch_shards(x) -> int:
    """How many devices split ``x``'s first axis under explicit sharding (else 1)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return 1
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    shards = 1
    for name in names:
        shards *= sharding.mesh.shape[name]
    return shards


def _chunked_moments(moments_fn, losses_fn, params, batch, chunk_size: int) -> Moments:
    """Stream the batch in chunks through ``lax.scan``, merging moments with Chan.

    Chunk ``j`` holds examples ``j, j + num_chunks, j + 2 num_chunks, ...`` (a strided
    split; the merge does not depend on the order). A batch sharded over devices along
    its first axis (contiguous blocks) then keeps every chunk spread over all devices, so
    each device streams its own examples and nothing is gathered; under explicit sharding
    (the default of ``jax.make_mesh``) this needs ``chunk_size`` to be a multiple of the
    number of devices the batch axis is split over.
    """
    n = batch_size_of(batch)
    num_chunks = n // chunk_size
    for leaf in jax.tree.leaves(batch):
        shards = _num_batch_shards(leaf)
        if chunk_size % shards:
            raise ValueError(
                f"chunk_size={chunk_size} is not a multiple of the {shards} devices the batch "
                f"axis is sharded over; pick a chunk_size that is (each device then streams "
                f"chunk_size / {shards} of its own examples per chunk)."
            )
    chunks = jax.tree.map(
        lambda x: jnp.swapaxes(jnp.reshape(x, (chunk_size, num_chunks) + jnp.shape(x)[1:]), 0, 1),
        batch,
    )
    first = jax.tree.map(lambda x: x[0], chunks)
    rest = jax.tree.map(lambda x: x[1:], chunks)
    init = moments_fn(losses_fn, params, first)

    def body(carry, chunk):
        return merge_moments(carry, moments_fn(losses_fn, params, chunk)), None

    moments, _ = jax.lax.scan(body, init, rest)
    return moments


def check_losses(losses: jax.ShapeDtypeStruct, n: int) -> int:
    """Validate the abstract output of ``losses_fn``; return the number of sources."""
    if len(losses.shape) != 2 or losses.shape[1] != n:
        raise ValueError(
            f"losses_fn must return per-source, per-example losses of shape [S, B] = [S, {n}]; "
            f"got shape {tuple(losses.shape)}. Stack the loss terms, e.g. "
            "jnp.stack([fusion_loss, audio_loss, image_loss]), each of shape [B] (no mean "
            "over the batch)."
        )
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        raise TypeError(f"losses_fn must return floating losses; got dtype {losses.dtype}.")
    return losses.shape[0]


def check_params(params: PyTree) -> None:
    """Every parameter leaf must be a floating array."""
    from bogc_jax import validation  # pylint: disable=g-import-not-at-top

    validation.check_floating(
        "source_grad_stats",
        "params",
        params,
        fix="Gradient statistics need floating parameters. Keep integer state (counters, "
        "indices) out of the params tree, e.g. with nnx.state(model, nnx.Param).",
    )


def source_grad_stats(
    losses_fn: LossesFn,
    params: PyTree,
    batch: PyTree,
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
      params: any pytree of floating arrays.
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
        devices exactly, so every device gets the statistics of the whole batch. Not needed
        under ``jit`` with sharded global arrays (on a mesh with explicit axes, the default
        of ``jax.make_mesh``, call inside ``jax.set_mesh(mesh)``; there ``"auto"`` needs
        every leaf on the fast path, or a mesh with ``AxisType.Auto`` axes).

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
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}.")
    check_params(params)
    n = batch_size_of(batch)
    from bogc_jax import validation  # pylint: disable=g-import-not-at-top

    validation.check_num_examples("source_grad_stats", n, axis_name)
    if chunk_size is not None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}.")
        if n % chunk_size:
            raise ValueError(
                f"chunk_size={chunk_size} does not divide the batch size {n}; pick a divisor "
                f"of {n} or pad the batch."
            )
    losses = jax.eval_shape(losses_fn, params, batch)
    check_losses(losses, n)

    if method == "vmap":
        moments_fn = _vmap_moments
    else:
        from bogc_jax import fast_stats  # pylint: disable=g-import-not-at-top

        moments_fn = fast_stats.fast_moments if method == "fast" else fast_stats.auto_moments

    if axis_name is not None:
        # Per-example gradients of this device's examples only (not summed over devices).
        params = as_varying(params, axis_name)
    if chunk_size is None or chunk_size == n:
        moments = moments_fn(losses_fn, params, batch)
    else:
        moments = _chunked_moments(moments_fn, losses_fn, params, batch, chunk_size)
    if axis_name is not None:
        moments = all_reduce_moments(moments, axis_name)
    return grad_stats_from_moments(moments)
