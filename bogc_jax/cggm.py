"""CGGM: classifier-guided gradient modulation as an Optax transform, and its direction term.

Guo, Jin, Chen and Zhao (NeurIPS 2024) attach an auxiliary classifier to every modality's
(stop-gradient) encoder output and use the change of its batch score to balance the
encoders. With scores ``eps_i(t)`` (accuracy, sign accuracy, Dice: see
:mod:`bogc_jax.metrics`), improvements ``d_i = eps_i(t) - eps_i(t - 1)`` and the balancing
term

    B_i = (sum_k d_k - d_i) / sum_k d_k                      (sum_i B_i = M - 1)

the method has two parts:

- *magnitude* (:func:`cggm`): encoder ``i``'s gradient is multiplied by ``rho * B_i``;
- *direction* (:func:`cggm_direction_loss`): ``L_gm = (1/M) sum_i (|B_i| - B_i cos_i)``
  is added to the task loss with weight ``lambda``, where ``cos_i`` compares classifier
  ``i``'s output layer with the fusion output layer.

Defaults of the official scripts (github.com/zrguo/CGGM): ``rho = 1.3`` and
``lambda = 0.2`` (CMU-MOSI, IEMOCAP), ``lambda = 0.05`` (Food-101); ``rho = 1.0`` and
``lambda = 0.1`` (BraTS 2021); global-norm clipping to 0.8 after the scaling; Adam 1e-3
for the model and Adam 5e-4 for the auxiliary classifiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bogc_jax import labels as labels_lib
from bogc_jax import validation
from bogc_jax._finite import Step, finite_guarded, initial_flags
from bogc_jax._types import CGGM_MODES as _MODES
from bogc_jax._types import DIRECTIONS as _DIRECTIONS
from bogc_jax._types import CggmMode as Mode
from bogc_jax._types import Direction, ParamLabels

REFERENCE_GUARD = 1e-8
"""The official code's only guard on ``sum_k d_k`` (added to the sum)."""
_SMOOTHING_FIX = (
    "It is the improvement mass spread evenly over the modalities, in score "
    "units; 1e-2 is the default."
)


class CggmState(NamedTuple):
    """State of :func:`cggm`; every field keeps its shape and dtype across updates.

    Attributes:
      step: ``[]`` int32, number of updates so far.
      previous_scores: ``[M]`` float32, the scores the latest update compared against.
      scores: ``[M]`` float32, the scores of the latest update (the next update's
        ``previous_scores``).
      improvements: ``[M]`` float32, ``d`` of the latest update.
      coefficients: ``[M]`` float32, ``B`` of the latest update (zeros before the first
        update); encoder ``i``'s gradient was scaled by ``rho * coefficients[i]``.
      finite: ``[]`` bool, whether the latest update was used: its inputs
        (``modality_scores`` and the gradients) and its outputs (updates and the fields
        above) were all finite. When False, that update returned the gradients unchanged
        and every field above kept its value (``step`` included).
      nonfinite_count: ``[]`` int32, the number of updates so far that were not used.
    """

    step: jax.Array
    previous_scores: jax.Array
    scores: jax.Array
    improvements: jax.Array
    coefficients: jax.Array
    finite: jax.Array
    nonfinite_count: jax.Array


