"""The method registry: each balancing method is one entry.

A method is a :class:`MethodSpec` whose ``make(ctx)`` returns :class:`MethodParts`: the
Optax transform (already chained with the base optimizer) and a function computing the
extra arguments of ``tx.update`` for one step (``grad_stats=`` for BOGC and MMPareto,
``modality_scores=`` for CGGM and OGM-GE). Everything runs inside the jitted step.

The training step (``experiments.train``) is the same for every method unless the method
brings its own: a method whose step is not "a gradient, then ``tx.update``" (for example a
representation-space method that computes the encoders' outputs, the heads' posteriors
and one encoder VJP) sets ``MethodParts.step`` to a function ``(params, opt_state,
batch, key) -> (params, opt_state, losses [S])``; the trainer jits it, feeds it the same
batches and PRNG keys as every other method, and evaluates and records the result the
same way. ``ctx.fn`` gives the pieces such a step needs (``features``,
``feature_losses``, ``fuse``).

Every method trains the same model with the same per-source losses ``[1 + M, B]``
(fusion first, then one per auxiliary head). The ordinary gradient handed to
``tx.update`` is that of ``sum_s mean_b losses[s]``. Methods differ in

* whether the auxiliary heads see stop-gradient features (``joint``, ``cggm*``,
  ``ogm_ge``: the heads are then monitors or CGGM's classifiers and the encoders get the
  fusion loss only) or features with gradient (the unimodal losses of ``joint_uni``,
  ``bogc*``, ``mmpareto``);
* the transform, which may rewrite that gradient from the extra arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import bogc_jax as bj
from experiments import models
from experiments.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Context:
    """What a method factory may use.

    Attributes:
      num_modalities: ``M``; there are ``S = 1 + M`` sources (fusion first).
      fn: the model's pure functions (``experiments.models.Functional``).
      params: the initial parameters (a plain dict), e.g. to build labels.
      base: the base optimizer (``optax.adam`` or ``optax.sgd`` with momentum).
      config: the run's :class:`experiments.config.TrainConfig` (the methods'
        hyper-parameters ``kappa``, ``gamma``, ``rho``, ..., and the statistics options
        ``stats_method`` and ``stats_chunk``).
      num_train: the number of training examples (the Laplace posterior's ``N``).
    """

    num_modalities: int
    fn: models.Functional
    params: Any
    base: optax.GradientTransformation
    config: TrainConfig = TrainConfig()
    num_train: int | None = None


@dataclasses.dataclass(frozen=True)
class MethodParts:
    """A method, ready to train.

    Attributes:
      tx: the full transform (method chained with the base optimizer).
      extra_args: ``(params, batch, out, opt_state, key) -> dict`` of keyword extra
        arguments for ``tx.update``; ``out`` holds the step's forward pass (``losses
        [S, B]``, ``fused``, ``branch`` and ``heads`` logits, ``feats``), ``key`` is a
        fresh PRNG key for this step.
      extra_loss: optional ``(params, batch, out, opt_state) -> scalar`` added to the
        training loss (CGGM's direction term).
      init: optional ``(params, seed) -> opt_state`` (default ``tx.init(params)``), for
        transforms whose state holds a seed.
      grads_from_stats: the gradient handed to ``tx.update`` is
        ``extra_args(...)["grad_stats"].fixed_weight_grads()`` (the gradient of the summed
        losses, which the statistics already hold) instead of a second backward pass. Only
        for methods whose statistics hold the batch gradient of every leaf (not the
        Laplace reading's, which covers the encoders' last layers) and that add no
        ``extra_loss``.
      step: optional ``(params, opt_state, batch, key) -> (params, opt_state, losses)``
        replacing the default step (``losses``: ``[S]`` batch-mean training losses, fusion
        first); ``tx``/``init`` still give the initial state. ``extra_args``,
        ``extra_loss`` and ``grads_from_stats`` are then unused.
    """

    tx: optax.GradientTransformation
    extra_args: Callable[..., dict] = lambda params, batch, out, opt_state, key: {}
    extra_loss: Callable[..., jax.Array] | None = None
    init: Callable[..., Any] | None = None
    grads_from_stats: bool = False
    step: Callable[..., tuple[Any, Any, jax.Array]] | None = None

    def __post_init__(self):
        if self.grads_from_stats and self.extra_loss is not None:
            raise ValueError(
                "MethodParts: grads_from_stats=True takes the gradient of the per-source "
                "losses from the statistics, which do not include extra_loss; set one of them."
            )


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One registry entry.

    Attributes:
      name: the CLI name.
      description: one line for ``--list`` and the results table.
      stop_gradient_heads: the auxiliary heads see stop-gradient features.
      requires: ``bogc_jax`` attributes the method needs; while one is missing the
        method is reported unavailable.
      make: ``Context -> MethodParts``.
      every_dataset: the reproduce script's main grid runs it on every dataset; False for a
        method too costly for that (it runs where ``experiments/reproduce.sh`` says).
    """

    name: str
    description: str
    stop_gradient_heads: bool
    requires: tuple[str, ...]
    make: Callable[[Context], MethodParts]
    every_dataset: bool = True

    def missing(self) -> list[str]:
        """The ``bogc_jax`` names this method needs that are not importable yet."""
        return [r for r in self.requires if not hasattr(bj, r)]


def _plain(ctx: Context) -> MethodParts:
    return MethodParts(tx=ctx.base)


def encoder_labels(params) -> Any:
    """``param_labels``: encoder ``m``'s parameters -> ``m``; heads and fusion -> None."""
    return bj.label_params(params, {"encoders": bj.labels.INDEX}, default=None)


def mean_grad_stats(losses_fn, params, batch) -> bj.GradStats:
    """Per-source batch-mean gradients only (``var`` = 0): ``S`` backward passes."""
    means = jax.jacrev(lambda p: jnp.mean(losses_fn(p, batch), axis=1))(params)
    count = jnp.asarray(jax.tree.leaves(batch)[0].shape[0], jnp.float32)
    return bj.GradStats(count, means, jax.tree.map(jnp.zeros_like, means))


def _grad_stats_args(ctx: Context):
    def extra_args(params, batch, out, opt_state, key):
        del out, opt_state, key
        stats = bj.source_grad_stats(
            ctx.fn.losses,
            params,
            batch,
            method=ctx.config.stats_method,
            chunk_size=ctx.config.stats_chunk,
        )
        return {"grad_stats": stats}

    return extra_args


def _bogc_transform(ctx: Context, aggregation: str, gamma: float | None, noise: str):
    cfg = ctx.config
    return bj.bogc(
        num_sources=ctx.num_modalities + 1,
        kappa=cfg.kappa,
        gamma=cfg.gamma if gamma is None else gamma,
        aggregation=aggregation,
        noise=cfg.noise or noise,
    )


def _bogc(aggregation: str, gamma: float | None = None, noise: str = "absolute"):
    def make(ctx: Context) -> MethodParts:
        tx = optax.chain(_bogc_transform(ctx, aggregation, gamma, noise), ctx.base)
        return MethodParts(tx=tx, extra_args=_grad_stats_args(ctx), grads_from_stats=True)

    return make


def _bogc_laplace(ctx: Context) -> MethodParts:
    """Laplace posterior on each encoder's last layer, the posterior of the training loss.

    The posterior sits where the fusion loss and the unimodal losses meet (an output
    head is reached by one source only, and a single source is never recalibrated);
    ``dataset_size`` = the training set, so the draws have the width of the training
    loss's posterior, not of one batch's; ``center="batch"`` (the CLI's default), so the
    calibrated means are the batch gradients and the draws give the variances. Other
    leaves pass the fixed-weight sum through.
    """
    cfg = ctx.config
    mask = models.encoder_output_mask(ctx.params)
    tx = optax.chain(_bogc_transform(ctx, "dempster", None, "absolute"), ctx.base)

    def extra_args(params, batch, out, opt_state, key):
        del out, opt_state
        stats = bj.laplace_grad_stats(
            ctx.fn.losses,
            params,
            batch,
            key,
            mask=mask,
            num_samples=cfg.laplace_samples,
            damping=cfg.laplace_damping,
            dataset_size=ctx.num_train,
            center=cfg.laplace_center,
            method=cfg.stats_method,
            chunk_size=cfg.stats_chunk,
        )
        return {"grad_stats": stats}

    # The statistics cover the masked leaves only (None elsewhere), so the gradient of
    # every leaf comes from the backward pass.
    return MethodParts(tx=tx, extra_args=extra_args)


def _output_kernels(params, num_modalities: int):
    """Fusion output-layer kernel per modality (its row slice, or its own head)."""
    if "fusion_heads" in params:
        return [params["fusion_heads"][m]["kernel"] for m in range(num_modalities)]
    kernel = params["fusion_head"]["kernel"]
    dims = [params["heads"][m]["kernel"].shape[0] for m in range(num_modalities)]
    offsets = [sum(dims[:m]) for m in range(num_modalities + 1)]
    return [kernel[offsets[m] : offsets[m + 1]] for m in range(num_modalities)]


def _classifier_partition(params):
    groups = models.param_groups(params)
    return jax.tree.map(lambda g: "classifiers" if g.startswith("head/") else "model", groups)


def _cggm(mode: str, direction: str, after_optimizer: bool = False):
    """CGGM: magnitude (``bj.cggm`` on the encoders) + the direction term in the loss.

    The concat fusion head's kernel ``[sum_m F_m, C]`` has no single shape to compare with
    the classifiers' ``[F_m, C]``, so the direction term compares classifier ``m`` with
    modality ``m``'s slice ``W_m`` of the fusion head:
    ``L_gm = (1/M) sum_m (|B_m| - B_m cos(c_m, f_m))``, with ``B`` of the previous update
    (the reference schedule's one-step-stale coefficients, but current weights).
    ``direction="gradients"``: ``f_m`` = the fusion loss's gradient w.r.t. ``W_m`` (taken
    on the live features, so ``L_gm`` is differentiated through it), ``c_m`` = classifier
    ``m``'s loss gradient w.r.t. its kernel; ``"weights"``: the kernels themselves.

    ``after_optimizer``: scale the base optimizer's *updates* instead of the gradients
    (``clip -> base -> cggm``). Adam divides each coordinate by a running RMS of its own
    gradients, so a per-encoder factor applied before it is largely undone; applied after
    it, ``rho * B_m`` scales encoder ``m``'s step as the paper intends for SGD.
    """

    def make(ctx: Context) -> MethodParts:
        m = ctx.num_modalities
        lam = ctx.config.cggm_lambda
        # The classifiers (auxiliary heads on stop-gradient features) train on their own
        # Adam (5e-4, as in the official scripts), outside the modulation and the clipping.
        modulate = bj.cggm(encoder_labels, rho=ctx.config.rho, mode=mode)
        if after_optimizer:
            model_tx = optax.chain(optax.clip_by_global_norm(0.8), ctx.base, modulate)
        else:
            model_tx = optax.chain(modulate, optax.clip_by_global_norm(0.8), ctx.base)
        tx = optax.partition(
            {"model": model_tx, "classifiers": optax.adam(5e-4)}, _classifier_partition
        )

        def extra_args(params, batch, out, opt_state, key):
            del params, opt_state, key
            labels = batch[1]
            scores = jnp.stack([bj.metrics.accuracy(out["heads"][i], labels) for i in range(m)])
            return {"modality_scores": scores}

        def extra_loss(params, batch, out, opt_state):
            # Reference schedule: B of the previous update (CggmState.coefficients).
            coeffs = optax.tree_utils.tree_get(opt_state, "coefficients")
            if direction == "weights":
                fusion = _output_kernels(params, m)
                classifiers = [params["heads"][i]["kernel"] for i in range(m)]
            else:  # the paper: gradients of the fusion loss and of each classifier's loss
                labels = batch[1]
                fusion_key = "fusion_heads" if "fusion_heads" in params else "fusion_head"

                def fusion_loss(sub):  # differentiable in the live features: grad of a grad
                    logits = ctx.fn.fuse({**params, fusion_key: sub}, out["feats"])
                    return jnp.mean(models.cross_entropy(logits, labels))

                grads = {**params, fusion_key: jax.grad(fusion_loss)(params[fusion_key])}
                fusion = _output_kernels(grads, m)
                feats = [jax.lax.stop_gradient(f) for f in out["feats"]]

                def head_losses(heads):
                    logits = [f @ hd["kernel"] + hd["bias"] for f, hd in zip(feats, heads)]
                    return sum(jnp.mean(models.cross_entropy(z, labels)) for z in logits)

                head_grads = jax.grad(head_losses)([params["heads"][i] for i in range(m)])
                classifiers = [g["kernel"] for g in head_grads]
            terms = [
                bj.cggm_direction_loss(
                    coeffs[i : i + 1], fusion[i], [classifiers[i]], direction=direction
                )
                for i in range(m)
            ]
            return lam * sum(terms) / m

        return MethodParts(tx=tx, extra_args=extra_args, extra_loss=extra_loss)

    return make


def _ogm_ge(ctx: Context) -> MethodParts:
    m = ctx.num_modalities
    tx = optax.chain(bj.ogm_ge(encoder_labels, alpha=ctx.config.alpha), ctx.base)

    def extra_args(params, batch, out, opt_state, key):
        del params, opt_state, key
        labels = batch[1]
        scores = jnp.stack([bj.metrics.confidence(out["branch"][i], labels) for i in range(m)])
        return {"modality_scores": scores}

    def init(params, seed):
        state = tx.init(params)
        key = jax.random.key_data(jax.random.key(seed))
        return optax.tree_utils.tree_set(state, key=key)

    return MethodParts(tx=tx, extra_args=extra_args, init=init)


def _mmpareto(ctx: Context) -> MethodParts:
    tx = optax.chain(bj.mmpareto(encoder_labels, gamma=ctx.config.pareto_gamma), ctx.base)

    def extra_args(params, batch, out, opt_state, key):
        del out, opt_state, key
        return {"grad_stats": mean_grad_stats(ctx.fn.losses, params, batch)}

    return MethodParts(tx=tx, extra_args=extra_args, grads_from_stats=True)


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


register(
    MethodSpec(
        "joint", "fusion loss only (heads trained as stop-gradient monitors)", True, (), _plain
    )
)
register(
    MethodSpec(
        "joint_uni",
        "fusion + unimodal losses, fixed-weight sum (BOGC's baseline)",
        False,
        (),
        _plain,
    )
)
register(
    MethodSpec(
        "bogc",
        "BOGC, reduced Dempster-Shafer fusion of per-coordinate evidence (default)",
        False,
        ("bogc", "source_grad_stats"),
        _bogc("dempster"),
    )
)
register(
    MethodSpec(
        "bogc_relative",
        'BOGC, default, each source\'s noise relative to its own signal (noise="relative")',
        False,
        ("bogc", "source_grad_stats"),
        _bogc("dempster", noise="relative"),
    )
)
register(
    MethodSpec(
        "bogc_precision",
        "BOGC, inverse-variance weights (no Dempster step)",
        False,
        ("bogc", "source_grad_stats"),
        _bogc("precision"),
    )
)
register(
    MethodSpec(
        "bogc_dimension_frame",
        "BOGC, one Dirichlet opinion per source over a leaf's coordinates, gamma 0.5",
        False,
        ("bogc", "source_grad_stats"),
        _bogc("dimension_frame", gamma=0.5),
    )
)
register(
    MethodSpec(
        "bogc_laplace",
        "BOGC, default, statistics from a diagonal Laplace "
        "posterior on each encoder's last layer (8 draws, N = train size)",
        False,
        ("bogc", "laplace_grad_stats"),
        _bogc_laplace,
    )
)
register(
    MethodSpec(
        "cggm",
        "CGGM, stable coefficients, gradient-direction term (the "
        "paper); classifiers on stop-gradient features",
        True,
        ("cggm", "cggm_direction_loss", "metrics"),
        _cggm("stable", "gradients"),
    )
)
register(
    MethodSpec(
        "cggm_on_updates",
        "CGGM as `cggm`, the coefficients scaling the base "
        "optimizer's updates (clip -> base -> cggm)",
        True,
        ("cggm", "cggm_direction_loss", "metrics"),
        _cggm("stable", "gradients", after_optimizer=True),
    )
)
register(
    MethodSpec(
        "cggm_reference",
        "CGGM, the official code's coefficients and weight-direction term",
        True,
        ("cggm", "cggm_direction_loss", "metrics"),
        _cggm("reference", "weights"),
    )
)
register(
    MethodSpec(
        "ogm_ge",
        "OGM-GE on the fusion loss (branch confidence discrepancy), Gaussian enhancement",
        True,
        ("ogm_ge", "metrics"),
        _ogm_ge,
    )
)
register(
    MethodSpec(
        "mmpareto",
        "MMPareto on fusion + unimodal losses (per-encoder Pareto combination)",
        False,
        ("mmpareto", "label_params"),
        _mmpareto,
    )
)


# Representation-space methods (their own training step): BOGC at the representation and
# BayesAgg-MTL. Imported here, after MethodSpec and MethodParts exist, which it uses.
from experiments import representation_methods

for _spec in representation_methods.SPECS:
    register(_spec)


def available(name: str) -> tuple[bool, str]:
    """``(True, "")`` or ``(False, reason)`` for a registered method name."""
    if name not in METHODS:
        return False, f"unknown method {name!r}; registered: {', '.join(METHODS)}"
    missing = METHODS[name].missing()
    if missing:
        return False, (
            f"{name} is unavailable: bogc_jax does not provide "
            f"{', '.join('bj.' + m for m in missing)} yet"
        )
    return True, ""
