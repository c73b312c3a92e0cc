"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement, as an Optax transform.

Peng, Wei, Deng, Wang and Hu (CVPR 2022) slow down the dominant modality's encoder by a
coefficient computed from per-modality confidence scores, and add gradient-sized Gaussian
noise (extra argument ``modality_scores``; parameters labelled by ``param_labels``, see
:mod:`bogc_jax.labels`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bogc_jax import labels as labels_lib
from bogc_jax import validation
from bogc_jax._finite import Step, finite_guarded, initial_flags
from bogc_jax._scale import max_abs
from bogc_jax._types import OGM_MODES, OgmMode, ParamLabels

_ALPHA_FIX = "alpha is the modulation strength; 0 turns the modulation off, 0.1 is the default."


class OgmGeState(NamedTuple):
    """State of :func:`ogm_ge`; every field keeps its shape and dtype across updates.

    Attributes:
      key: ``[2]`` uint32 raw PRNG key of the Gaussian enhancement (split at every update).
      dominant: ``[]`` int32, the dominant modality of the latest update.
      ratio: ``[]`` float32, its discrepancy ratio ``rho`` at the latest update.
      coefficients: ``[M]`` float32, the gradient coefficients ``k`` of the latest update
        (ones before the first update).
      finite: ``[]`` bool, whether the latest update was used: its inputs
        (``modality_scores`` and the gradients) finite, the scores non-negative, and its
        outputs finite. When False, that update returned the gradients unchanged (no
        modulation, no noise) and every field above kept its value (the key included, so
        the noise sequence resumes where it stopped).
      nonfinite_count: ``[]`` int32, the number of updates so far that were not used.
    """

    key: jax.Array
    dominant: jax.Array
    ratio: jax.Array
    coefficients: jax.Array
    finite: jax.Array
    nonfinite_count: jax.Array


_KEY_FIX = (
    "Pass an int seed, a key from jax.random.key(seed), or a raw uint32[2] key from "
    "jax.random.PRNGKey(seed)."
)


def _check_key(key) -> None:
    """``key`` is an int seed, a typed PRNG key or a raw ``uint32[2]`` key (trace time)."""
    if validation.is_traced(key):  # optax.inject_hyperparams inside jit
        return
    if isinstance(key, (bool, np.bool_)):
        raise TypeError(f"ogm_ge: key must be a PRNG seed or key; got the bool {key!r}. {_KEY_FIX}")
    if isinstance(key, (int, np.integer)):
        return
    if isinstance(key, (jax.Array, np.ndarray)):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return
        if key.dtype == jnp.uint32 and key.shape == (2,):
            return
        if jnp.issubdtype(key.dtype, jnp.integer) and key.shape == ():
            return
        raise TypeError(
            f"ogm_ge: key must be one PRNG seed or key; got an array of dtype {key.dtype} and "
            f"shape {key.shape}. {_KEY_FIX}"
        )
    raise TypeError(
        f"ogm_ge: key must be a PRNG seed or key; got {type(key).__name__} {key!r}. {_KEY_FIX}"
    )


def _raw_key(key) -> jax.Array:
    """A fresh ``uint32[2]`` buffer holding ``key`` (never the caller's array: donation)."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jnp.array(jax.random.key_data(key))
    key = jnp.asarray(key)
    if key.shape == (2,) and key.dtype == jnp.uint32:
        return jnp.array(key)
    return jax.random.key_data(jax.random.key(key))


def ogm_ge_coefficients(
    scores: jax.Array, alpha: float = 0.1, mode: OgmMode = "continuous"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """OGM's coefficients ``k`` (shape ``[M]``) from per-modality confidence scores.

    With ``s`` the scores, the dominant modality ``j = argmax_i s_i`` (the first on ties) and
    its discrepancy ratio against the mean of the others,

        rho = s_j / mean_{i != j} s_i            (rho = 1 when that mean is 0)
        k_j = 1 - tanh(alpha * max(rho - 1, 0))  ("continuous")
        k_j = 1 - tanh(alpha * rho)              ("reference")
        k_i = 1                                  for i != j

    Scores are confidences or accuracies: their domain is ``s_i >= 0``. A negative score
    (outside it) makes ``k`` and ``rho`` NaN, which :func:`ogm_ge` flags and skips.
    For two modalities ``rho`` is the paper's ``s_a / s_v``. ``"reference"`` is the
    official code's expression (``1 - tanh(alpha * relu(ratio))`` for the modality whose
    ratio exceeds 1), which jumps from 1 to ``1 - tanh(alpha)`` as the ratio crosses 1;
    ``"continuous"`` (default) measures the excess over parity, so ``k_j -> 1`` as the
    modalities become balanced.

    Args:
      scores: ``[M]`` non-negative scores (e.g. :func:`bogc_jax.metrics.confidence`).
        Any negative entry gives NaN coefficients.
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
    validation.check_choice("ogm_ge_coefficients", "mode", mode, OGM_MODES)
    validation.check_number("ogm_ge_coefficients", "alpha", alpha, finite=True, fix=_ALPHA_FIX)
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
    k = jnp.where(jnp.arange(m) == j, k_j, 1.0)
    in_domain = jnp.all(s >= 0)  # NaN outside the domain (NaN scores stay NaN)
    k = jnp.where(in_domain, k, jnp.nan).astype(jnp.float32)
    return k, j, jnp.where(in_domain, ratio, jnp.nan).astype(jnp.float32)


