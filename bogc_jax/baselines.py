"""Baselines in the shape of the library's transforms: OGM-GE and MMPareto.

Both read which encoder each parameter belongs to from ``param_labels`` (see
:mod:`bogc_jax.labels`), so an experiment swaps methods by swapping one transform in its
``optax.chain``:

- :func:`ogm_ge` (Peng et al., CVPR 2022): slows down the dominant modality's encoder and
  adds gradient-sized Gaussian noise (extra argument ``modality_scores``).
- :func:`mmpareto` (Wei and Hu, ICML 2024): per encoder, combines the fusion-loss and
  unimodal-loss gradients into a common descent direction when they conflict (extra
  argument ``grad_stats``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bogc_jax import labels as labels_lib
from bogc_jax import validation

PyTree = Any

_OGM_MODES = ("continuous", "reference")
_DEGENERATE = 1e-12  # squared relative norm under which MMPareto's d counts as zero
_RESCALE = ("leaf", "group")
_ALPHA_FIX = "alpha is the modulation strength; 0 turns the modulation off, 0.1 is the default."


# --------------------------------------------------------------------------------------
# OGM-GE
# --------------------------------------------------------------------------------------


class OgmGeState(NamedTuple):
    """State of :func:`ogm_ge`; every field keeps its shape and dtype across updates.

    Attributes:
      key: ``[2]`` uint32 raw PRNG key of the Gaussian enhancement (split at every update).
      dominant: ``[]`` int32, the dominant modality of the latest update.
      ratio: ``[]`` float32, its discrepancy ratio ``rho`` at the latest update.
      coefficients: ``[M]`` float32, the gradient coefficients ``k`` of the latest update
        (ones before the first update).
      finite: ``[]`` bool, whether the latest update's inputs (``modality_scores`` and the
        gradients) were all finite. When False, that update returned the gradients
        unchanged (no modulation, no noise) and every field above kept its value (the key
        included, so the noise sequence resumes where it stopped).
      nonfinite_count: ``[]`` int32, the number of updates so far with non-finite inputs.
    """

    key: jax.Array
    dominant: jax.Array
    ratio: jax.Array
    coefficients: jax.Array
    finite: jax.Array
    nonfinite_count: jax.Array


def _raw_key(key) -> jax.Array:
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    key = jnp.asarray(key)
    if key.shape == (2,) and key.dtype == jnp.uint32:
        return key
    return jax.random.key_data(jax.random.key(key))


def ogm_ge_coefficients(
    scores: jax.Array, alpha: float = 0.1, mode: str = "continuous"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """OGM's coefficients ``k`` (shape ``[M]``) from per-modality confidence scores.

    With ``s`` the scores, the dominant modality ``j = argmax_i s_i`` (the first on ties) and
    its discrepancy ratio against the mean of the others,

        rho = s_j / mean_{i != j} s_i            (rho = 1 when that mean is 0)
        k_j = 1 - tanh(alpha * max(rho - 1, 0))  ("continuous")
        k_j = 1 - tanh(alpha * rho)              ("reference")
        k_i = 1                                  for i != j

    For two modalities ``rho`` is the paper's ``s_a / s_v``. ``"reference"`` is the
    official code's expression (``1 - tanh(alpha * relu(ratio))`` for the modality whose
    ratio exceeds 1), which jumps from 1 to ``1 - tanh(alpha)`` as the ratio crosses 1;
    ``"continuous"`` (default) measures the excess over parity, so ``k_j -> 1`` as the
    modalities become balanced.

    Args:
      scores: ``[M]`` non-negative scores (e.g. :func:`bogc_jax.metrics.confidence`).
      alpha: modulation strength.
      mode: ``"continuous"`` or ``"reference"``.

    Returns:
      ``(k, j, rho)``: ``[M]`` float32 coefficients, the int32 dominant index and its
      float32 ratio.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> k, j, rho = bj.ogm_ge_coefficients(jnp.array([0.3, 0.6]), alpha=1.0)
      >>> [round(x, 4) for x in k.tolist()], int(j), float(rho)
      ([1.0, 0.2384], 1, 2.0)
    """
    validation.check_choice("ogm_ge_coefficients", "mode", mode, _OGM_MODES)
    validation.check_number("ogm_ge_coefficients", "alpha", alpha, fix=_ALPHA_FIX)
    s = jnp.asarray(scores, jnp.float32)
    if s.ndim != 1 or s.shape[0] < 2:
        raise ValueError(
            f"ogm_ge_coefficients: scores must have shape [M] with M >= 2 (one "
            f"score per modality); got shape {s.shape}."
        )
    m = s.shape[0]
    j = jnp.argmax(s).astype(jnp.int32)
    others = jnp.sum(jnp.where(jnp.arange(m) == j, 0.0, s)) / (m - 1)
    ratio = jnp.where(others > 0, s[j] / jnp.where(others > 0, others, 1.0), 1.0)
    excess = jnp.maximum(ratio - 1.0, 0.0) if mode == "continuous" else ratio
    # 1 - tanh(x) = 2 sigmoid(-2x), without the cancellation of 1 - tanh(x) for large x.
    k_j = 2.0 * jax.nn.sigmoid(-2.0 * alpha * excess)
    k = jnp.where(jnp.arange(m) == j, k_j, 1.0).astype(jnp.float32)
    return k, j, ratio.astype(jnp.float32)


def _leaf_std(g: jax.Array) -> jax.Array:
    """Unbiased (ddof = 1, like ``torch.Tensor.std``) std of all entries; 0 for one entry."""
    g = g.astype(jnp.float32)
    if g.size < 2:
        return jnp.zeros([], jnp.float32)
    scale = _max_abs([g])  # no overflow of the squares at large gradient scales
    return scale * jnp.std(g / scale, ddof=1)


def ogm_ge(
    param_labels: labels_lib.ParamLabels,
    alpha: float = 0.1,
    noise: bool = True,
    key: Any = 0,
    mode: str = "continuous",
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """OGM-GE: on-the-fly gradient modulation with generalisation enhancement.

    Every update, from ``modality_scores`` ``s`` (one confidence score per modality, e.g.
    :func:`bogc_jax.metrics.confidence` of each modality's unimodal logits):

        k, j, rho = ogm_ge_coefficients(s, alpha, mode)
        g_p = k_i * g_p + n_p,  n_p ~ N(0, (std(g_p) + 1e-8)^2)   for p labelled i
        g_p = g_p                                                   for p labelled None

    The dominant modality ``j`` (largest score) has ``k_j < 1`` and every other modality
    ``k_i = 1`` exactly. The Gaussian enhancement (GE, ``noise=True``) draws, for every
    labelled leaf, independent noise whose standard deviation is that leaf's own gradient
    standard deviation (over its entries, before scaling; ddof = 1 like the official
    ``grad.std()``), from a PRNG key carried in the state; ``noise=False`` gives plain OGM.
    As in the official code, noise is added to every modality's encoder, dominant or not.
    The official code modulates only 4-D (convolution) encoder weights; here every
    parameter labelled with a modality is modulated, so label the parameters to modulate.

    The official default is ``alpha = 0.1``; its README recommends 0.1 for VGGSound and 0.8
    for CREMA-D. The official runs modulate during epochs 0-50 only; to reproduce that,
    switch transforms by epoch or wrap with ``optax.inject_hyperparams`` and set ``alpha``
    to 0 (and pass ``noise`` as a static argument).

    Degenerate and non-finite inputs. All-zero or equal scores give ``rho = 1``: no
    slow-down in ``"continuous"`` mode. A leaf whose gradient is all zero gets noise of
    standard deviation ``1e-8`` only. If ``modality_scores`` or the gradients hold a NaN or
    an infinity (on any device, with ``axis_name``), the update returns the gradients
    unchanged (no modulation, no noise), the state keeps its previous value (the PRNG key
    included) and ``state.finite`` is False (``state.nonfinite_count`` counts such
    updates). A NaN gradient thus reaches the next transform:
    ``optax.chain(bj.ogm_ge(labels), optax.apply_if_finite(optax.sgd(lr), k))`` skips it.

    Args:
      param_labels: pytree (or callable) of modality index / ``None`` per parameter; see
        :func:`bogc_jax.label_params`. ``M`` = largest label + 1 (at least 2).
      alpha: modulation strength.
      noise: add the Gaussian enhancement (GE).
      key: PRNG seed (int) or key for the noise.
      mode: ``"continuous"`` (default) or ``"reference"``; see
        :func:`ogm_ge_coefficients`.
      axis_name: per-device scores are averaged over this mapped axis (exact for equal
        per-device batches; scores from :mod:`bogc_jax.metrics` with ``axis_name`` are
        already global). The noise comes from the replicated state key, so it is identical
        on every device, as replicated parameters need.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the keyword-only
      extra argument ``modality_scores`` (shape ``[M]``) and ignores unknown ones.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> params = {"audio": jnp.ones(4), "video": jnp.ones(4), "head": jnp.ones(2)}
      >>> tx = bj.ogm_ge({"audio": 0, "video": 1, "head": None}, alpha=1.0, noise=False)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params,
      ...                            modality_scores=jnp.array([0.6, 0.3]))
      >>> [round(x, 4) for x in state.coefficients.tolist()]
      [0.2384, 1.0]

    References:
      Peng, Wei, Deng, Wang and Hu, "Balanced Multimodal Learning via On-the-fly Gradient
      Modulation", CVPR 2022, https://arxiv.org/abs/2203.15332; official code
      https://github.com/GeWu-Lab/OGM-GE_CVPR2022 (``main.py``).
    """
    validation.check_choice("ogm_ge", "mode", mode, _OGM_MODES)
    validation.check_number("ogm_ge", "alpha", alpha, fix=_ALPHA_FIX)
    if (
        validation.is_traced(noise)
        or np.shape(noise) != ()
        or not (jnp.issubdtype(jnp.result_type(noise), jnp.bool_))
    ):
        raise TypeError(
            f"ogm_ge: noise must be a Python bool (add the Gaussian enhancement or "
            f"not); got {noise!r}. Under optax.inject_hyperparams list it in "
            "static_args."
        )
    noise = bool(noise)

    def init_fn(params):
        m = labels_lib.num_modalities(labels_lib.leaf_labels(param_labels, params))
        return OgmGeState(
            _raw_key(key),
            jnp.zeros([], jnp.int32),
            jnp.ones([], jnp.float32),
            jnp.ones([m], jnp.float32),
            *validation.initial_flags(),
        )

    def update_fn(updates, state, params=None, *, modality_scores=None, **extra_args):
        del params, extra_args
        leaf_labels = labels_lib.leaf_labels(param_labels, updates)
        m = state.coefficients.shape[0]
        scores, finite = validation.modality_update_inputs(
            "ogm_ge", leaf_labels, updates, modality_scores, m, axis_name
        )
        k, dominant, ratio = ogm_ge_coefficients(scores, alpha, mode)
        key_state, key_noise = jax.random.split(jax.random.wrap_key_data(state.key))
        leaves = jax.tree.leaves(updates)
        # One standard-normal draw for all labelled entries, cut into per-leaf pieces.
        sizes = [g.size if label is not None else 0 for label, g in zip(leaf_labels, leaves)]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        if noise and sum(sizes):
            standard = jax.random.normal(key_noise, (sum(sizes),), jnp.float32)
        position = iter(zip(offsets, sizes))

        def modulate(label, g):
            start, size = next(position)
            if label is None:
                return g
            out = g.astype(jnp.float32) * k[label]
            if noise:
                std = _leaf_std(g) + 1e-8
                out = out + std * standard[start : start + size].reshape(g.shape)
            # A non-finite input: the gradient passes unchanged (see the docstring).
            return jnp.where(finite, out.astype(g.dtype), g)

        updates = labels_lib.map_labelled(modulate, leaf_labels, updates)
        new_state = OgmGeState(
            jax.random.key_data(key_state), dominant, ratio, k, state.finite, state.nonfinite_count
        )
        return updates, validation.guard_state(finite, new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------
# MMPareto
# --------------------------------------------------------------------------------------


class MMParetoState(NamedTuple):
    """State of :func:`mmpareto` (diagnostics of the latest update; stable shapes).

    Attributes:
      cosines: ``[M]`` float32, cosine between the fusion-loss and unimodal-loss gradients
        over each modality's encoder.
      weights: ``[M, 2]`` float32, the combination weights ``(w_fusion, w_unimodal)`` of
        each encoder (``(0.5, 0.5)`` without conflict).
      finite: ``[]`` bool, whether the latest update's inputs (the gradients and
        ``grad_stats.mean`` of the encoder parameters) were all finite. When False, that
        update returned the gradients unchanged and the fields above kept their values.
      nonfinite_count: ``[]`` int32, the number of updates so far with non-finite inputs.
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
    """
    denom = v11 + v22 - 2.0 * v12
    interior = (v22 - v12) / jnp.where(denom > 0, denom, 1.0)
    return jnp.where(v12 >= v11, 0.999, jnp.where(v12 >= v22, 0.001, interior))


def _sq(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x))


def _max_abs(xs: Sequence[jax.Array]) -> jax.Array:
    """The largest ``|entry|`` of the arrays (1 when they are all zero): a safe divisor."""
    top = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in xs]))
    return jnp.where(top > 0, top, 1.0)


def mmpareto(
    param_labels: labels_lib.ParamLabels,
    gamma: float = 1.5,
    fusion_source: int = 0,
    modality_sources: Sequence[int] | None = None,
    rescale: str = "leaf",
) -> optax.GradientTransformationExtraArgs:
    """MMPareto: a Pareto-aware combination of fusion and unimodal gradients per encoder.

    For every modality ``i``, over the parameters labelled ``i`` (its encoder), with
    ``g_f`` the mean gradient of the fusion loss and ``g_u`` that of modality ``i``'s
    unimodal loss (from ``grad_stats``), and ``g`` the incoming gradient::

        cos = <g_f, g_u> / (|g_f| |g_u|)                      (over the whole encoder)
        (w_f, w_u) = (0.5, 0.5)                    if cos > 0
        (w_f, w_u) = (c, 1 - c), c = min_norm_weights(...)    otherwise (MGDA, two tasks)
        d   = 2 (w_f g_f + w_u g_u)
        out = gamma * max(|g| / |d|, 1) * d                     (norms per leaf or group)

    When the two gradients conflict, ``d`` is the minimum-norm point of their convex hull,
    which has a non-negative inner product with both (a common descent direction); the
    rescaling then restores at least the magnitude of ``g`` (the fixed-weight gradient),
    because the min-norm point can be much shorter than either gradient, and ``gamma``
    (1.5 in the official code) enlarges it further. Without conflict ``d = g_f + g_u``.
    Parameters labelled ``None`` keep ``g``.

    If ``d`` vanishes (``|d| <= 1e-6 * 2 max(|g_f|, |g_u|)``: the two gradients point in
    opposite directions, so no common descent direction exists and what is left of ``d``
    is rounding noise) the encoder's update falls back to ``gamma * g`` instead of
    dividing by (nearly) zero: the result is never zeroed or NaN while ``g`` is non-zero.

    ``rescale="leaf"`` takes the norms per parameter array as the official code does (the
    combination weights are still per encoder); ``"group"`` takes them over the whole
    encoder, which keeps the non-negative inner products of ``d`` with ``g_f`` and ``g_u``
    over the encoder exactly (per-leaf factors keep them per leaf only when every leaf is
    rescaled alike).

    If the gradients or the ``grad_stats`` means of the encoder parameters hold a NaN or
    an infinity, the update returns the gradients unchanged, the state keeps its previous
    diagnostics and ``state.finite`` is False (``state.nonfinite_count`` counts such
    updates); ``optax.apply_if_finite`` after this transform skips a NaN gradient.

    ``grad_stats`` are typically those of :func:`bogc_jax.source_grad_stats` with the
    sources ``[fusion, modality 0, ..., modality M-1]``; under data parallelism pass the
    all-reduced statistics (its ``axis_name``) and the all-reduced gradient.

    Args:
      param_labels: pytree (or callable) of modality index / ``None`` per parameter; see
        :func:`bogc_jax.label_params`. ``M`` = largest label + 1 (at least 2).
      gamma: the final enlargement factor (official: 1.5).
      fusion_source: index of the fusion loss on the sources axis of ``grad_stats``.
      modality_sources: source index of each modality's unimodal loss (default: the other
        sources in order, ``(1, ..., M)`` when ``fusion_source = 0``).
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
    validation.check_choice("mmpareto", "rescale", rescale, _RESCALE)
    validation.check_number(
        "mmpareto",
        "gamma",
        gamma,
        strict=True,
        fix="gamma enlarges the combined gradient; the official value is 1.5.",
    )
    if not isinstance(fusion_source, jax.Array):  # arrays: optax.inject_hyperparams
        validation.check_int(
            "mmpareto",
            "fusion_source",
            fusion_source,
            minimum=0,
            fix="It is the index of the fusion loss among the sources.",
        )
    if modality_sources is not None:
        for i, idx in enumerate(modality_sources):
            validation.check_int(
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

    def init_fn(params):
        m = labels_lib.num_modalities(labels_lib.leaf_labels(param_labels, params))
        return MMParetoState(
            jnp.zeros([m], jnp.float32),
            jnp.full([m, 2], 0.5, jnp.float32),
            *validation.initial_flags(),
        )

    def sources_for(m: int, s: int) -> tuple[Any, tuple[Any, ...]]:
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
                    f"mmpareto: source index {idx} (fusion_source or "
                    f"modality_sources) is out of range for the {s} sources in "
                    "grad_stats."
                )
        return fusion_source, mods

    def update_fn(updates, state, params=None, *, grad_stats=None, **extra_args):
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
        fusion_idx, mods = sources_for(m, s)
        finite = validation.all_finite(updates, [x for x, on in zip(means, labelled) if on])

        new_leaves = list(leaves)
        cosines, weights = [], []
        for i in range(m):
            idx = [n for n, l in enumerate(leaf_labels) if l == i]
            g_f = [means[n][fusion_idx].astype(jnp.float32) for n in idx]
            g_u = [means[n][mods[i]].astype(jnp.float32) for n in idx]
            # Inner products of the gradients divided by their largest entry: cosines, weights
            # and norm ratios do not depend on the scale, and squares neither overflow (1e20)
            # nor underflow (1e-20) in float32.
            scale = _max_abs(g_f + g_u)
            a_hat = [a / scale for a in g_f]
            b_hat = [b / scale for b in g_u]
            v11 = sum((_sq(a) for a in a_hat), jnp.zeros([], jnp.float32))
            v22 = sum((_sq(b) for b in b_hat), jnp.zeros([], jnp.float32))
            v12 = sum((jnp.sum(a * b) for a, b in zip(a_hat, b_hat)), jnp.zeros([], jnp.float32))
            ok = (v11 > 0) & (v22 > 0)
            norms_product = jnp.sqrt(jnp.where(ok, v11, 1.0)) * jnp.sqrt(jnp.where(ok, v22, 1.0))
            cos = jnp.where(ok, v12 / norms_product, 0.0)
            c = jnp.where(cos > 0, 0.5, min_norm_weights(v11, v12, v22))
            cosines.append(cos)
            weights.append(jnp.stack([c, 1.0 - c]))
            d = [2.0 * (c * a + (1.0 - c) * b) for a, b in zip(g_f, g_u)]
            d_hat = [2.0 * (c * a + (1.0 - c) * b) for a, b in zip(a_hat, b_hat)]  # d / scale
            g = [leaves[n].astype(jnp.float32) for n in idx]
            d_sq_group = sum((_sq(x) for x in d_hat), jnp.zeros([], jnp.float32))
            # No common descent direction: d vanishes up to rounding (|d| <= 1e-6 |longest|).
            degenerate = d_sq_group <= _DEGENERATE * 4.0 * jnp.maximum(v11, v22)
            if rescale == "group":
                g_scale = _max_abs(g)
                g_sq = sum((_sq(x / g_scale) for x in g), jnp.zeros([], jnp.float32))
                norms = [(d_sq_group, g_sq, g_scale)] * len(idx)
            else:
                norms = [(_sq(x), _sq(y / _max_abs([y])), _max_abs([y])) for x, y in zip(d_hat, g)]
            for n, dn, gn, (d_sq, g_sq, g_scale) in zip(idx, d, g, norms):
                use_d = (d_sq > 0) & ~degenerate
                # |g| / |d| = (g_scale / scale) * |g / g_scale| / |d / scale|
                ratio = jnp.sqrt(g_sq) / jnp.sqrt(jnp.where(use_d, d_sq, 1.0))
                factor = jnp.maximum(ratio * (g_scale / scale), 1.0)
                out = jnp.where(use_d, gamma * factor * dn, gamma * gn)
                # A non-finite input: the gradient passes unchanged (see the docstring).
                new_leaves[n] = jnp.where(finite, out.astype(leaves[n].dtype), leaves[n])
        updates = jax.tree.unflatten(treedef, new_leaves)
        new_state = MMParetoState(
            jnp.stack(cosines).astype(jnp.float32),
            jnp.stack(weights).astype(jnp.float32),
            state.finite,
            state.nonfinite_count,
        )
        return updates, validation.guard_state(finite, new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
