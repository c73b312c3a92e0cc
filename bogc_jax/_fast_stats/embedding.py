"""The embedding rule: exact centred moments of row-gather gradients.

For ``table[idx]`` (``jnp.take(table, idx, axis=0)``, ``nnx.Embed``) example ``i``'s
gradient is ``g_i[r] = sum_{t: idx_it = r} delta_it`` on the rows it touches and zero
elsewhere, so the moments need only the touched rows: memory of the order of the
cotangents, never ``n x rows``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bogc_jax._fast_stats import kernels


def _credited_rows(idx, rows: int, mode):
    """The row each id's cotangent is credited to, and whether it is credited at all.

    As the gather's transpose (a scatter-add in the same mode) does: ``CLIP`` credits the
    clamped row; ``FILL_OR_DROP`` and ``PROMISE_IN_BOUNDS`` drop an out-of-range id (XLA's
    scatter skips out-of-bounds updates).
    """
    if mode == jax.lax.GatherScatterMode.CLIP:
        return jnp.clip(idx, 0, rows - 1), jnp.ones(idx.shape, bool)
    valid = (idx >= 0) & (idx < rows)
    return jnp.clip(idx, 0, rows - 1), valid


def embedding_moments(job: kernels.LeafJob):
    """Exact centred moments of row-gather gradients (rows repeated in an example summed).

    ``indices``: ``[n, ..., 1]``; the cotangents: per source ``[n, ..., *row_shape]``. Per
    example ``i`` and row ``r``: ``g_i[r] = sum_{t: idx_it = r} delta_it``; with ``k[r]``
    the number of examples touching ``r``:
    ``m2[r] = sum_{i touching r} (g_i[r] - mean[r])**2 + (n - k[r]) mean[r]**2``.
    """
    plan, dtype = job.plan, job.dtype
    node, _ = plan.uses[0]
    indices, deltas = job.tap_input(), job.tap_deltas()
    table_shape = tuple(node.invars[0].aval.shape)
    rows, row_shape = table_shape[0], table_shape[1:]
    width = math.prod(row_shape)
    n = indices.shape[0]
    idx = indices.reshape(n, -1).astype(jnp.int32)
    t = idx.shape[1]
    num = len(deltas)
    d = jnp.concatenate([x.reshape(n, t, width).astype(dtype) for x in deltas], axis=-1)
    idx, credited = _credited_rows(idx, rows, node.params.get("mode"))
    d = jnp.where(credited[..., None], d, 0.0)

    order = jnp.argsort(idx, axis=1, stable=True)
    idx_sorted = jnp.take_along_axis(idx, order, axis=1)
    d_sorted = jnp.take_along_axis(d, order[..., None], axis=1)
    new_row = jnp.concatenate(
        [jnp.ones((n, 1), bool), idx_sorted[:, 1:] != idx_sorted[:, :-1]], axis=1
    )
    segment = (jnp.arange(n)[:, None] * t + jnp.cumsum(new_row, axis=1) - 1).reshape(-1)
    per_row = jax.ops.segment_sum(d_sorted.reshape(n * t, -1), segment, n * t)  # g_i[r]
    row_of = jnp.zeros(n * t, jnp.int32).at[segment].set(idx_sorted.reshape(-1))
    used = jnp.zeros(n * t, bool).at[segment].set(True)
    mean = jax.ops.segment_sum(per_row, row_of, rows) / n  # [rows, W]
    touched = jax.ops.segment_sum(used.astype(dtype), row_of, rows)  # k[r]
    dev = jnp.where(used[:, None], per_row - mean[row_of], 0.0)
    m2 = jax.ops.segment_sum(jnp.square(dev), row_of, rows) + (
        (n - touched)[:, None] * jnp.square(mean)
    )

    def layout(x):  # [rows, num * W] -> [num, *table_shape] -> [num, *leaf_shape]
        x = jnp.moveaxis(x.reshape(rows, num, width), 1, 0).reshape((num,) + table_shape)
        return kernels.pull_back(plan.chain, x, 1)

    return layout(mean), layout(m2)
