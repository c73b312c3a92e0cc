"""BOGC at the representation: calibrated encoder cotangents from Bayesian head posteriors.

Encoders give representations ``h_1..h_M`` (``[B, d_m]``); linear heads
(:class:`~bogc_jax.LinearHead`) read them. Per step, :func:`representation_bogc`'s
``grads``:

1. gives every head the plain gradient of ``weight * mean_n loss_n``;
2. forms each head's batch posterior: a Newton step on the batch from the current head,
   with the full-data posterior carried in the state as prior
   (:mod:`bogc_jax.head_posterior`);
3. per example ``n`` and dimension ``j`` of every ``h_m``, takes the moments of each
   source's gradient w.r.t. ``h_m`` (a head's block of it; one source per head, or per
   output with ``split_outputs``; :mod:`bogc_jax.representation_moments`), centred at the
   posterior mean or at the current head;
4. calibrates them over the sources that read ``h_m``
   (:mod:`bogc_jax.representation_weights`) into a cotangent ``c_m`` and back-propagates
   ``(c_1, .., c_M) / B`` once through the encoders (one VJP).

The result is a parameter-shaped gradient: feed it to any optax optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bogc_jax import head_posterior as hp
from bogc_jax import representation_heads as rh
from bogc_jax import representation_moments as rm
from bogc_jax import representation_state as rs
from bogc_jax import representation_weights as rw
from bogc_jax.representation_state import HeadState, RepresentationState

Array = jax.Array
PyTree = Any

MOMENTS = ("linearized", "monte_carlo")
CENTRES = ("current", "posterior")
FULL_DATA = (None, "epoch", "ema")


class RepresentationInfo(NamedTuple):
    """Diagnostics of one step.

    Attributes:
      losses: ``[H]`` each head's mean loss on the batch.
      weights: per representation, ``[T_m]`` each source's mean relative weight
        ``T_m w_t`` over examples and dimensions (1 = the fixed-weight sum).
      uncertainty: ``[M]`` the mean fused uncertainty ``m(Theta)`` (``"dempster"``).
    """

    losses: Array
    weights: tuple[Array, ...]
    uncertainty: Array


class RepresentationCalibration(NamedTuple):
    """``init(params) -> state``; ``grads(params, state, batch, *, key=None, targets=None)
    -> (grads, state, info)``; ``refresh(params, state, reps, targets) -> state``."""

    init: Callable[..., RepresentationState]
    grads: Callable[..., tuple[PyTree, RepresentationState, RepresentationInfo]]
    refresh: Callable[..., RepresentationState]


@dataclasses.dataclass(frozen=True)
class _Config:
    heads: tuple[rh.LinearHead, ...]
    aggregation: str
    posterior: str
    moments: str
    num_samples: int
    chunk_size: int
    scale: str
    centre: str
    power: Any
    prior_variance: float
    kappa: float
    gamma: float
    prior_weight: float
    eps: float
    full_data: str | None
    refresh_every: int | None
    ema_decay: float
    axis_name: Any


def _as_tuple(reps) -> tuple[Array, ...]:
    if isinstance(reps, (list, tuple)):
        return tuple(reps)
    return (reps,)


def _head_params(head_params_fn, params, num_heads) -> tuple[tuple[Array, Any], ...]:
    out = tuple((k, b) for k, b in head_params_fn(params))
    if len(out) != num_heads:
        raise ValueError(
            f"head_params_fn(params) returned {len(out)} (kernel, bias) pairs; expected one "
            f"per head ({num_heads})."
        )
    return out


def _targets_per_head(targets, num_heads):
    if isinstance(targets, (list, tuple)):
        if len(targets) != num_heads:
            raise ValueError(
                f"targets: a sequence must hold one entry per head ({num_heads}); got "
                f"{len(targets)}. Pass one array to share it."
            )
        return tuple(jnp.asarray(t) for t in targets)
    return (jnp.asarray(targets),) * num_heads


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _moments(cfg, head, post, x, y, bias, key) -> rm.GradMoments:
    if head.loss == "mse":
        return rm.mse_moments(
            post, x, y, form=cfg.posterior, bias=bias, split_outputs=head.split_outputs
        )
    if cfg.moments == "linearized":
        return rm.linearized_moments(head.loss, post, x, y, split_outputs=head.split_outputs)
    return rm.monte_carlo_moments(
        head.loss,
        x,
        y,
        posterior=post,
        form=cfg.posterior,
        key=key,
        num_samples=cfg.num_samples,
        chunk_size=cfg.chunk_size,
        split_outputs=head.split_outputs,
    )


def _calibrate_reps(cfg, reps, sources, total):
    """Per representation: the calibrated cotangent, the mean relative weights, ``m(Theta)``."""
    cotangents, weights, uncertainty = [], [], []
    for m, rep in enumerate(reps):
        mine = [s for s in sources if s[0] == m]
        if not mine:
            cotangents.append(jnp.zeros_like(rep))
            weights.append(jnp.zeros((0,), jnp.float32))
            uncertainty.append(jnp.zeros((), jnp.float32))
            continue
        mean = jnp.concatenate([s[1] for s in mine], axis=0)
        var = jnp.concatenate([s[2] for s in mine], axis=0)
        power = jnp.concatenate([jnp.full((s[1].shape[0],), s[3], mean.dtype) for s in mine])
        out, w, u = rw.calibrate(
            mean,
            var,
            scale=cfg.scale,
            aggregation=cfg.aggregation,
            power=power,
            kappa=cfg.kappa,
            gamma=cfg.gamma,
            prior_weight=cfg.prior_weight,
            eps=cfg.eps,
        )
        cotangents.append(out / total)
        weights.append((mean.shape[0] * jnp.mean(w, axis=(1, 2))).astype(jnp.float32))
        uncertainty.append(jnp.mean(u).astype(jnp.float32))
    return cotangents, tuple(weights), jnp.stack(uncertainty)


def _make_grads(cfg: _Config, encode_fn, head_params_fn, targets_fn):
    num_heads = len(cfg.heads)

    def grads_fn(params, state: RepresentationState, batch, *, key=None, targets=None, **extra):
        del extra
        sampled = any(h.loss != "mse" for h in cfg.heads)
        if cfg.moments == "monte_carlo" and key is None and cfg.aggregation != "sum" and sampled:
            raise ValueError(
                "grads: moments='monte_carlo' needs key= (a PRNG key; the same on every device)."
            )
        if targets is None:
            if targets_fn is None:
                raise ValueError("grads: pass targets=, or targets_fn= to the factory.")
            targets = targets_fn(batch)
        ys = _targets_per_head(targets, num_heads)
        reps, encoder_vjp = jax.vjp(lambda p: _as_tuple(encode_fn(p, batch)), params)
        head_params, head_vjp = jax.vjp(
            lambda p: _head_params(head_params_fn, p, num_heads), params
        )
        batch_size = reps[0].shape[0]
        compute = [
            jax.lax.stop_gradient(r).astype(jnp.promote_types(r.dtype, jnp.float32)) for r in reps
        ]
        total = _psum(jnp.asarray(batch_size, compute[0].dtype), cfg.axis_name)
        refresh_now = jnp.asarray(False)
        if cfg.full_data == "epoch":
            refresh_now = (state.step > 0) & (state.step % int(cfg.refresh_every or 1) == 0)
        elif cfg.full_data == "ema":
            refresh_now = state.step > 0
        decay = cfg.ema_decay if cfg.full_data == "ema" else 1.0
        sources, plain, head_cots, losses, new_heads = [], [], [], [], []
        for t, (head, (kernel, bias), y) in enumerate(zip(cfg.heads, head_params, ys)):
            x, columns = rh.fuse(head, compute)
            rh.check_head_params(t, head, kernel, bias, x.shape[-1])
            rh.check_targets(t, head, y, batch_size, kernel.shape[1])
            kernel_c = kernel.astype(x.dtype)
            bias_c = None if bias is None else bias.astype(x.dtype)
            loss_n, d_kernel, d_bias = rh.head_gradients(head, x, kernel_c, bias_c, y, total)
            head_cots.append(
                (d_kernel.astype(kernel.dtype), None if bias is None else d_bias.astype(bias.dtype))
            )
            losses.append(_psum(jnp.sum(loss_n), cfg.axis_name) / total)
            theta = rh.theta_of(head, kernel_c, bias_c)
            hstate = rs.refresh_head(
                head.loss,
                cfg.posterior,
                cfg.prior_variance,
                cfg.full_data == "ema",
                theta,
                state.heads[t],
                refresh_now,
            )
            extra_bias = bias_c if head.loss == "mse" else None
            stats = hp.curvature_stats(head.loss, cfg.posterior, theta, x, y, extra_bias)
            stats = hp.CurvatureStats(*(_psum(s, cfg.axis_name) for s in stats))
            new_heads.append(rs.accumulate(head.loss, cfg.posterior, decay, theta, hstate, stats))
            current = head.weight * rm.input_gradients(
                head.loss, theta, x, y, extra_bias, head.split_outputs
            )
            if cfg.aggregation == "sum":
                moments = rm.GradMoments(current, jnp.ones_like(current))
            else:
                prior = hp.HeadPosterior(hstate.prior_mean, hstate.prior_precision)
                post = hp.newton_posterior(head.loss, cfg.posterior, theta, stats, prior)
                head_key = None if key is None else jax.random.fold_in(key, t)
                moments = _moments(cfg, head, post, x, y, extra_bias, head_key)
                centre = current if cfg.centre == "current" else head.weight * moments.mean
                moments = rm.GradMoments(centre, head.weight**2 * moments.var)
            power = rh.head_power(head, cfg.power)
            for m, (start, stop) in zip(head.reads, columns):
                mean = jnp.moveaxis(moments.mean[..., start:stop], 1, 0)
                var = jnp.moveaxis(moments.var[..., start:stop], 1, 0)
                sources.append((m, mean, var, power))
                plain.append((m, jnp.moveaxis(current[..., start:stop], 1, 0)))
        cotangents, weights, uncertainty = _calibrate_reps(cfg, compute, sources, total)
        finite = jnp.asarray(True)
        for c in cotangents:
            finite = finite & jnp.all(jnp.isfinite(c))
        finite = _psum(finite.astype(jnp.int32), cfg.axis_name) == (
            1 if cfg.axis_name is None else _psum(1, cfg.axis_name)
        )
        out = []
        for m, (c, rep) in enumerate(zip(cotangents, reps)):
            fallback = (
                sum((jnp.sum(p[1], axis=0) for p in plain if p[0] == m), jnp.zeros_like(c)) / total
            )
            out.append(jnp.where(finite, c, fallback).astype(rep.dtype))
        (encoder_grads,) = encoder_vjp(tuple(out))
        (head_grads,) = head_vjp(tuple(head_cots))
        grads = jax.tree.map(lambda a, b: a + b, encoder_grads, head_grads)
        if cfg.axis_name is not None:
            grads = jax.lax.psum(grads, cfg.axis_name)
        kept = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), tuple(new_heads), state.heads
        )
        new_state = RepresentationState(
            state.step + 1,
            kept,
            finite,
            state.nonfinite_count + (~finite).astype(jnp.int32),
        )
        if cfg.axis_name is not None:  # per-example means: the same shard sizes everywhere
            weights, uncertainty = jax.lax.pmean((weights, uncertainty), cfg.axis_name)
        info = RepresentationInfo(jnp.stack(losses).astype(jnp.float32), weights, uncertainty)
        return grads, new_state, info

    return grads_fn


def representation_bogc(
    encode_fn: Callable[[PyTree, Any], Sequence[Array] | Array],
    head_params_fn: Callable[[PyTree], Sequence[tuple[Array, Array | None]]],
    heads: Sequence[rh.LinearHead],
    *,
    targets_fn: Callable[[Any], Any] | None = None,
    aggregation: str = "dempster",
    posterior: str = "diag",
    moments: str = "linearized",
    num_samples: int = 64,
    chunk_size: int = 32,
    scale: str = "sum",
    centre: str = "current",
    power: float | Mapping[str, float] = 1.0,
    prior_variance: float = 0.005,
    kappa: float = 1.0,
    gamma: float = 1.0,
    prior_weight: float = 1.0,
    eps: float = 1e-3,
    full_data: str | None = "ema",
    refresh_every: int | None = None,
    ema_decay: float = 0.99,
    axis_name: Any = None,
) -> RepresentationCalibration:
    r"""BOGC at the representation: per-example, per-dimension calibration of encoder gradients.

    For representation ``h_m`` with touching sources ``T_m`` (each head output reading
    ``h_m``, its block of the head's input gradient ``g_t = d loss_t / d h_m``), with moments
    ``mu[t, n, j]``, ``var[t, n, j]`` under the heads' posteriors (``mu`` the gradient at
    the current head for ``centre="current"``, the posterior mean for ``"posterior"``):

    .. math::

      w_{t,n,j} = \mathrm{agg}(\mu, \mathrm{var})_{t,n,j}, \qquad
      c_{m,n,j} = \frac{s}{B} \sum_{t \in T_m} w_{t,n,j}\, \mu_{t,n,j},

    ``s = |T_m|`` (``scale="sum"``) or 1 (``"mean"``), then one VJP of ``(c_1..c_M)``
    through ``encode_fn``, plus each head's plain gradient. With equal variances (or
    ``power=0``, or ``kappa=0`` for ``"dempster"``), ``scale="sum"`` and
    ``centre="current"`` this is exactly the gradient of ``sum_t weight_t mean_n loss_t``.

    Full-data part of the posterior (``full_data=``): ``"ema"`` (default): the GGN and
    the gradients of past batches, decayed by ``ema_decay`` per step, form the prior of
    every step (``1 / (1 - ema_decay)`` batches' worth of data); ``"epoch"``: summed over
    ``refresh_every`` steps (an epoch), they form the prior at the next epoch's first step
    (BayesAgg-MTL's timing); ``None``: the prior is always ``N(0, prior_variance I)``. Past
    gradients are carried to the current head by their GGN (exact for ``"mse"``). For
    BayesAgg-MTL's own scheme from stored features, call ``refresh`` at an epoch's start.

    Cost per step beyond the plain step, with ``P = K (d + 1)`` per head:
    ``posterior="diag"`` and ``moments="linearized"``: ``O(B P)``, a few head-sized
    matrix products; ``moments="monte_carlo"``: ``O(S B P)`` in chunks of draws;
    ``posterior="full"``: a ``P x P`` Cholesky for ``"softmax"`` (small heads only).

    Args:
      encode_fn: ``(params, batch) -> (h_1, .., h_M)`` (or one array), each ``[B, d_m]``.
      head_params_fn: ``params -> [(kernel [d_in, K], bias [K] | None), ...]``, one per
        head (Flax ``Linear`` layout), differentiable in ``params``.
      heads: one :class:`~bogc_jax.LinearHead` per head.
      targets_fn: ``batch -> targets`` (one array for every head, or one per head);
        otherwise pass ``targets=`` to ``grads``.
      aggregation: ``"dempster"`` (BOGC), ``"precision"`` (BayesAgg-MTL) or ``"sum"``.
      posterior: ``"diag"`` or ``"full"`` (:mod:`bogc_jax.head_posterior`).
      moments: ``"linearized"`` (delta method; diagonal posterior) or ``"monte_carlo"``
        (``num_samples`` draws in chunks of ``chunk_size``); ``"mse"`` heads are exact.
      num_samples, chunk_size: Monte Carlo draws and draws per chunk.
      scale: ``"sum"`` or ``"mean"``.
      centre: ``"current"`` or ``"posterior"``.
      power: ``p >= 0`` (``V = var ** p``), a number or a mapping loss -> number.
      prior_variance: ``gamma`` of the prior ``N(0, gamma I)``, > 0.
      kappa, gamma, prior_weight, eps: ``"dempster"``'s evidence hyper-parameters.
      full_data: ``"ema"``, ``"epoch"`` or ``None``.
      refresh_every: steps per epoch (``full_data="epoch"``).
      ema_decay: in ``[0, 1)``, for ``full_data="ema"``.
      axis_name: the mapped axis when the batch is split over devices (``shard_map``):
        statistics, losses and gradients are summed over it.

    Returns:
      A :class:`RepresentationCalibration`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, bogc_jax as bj
      >>> k = jax.random.split(jax.random.key(0), 4)
      >>> params = {"enc": [jax.random.normal(k[0], (6, 4)), jax.random.normal(k[1], (5, 4))],
      ...           "fusion": (jnp.zeros((8, 3)), jnp.zeros(3)),
      ...           "uni": [(jnp.zeros((4, 3)), jnp.zeros(3)), (jnp.zeros((4, 3)), jnp.zeros(3))]}
      >>> encode = lambda p, b: [jnp.tanh(b[0] @ p["enc"][0]), jnp.tanh(b[1] @ p["enc"][1])]
      >>> heads = [bj.LinearHead((0, 1)), bj.LinearHead((0,)), bj.LinearHead((1,))]
      >>> method = bj.representation_bogc(
      ...     encode, lambda p: [p["fusion"], *p["uni"]], heads, targets_fn=lambda b: b[2])
      >>> batch = (jax.random.normal(k[2], (16, 6)), jax.random.normal(k[3], (16, 5)),
      ...          jnp.arange(16) % 3)
      >>> state = method.init(params)
      >>> grads, state, info = jax.jit(method.grads)(params, state, batch)
      >>> tx = optax.adam(1e-3)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> info.losses.shape, [w.shape for w in info.weights]
      ((3,), [(2,), (2,)])

    References:
      Multi-Modal Learning with Bayesian-Oriented Gradient Calibration, arXiv 2505.23071.
      Achituve et al., Bayesian Uncertainty for Gradient Aggregation in Multi-Task
      Learning, ICML 2024.
    """
    heads = tuple(heads)
    if not heads or not all(isinstance(h, rh.LinearHead) for h in heads):
        raise ValueError("heads must be a non-empty sequence of bj.LinearHead.")
    if aggregation not in rw.AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {rw.AGGREGATIONS}; got {aggregation!r}.")
    if posterior not in hp.FORMS:
        raise ValueError(f"posterior must be one of {hp.FORMS}; got {posterior!r}.")
    if moments not in MOMENTS:
        raise ValueError(f"moments must be one of {MOMENTS}; got {moments!r}.")
    if moments == "linearized" and posterior != "diag":
        raise ValueError(
            "moments='linearized' needs posterior='diag'; use moments='monte_carlo' with "
            "posterior='full'."
        )
    if scale not in rw.SCALES:
        raise ValueError(f"scale must be one of {rw.SCALES}; got {scale!r}.")
    if centre not in CENTRES:
        raise ValueError(f"centre must be one of {CENTRES}; got {centre!r}.")
    if full_data not in FULL_DATA:
        raise ValueError(f"full_data must be one of {FULL_DATA}; got {full_data!r}.")
    if full_data == "epoch" and not (isinstance(refresh_every, int) and refresh_every >= 1):
        raise ValueError(
            f"full_data='epoch' needs refresh_every = the steps per epoch (an int >= 1); got "
            f"{refresh_every!r}."
        )
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1); got {ema_decay}.")
    if not (isinstance(num_samples, int) and num_samples >= 1 and chunk_size >= 1):
        raise ValueError(
            f"num_samples and chunk_size must be ints >= 1; got {num_samples}, {chunk_size}."
        )
    if not prior_variance > 0:
        raise ValueError(f"prior_variance must be > 0; got {prior_variance}.")
    for h in heads:
        if not rh.head_power(h, power) >= 0:
            raise ValueError(f"power must be >= 0; got {power!r}.")
    cfg = _Config(
        heads, aggregation, posterior, moments, num_samples, chunk_size, scale, centre,
        power, prior_variance, kappa, gamma, prior_weight, eps, full_data, refresh_every,
        ema_decay, axis_name,
    )  # fmt: skip

    def init_fn(params) -> RepresentationState:
        pairs = _head_params(head_params_fn, params, len(heads))
        states = tuple(
            rs.init_head(h.loss, posterior, prior_variance, k, b) for h, (k, b) in zip(heads, pairs)
        )
        return RepresentationState(
            jnp.zeros((), jnp.int32), states, jnp.asarray(True), jnp.zeros((), jnp.int32)
        )

    def refresh_fn(params, state: RepresentationState, reps, targets) -> RepresentationState:
        """BayesAgg-MTL's first stage from stored features ``reps`` (``[N, d_m]`` each)."""
        reps = _as_tuple(reps)
        ys = _targets_per_head(targets, len(heads))
        pairs = _head_params(head_params_fn, params, len(heads))
        new = []
        for head, (kernel, bias), y, old in zip(heads, pairs, ys, state.heads):
            x, _ = rh.fuse(head, [jnp.asarray(r, old.prior_mean.dtype) for r in reps])
            theta = rh.theta_of(
                head, kernel.astype(x.dtype), None if bias is None else bias.astype(x.dtype)
            )
            extra_bias = bias.astype(x.dtype) if (head.loss == "mse" and bias is not None) else None
            post = hp.full_data_posterior(
                head.loss,
                theta,
                x,
                y,
                prior_variance=prior_variance,
                form=posterior,
                bias=extra_bias,
            )
            zero = jax.tree.map(jnp.zeros_like, (old.ggn_sum, old.offset_sum, old.num_examples))
            new.append(HeadState(post.mean, post.precision, *zero))
        return state._replace(heads=tuple(new))

    return RepresentationCalibration(
        init_fn, _make_grads(cfg, encode_fn, head_params_fn, targets_fn), refresh_fn
    )
