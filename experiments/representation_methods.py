"""Representation-space methods for the experiments: BOGC at the representation and
BayesAgg-MTL, each with its own training step.

Both train the experiments' model unchanged (``experiments.models``): encoders ``h_m``, a
fusion head on ``concat(h_1..h_M)`` and one unimodal head per modality, so that they are
paired with ``joint_uni`` (the fixed-weight sum of the fusion and unimodal losses, same
heads, same base optimizer, same batches and keys). Their step::

    grads, rep_state, info = method.grads(params, rep_state, batch, key=key)
    updates, opt_state     = base.update(grads, opt_state, params)

``method`` is ``bj.representation_bogc`` or ``bj.bayesagg_mtl`` over the heads

    LinearHead(reads=(0, .., M-1), "softmax", fusion="concat")   # the fusion head
    LinearHead(reads=(m,), "softmax")                             # unimodal head m

with ``head_params_fn`` reading ``params["fusion_head"]`` and ``params["heads"][m]``. A
``"sum"``-fusion model (one fusion kernel per modality, logits summed) is the same concat
head with the kernels stacked and the biases summed; ``"gated"`` fusion is not a linear
head on the encoders' outputs and is refused. The optimizer state is the pair
``(base state, bj.RepresentationState)``.

Hyper-parameters come from :class:`experiments.config.TrainConfig`: ``kappa`` and
``gamma`` (the evidence strength and sharpness shared with parameter-space BOGC),
``rep_power`` (``p``; ``None``: the method's own, 1 for BOGC, BayesAgg-MTL's 0.1 for
classifiers) and ``rep_prior_variance`` (the prior ``N(0, gamma I)`` of the heads;
``None``: 0.005, BayesAgg-MTL's). BayesAgg-MTL's full-data posterior is carried in the
state per epoch (``full_data="epoch"``, ``refresh_every`` = steps per epoch: the previous
epoch's batches, each at the head of its own step), the closest a jitted step comes to
the official code's recomputation from stored features at each epoch's first batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

import bogc_jax as bj
from experiments import methods as methods_lib

# BayesAgg-MTL's published number of Monte Carlo draws, and the smaller number of the grid.
BAYESAGG_SAMPLES = 1024
BAYESAGG_GRID_SAMPLES = 32
DEFAULT_PRIOR_VARIANCE = 0.005


def model_heads(ctx: methods_lib.Context):
    """``(encode_fn, head_params_fn, heads)`` of the experiments' model for ``bj``'s
    representation methods: the encoders' outputs, the fusion head, then the unimodal heads.
    """
    fn, params, m = ctx.fn, ctx.params, ctx.num_modalities
    if "gates" in params:
        raise ValueError(
            "representation methods: fusion='gated' weights each representation by a "
            "learned gate before the fusion head, so that head is not linear in the "
            "encoders' outputs; use fusion='concat' or 'sum'."
        )

    def encode_fn(p, batch):
        return fn.features(p, batch[0])

    def head_params_fn(p):
        if "fusion_heads" in p:  # sum fusion: sum_m (h_m W_m + b_m) = [h] [W] + sum_m b_m
            kernel = jnp.concatenate([p["fusion_heads"][i]["kernel"] for i in range(m)], 0)
            bias = sum(p["fusion_heads"][i]["bias"] for i in range(m))
            fusion = (kernel, bias)
        else:
            fusion = (p["fusion_head"]["kernel"], p["fusion_head"]["bias"])
        return [fusion] + [(p["heads"][i]["kernel"], p["heads"][i]["bias"]) for i in range(m)]

    heads = [bj.LinearHead(tuple(range(m)), "softmax", fusion="concat")]
    heads += [bj.LinearHead((i,), "softmax") for i in range(m)]
    return encode_fn, head_params_fn, heads


def steps_per_epoch(ctx: methods_lib.Context) -> int:
    """Full batches per epoch (as ``experiments.train.Trainer``)."""
    n = int(ctx.num_train or 1)
    return max(n // min(ctx.config.batch_size, n), 1)


def representation_parts(method: bj.RepresentationCalibration, base) -> methods_lib.MethodParts:
    """:class:`~experiments.methods.MethodParts` whose step is ``method.grads`` then ``base``."""

    def init(params, seed):
        del seed
        return base.init(params), method.init(params)

    def step(params, opt_state, batch, key):
        base_state, rep_state = opt_state
        grads, rep_state, info = method.grads(params, rep_state, batch, key=key)
        updates, base_state = base.update(grads, base_state, params)
        return optax.apply_updates(params, updates), (base_state, rep_state), info.losses

    return methods_lib.MethodParts(tx=base, init=init, step=step)


def _prior_variance(ctx: methods_lib.Context) -> float:
    value = ctx.config.rep_prior_variance
    return DEFAULT_PRIOR_VARIANCE if value is None else value


def rep_bogc(**options: Any) -> Callable[[methods_lib.Context], methods_lib.MethodParts]:
    """A factory of ``bj.representation_bogc`` with ``options`` over the library defaults
    (``"dempster"``, diagonal posterior, linearised moments, ``p = 1``)."""

    def make(ctx: methods_lib.Context) -> methods_lib.MethodParts:
        cfg = ctx.config
        encode_fn, head_params_fn, heads = model_heads(ctx)
        method = bj.representation_bogc(
            encode_fn,
            head_params_fn,
            heads,
            targets_fn=lambda batch: batch[1],
            kappa=cfg.kappa,
            gamma=cfg.gamma,
            power=1.0 if cfg.rep_power is None else cfg.rep_power,
            prior_variance=_prior_variance(ctx),
            **options,
        )
        return representation_parts(method, ctx.base)

    return make


def bayesagg(num_samples: int, posterior: str = "full"):
    """A factory of ``bj.bayesagg_mtl`` (its published settings) with ``num_samples``
    draws, the full-data posterior accumulated per epoch."""

    def make(ctx: methods_lib.Context) -> methods_lib.MethodParts:
        cfg = ctx.config
        encode_fn, head_params_fn, heads = model_heads(ctx)
        power: Any = bj.bayesagg.DEFAULT_POWER if cfg.rep_power is None else cfg.rep_power
        method = bj.bayesagg_mtl(
            encode_fn,
            head_params_fn,
            heads,
            targets_fn=lambda batch: batch[1],
            prior_variance=_prior_variance(ctx),
            power=power,
            num_samples=num_samples,
            chunk_size=min(num_samples, 64),
            posterior=posterior,
            full_data="epoch",
            refresh_every=steps_per_epoch(ctx),
        )
        return representation_parts(method, ctx.base)

    return make


REQUIRES = ("representation_bogc", "LinearHead")

SPECS = (
    methods_lib.MethodSpec(
        "rep_bogc",
        "BOGC at the representation: per-example, per-dimension Dempster-Shafer calibration "
        "of the fusion and unimodal heads' feature gradients (diag posterior, linearised "
        "moments, p 1)",
        False,
        REQUIRES,
        rep_bogc(),
    ),
    methods_lib.MethodSpec(
        "rep_bogc_precision",
        "BOGC at the representation, inverse-variance weights (no Dempster step)",
        False,
        REQUIRES,
        rep_bogc(aggregation="precision"),
    ),
    methods_lib.MethodSpec(
        "rep_bogc_mc",
        "BOGC at the representation, Monte Carlo moments (16 draws) of the diag posterior",
        False,
        REQUIRES,
        rep_bogc(moments="monte_carlo", num_samples=16, chunk_size=16),
    ),
    methods_lib.MethodSpec(
        "rep_bogc_posterior",
        "BOGC at the representation, centred at the posterior-mean gradient",
        False,
        REQUIRES,
        rep_bogc(centre="posterior"),
    ),
    methods_lib.MethodSpec(
        "bayesagg_mtl",
        f"BayesAgg-MTL, published settings: full posterior, {BAYESAGG_SAMPLES} draws, "
        "precision average at the posterior mean, p 0.1, prior variance 0.005",
        False,
        ("bayesagg_mtl", "LinearHead"),
        bayesagg(BAYESAGG_SAMPLES),
        every_dataset=False,
    ),
    methods_lib.MethodSpec(
        f"bayesagg_mtl_diag_s{BAYESAGG_GRID_SAMPLES}",
        f"BayesAgg-MTL with a diagonal posterior and {BAYESAGG_GRID_SAMPLES} Monte Carlo "
        f"draws (not the published full posterior and {BAYESAGG_SAMPLES} draws: the grid's "
        "CPU budget)",
        False,
        ("bayesagg_mtl", "LinearHead"),
        bayesagg(BAYESAGG_GRID_SAMPLES, posterior="diag"),
    ),
    methods_lib.MethodSpec(
        "bayesagg_mtl_diag",
        f"BayesAgg-MTL with a diagonal posterior, {BAYESAGG_SAMPLES} draws",
        False,
        ("bayesagg_mtl", "LinearHead"),
        bayesagg(BAYESAGG_SAMPLES, posterior="diag"),
        every_dataset=False,
    ),
)
