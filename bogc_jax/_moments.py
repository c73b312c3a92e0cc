"""Moments of per-example gradients: merged over chunks, micro-batches and devices.

Every statistic of the library is kept as ``(count, mean, m2)`` with
``m2 = sum_i (g_i - mean)**2`` over the examples, and two sets of moments over disjoint
examples are merged with Chan et al.'s parallel formula, exact and numerically stable:

    n    = n_a + n_b
    mean = mean_a + delta * n_b / n,                 delta = mean_b - mean_a
    m2   = m2_a + m2_b + delta**2 * n_a * n_b / n

(:func:`merge_leaf`, the one place it is written). Over the devices of a mapped axis the
same merge takes its ``K``-way form (:func:`all_reduce_moments`). A batch streamed in chunks
is split with a stride (:func:`strided_chunks`), so that a batch sharded in contiguous
blocks over devices keeps every chunk spread over all of them.

The last part holds the typing shims of ``shard_map`` (values *varying* over a mapped
axis) and of explicit sharding (``jax.sharding.reshard``), shared by the statistics.

References:
  Chan, Golub and LeVeque, Updating formulae and a pairwise algorithm for computing
  sample variances, 1979.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bogc_jax import _source_reach
from bogc_jax._sources import sum_over_sources

PyTree = Any


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

    count: jax.Array  # type: ignore[assignment]  # a field, shadowing tuple.count
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
        """The fixed-weight gradient ``sum_s mean[s]``: the gradient of the summed losses.

        Summed as ``S - 1`` elementwise additions (:func:`sum_over_sources`), an order of
        magnitude faster on XLA:CPU than a reduction over the short leading axis; the
        slabs of sources known not to reach a leaf (zeros, see ``_source_reach``) are
        left out.
        """
        return jax.tree.map(
            lambda m: sum_over_sources(m, _source_reach.reaching(m.shape[0], m)), self.mean
        )


GradStats.__module__ = "bogc_jax"


class Moments(NamedTuple):
    """Running moments of per-example gradients, mergeable with Chan's formula.

    Attributes:
      count: ``[]`` float32, number of examples.
      mean: pytree of ``[S, *param.shape]`` means.
      m2: pytree of ``[S, *param.shape]`` sums of squared deviations from the mean.
    """

    count: jax.Array  # type: ignore[assignment]  # a field, shadowing tuple.count
    mean: PyTree
    m2: PyTree


def accumulation_dtype(dtype) -> jnp.dtype:
    """The dtype statistics are kept in: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def leaves_up_to(treedef: Any, tree: PyTree) -> list:
    """The subtrees of ``tree`` at the leaves of ``treedef`` (``None`` leaves kept)."""
    return treedef.flatten_up_to(tree)


def _map_leaves(fn: Callable, *trees: PyTree) -> list[PyTree]:
    """``fn`` leaf by leaf over trees of ``trees[0]``'s structure; one tree per output.

    Not ``jax.tree.map`` with tuple outputs: the params may themselves hold tuples.
    """
    flat, treedef = jax.tree.flatten(trees[0])
    others = [leaves_up_to(treedef, t) for t in trees[1:]]
    outs = [fn(*leaves) for leaves in zip(flat, *others)]
    return [jax.tree.unflatten(treedef, list(column)) for column in zip(*outs)]


# ----------------------------------------------------------------------------------------
# Chan's merge, and moments from samples.


def merge_leaf(count_a, mean_a, m2_a, count_b, mean_b, m2_b) -> tuple[jax.Array, jax.Array]:
    """Chan's merge of one leaf: ``(mean, m2)`` of the union of two disjoint sets.

    ``mean = mean_a + delta n_b / n`` and ``m2 = m2_a + m2_b + delta**2 n_a n_b / n`` with
    ``delta = mean_b - mean_a`` and ``n = n_a + n_b`` (both zero when ``n = 0``). The
    coefficients are formed in the leaf's accumulation dtype (float64 stays float64).
    """
    delta = mean_b - mean_a
    wide = accumulation_dtype(delta.dtype)
    n_a, n_b = jnp.asarray(count_a, wide), jnp.asarray(count_b, wide)
    n = n_a + n_b
    safe = jnp.maximum(n, 1.0)
    frac_b = jnp.where(n > 0, n_b / safe, 0.0).astype(delta.dtype)
    cross = jnp.where(n > 0, n_a * n_b / safe, 0.0).astype(delta.dtype)
    return mean_a + delta * frac_b, m2_a + m2_b + jnp.square(delta) * cross


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan's parallel merge of two sets of moments over disjoint sets of examples."""
    mean, m2 = _map_leaves(
        lambda ma, sa, mb, sb: merge_leaf(a.count, ma, sa, b.count, mb, sb),
        a.mean,
        a.m2,
        b.mean,
        b.m2,
    )
    return Moments(a.count + b.count, mean, m2)


