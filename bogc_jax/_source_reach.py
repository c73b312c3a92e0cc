"""Which loss sources reach a statistics leaf, known while tracing.

The fast statistics read, from the program of ``losses_fn``, which sources reach each
parameter leaf; the others get exact zeros in that leaf's ``[S, ...]`` mean and second
moment. In a multimodal network a branch's leaves are reached by the fusion loss and
their own auxiliary loss only, so a third of the statistics of a two-branch network with
three sources are such zeros. :func:`mark` records the reaching sources on the array
object itself, so that a transform that reads the statistics in the same trace
(:func:`bogc_jax.bogc`, one jitted training step) can leave the zero slabs out of its
work.

A mark belongs to one array object: JAX arrays and tracers are immutable, so the object
still holds the values it was marked with (the few operations that hand back their
input, such as ``astype`` to its own dtype, hand back those values too). An operation
that computes new values makes a new object without a mark (:func:`carry` passes a mark
on where zeros provably stay zeros), and a reader then treats every source as reaching
the leaf, which is always correct. Marks are held weakly: they go when their array goes.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

# id(array) -> (weak reference to the array, the sources reaching it).
_REACHING: dict[int, tuple[weakref.ref, tuple[int, ...]]] = {}


def mark(array: Any, sources: Iterable[int]) -> Any:
    """Record that only ``sources`` may be nonzero along ``array``'s leading axis.

    Returns ``array`` itself. The caller guarantees ``array[s] == 0`` for every other
    ``s``.
    """
    key = id(array)

    def forget(ref, key=key):
        entry = _REACHING.get(key)
        if entry is not None and entry[0] is ref:
            del _REACHING[key]

    try:
        ref = weakref.ref(array, forget)
    except TypeError:  # an object without weak references: leave it unmarked
        return array
    _REACHING[key] = (ref, tuple(sorted(set(int(s) for s in sources))))
    return array


def reaching(num_sources: int, *arrays: Any) -> tuple[int, ...]:
    """The sources that may be nonzero in any of ``arrays`` (the statistics of one leaf),
    sorted: those marked on each (:func:`mark`), every source for an array without a
    mark."""
    found: set[int] = set()
    for array in arrays:
        entry = _REACHING.get(id(array))
        found |= set(entry[1] if entry is not None and entry[0]() is array else range(num_sources))
    return tuple(sorted(found))


def carry(marked: Any, new: Any) -> Any:
    """Give ``new`` the mark of ``marked``, if it has one (for operations that keep the
    zero slabs zero: scaling, summing over devices). Returns ``new``."""
    entry = _REACHING.get(id(marked))
    if entry is not None and entry[0]() is marked:
        mark(new, entry[1])
    return new
