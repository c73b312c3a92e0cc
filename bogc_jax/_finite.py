"""The library's non-finite policy, written once for every transform.

A transform's update is split in two. Its *core* computes the new updates and the new
state as if nothing could go wrong, and declares which inputs count (a :class:`Step`).
:func:`finite_guarded` turns the core into an optax ``update`` function that applies one
policy, in the spirit of ``optax.apply_if_finite``:

    ok      = all inputs finite  and  valid  and  new updates finite  and  new state finite
    ok      = ok on every device along axis_name (so replicated states stay equal)
    updates = new updates      if ok else the incoming updates
    state   = new state        if ok else the previous state
    state.finite = ok,  state.nonfinite_count += not ok

so a bad step never poisons the state and never turns finite gradients into NaN, and the
flag is there for users and for ``optax.apply_if_finite`` further down a chain. ``valid``
carries the domain checks a value can fail at run time (a negative variance, a count of
zero); the outputs are checked too, so an overflow inside a transform is flagged like a
NaN input.

The state fields keep the names ``finite`` and ``nonfinite_count`` rather than optax's
``last_finite`` and ``total_notfinite``: they sit next to each transform's diagnostics, and
``optax.tree.get(state, "finite")`` must not collide with an ``apply_if_finite`` wrapper's
fields in the same chain.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bogc_jax._types import PyTree


class Step(NamedTuple):
    """What a transform's core computed for one update, before the non-finite policy.

    Attributes:
      updates: the new updates, shaped like the incoming ones.
      state: the new state, a NamedTuple ending in ``finite`` and ``nonfinite_count``
        (whatever it holds there is replaced).
      inputs: the trees whose entries must be finite for the update to be used (the
        gradients, the statistics or the scores it read).
      valid: ``[]`` bool, the run-time domain checks of the inputs (True by default).
      axis_name: a mapped axis over which the flag must agree, or None.
    """

    updates: PyTree
    state: Any
    inputs: Sequence[PyTree]
    valid: Any = True
    axis_name: Any = None


def _is_floating(x) -> bool:
    dtype = getattr(x, "dtype", None)
    dtype = jnp.result_type(x) if dtype is None else dtype
    return jnp.issubdtype(dtype, jnp.inexact)


def all_finite(*trees: PyTree) -> jax.Array:
    """``[]`` bool: every floating entry of every tree is finite (``None`` leaves skipped)."""
    flags = [
        jnp.all(jnp.isfinite(x)) for tree in trees for x in jax.tree.leaves(tree) if _is_floating(x)
    ]
    return functools.reduce(jnp.logical_and, flags, jnp.ones([], bool))


def all_finite_across(finite: jax.Array, axis_name) -> jax.Array:
    """All devices along ``axis_name`` saw finite inputs (so their states stay equal)."""
    if axis_name is None:
        return finite
    return jax.lax.pmin(finite.astype(jnp.int32), axis_name) > 0


def select(finite: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where ``finite``, else ``old``, leaf by leaf, in ``old``'s dtypes."""

    def pick(n, o):
        if n is o:  # a leaf the transform left alone
            return o
        return jnp.where(finite, jnp.asarray(n).astype(jnp.result_type(o)), o)

    return jax.tree.map(pick, new, old)


def guard_state(finite: jax.Array, new_state, old_state):
    """The state after an update: ``new_state`` if ``finite``, else ``old_state``.

    Both are NamedTuples ending in the fields ``finite`` (``[]`` bool) and
    ``nonfinite_count`` (``[]`` int32); ``finite`` records this update's flag and
    ``nonfinite_count`` counts the rejected updates so far.
    """
    count = old_state.nonfinite_count
    new_state = new_state._replace(finite=old_state.finite, nonfinite_count=count)
    kept = select(finite, new_state, old_state)
    return kept._replace(
        finite=jnp.asarray(finite, bool),
        nonfinite_count=jnp.where(finite, count, optax.safe_increment(count)),
    )


def initial_flags() -> tuple[jax.Array, jax.Array]:
    """``(finite, nonfinite_count)`` of a fresh state: ``(True, 0)``, two distinct buffers."""
    return jnp.ones([], bool), jnp.zeros([], jnp.int32)


def finite_guarded(core: Callable[..., Step]) -> Callable[..., tuple[PyTree, Any]]:
    """An optax ``update`` function: ``core`` under the non-finite policy (module doc).

    Args:
      core: ``core(updates, state, params, **extra_args) -> Step``.

    Returns:
      ``update(updates, state, params=None, **extra_args) -> (updates, state)``.
    """

    def update_fn(updates, state, params=None, **extra_args):
        step = core(updates, state, params, **extra_args)
        ok = all_finite(*step.inputs, step.updates, step.state) & jnp.asarray(step.valid, bool)
        ok = all_finite_across(ok, step.axis_name)
        return select(ok, step.updates, updates), guard_state(ok, step.state, state)

    return update_fn
