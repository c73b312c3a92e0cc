"""Argument checks shared by the public entry points, and the non-finite guard of states.

Two kinds of protection, kept apart:

- *Static checks* raise at trace time, before anything runs: hyper-parameters given as
  Python numbers (or concrete arrays), pytree structures, shapes, dtypes, the number of
  sources or modalities, batch sizes. Every error names the argument, the value expected,
  the value received and the fix. Traced values (hyper-parameters under
  ``optax.inject_hyperparams`` inside ``jit``) cannot be inspected and are skipped.
- *Run-time values* (a NaN in a gradient, an infinite variance) are only known on the
  device. The transforms never raise on them; the non-finite policy of
  :mod:`bogc_jax._finite` flags and skips such an update.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bogc_jax._moments import GradStats

PyTree = Any

_GRAD_STATS_HOWTO = (
    "tx.update(grads, state, params, grad_stats=bj.source_grad_stats(losses_fn, params, batch))"
    ". If you did pass it: Flax Linen's TrainState.apply_gradients drops extra arguments; "
    "call state.tx.update yourself (see docs/flax.md)"
)


# ----------------------------------------------------------------------------------------
# Hyper-parameters.


def is_traced(value) -> bool:
    """Whether ``value`` is a tracer (its value is unknown at trace time)."""
    return isinstance(value, jax.core.Tracer)


def _concrete_real(value) -> float | None:
    """``value`` as a float when it is a concrete real scalar; None when it is traced.

    Raises:
      TypeError: for anything that is not a real number or a real scalar array.
    """
    if is_traced(value):
        return None
    if isinstance(value, bool) or isinstance(value, np.bool_):
        raise TypeError(f"expected a real number, got the bool {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        dtype = np.dtype(value.dtype) if not isinstance(value, jax.Array) else value.dtype
        if (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)) and (
            np.size(value) == 1
        ):
            try:
                return float(np.asarray(value).reshape(()))
            except (TypeError, ValueError, RuntimeError):  # e.g. not addressable here
                return None
        raise TypeError(
            f"expected a real scalar, got an array of dtype {dtype} and shape {np.shape(value)}"
        )
    raise TypeError(f"expected a real number, got {type(value).__name__} {value!r}")


def check_number(
    owner: str,
    name: str,
    value,
    *,
    minimum: float = 0.0,
    strict: bool = False,
    finite: bool = False,
    fix: str = "",
) -> None:
    """``value >= minimum`` (``> minimum`` when ``strict``), not NaN (and not inf if ``finite``).

    Python numbers and concrete scalar arrays are checked; traced values are skipped (they
    are the hyper-parameters of ``optax.inject_hyperparams`` inside ``jit``).

    Raises:
      ValueError: out of range, NaN or infinite. TypeError: not a real number.
    """
    need = f"{'>' if strict else '>='} {minimum:g}"
    try:
        x = _concrete_real(value)
    except TypeError as err:
        raise TypeError(
            f"{owner}: {name} must be a real number {need}; {err}. {fix}".rstrip()
        ) from None
    if x is None:
        return
    if x != x or (x <= minimum if strict else x < minimum):  # pylint: disable=comparison-with-itself
        raise ValueError(f"{owner}: {name} must be {need}; got {value!r}. {fix}".rstrip())
    if finite and x == float("inf"):
        raise ValueError(
            f"{owner}: {name} must be a finite number {need}; got {value!r}. {fix}".rstrip()
        )


def check_int(owner: str, name: str, value, *, minimum: int = 1, fix: str = "") -> int:
    """``value`` is a Python (or NumPy) ``int >= minimum``, not a bool or a float."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok and isinstance(value, jax.Array):
        raise ValueError(
            f"{owner}: {name} must be a Python int; got the array {value!r}. It sets shapes, "
            f"so it cannot be a traced hyper-parameter: under optax.inject_hyperparams list "
            f"it in static_args, e.g. optax.inject_hyperparams(bj.{owner}, "
            f'static_args=("{name}",)).'
        )
    if not ok or value < minimum:
        raise ValueError(
            f"{owner}: {name} must be an int >= {minimum}; got {value!r}. {fix}".rstrip()
        )
    return int(value)