def moments_from_samples(per_example: PyTree, axis: int = 1) -> Moments:
    """Two-pass moments of per-example gradients stacked along ``axis``."""
    n = jax.tree.leaves(per_example)[0].shape[axis]

    def mean_and_m2(g):
        g = g.astype(accumulation_dtype(g.dtype))
        mean = jnp.mean(g, axis=axis)
        return mean, jnp.sum(jnp.square(g - jnp.expand_dims(mean, axis)), axis=axis)

    mean, m2 = _map_leaves(mean_and_m2, per_example)
    return Moments(jnp.asarray(n, jnp.float32), mean, m2)


def var_from_m2(m2, count):
    """The unbiased (ddof = 1) variance ``m2 / max(count - 1, 1)`` of one leaf."""
    return m2 / jnp.maximum(count - 1.0, 1.0).astype(m2.dtype)


def m2_from_var(var, count):
    """Inverse of :func:`var_from_m2`: ``m2 = var * max(count - 1, 0)``."""
    return var * jnp.maximum(count - 1.0, 0.0).astype(var.dtype)


def grad_stats_from_moments(moments: Moments) -> GradStats:
    """Finalise moments into :class:`GradStats` (unbiased variance, ddof = 1)."""
    var = jax.tree.map(
        lambda m2: _source_reach.carry(m2, var_from_m2(m2, moments.count)), moments.m2
    )
    return GradStats(moments.count, moments.mean, var)


def moments_from_grad_stats(stats: GradStats) -> Moments:
    """Inverse of :func:`grad_stats_from_moments` (``None`` leaves stay ``None``)."""
    return Moments(
        stats.count, stats.mean, jax.tree.map(lambda v: m2_from_var(v, stats.count), stats.var)
    )


# ----------------------------------------------------------------------------------------
# Streaming in chunks, and merging across devices.


def strided_chunks(tree: PyTree, chunk_size: int) -> PyTree:
    """Leaves ``[n, ...]`` -> ``[n // chunk_size, chunk_size, ...]``, chunk ``j`` holding
    examples ``j, j + num_chunks, j + 2 num_chunks, ...``.

    The merge does not depend on the order; with the stride, a batch sharded over devices
    in contiguous blocks keeps every chunk spread over all of them, so each device streams
    its own examples and nothing is gathered.
    """

    def split(x):
        num_chunks = jnp.shape(x)[0] // chunk_size
        return jnp.swapaxes(jnp.reshape(x, (chunk_size, num_chunks) + jnp.shape(x)[1:]), 0, 1)

    return jax.tree.map(split, tree)


def scan_chunks(moments_of: Callable[[PyTree], Moments], xs: PyTree, chunk_size: int) -> Moments:
    """Moments of ``xs`` (leaves ``[n, ...]``) streamed through ``lax.scan`` in chunks.

    ``moments_of(chunk)`` gives the moments of one chunk of ``chunk_size`` examples; the
    chunks (:func:`strided_chunks`) are merged with :func:`merge_moments`.
    """
    chunks = strided_chunks(xs, chunk_size)
    init = moments_of(jax.tree.map(lambda x: x[0], chunks))

    def body(carry, chunk):
        return merge_moments(carry, moments_of(chunk)), None

    moments, _ = jax.lax.scan(body, init, jax.tree.map(lambda x: x[1:], chunks))
    return moments


