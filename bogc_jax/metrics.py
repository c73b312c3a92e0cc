"""Batch scores for the utilisation signal of CGGM and OGM-GE, correct under data parallelism.

Every score here is a ratio ``total / count`` over the examples of a batch. With
``axis_name`` (inside ``shard_map`` or ``pmap``, the batch split over devices) the
numerator and the denominator are each summed over devices with ``jax.lax.psum`` before
dividing, so the score of a split batch equals the score of the whole batch, whatever the
per-device batch sizes or masks (averaging per-device ratios would not). Under ``jit``
with sharded global arrays no ``axis_name`` is needed. A batch with no counted example
scores 0.

Domain: every score lies in ``[0, 1]``. A score is NaN when a counted example (``where``
non-zero) has a non-finite logit or prediction, or (for :func:`accuracy` with logits and
:func:`confidence`) a label outside ``[0, C)``: the transforms then flag the update
(``state.finite`` False) and skip it, instead of acting on a meaningless score. Examples
masked out with ``where`` are ignored entirely, whatever they hold (padding with label
``C`` or ``-100`` is fine there).

- :func:`accuracy`: fraction of correct class predictions (CGGM on IEMOCAP, Food-101).
- :func:`sign_accuracy`: binary accuracy of a regression's sign, positive vs
  non-positive (CGGM on CMU-MOSI/MOSEI).
- :func:`dice`: mean Dice over label groups (CGGM on BraTS: ET, TC, WT).
- :func:`confidence`: mean softmax probability of the true class (OGM-GE's score).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

BRATS_REGIONS = ((3,), (1, 3), (1, 2, 3))
"""BraTS label groups: enhancing tumour (3), tumour core (1 or 3), whole tumour (1, 2 or 3)."""


def _ratio(total: jax.Array, count: jax.Array, axis_name: Any) -> jax.Array:
    total = jnp.asarray(total, jnp.float32)
    count = jnp.asarray(count, jnp.float32)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
        count = jax.lax.psum(count, axis_name)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def _weights(where, shape, argname: str = "where") -> jax.Array:
    """Per-example weights (1 = counted) broadcast to ``shape``."""
    if where is None:
        return jnp.ones(shape, jnp.float32)
    where = jnp.asarray(where)
    if where.shape != shape:
        raise ValueError(
            f"{argname} must have shape {shape} (one flag per example); got {where.shape}."
        )
    return where.astype(jnp.float32)


def _counted(w: jax.Array, values: jax.Array) -> jax.Array:
    """``sum_n w_n values_n`` over the counted examples only (a masked-out NaN is ignored)."""
    return jnp.sum(jnp.where(w != 0, w * values, 0.0))


def _poison(x: jax.Array, w: jax.Array) -> jax.Array:
    """NaN if a counted example (``w != 0``) has a non-finite entry in ``x``, else 0.

    ``x`` has ``w``'s shape as its leading axes. Added to a score's numerator, it makes the
    score NaN, on every device when the numerator is summed with ``axis_name``.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros([], jnp.float32)
    bad = ~jnp.isfinite(x).reshape(x.shape[: w.ndim] + (-1,))
    return jnp.where(jnp.any(jnp.any(bad, axis=-1) & (w != 0)), jnp.nan, 0.0)


def _label_poison(labels: jax.Array, num_classes: int, w: jax.Array) -> jax.Array:
    """NaN if a counted example's label is outside ``[0, num_classes)``, else 0."""
    outside = (labels < 0) | (labels >= num_classes)
    return jnp.where(jnp.any(outside & (w != 0)), jnp.nan, 0.0)


def _class_predictions(logits: jax.Array, labels: jax.Array, class_axis: int, fn: str) -> jax.Array:
    logits = jnp.asarray(logits)
    if logits.ndim == labels.ndim + 1:
        predictions = jnp.argmax(logits, axis=class_axis)
        if predictions.shape != labels.shape:
            hint = (
                " For channels-first logits ([B, C, *spatial], PyTorch's layout) pass class_axis=1."
                if fn == "dice"
                else ""
            )
            raise ValueError(
                f"{fn}: logits of shape {logits.shape} with the classes on axis {class_axis} "
                f"give predictions of shape {predictions.shape}, but labels have shape "
                f"{labels.shape}.{hint}"
            )
        return predictions
    if logits.shape == labels.shape and jnp.issubdtype(logits.dtype, jnp.integer):
        return logits
    raise ValueError(
        f"{fn}: expected logits of shape labels.shape + [C] (labels {labels.shape}) or "
        f"integer predictions of shape {labels.shape}; got {logits.dtype} "
        f"{logits.shape}."
    )