def cggm_coefficients(
    improvements: jax.Array, mode: Mode = "stable", smoothing: float = 1e-2
) -> jax.Array:
    """CGGM's balancing term ``B`` (shape ``[M]``) from the score improvements ``d``.

    ``"reference"`` is the official code's formula, in float32:

        s   = sum_k d_k + 1e-8
        B_i = (s - d_i) / s

    It explodes when ``sum_k d_k`` is (close to) zero, which happens often because batch
    accuracies are multiples of ``1 / batch``; and ``B_i < 0`` (an ascent step for encoder
    ``i``) whenever ``d_i > sum_k d_k``.

    ``"stable"`` reads ``B_i = 1 - d_i / sum_k d_k`` as "one minus modality ``i``'s share
    of the total improvement" and makes the share well defined:

        p_i     = max(d_i, 0)                          (getting worse is no progress)
        share_i = (p_i + smoothing / M) / (sum_k p_k + smoothing)
        B_i     = 1 - share_i

    The shares are positive and sum to 1, so ``0 < B_i < 1`` (no explosion, no sign flip)
    and ``sum_i B_i = M - 1`` as in the paper. When every ``d_i >= 0`` and
    ``sum_k d_k >> smoothing`` it equals the paper's formula; as the total progress goes to
    zero the shares go smoothly to ``1/M`` and every ``B_i`` to ``(M - 1) / M`` (no
    evidence, equal treatment). A modality that got worse gets the smallest share, hence the
    largest ``B``. ``smoothing`` is in units of the score (``1e-2`` = one percentage point of
    accuracy).

    Args:
      improvements: ``[M]`` score improvements ``d``.
      mode: ``"stable"`` or ``"reference"``.
      smoothing: ``"stable"`` only: the improvement mass spread evenly over the modalities
        (> 0).

    Returns:
      ``[M]`` float32 coefficients ``B``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> d = jnp.array([0.25, 0.0])
      >>> bj.cggm_coefficients(d, mode="reference").tolist()
      [0.0, 1.0]
      >>> [round(b, 3) for b in bj.cggm_coefficients(d, smoothing=0.01).tolist()]
      [0.019, 0.981]
    """
    validation.check_choice("cggm_coefficients", "mode", mode, _MODES)
    if mode == "stable":
        validation.check_number(
            "cggm_coefficients", "smoothing", smoothing, strict=True, fix=_SMOOTHING_FIX
        )
    d = jnp.asarray(improvements, jnp.float32)
    if d.ndim != 1:
        raise ValueError(f"improvements must have shape [M]; got shape {d.shape}.")
    if mode == "reference":
        total = jnp.sum(d) + REFERENCE_GUARD
        return (total - d) / total
    m = d.shape[0]
    p = jnp.maximum(d, 0.0)
    share = (p + smoothing / m) / (jnp.sum(p) + smoothing)
    return 1.0 - share