def check_choice(owner: str, name: str, value, choices: Sequence[Any]) -> None:
    """``value`` is one of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"{owner}: {name} must be one of {tuple(choices)}; got {value!r}.")


# ----------------------------------------------------------------------------------------
# Dtypes, structures, shapes.


def _dtype(leaf):
    dtype = getattr(leaf, "dtype", None)
    return jnp.result_type(leaf) if dtype is None else dtype


def is_floating(leaf) -> bool:
    """Whether ``leaf`` has a real floating dtype (float16, bfloat16, float32, float64)."""
    return jnp.issubdtype(_dtype(leaf), jnp.floating)


def check_floating(
    owner: str,
    name: str,
    tree: PyTree,
    *,
    only: Sequence[bool] | None = None,
    fix: str = "",
    is_leaf=None,
) -> None:
    """Every (selected) non-``None`` leaf of ``tree`` has a floating dtype.

    Args:
      owner: the public function, for the message.
      name: the argument, e.g. ``"grads"``; the message names ``name[path]``.
      tree: the pytree to check.
      only: one flag per leaf of ``tree``: check only the flagged leaves.
      fix: what to do about it.
      is_leaf: as in ``jax.tree_util.tree_flatten``.

    Raises:
      TypeError: naming the first offending leaf, its dtype and the fix.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    only = [True] * len(flat) if only is None else list(only)
    for (path, leaf), on in zip(flat, only):
        if on and leaf is not None and not is_floating(leaf):
            raise TypeError(
                f"{owner}: {name}{jax.tree_util.keystr(path)} has dtype {_dtype(leaf)}; expected "
                f"a floating dtype (float16, bfloat16, float32 or float64). {fix}".rstrip()
            )


