"""The examples of a batch, and the reference per-example gradients (``vmap`` of ``jacrev``).

For ``losses_fn(params, batch) -> [S, B]``, example ``i``'s losses are ``losses[:, i]``
evaluated on a batch of that one example; their Jacobian with respect to the params,
vmapped over the examples, gives the per-example gradients ``g[s, i]`` of every source,
and their two-pass moments are the reference every faster path is checked against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bogc_jax import _moments

PyTree = Any
LossesFn = Callable[[PyTree, PyTree], jax.Array]


def batch_size_of(batch: PyTree) -> int:
    """The common leading dimension of every leaf of ``batch``."""
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError(
            "batch has no array leaves; expected a pytree of arrays with a leading batch axis."
        )
    sizes: set[Any] = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [jnp.shape(x) for x in leaves]
        raise ValueError(
            f"batch: every leaf needs the same leading batch axis; got leaf shapes {shapes}. "
            "Give each array the examples along axis 0."
        )
    return int(sizes.pop())


def first_examples(batch: PyTree, count: int | None = None) -> PyTree:
    """The first example of every leaf (``count=None``), or a batch of the first ``count``.

    Abstract (``jax.ShapeDtypeStruct``) where the leaf does not vary over a mapped axis,
    so tracing with it costs nothing; inside ``shard_map`` the values themselves, so that
    their types vary over the mapped axes as the batch does.
    """

    def one(x):
        if _moments.varying_axes(x):
            return x[0] if count is None else x[:count]
        shape = jnp.shape(x)[1:] if count is None else (count,) + jnp.shape(x)[1:]
        return jax.ShapeDtypeStruct(shape, jnp.result_type(x))

    return jax.tree.map(one, batch)


def per_example_loss_fn(losses_fn: LossesFn) -> Callable[[PyTree, PyTree], jax.Array]:
    """``(params, example) -> [S]`` from ``losses_fn(params, batch) -> [S, B]``."""

    def one(params, example):
        batch_of_one = jax.tree.map(lambda x: jnp.expand_dims(x, 0), example)
        return losses_fn(params, batch_of_one)[:, 0]

    return one


def vmap_moments(losses_fn: LossesFn, params: PyTree, batch: PyTree) -> _moments.Moments:
    """Moments from per-example gradients materialised with ``vmap(jacrev)``."""
    jac = jax.jacrev(per_example_loss_fn(losses_fn))
    per_example = jax.vmap(jac, in_axes=(None, 0))(params, batch)  # leaves [n, S, ...]
    return _moments.moments_from_samples(per_example, axis=0)


MomentsFn = Callable[[LossesFn, PyTree, PyTree], _moments.Moments]


def chunked(moments_fn: MomentsFn, chunk_size: int | None) -> MomentsFn:
    """``moments_fn`` streaming the batch in chunks of ``chunk_size`` (None: all at once)."""
    if chunk_size is None:
        return moments_fn

    def streamed(losses_fn, params, batch):
        if chunk_size >= batch_size_of(batch):
            return moments_fn(losses_fn, params, batch)
        return _moments.scan_chunks(
            lambda chunk: moments_fn(losses_fn, params, chunk), batch, chunk_size
        )

    return streamed