def _leaf_std(g: jax.Array) -> jax.Array:
    """Unbiased (ddof = 1, like ``torch.Tensor.std``) std of all entries; 0 for one entry."""
    g = g.astype(jnp.float32)
    if g.size < 2:
        return jnp.zeros([], jnp.float32)
    scale = max_abs([g])  # no overflow of the squares at large gradient scales
    return scale * jnp.std(g / scale, ddof=1)


def ogm_ge(
    param_labels: ParamLabels,
    *,
    alpha: float = 0.1,
    noise: bool = True,
    key: Any = 0,
    mode: OgmMode = "continuous",
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
    standard deviation ``1e-8`` only. The scores' domain is ``>= 0`` (confidences,
    accuracies). If ``modality_scores`` hold a negative value, a NaN or an infinity, or the
    gradients a NaN or an infinity (on any device, with ``axis_name``), or an output
    overflows, the update returns the gradients unchanged (no modulation, no noise), the
    state keeps its previous value (the PRNG key included) and ``state.finite`` is False
    (``state.nonfinite_count`` counts such updates). A NaN gradient thus reaches the next transform:
    ``optax.chain(bj.ogm_ge(labels), optax.apply_if_finite(optax.sgd(lr), k))`` skips it.

    Args:
      param_labels: pytree (or callable) of modality index / ``None`` per parameter; see
        :func:`bogc_jax.label_params`. ``M`` = largest label + 1 (at least 2).
      alpha: modulation strength, >= 0.
      noise: add the Gaussian enhancement (GE).
      key: PRNG seed (int), key (``jax.random.key``) or raw ``uint32[2]`` key for the noise.
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
    validation.check_choice("ogm_ge", "mode", mode, OGM_MODES)
    validation.check_number("ogm_ge", "alpha", alpha, finite=True, fix=_ALPHA_FIX)
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
    _check_key(key)
    validation.check_static_labels("ogm_ge", param_labels)

    def init_fn(params):
        m = labels_lib.modality_count(param_labels, params)
        return OgmGeState(
            _raw_key(key),
            jnp.zeros([], jnp.int32),
            jnp.ones([], jnp.float32),
            jnp.ones([m], jnp.float32),
            *initial_flags(),
        )

    def core(updates, state, params=None, *, modality_scores=None, **extra_args):
        del params, extra_args
        leaf_labels = labels_lib.leaf_labels(param_labels, updates)
        m = state.coefficients.shape[0]
        scores = validation.modality_update_inputs(
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
            return out.astype(g.dtype)

        new_state = state._replace(
            key=jax.random.key_data(key_state), dominant=dominant, ratio=ratio, coefficients=k
        )
        new_updates = labels_lib.map_labelled(modulate, leaf_labels, updates)
        return Step(
            new_updates,
            new_state,
            inputs=(scores, updates),
            valid=jnp.all(scores >= 0),
            axis_name=axis_name,
        )

    return optax.GradientTransformationExtraArgs(init_fn, finite_guarded(core))