def all_reduce_moments(moments: Moments, axis_name) -> Moments:
    """Merge moments held by every device along ``axis_name`` (exact, Chan's formula).

    With per-device counts ``n_k``, means ``mu_k`` and ``m2_k``: ``N = sum n_k``,
    ``mu = sum n_k mu_k / N``, ``m2 = sum (m2_k + n_k (mu_k - mu)**2)``.
    """
    count = jax.lax.psum(moments.count, axis_name)
    safe = jnp.maximum(count, 1.0)

    def mean_leaf(mean):
        weight = moments.count.astype(mean.dtype)
        return jax.lax.psum(mean * weight, axis_name) / safe.astype(mean.dtype)

    # Zero slabs stay zero (the same sources reach a leaf on every device): marks carry.
    mean = jax.tree.map(lambda x: _source_reach.carry(x, mean_leaf(x)), moments.mean)

    def m2_leaf(local_mean, local_m2, global_mean):
        spread = moments.count.astype(local_mean.dtype) * jnp.square(local_mean - global_mean)
        return _source_reach.carry(local_m2, jax.lax.psum(local_m2 + spread, axis_name))

    m2 = jax.tree.map(m2_leaf, moments.mean, moments.m2, mean)
    return Moments(count, mean, m2)


# ----------------------------------------------------------------------------------------
# Typing shims: values varying over mapped axes (shard_map), and explicit sharding.


def varying_axes(x) -> frozenset:
    """The mapped axes ``x`` (a value or an abstract value) varies over inside ``shard_map``."""
    aval = x if isinstance(x, jax.core.ShapedArray) else jax.typeof(x)
    mat = getattr(aval, "mat", None)
    axes = getattr(mat, "varying", None) if mat is not None else getattr(aval, "vma", None)
    return frozenset(axes or ())


def _pcast_missing(x, axes):
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def as_varying(tree: PyTree, axis_name) -> PyTree:
    """Mark every leaf as varying over ``axis_name`` (inside ``shard_map``).

    Differentiating with respect to a value that is invariant over a mapped axis (e.g.
    replicated params) makes JAX sum the gradient over that axis; per-device (per-example)
    gradients need the value marked varying first. Leaves already varying are left as is;
    without ``check_vma`` this is the identity.
    """
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return jax.tree.map(lambda x: _pcast_missing(x, axes), tree)


def typed_like(x, ref):
    """``x`` marked varying over the mapped axes ``ref`` varies over (inside ``shard_map``)."""
    return _pcast_missing(x, tuple(varying_axes(ref)))


def varying_zeros(aval):
    """Zeros of ``aval``'s shape, dtype and varying axes.

    A perturbation must vary over the axes its tap does: an invariant one would be summed
    over the devices in the backward pass.
    """
    return typed_like(jnp.zeros(aval.shape, aval.dtype), aval)


def num_batch_shards(x) -> int:
    """How many devices split ``x``'s first axis under explicit sharding (else 1)."""
    sharding: Any = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return 1
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    shards = 1
    for name in names:
        shards *= sharding.mesh.shape[name]
    return shards


def sum_as_product(x, axis: int):
    """Sum over ``axis`` as a product with ones.

    XLA:CPU reduces an axis of a wide array (a leading one, or any axis of a complex
    array) several times slower than it multiplies by a vector of ones; the result is
    the same. The output is replicated where ``x`` is sharded explicitly.
    """
    ones = jnp.ones((x.shape[axis],), x.dtype)
    return jnp.tensordot(
        ones,
        x,
        axes=((0,), (axis,)),
        precision=jax.lax.Precision.HIGHEST,
        out_sharding=replicated_if_sharded(x),
    )


def replicated_if_sharded(*xs):
    """``P()`` when an operand is sharded explicitly (a contraction over the examples then
    needs its output sharding spelled out), else None."""
    for x in xs:
        spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
        if spec and any(s is not None for s in spec):
            return jax.sharding.PartitionSpec()
    return None


def _on_no_mesh(x) -> bool:
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    return mesh is not None and mesh.empty


def replicate_on_context_mesh(tree: PyTree) -> PyTree:
    """Leaves that are on no mesh, replicated on the mesh set by ``jax.set_mesh``.

    Under ``jit`` on a mesh with explicit axes, parameters that were never placed (no
    ``device_put``) carry no mesh, and combining them with a sharded batch inside ``vmap``
    fails; replicating them, as ``device_put(params, NamedSharding(mesh, P()))`` would,
    changes no value. The identity when no mesh with explicit axes is set.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.sharding.AxisType.Explicit not in tuple(mesh.axis_types):
        return tree
    spec = jax.sharding.PartitionSpec()
    return jax.tree.map(lambda x: jax.sharding.reshard(x, spec) if _on_no_mesh(x) else x, tree)