def cggm(
    param_labels: ParamLabels,
    *,
    rho: float = 1.3,
    mode: Mode = "stable",
    smoothing: float = 1e-2,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """CGGM magnitude modulation: scale encoder ``i``'s gradient by ``rho * B_i``.

    At every update, with ``eps(t)`` = ``modality_scores`` and ``eps(t - 1)`` the scores of
    the previous update (kept in the state):

        d   = eps(t) - eps(t - 1)
        B   = cggm_coefficients(d, mode, smoothing)
        g_p = rho * B_i * g_p     for every parameter p labelled i
        g_p = g_p                 for parameters labelled None (shared)

    ``mode="reference"`` reproduces the official code: ``B_i = (s - d_i) / s`` with
    ``s = sum_k d_k + 1e-8``, and the first update compares against zero scores.
    ``mode="stable"`` (default) uses the bounded shares described in
    :func:`cggm_coefficients` (``0 < B_i < 1``: never explodes, never flips a gradient's
    sign), and its first update, having no previous scores, uses ``d = 0`` (every
    ``B_i = (M - 1)/M``).

    The official scripts use ``rho = 1.3`` (CMU-MOSI, IEMOCAP, Food-101) and ``rho = 1.0``
    (BraTS), followed by ``optax.clip_by_global_norm(0.8)`` and Adam with learning rate
    1e-3; the auxiliary classifiers train on their own Adam (5e-4) on the stop-gradient
    encoder outputs. The direction part of CGGM is a loss term: see
    :func:`cggm_direction_loss`.

    Degenerate and non-finite inputs. Scores that do not change (or are all zero) give
    ``d = 0``: ``B_i = (M - 1)/M`` ("stable") or ``B_i = 1`` ("reference"), finite. If
    ``modality_scores`` or the gradients hold a NaN or an infinity (on any device, with
    ``axis_name``), or the scaled gradients overflow, the update returns the gradients
    unchanged, the state keeps its previous value (so the next update compares against
    the last finite scores), and ``state.finite`` is False (``state.nonfinite_count``
    counts such updates). Scores of :mod:`bogc_jax.metrics` computed from NaN logits are
    NaN, so they are flagged the same way. A NaN gradient thus reaches the next
    transform: ``optax.chain(bj.cggm(labels), optax.apply_if_finite(optax.adam(lr),
    max_consecutive_errors))`` skips the step.

    Args:
      param_labels: pytree (or callable ``params -> pytree``) of ``int | None`` like
        ``optax.partition``'s labels: modality index of each parameter's encoder, ``None``
        for shared parameters. ``M`` = largest label + 1 (at least 2). See
        :func:`bogc_jax.label_params`. Under ``optax.inject_hyperparams`` list it in
        ``static_args=("param_labels",)``.
      rho: the paper's ``rho`` (official default 1.3).
      mode: ``"stable"`` (default) or ``"reference"``.
      smoothing: ``"stable"`` only; see :func:`cggm_coefficients`.
      axis_name: when the update runs inside ``shard_map``/``pmap`` with per-device scores,
        the scores are averaged over this axis (exact for equal per-device batches; scores
        from :mod:`bogc_jax.metrics` with ``axis_name`` are already global and need none).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the keyword-only
      extra argument ``modality_scores`` (shape ``[M]``) and ignores unknown ones. ``B``,
      ``d`` and the scores are in :class:`CggmState` (``optax.tree.get(state,
      "coefficients")``).

    Example:
      >>> import jax.numpy as jnp, optax, bogc_jax as bj
      >>> params = {"audio": jnp.ones(2), "video": jnp.ones(2), "head": jnp.ones(3)}
      >>> labels = {"audio": 0, "video": 1, "head": None}
      >>> tx = bj.cggm(labels, rho=1.0, mode="reference")
      >>> state = tx.init(params)
      >>> grads = {"audio": jnp.ones(2), "video": jnp.ones(2), "head": jnp.ones(3)}
      >>> updates, state = tx.update(grads, state, params,
      ...                            modality_scores=jnp.array([0.75, 0.25]))
      >>> state.coefficients.tolist(), updates["audio"].tolist(), updates["head"].tolist()
      ([0.25, 0.75], [0.25, 0.25], [1.0, 1.0, 1.0])

    References:
      Guo et al., "Classifier-guided Gradient Modulation for Enhanced Multimodal Learning",
      NeurIPS 2024, https://arxiv.org/abs/2411.01409; official code
      https://github.com/zrguo/CGGM (``src/msatrain.py``).
    """
    validation.check_choice("cggm", "mode", mode, _MODES)
    validation.check_number(
        "cggm",
        "rho",
        rho,
        strict=True,
        finite=True,
        fix="rho scales every encoder's gradient by rho * B_i; the "
        "official values are 1.3 and 1.0.",
    )
    if mode == "stable":
        validation.check_number(
            "cggm", "smoothing", smoothing, strict=True, finite=True, fix=_SMOOTHING_FIX
        )
    validation.check_static_labels("cggm", param_labels)

    def init_fn(params):
        m = labels_lib.modality_count(param_labels, params)
        # One buffer per field, so that the state can be donated to jit.
        return CggmState(
            jnp.zeros([], jnp.int32),
            *(jnp.zeros([m], jnp.float32) for _ in range(4)),
            *initial_flags(),
        )

    def core(updates, state, params=None, *, modality_scores=None, **extra_args):
        del params, extra_args
        leaf_labels = labels_lib.leaf_labels(param_labels, updates)
        m = state.scores.shape[0]
        scores = validation.modality_update_inputs(
            "cggm", leaf_labels, updates, modality_scores, m, axis_name
        )
        previous = state.scores
        improvements = scores - previous
        if mode == "stable":
            improvements = jnp.where(state.step > 0, improvements, 0.0)
        coefficients = cggm_coefficients(improvements, mode, smoothing)
        scale = rho * coefficients

        def scale_leaf(label, g):
            return g if label is None else g * scale[label].astype(g.dtype)

        new_state = state._replace(
            step=optax.safe_increment(state.step),
            previous_scores=previous,
            scores=scores,
            improvements=improvements,
            coefficients=coefficients.astype(jnp.float32),
        )
        new_updates = labels_lib.map_labelled(scale_leaf, leaf_labels, updates)
        return Step(new_updates, new_state, inputs=(scores, updates), axis_name=axis_name)

    return optax.GradientTransformationExtraArgs(init_fn, finite_guarded(core))


def _cosine(a: jax.Array, b: jax.Array, direction: Direction) -> jax.Array:
    """Cosine of two flattened arrays.

    ``"weights"``: ``a.b / (max(|a|, 1e-8) max(|b|, 1e-8))`` like ``torch``'s
    ``cosine_similarity``; ``"gradients"``: ``a.b / (|a| |b|)``, scale-free (gradients can
    be tiny), and 0 with a zero gradient when either vector is zero.
    """
    dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    a = a.reshape(-1).astype(dtype)
    b = b.reshape(-1).astype(dtype)
    dot = jnp.dot(a, b)
    sq_a, sq_b = jnp.dot(a, a), jnp.dot(b, b)
    if direction == "weights":
        eps = jnp.asarray(1e-8, dtype)
        return dot / (jnp.maximum(jnp.sqrt(sq_a), eps) * jnp.maximum(jnp.sqrt(sq_b), eps))
    ok = (sq_a > 0) & (sq_b > 0)
    denom = jnp.sqrt(jnp.where(ok, sq_a, 1.0)) * jnp.sqrt(jnp.where(ok, sq_b, 1.0))
    return jnp.where(ok, dot / denom, 0.0)


def cggm_direction_loss(
    coefficients: jax.Array,
    fusion: jax.Array,
    classifiers: Sequence[jax.Array] | jax.Array,
    direction: Direction = "gradients",
) -> jax.Array:
    """CGGM's direction term ``L_gm = (1/M) sum_i (|B_i| - B_i cos(c_i, f))``.

    ``f`` is the fusion module's output layer and ``c_i`` auxiliary classifier ``i``'s, in
    the same layout: minimising ``L_gm`` turns ``f`` toward ``c_i`` when ``B_i > 0`` and
    away from it when ``B_i < 0``. ``L_gm >= 0``, and ``L_gm = 0`` when every ``cos = 1``
    (or ``B = 0``). The coefficients and the classifiers are constants
    (``jax.lax.stop_gradient``): the gradient of ``L_gm`` reaches only what ``fusion``
    depends on. The total loss is ``L + lambda * L_gm``; the official scripts use
    ``lambda = 0.2`` (CMU-MOSI, IEMOCAP), ``0.05`` (Food-101), ``0.1`` (BraTS).

    - ``direction="gradients"`` (the paper): ``f`` is the gradient of the task loss with
      respect to the fusion output-layer weight, computed inside the loss with
      ``jax.grad`` so that ``L_gm`` is differentiated through it (a gradient of a
      gradient); ``c_i`` is the gradient of classifier ``i``'s loss with respect to its
      output-layer weight. The cosine is scale-free and is 0 when a gradient is exactly 0.
    - ``direction="weights"`` (the official code): ``f`` and ``c_i`` are the output-layer
      weights themselves; the gradient of ``L_gm`` then reaches only the fusion
      output-layer weight. The cosine clamps each norm at ``1e-8`` as ``torch``'s
      ``cosine_similarity`` does.

    The official code builds ``L_gm`` at step ``t`` (with that step's ``B``, fusion weight
    and classifier weights) and adds it to the loss at step ``t + 1`` ("reference
    schedule"); computing ``B`` first and adding ``L_gm`` to the same step's loss is the
    "same-step schedule". ``experiments/cggm_direction_example.py`` shows both.

    Args:
      coefficients: ``[M]`` balancing term ``B`` (e.g. ``CggmState.coefficients`` of the
        previous update, or :func:`cggm_coefficients` of this step's improvements).
      fusion: the fusion output layer's weight or gradient (any shape).
      classifiers: ``M`` arrays shaped like ``fusion`` (a sequence, or stacked on a leading
        axis).
      direction: ``"gradients"`` or ``"weights"``: what ``fusion`` and ``classifiers`` are.

    Returns:
      The scalar ``L_gm`` (float32, or float64 for float64 inputs).

    Example:
      >>> import jax, jax.numpy as jnp, bogc_jax as bj
      >>> w_fusion = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w_cls = [w_fusion, -w_fusion]
      >>> b = jnp.array([0.5, 0.5])
      >>> round(float(bj.cggm_direction_loss(b, w_fusion, w_cls, direction="weights")), 6)
      0.5
      >>> g = jax.grad(bj.cggm_direction_loss, argnums=1)(b, w_fusion, w_cls, "weights")
      >>> g.shape
      (2, 2)

    References:
      Guo et al., "Classifier-guided Gradient Modulation for Enhanced Multimodal Learning",
      NeurIPS 2024, Eq. for L_gm; official code https://github.com/zrguo/CGGM
      (``src/eval_metrics.py`` ``cal_cos``, ``src/msatrain.py``).
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}; got {direction!r}.")
    b = jax.lax.stop_gradient(jnp.asarray(coefficients))
    if b.ndim != 1:
        raise ValueError(f"coefficients must have shape [M]; got shape {b.shape}.")
    m = b.shape[0]
    fusion = jnp.asarray(fusion)
    if isinstance(classifiers, (list, tuple)):
        classifiers = list(classifiers)
    else:
        classifiers = list(jnp.asarray(classifiers))
    if len(classifiers) != m:
        raise ValueError(
            f"classifiers has {len(classifiers)} entries but coefficients has {m}; give one "
            "output layer per modality, in the order of the coefficients."
        )
    cosines = []
    for i, c in enumerate(classifiers):
        c = jnp.asarray(c)
        if c.shape != fusion.shape:
            raise ValueError(
                f"classifiers[{i}] has shape {c.shape} but fusion has shape {fusion.shape}; the "
                "cosine compares output layers of the same shape (same number of inputs and "
                "outputs, same layout)."
            )
        cosines.append(_cosine(jax.lax.stop_gradient(c), fusion, direction))
    cos = jnp.stack(cosines)
    b = b.astype(cos.dtype)
    return jnp.sum(jnp.abs(b) - b * cos) / m
