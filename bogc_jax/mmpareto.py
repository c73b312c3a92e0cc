"""MMPareto: a Pareto-aware combination of fusion and unimodal gradients, as an Optax transform.

Wei and Hu (ICML 2024): per encoder, when the fusion-loss and unimodal-loss gradients
conflict, combine them into their minimum-norm convex combination (a common descent
direction) and restore the magnitude (extra argument ``grad_stats``; parameters labelled by
``param_labels``, see :mod:`bogc_jax.labels`). Each step of the update is a small pure
function below, so each can be checked on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bogc_jax import labels as labels_lib
from bogc_jax import validation
from bogc_jax._finite import Step, finite_guarded, initial_flags
from bogc_jax._scale import max_abs
from bogc_jax._types import RESCALES, ParamLabels, Rescale

DEGENERATE = 1e-12
"""Squared relative norm under which the combined direction ``d`` counts as zero."""


class MMParetoState(NamedTuple):
    """State of :func:`mmpareto` (diagnostics of the latest update; stable shapes).

    Attributes:
      cosines: ``[M]`` float32, cosine between the fusion-loss and unimodal-loss gradients
        over each modality's encoder.
      weights: ``[M, 2]`` float32, the combination weights ``(w_fusion, w_unimodal)`` of
        each encoder (``(0.5, 0.5)`` without conflict).
      finite: ``[]`` bool, whether the latest update was used: its inputs (the gradients
        and ``grad_stats.mean`` of the encoder parameters) and its outputs were all finite.
        When False, that update returned the gradients unchanged and the fields above
        kept their values.
      nonfinite_count: ``[]`` int32, the number of updates so far that were not used.
    """

    cosines: jax.Array
    weights: jax.Array
    finite: jax.Array
    nonfinite_count: jax.Array


def min_norm_weights(v11: jax.Array, v12: jax.Array, v22: jax.Array) -> jax.Array:
    """Weight ``c`` of ``argmin_{c in [0, 1]} |c x1 + (1 - c) x2|^2`` from inner products.

        c = (v22 - v12) / (v11 + v22 - 2 v12)

    with the MGDA solver's end cases as in the MMPareto code: ``c = 0.999`` when
    ``v12 >= v11`` and ``c = 0.001`` when ``v12 >= v22``. At the interior solution
    ``d = c x1 + (1 - c) x2`` satisfies ``d.x1 = d.x2 = |d|^2 >= 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> from bogc_jax.mmpareto import min_norm_weights
      >>> float(min_norm_weights(jnp.float32(1.0), jnp.float32(-1.0), jnp.float32(1.0)))
      0.5
    """
    denom = v11 + v22 - 2.0 * v12
    interior = (v22 - v12) / jnp.where(denom > 0, denom, 1.0)
    return jnp.where(v12 >= v11, 0.999, jnp.where(v12 >= v22, 0.001, interior))


def _sq(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x))


def _total(xs) -> jax.Array:
    return sum(xs, jnp.zeros([], jnp.float32))


class Gram(NamedTuple):
    """Inner products of two gradients over an encoder, in units of ``scale``.

    ``v11 = |g_f / scale|^2``, ``v12 = <g_f, g_u> / scale^2``, ``v22 = |g_u / scale|^2``,
    ``scale`` the largest entry of either: no square overflows or underflows, and cosines,
    weights and norm ratios do not depend on it.
    """

    scale: jax.Array
    v11: jax.Array
    v12: jax.Array
    v22: jax.Array


def gram(g_f: Sequence[jax.Array], g_u: Sequence[jax.Array]) -> Gram:
    """:class:`Gram` of two gradients given as lists of leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> from bogc_jax.mmpareto import gram
      >>> [float(x) for x in gram([jnp.array([2.0, 0.0])], [jnp.array([1.0, 1.0])])]
      [2.0, 1.0, 0.5, 0.5]
    """
    scale = max_abs(list(g_f) + list(g_u))
    a = [x / scale for x in g_f]
    b = [x / scale for x in g_u]
    v12 = _total(jnp.sum(x * y) for x, y in zip(a, b))
    return Gram(scale, _total(_sq(x) for x in a), v12, _total(_sq(y) for y in b))


def pair_cosine(g: Gram) -> jax.Array:
    """``cos = v12 / sqrt(v11 v22)``; 0 when either gradient is zero.

    Example:
      >>> import jax.numpy as jnp
      >>> from bogc_jax.mmpareto import Gram, pair_cosine
      >>> float(pair_cosine(Gram(*jnp.array([1.0, 4.0, -2.0, 1.0]))))
      -1.0
    """
    ok = (g.v11 > 0) & (g.v22 > 0)
    norms = jnp.sqrt(jnp.where(ok, g.v11, 1.0)) * jnp.sqrt(jnp.where(ok, g.v22, 1.0))
    return jnp.where(ok, g.v12 / norms, 0.0)


def combination_weight(cos: jax.Array, g: Gram) -> jax.Array:
    """The fusion gradient's weight ``c``: 0.5 without conflict (``cos > 0``), else MGDA's.

    Example:
      >>> import jax.numpy as jnp
      >>> from bogc_jax.mmpareto import Gram, combination_weight
      >>> g = Gram(*jnp.array([1.0, 4.0, -1.0, 1.0]))
      >>> float(combination_weight(jnp.float32(0.3), g)), float(combination_weight(-0.25, g))
      (0.5, 0.2857142984867096)
    """
    return jnp.where(cos > 0, 0.5, min_norm_weights(g.v11, g.v12, g.v22))


def combine(c: jax.Array, g_f: Sequence[jax.Array], g_u: Sequence[jax.Array]) -> list:
    """``d = 2 (c g_f + (1 - c) g_u)`` leaf by leaf (``g_f + g_u`` at ``c = 0.5``).

    Example:
      >>> import jax.numpy as jnp
      >>> from bogc_jax.mmpareto import combine
      >>> combine(0.25, [jnp.array([4.0])], [jnp.array([0.0])])[0].tolist()
      [2.0]
    """
    return [2.0 * (c * a + (1.0 - c) * b) for a, b in zip(g_f, g_u)]


def is_degenerate(d_hat: Sequence[jax.Array], g: Gram) -> jax.Array:
    """``d`` vanishes up to rounding: ``|d| <= 1e-6 * 2 max(|g_f|, |g_u|)`` (``d_hat = d / scale``).

    The two gradients then point in opposite directions: no common descent direction.

    Example:
      >>> import jax.numpy as jnp
      >>> from bogc_jax.mmpareto import Gram, is_degenerate
      >>> bool(is_degenerate([jnp.array([1e-8])], Gram(*jnp.array([1.0, 1.0, -1.0, 1.0]))))
      True
    """
    return _total(_sq(x) for x in d_hat) <= DEGENERATE * 4.0 * jnp.maximum(g.v11, g.v22)


def rescaled(
    d: Sequence[jax.Array],
    d_hat: Sequence[jax.Array],
    target: Sequence[jax.Array],
    scale: jax.Array,
    degenerate: jax.Array,
    gamma: float,
    rescale: Rescale,
) -> list:
    """``gamma * max(|t| / |d|, 1) * d`` per leaf or per group (``t`` = ``target``).

    Norms are taken per leaf (``"leaf"``) or over the whole encoder (``"group"``), each in
    units of its own largest entry; a zero or ``degenerate`` ``d`` falls back to
    ``gamma * t``.

    Example:
      >>> import jax.numpy as jnp
      >>> from bogc_jax.mmpareto import rescaled
      >>> d = [jnp.array([1.0, 0.0])]
      >>> out = rescaled(d, d, [jnp.array([0.0, 3.0])], jnp.float32(1.0), False, 1.5, "leaf")
      >>> out[0].tolist()
      [4.5, 0.0]
    """
    if rescale == "group":
        t_scale = max_abs(target)
        t_sq = _total(_sq(x / t_scale) for x in target)
        norms = [(_total(_sq(x) for x in d_hat), t_sq, t_scale)] * len(d)
    else:
        norms = [(_sq(x), _sq(t / max_abs([t])), max_abs([t])) for x, t in zip(d_hat, target)]
    out = []
    for dn, tn, (d_sq, t_sq, t_scale) in zip(d, target, norms):
        use_d = (d_sq > 0) & ~degenerate
        # |t| / |d| = (t_scale / scale) * |t / t_scale| / |d / scale|
        ratio = jnp.sqrt(t_sq) / jnp.sqrt(jnp.where(use_d, d_sq, 1.0))
        factor = jnp.maximum(ratio * (t_scale / scale), 1.0)
        out.append(jnp.where(use_d, gamma * factor * dn, gamma * tn))
    return out


def encoder_update(g_f, g_u, total, *, gamma: float, rescale: Rescale):
    """MMPareto on one encoder: ``(outputs, cos, c)`` from the leaves of ``g_f``, ``g_u``.

        cos, c  = pair_cosine(gram), combination_weight(cos, gram)
        d       = combine(c, g_f, g_u)
        outputs = rescaled(d, target=total)       (gamma * total where d vanishes)

    ``total`` is the fixed-weight sum of the statistics over the encoder's leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> from bogc_jax.mmpareto import encoder_update
      >>> f, u = [jnp.array([1.0, 0.0])], [jnp.array([0.0, 1.0])]
      >>> out, cos, c = encoder_update(f, u, [f[0] + u[0]], gamma=1.0, rescale="leaf")
      >>> out[0].tolist(), float(cos), float(c)
      ([1.0, 1.0], 0.0, 0.5)
    """
    g = gram(g_f, g_u)
    cos = pair_cosine(g)
    c = combination_weight(cos, g)
    d = combine(c, g_f, g_u)
    d_hat = [x / g.scale for x in d]
    outputs = rescaled(d, d_hat, total, g.scale, is_degenerate(d_hat, g), gamma, rescale)
    return outputs, cos, c


def _source_layout(fusion_source, modality_sources, m: int, s: int):
    """``(fusion index, per-modality indices)`` checked against ``M`` and ``S``."""
    if modality_sources is not None:
        mods = tuple(modality_sources)
        if len(mods) != m:
            raise ValueError(
                f"mmpareto: modality_sources has {len(mods)} entries but param_labels use {m} "
                "modalities; give the source index of each modality's unimodal loss."
            )
    else:
        if s != m + 1:
            raise ValueError(
                f"mmpareto: grad_stats has {s} sources but param_labels use {m} modalities; the "
                f"default layout is the fusion loss at fusion_source and the {m} unimodal "
                f"losses, in modality order, at the other indices ({m + 1} sources). Pass "
                "modality_sources= for another layout."
            )
        # Modality i's unimodal loss is the i-th source other than the fusion source
        # (written with arithmetic so that a traced fusion_source works too).
        mods = tuple(i + (i >= fusion_source) for i in range(m))
    for idx in (fusion_source, *mods):
        if isinstance(idx, int) and not 0 <= idx < s:
            raise ValueError(
                f"mmpareto: source index {idx} (fusion_source or modality_sources) is out of "
                f"range for the {s} sources in grad_stats."
            )
    return fusion_source, mods


def _check_sources(fusion_source, modality_sources):
    """Static checks of the source layout; Python ints out (NumPy integers accepted)."""
    if not isinstance(fusion_source, jax.Array):  # arrays: optax.inject_hyperparams
        fusion_source = validation.check_int(
            "mmpareto",
            "fusion_source",
            fusion_source,
            minimum=0,
            fix="It is the index of the fusion loss among the sources.",
        )
    if modality_sources is None:
        return fusion_source, None
    mods = []
    for i, idx in enumerate(modality_sources):
        idx = validation.check_int(
            "mmpareto",
            f"modality_sources[{i}]",
            idx,
            minimum=0,
            fix="Give the source index of each modality's unimodal loss.",
        )
        if isinstance(fusion_source, int) and idx == fusion_source:
            raise ValueError(
                f"mmpareto: modality_sources[{i}] = {idx} is the fusion_source; each "
                "modality needs its own unimodal loss, distinct from the fusion loss."
            )
        if idx in mods:
            raise ValueError(
                f"mmpareto: modality_sources[{i}] = {idx} repeats modality_sources"
                f"[{mods.index(idx)}]; each modality needs its own unimodal loss. Give "
                "distinct source indices."
            )
        mods.append(idx)
    return fusion_source, tuple(mods)


def mmpareto(
    param_labels: ParamLabels,
    *,
    gamma: float = 1.5,
    fusion_source: int = 0,
    modality_sources: Sequence[int] | None = None,
    rescale: Rescale = "leaf",
) -> optax.GradientTransformationExtraArgs:
    """MMPareto: a Pareto-aware combination of fusion and unimodal gradients per encoder.

    For every modality ``i``, over the parameters labelled ``i`` (its encoder), with
    ``g_f`` the mean gradient of the fusion loss and ``g_u`` that of modality ``i``'s
    unimodal loss, and ``t = sum_s mu_s`` the fixed-weight sum of all sources (all from
    ``grad_stats``), and ``g`` the incoming gradient::

        cos = <g_f, g_u> / (|g_f| |g_u|)                      (over the whole encoder)
        (w_f, w_u) = (0.5, 0.5)                    if cos > 0
        (w_f, w_u) = (c, 1 - c), c = min_norm_weights(...)    otherwise (MGDA, two tasks)
        d   = 2 (w_f g_f + w_u g_u)
        p   = gamma * max(|t| / |d|, 1) * d                     (norms per leaf or group)
        out = g + (p - t)

    When the two gradients conflict, ``d`` is the minimum-norm point of their convex hull,
    which has a non-negative inner product with both (a common descent direction); the
    rescaling then restores at least the magnitude of ``t`` (the fixed-weight gradient),
    because the min-norm point can be much shorter than either gradient, and ``gamma``
    (1.5 in the official code) enlarges it further. Without conflict ``d = g_f + g_u``.
    Parameters labelled ``None`` keep ``g``.

    Direction and norm come from the statistics. With ``g = t`` (the usual
    ``grad_stats.fixed_weight_grads()``) the output is MMPareto's ``p``; whatever else
    ``g`` holds (an L2 term, weight decay from ``optax.add_decayed_weights`` placed before,
    an auxiliary loss outside the statistics) passes through unchanged, not rescaled by
    ``gamma``. Put mmpareto first in a chain, or after transforms that only add to the
    gradient; clipping and optimisers go after it.

    If ``d`` vanishes (``|d| <= 1e-6 * 2 max(|g_f|, |g_u|)``: the two gradients point in
    opposite directions, so no common descent direction exists and what is left of ``d``
    is rounding noise) the encoder's ``p`` falls back to ``gamma * t`` instead of
    dividing by (nearly) zero: the result is never zeroed or NaN while ``t`` is non-zero.

    ``rescale="leaf"`` takes the norms per parameter array as the official code does (the
    combination weights are still per encoder); ``"group"`` takes them over the whole
    encoder, which keeps the non-negative inner products of ``d`` with ``g_f`` and ``g_u``
    over the encoder exactly (per-leaf factors keep them per leaf only when every leaf is
    rescaled alike).

    If the gradients or the ``grad_stats`` means of the encoder parameters hold a NaN or
    an infinity, or an output overflows, the update returns the gradients unchanged, the
    state keeps its previous diagnostics and ``state.finite`` is False
    (``state.nonfinite_count`` counts such updates); ``optax.apply_if_finite`` after this
    transform skips a NaN gradient.

    ``grad_stats`` are typically those of :func:`bogc_jax.source_grad_stats` with the
    sources ``[fusion, modality 0, ..., modality M-1]``; under data parallelism pass the
    all-reduced statistics (its ``axis_name``) and the all-reduced gradient.

    Args:
      param_labels: pytree (or callable) of modality index / ``None`` per parameter; see
        :func:`bogc_jax.label_params`. ``M`` = largest label + 1 (at least 2).
      gamma: the final enlargement factor (official: 1.5), > 0 and finite.
      fusion_source: index of the fusion loss on the sources axis of ``grad_stats``.
      modality_sources: source index of each modality's unimodal loss, distinct and
        different from ``fusion_source`` (default: the other sources in order,
        ``(1, ..., M)`` when ``fusion_source = 0``).
      rescale: ``"leaf"`` (official) or ``"group"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the keyword-only
      extra argument ``grad_stats`` (:class:`bogc_jax.GradStats`) and ignores unknown ones.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> params = {"enc0": jnp.zeros(2), "enc1": jnp.zeros(2), "head": jnp.zeros(1)}
      >>> mean = {"enc0": jnp.array([[1.0, 0.0], [-0.5, 1.0], [0.0, 0.0]]),
      ...         "enc1": jnp.array([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]),
      ...         "head": jnp.ones((3, 1))}
      >>> stats = bj.GradStats(jnp.float32(8), mean, mean)
      >>> grads = stats.fixed_weight_grads()
      >>> tx = bj.mmpareto({"enc0": 0, "enc1": 1, "head": None})
      >>> updates, state = tx.update(grads, tx.init(params), params, grad_stats=stats)
      >>> [round(c, 3) for c in state.cosines.tolist()]
      [-0.447, 1.0]

    References:
      Wei and Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
      Assistance", ICML 2024, https://arxiv.org/abs/2405.17730; official code
      https://github.com/GeWu-Lab/MMPareto_ICML2024 (``code/MMPareto.py``,
      ``code/min_norm_solvers.py``).
    """
    validation.check_choice("mmpareto", "rescale", rescale, RESCALES)
    validation.check_number(
        "mmpareto",
        "gamma",
        gamma,
        strict=True,
        finite=True,
        fix="gamma enlarges the combined gradient; the official value is 1.5.",
    )
    fusion_source, modality_sources = _check_sources(fusion_source, modality_sources)
    validation.check_static_labels("mmpareto", param_labels)

    def init_fn(params):
        m = labels_lib.modality_count(param_labels, params)
        return MMParetoState(
            jnp.zeros([m], jnp.float32), jnp.full([m, 2], 0.5, jnp.float32), *initial_flags()
        )

    def core(updates, state, params=None, *, grad_stats=None, **extra_args):
        del params, extra_args
        leaves, treedef = jax.tree.flatten(updates)
        means, _ = validation.grad_stats_leaves("mmpareto", grad_stats, treedef, need_var=False)
        leaf_labels = labels_lib.leaf_labels(param_labels, updates)
        m = state.cosines.shape[0]
        validation.check_labels_in_range("mmpareto", leaf_labels, m)
        labelled = [label is not None for label in leaf_labels]
        validation.check_floating("mmpareto", "grads", updates, only=labelled)
        s = validation.check_grad_stats_leaves(
            "mmpareto",
            validation.leaf_paths(updates),
            leaves,
            means,
            None,
            labelled,
            why="that parameter is labelled with a modality; mmpareto needs the per-source "
            "gradients of every encoder parameter.",
        )
        fusion_idx, mods = _source_layout(fusion_source, modality_sources, m, s)
        new_leaves = list(leaves)
        cosines, weights = [], []
        for i in range(m):
            idx = [n for n, label in enumerate(leaf_labels) if label == i]
            g_f = [means[n][fusion_idx].astype(jnp.float32) for n in idx]
            g_u = [means[n][mods[i]].astype(jnp.float32) for n in idx]
            total = [jnp.sum(means[n].astype(jnp.float32), axis=0) for n in idx]
            outputs, cos, c = encoder_update(g_f, g_u, total, gamma=gamma, rescale=rescale)
            cosines.append(cos)
            weights.append(jnp.stack([c, 1.0 - c]))
            for n, p, t in zip(idx, outputs, total):
                g = leaves[n]
                new_leaves[n] = (g + (p - t)).astype(g.dtype)
        new_state = state._replace(
            cosines=jnp.stack(cosines).astype(jnp.float32),
            weights=jnp.stack(weights).astype(jnp.float32),
        )
        chosen = [x for x, on in zip(means, labelled) if on]
        return Step(jax.tree.unflatten(treedef, new_leaves), new_state, inputs=(updates, chosen))

    return optax.GradientTransformationExtraArgs(init_fn, finite_guarded(core))