def leaf_paths(tree: PyTree, is_leaf=None) -> list[str]:
    """``jax.tree_util.keystr`` of every leaf's path, in ``jax.tree.leaves`` order."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return [jax.tree_util.keystr(p) for p, _ in flat]


def grad_stats_leaves(
    owner: str, grad_stats, treedef, *, need_var: bool = True
) -> tuple[list, list | None]:
    """Check the ``grad_stats`` container; return its mean and var leaves in params order.

    ``mean`` (and ``var`` when ``need_var``; else ``None`` is returned for it) must have
    the structure of the gradients (``treedef``), with ``None`` allowed at any leaf;
    ``count`` must be a scalar.

    Raises:
      ValueError: ``grad_stats`` missing, ``count`` not a scalar, structure mismatch.
      TypeError: not a :class:`bogc_jax.GradStats`.
    """
    if grad_stats is None:
        raise ValueError(
            f"{owner}: missing the keyword extra argument grad_stats. Call {_GRAD_STATS_HOWTO}."
        )
    if not isinstance(grad_stats, GradStats):
        raise TypeError(
            f"{owner}: grad_stats must be a bogc_jax.GradStats; got "
            f"{type(grad_stats).__name__}. Build it with bj.source_grad_stats "
            "(or bj.GradStats(count, mean, var))."
        )
    if np.ndim(grad_stats.count) != 0 or not jnp.issubdtype(_dtype(grad_stats.count), jnp.number):
        raise ValueError(
            f"{owner}: grad_stats.count must be a numeric scalar (the number of "
            f"examples); got {_describe(grad_stats.count)}."
        )
    try:
        means = treedef.flatten_up_to(grad_stats.mean)
        variances = treedef.flatten_up_to(grad_stats.var) if need_var else None
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{owner}: grad_stats.mean/var must have the same pytree structure as the params "
            f"(the updates); params have {treedef}. Compute the statistics on the same "
            f"params tree you optimise. ({err})"
        ) from err
    return means, variances


def _describe(x) -> str:
    return f"dtype {_dtype(x)} and shape {tuple(np.shape(x))}"


def check_grad_stats_leaves(
    owner: str,
    paths: Sequence[str],
    grads: Sequence[Any],
    means: Sequence[Any],
    variances: Sequence[Any] | None,
    needed: Sequence[bool],
    num_sources: int | None = None,
    why: str = "",
) -> int | None:
    """Every needed leaf has floating ``[S, *param.shape]`` statistics; return ``S``.

    Args:
      owner: the public function, for the message.
      paths: ``keystr`` paths of the gradient leaves.
      grads: the gradient leaves.
      means, variances: the statistics' leaves in the same order (``variances=None`` when
        the variance is not read).
      needed: one flag per leaf: the statistics of this leaf are read.
      num_sources: the configured ``S``; ``None``: taken from the first needed leaf, and
        every other needed leaf must agree.
      why: why a ``None`` leaf is an error (appended to the message).

    Returns:
      ``S``, or ``None`` when no leaf is needed.
    """
    s = num_sources
    parts = (("mean", means),) + ((("var", variances),) if variances is not None else ())
    for k, (path, g, on) in enumerate(zip(paths, grads, needed)):
        if not on:
            continue
        for name, leaves in parts:
            leaf = leaves[k]
            if leaf is None:
                raise ValueError(f"{owner}: grad_stats.{name}{path} is None but {why}".rstrip())
            shape = tuple(np.shape(leaf))
            if s is None and len(shape) == np.ndim(g) + 1:
                s = shape[0]
            expected = ((s,) if s is not None else ("S",)) + tuple(np.shape(g))
            if shape != expected:
                configured = (
                    f"num_sources={num_sources}"
                    if num_sources is not None
                    else f"{s} sources, as in the other leaves"
                    if s is not None
                    else "S sources"
                )
                raise ValueError(
                    f"{owner}: grad_stats.{name}{path} has shape {shape}; expected {expected} "
                    f"({configured} stacked on the parameter's shape {tuple(np.shape(g))}). Check "
                    "the number of sources and that the statistics match these params."
                )
            if not is_floating(leaf):
                raise TypeError(
                    f"{owner}: grad_stats.{name}{path} has dtype {_dtype(leaf)}; "
                    "expected a floating dtype. Build the statistics with "
                    "bj.source_grad_stats."
                )
    return s


def check_scores(
    owner: str, modality_scores, num_modalities: int, argname: str = "modality_scores"
) -> jax.Array:
    """``modality_scores`` is a floating ``[M]`` array; returned as float32."""
    m = num_modalities
    if modality_scores is None:
        raise ValueError(
            f"{owner}: this transform needs the extra argument {argname}= (shape [{m}]: one "
            f"score per modality, e.g. bj.metrics.accuracy of each auxiliary classifier): "
            f"call tx.update(grads, state, params, {argname}=scores)."
        )
    scores = jnp.asarray(modality_scores)
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise TypeError(
            f"{owner}: {argname} must hold floating scores (a metric such as an accuracy in "
            f"[0, 1]); got dtype {scores.dtype}. Compute them with bj.metrics or convert "
            f"with jnp.asarray(scores, jnp.float32)."
        )
    if scores.shape != (m,):
        raise ValueError(
            f"{owner}: {argname} must have shape [{m}] (one score per modality; param_labels "
            f"use modalities 0..{m - 1}); got shape {scores.shape}. Give one score per "
            "modality in label order, or fix param_labels."
        )
    return scores.astype(jnp.float32)


def check_static_labels(owner: str, param_labels) -> None:
    """``param_labels`` is labels, not an array (as ``optax.inject_hyperparams`` makes them).

    Raises:
      TypeError: naming ``static_args=("param_labels",)``.
    """
    if isinstance(param_labels, (jax.Array, np.ndarray, int, float)):
        raise TypeError(
            f"{owner}: param_labels must be a pytree of labels (or a callable params -> "
            f"labels); got {param_labels!r}. Under optax.inject_hyperparams list it in "
            f'static_args: optax.inject_hyperparams(bj.{owner}, static_args=("param_labels",)).'
        )


def check_labels_in_range(owner: str, labels: Sequence[int | None], num_modalities: int) -> None:
    """Every label is below the ``num_modalities`` the state was built for."""
    bad = sorted({label for label in labels if label is not None and label >= num_modalities})
    if bad:
        raise ValueError(
            f"{owner}: param_labels has modalities {bad}, but the state was built for "
            f"{num_modalities} modalities (0..{num_modalities - 1}); the labels changed "
            "between init and update. Use the same param_labels for both, or re-initialise."
        )


def axis_size(axis_name) -> int | None:
    """The static size of a mapped axis (``shard_map``/``pmap``/``vmap``), if known."""
    try:
        return int(jax.lax.axis_size(axis_name))
    except Exception:  # pylint: disable=broad-except
        return None


def check_num_examples(
    owner: str, n: int, axis_name=None, argname: str = "batch", minimum: int = 2
) -> None:
    """A variance over examples needs ``minimum`` (2) examples in the whole batch."""
    devices = 1 if axis_name is None else (axis_size(axis_name) or 1)
    if n * devices < minimum:
        where = "" if devices == 1 else f" ({n} per device on {devices} devices)"
        raise ValueError(
            f"{owner}: {argname} has {n * devices} example(s){where}; the per-example "
            f"variance (ddof = 1) needs at least {minimum}. Use a batch of {minimum} or more "
            "examples."
        )


def modality_update_inputs(
    owner: str,
    leaf_labels: Sequence[int | None],
    updates: PyTree,
    modality_scores,
    num_modalities: int,
    axis_name,
):
    """Checked scores of a per-modality transform's update.

    Shared by the transforms that scale encoder gradients from ``modality_scores``
    (cggm, ogm_ge): labels in range, floating labelled gradients, scores of shape
    ``[M]`` (averaged over ``axis_name`` when given).

    Returns:
      ``[M]`` float32 scores.
    """
    check_labels_in_range(owner, leaf_labels, num_modalities)
    check_floating(owner, "grads", updates, only=[label is not None for label in leaf_labels])
    scores = check_scores(owner, modality_scores, num_modalities)
    if axis_name is not None:
        scores = jax.lax.pmean(scores, axis_name)
    return scores