def accuracy(
    logits: jax.Array, labels: jax.Array, *, where: jax.Array | None = None, axis_name: Any = None
) -> jax.Array:
    """Fraction of examples whose predicted class is the label.

        accuracy = sum_n w_n [argmax logits_n == labels_n] / sum_n w_n

    Args:
      logits: ``[B, C]`` scores (argmax over the last axis), or ``[B]`` integer predicted
        classes.
      labels: ``[B]`` integer classes.
      where: optional ``[B]`` mask (or weights) of the examples to count, e.g. to drop
        padding.
      axis_name: sum the counts over this mapped axis (batch split over devices).

    Returns:
      Scalar float32 in ``[0, 1]``; NaN when a counted example has a non-finite logit or
      (with logits) a label outside ``[0, C)``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
      >>> float(bj.metrics.accuracy(logits, jnp.array([0, 1, 1, 1])))
      0.75
    """
    labels = jnp.asarray(labels)
    predictions = _class_predictions(logits, labels, -1, "accuracy")
    w = _weights(where, labels.shape)
    correct = (predictions == labels).astype(jnp.float32)
    total = _counted(w, correct) + _poison(logits, w)
    if jnp.ndim(logits) == labels.ndim + 1:
        total = total + _label_poison(labels, jnp.shape(logits)[-1], w)
    return _ratio(total, jnp.sum(w), axis_name)


def sign_accuracy(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    exclude_zero: bool = False,
    where: jax.Array | None = None,
    axis_name: Any = None,
) -> jax.Array:
    """Binary accuracy of a regression's sign: positive vs non-positive.

        sign_accuracy = sum_n w_n [(pred_n > 0) == (target_n > 0)] / sum_n w_n

    As in the CGGM code (``train_eval_senti``, the CMU-MOSI/MOSEI "Acc-2"): a prediction
    or target of exactly 0 counts as non-positive. ``exclude_zero=True`` drops examples
    whose target is 0 (the "non-zero" Acc-2 variant).

    Args:
      predictions: ``[B]`` (or ``[B, 1]``) real predictions.
      targets: real targets, same shape.
      exclude_zero: skip examples with ``target == 0``.
      where: optional ``[B]``-shaped mask of the examples to count.
      axis_name: sum the counts over this mapped axis.

    Returns:
      Scalar float32 in ``[0, 1]``; NaN when a counted prediction or target is not finite.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> pred = jnp.array([0.5, -1.0, 0.0, 2.0])
      >>> float(bj.metrics.sign_accuracy(pred, jnp.array([1.0, -0.5, 0.3, 0.0])))
      0.5
    """
    predictions = jnp.asarray(predictions)
    targets = jnp.asarray(targets)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"sign_accuracy: predictions {predictions.shape} and targets {targets.shape} "
            "must have the same shape."
        )
    w = _weights(where, targets.shape)
    if exclude_zero:
        w = w * (targets != 0).astype(jnp.float32)
    agree = ((predictions > 0) == (targets > 0)).astype(jnp.float32)
    total = _counted(w, agree) + _poison(predictions, w) + _poison(targets, w)
    return _ratio(total, jnp.sum(w), axis_name)


