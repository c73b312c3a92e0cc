"""Types shared by the library's modules: pytrees, labels and every string option."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

PyTree = Any
"""A JAX pytree (nested dicts, lists, tuples, NamedTuples, ... of arrays)."""

Label = int | None
"""A parameter's modality index, or None for a shared parameter."""

ParamLabels = PyTree | Callable[[PyTree], PyTree]
"""A pytree of :data:`Label` shaped like the params (or a prefix of them), or a callable."""

Aggregation = Literal["dempster", "precision", "dimension_frame", "sum"]
"""How :func:`bogc_jax.bogc` weighs the sources (see :mod:`bogc_jax.weightings`)."""

Noise = Literal["absolute", "relative"]
"""How :func:`bogc_jax.bogc` compares variances across sources."""

CggmMode = Literal["stable", "reference"]
"""CGGM's balancing term: bounded shares or the official formula."""

Direction = Literal["gradients", "weights"]
"""What CGGM's direction loss compares: output-layer gradients or weights."""

OgmMode = Literal["continuous", "reference"]
"""OGM's slow-down: from the excess over parity or the official expression."""

Rescale = Literal["leaf", "group"]
"""Where MMPareto takes the norms of its rescaling: per parameter array or per encoder."""

AGGREGATIONS: tuple[Aggregation, ...] = ("dempster", "precision", "dimension_frame", "sum")
NOISE_SCALES: tuple[Noise, ...] = ("absolute", "relative")
CGGM_MODES: tuple[CggmMode, ...] = ("stable", "reference")
DIRECTIONS: tuple[Direction, ...] = ("gradients", "weights")
OGM_MODES: tuple[OgmMode, ...] = ("continuous", "reference")
RESCALES: tuple[Rescale, ...] = ("leaf", "group")


def is_params_placeholder(params: PyTree) -> bool:
    """Whether ``params`` is the stand-in that ``optax.tree.map_params`` initialises with.

    A transform's ``init`` then returns a state of the right structure whose non-parameter
    fields are plain arrays, so ``map_params`` maps only true parameter copies.
    """
    return type(params).__name__ == "_ParamsPlaceholder"