def dice(
    logits: jax.Array,
    labels: jax.Array,
    groups: Sequence[Sequence[int]] = BRATS_REGIONS,
    *,
    class_axis: int = -1,
    eps: float = 1e-3,
    where: jax.Array | None = None,
    axis_name: Any = None,
) -> jax.Array:
    """Mean Dice score over label groups, per example, averaged over the batch.

    For each group ``G`` (a set of labels) and example ``n``, with ``P = [pred in G]`` and
    ``T = [label in G]`` over the example's pixels/voxels:

        dice_G(n) = (2 sum(P T) + 2 eps) / (sum(P) + sum(T) + 2 eps)
        dice      = sum_n w_n mean_G dice_G(n) / sum_n w_n

    This is the CGGM code's segmentation score (``train_eval_seg``: ``eps = 1e-3``,
    per-example Dice averaged over the batch, then over the BraTS regions
    :data:`BRATS_REGIONS`). An example where a region is absent from both prediction and
    label scores 1 for it.

    Args:
      logits: ``[B, *spatial, C]`` class scores (argmax over ``class_axis``), or integer
        label maps shaped like ``labels``.
      labels: ``[B, *spatial]`` integer label maps.
      groups: the label groups to average over.
      class_axis: the class axis of ``logits`` (``-1`` channels-last, ``1`` for
        channels-first as in PyTorch).
      eps: smoothing of each Dice ratio.
      where: optional ``[B]`` mask of the examples to count.
      axis_name: sum the per-example totals and the counts over this mapped axis.

    Returns:
      Scalar float32 in ``[0, 1]``; NaN when a counted example has a non-finite logit.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> labels = jnp.array([[[0, 1], [2, 3]]])
      >>> round(float(bj.metrics.dice(labels, labels)), 6)
      1.0
    """
    from bogc_jax import validation  # pylint: disable=g-import-not-at-top

    validation.check_number(  # a region absent from prediction and label: 0 / 0
        "dice",
        "eps",
        eps,
        strict=True,
        fix="It smooths every Dice ratio, so that a region absent from both prediction "
        "and label scores 1, not NaN; the CGGM code uses 1e-3.",
    )
    labels = jnp.asarray(labels)
    if labels.ndim < 2:
        raise ValueError(
            f"dice: labels must be [B, *spatial] label maps; got shape {labels.shape}."
        )
    predictions = _class_predictions(logits, labels, class_axis, "dice")
    if not groups:
        raise ValueError("dice: groups is empty; give at least one group of labels.")
    spatial = tuple(range(1, labels.ndim))
    per_group = []
    for group in groups:
        members = jnp.asarray(tuple(group), labels.dtype)
        p = jnp.isin(predictions, members).astype(jnp.float32)
        t = jnp.isin(labels, members).astype(jnp.float32)
        inter = jnp.sum(p * t, axis=spatial) + eps
        union = jnp.sum(p, axis=spatial) + jnp.sum(t, axis=spatial) + 2 * eps
        per_group.append(2 * inter / union)
    per_example = jnp.mean(jnp.stack(per_group), axis=0)  # [B]
    w = _weights(where, labels.shape[:1])
    total = _counted(w, per_example) + _poison(logits, w)
    return _ratio(total, jnp.sum(w), axis_name)


def confidence(
    logits: jax.Array, labels: jax.Array, *, where: jax.Array | None = None, axis_name: Any = None
) -> jax.Array:
    """Mean softmax probability of the true class.

        confidence = sum_n w_n softmax(logits_n)[labels_n] / sum_n w_n

    OGM-GE's per-modality score (the official code sums it over the batch; the ratio of two
    modalities' scores is the same either way).

    Args:
      logits: ``[B, C]`` class scores.
      labels: ``[B]`` integer classes.
      where: optional ``[B]`` mask of the examples to count.
      axis_name: sum the totals and counts over this mapped axis.

    Returns:
      Scalar float32 in ``[0, 1]``; NaN when a counted example has a non-finite logit or
      a label outside ``[0, C)`` (a ``-1`` label is not the last class).

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> float(bj.metrics.confidence(jnp.zeros((3, 4)), jnp.array([0, 1, 2])))
      0.25
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.shape[:-1] != labels.shape or logits.ndim != labels.ndim + 1:
        raise ValueError(
            f"confidence: expected logits of shape labels.shape + [C] (labels "
            f"{labels.shape}); got {logits.shape}."
        )
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    num_classes = logits.shape[-1]
    inside = (labels >= 0) & (labels < num_classes)
    index = jnp.where(inside, labels, 0).astype(jnp.int32)
    true_prob = jnp.take_along_axis(probs, index[..., None], axis=-1)[..., 0]
    w = _weights(where, labels.shape)
    total = _counted(w, true_prob) + _poison(logits, w) + _label_poison(labels, num_classes, w)
    return _ratio(total, jnp.sum(w), axis_name)
