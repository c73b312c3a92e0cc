"""Flax NNX multimodal classifiers for the experiments.

A :class:`MultimodalModel` has one encoder per modality (chosen by the modality's kind),
a fusion head, and one auxiliary head per modality. For features ``h_m = enc_m(x_m)``:

* ``"concat"`` fusion: ``logits = W [h_1; ...; h_M] + b``; modality ``m``'s branch
  logits are its own slice, ``W_m h_m + b / M`` (they sum to the fused logits).
* ``"sum"`` fusion (late fusion): ``logits = sum_m (W_m h_m + b_m)``; branch ``m`` is
  ``W_m h_m + b_m``.
* ``"gated"`` fusion: ``g_m = sigmoid(v_m . h_m + c_m)`` per example, then concat fusion
  of ``g_m h_m``; branch ``m`` is ``W_m g_m h_m + b / M``.

The auxiliary heads ``A_m h_m + a_m`` give the unimodal losses (features with gradient)
or CGGM's classifiers (stop-gradient features). There is no batch normalisation or
dropout: every example's loss depends on that example only, as per-example gradient
statistics require.

:func:`source_losses` returns the per-source, per-example losses ``[1 + M, B]`` (fusion
first, then one per modality) that ``bogc_jax.source_grad_stats`` consumes;
:func:`functional` turns a model into pure ``(params, ...)`` functions over a plain dict
of parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

FUSIONS = ("concat", "sum", "gated")
ENCODERS = ("auto", "mlp", "conv", "transformer")


class MLPEncoder(nnx.Module):
    """Flatten, then ``Linear -> relu`` for each width in ``hidden`` (the last is the output)."""

    def __init__(self, in_shape: Sequence[int], hidden: Sequence[int], *, rngs: nnx.Rngs):
        dims = [int(np.prod(in_shape))] + list(hidden)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.out_dim = dims[-1]

    def __call__(self, x):
        h = jnp.reshape(x, (x.shape[0], -1))
        for layer in self.layers:
            h = jax.nn.relu(layer(h))
        return h


class Conv1DEncoder(nnx.Module):
    """Time series ``[B, T, C]``: two strided 1-D convs, mean over time, ``Linear -> relu``."""

    def __init__(
        self,
        in_shape: Sequence[int],
        channels: Sequence[int],
        out_dim: int,
        *,
        kernel_size: int = 5,
        rngs: nnx.Rngs,
    ):
        _, c = in_shape
        dims = [c] + list(channels)
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, kernel_size=(kernel_size,), strides=(2,), padding="SAME", rngs=rngs)
                for a, b in zip(dims[:-1], dims[1:])
            ]
        )
        self.out = nnx.Linear(dims[-1], out_dim, rngs=rngs)
        self.out_dim = out_dim

    def __call__(self, x):
        h = x
        for conv in self.convs:
            h = jax.nn.relu(conv(h))
        return jax.nn.relu(self.out(jnp.mean(h, axis=1)))


class Conv2DEncoder(nnx.Module):
    """Images ``[B, H, W]`` (or colour images ``[B, C, H, W]`` and videos ``[B, T, H, W]``,
    channels or frames first): strided 3x3 convs, a 2x2 average pool when more than 4x4
    positions remain, flatten, ``Linear -> relu``."""

    def __init__(
        self, in_shape: Sequence[int], channels: Sequence[int], out_dim: int, *, rngs: nnx.Rngs
    ):
        if len(in_shape) == 2:
            h, w, c = in_shape[0], in_shape[1], 1
        elif len(in_shape) == 3:  # [C, H, W] or [T, H, W]: channels or frames first
            c, h, w = in_shape
        else:
            raise ValueError(
                f"Conv2DEncoder: in_shape must be [H, W] or [C, H, W]; got {in_shape}."
            )
        dims = [c] + list(channels)
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, kernel_size=(3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
                for a, b in zip(dims[:-1], dims[1:])
            ]
        )
        for _ in channels:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        self.pool = h * w > 16  # a 2x2 average pool keeps the flattened width small
        if self.pool:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        self.out = nnx.Linear(h * w * dims[-1], out_dim, rngs=rngs)
        self.out_dim = out_dim

    def __call__(self, x):
        h = x[..., None] if x.ndim == 3 else jnp.moveaxis(x, 1, -1)
        for conv in self.convs:
            h = jax.nn.relu(conv(h))
        if self.pool:
            h = nnx.avg_pool(h, window_shape=(2, 2), strides=(2, 2), padding="SAME")
        return jax.nn.relu(self.out(jnp.reshape(h, (h.shape[0], -1))))


class TransformerEncoder(nnx.Module):
    """Time series ``[B, T, C]``: linear embedding + learned positions, one pre-norm
    self-attention block, mean over time, ``Linear -> relu``."""

    def __init__(
        self, in_shape: Sequence[int], dim: int, out_dim: int, *, num_heads: int = 2, rngs: nnx.Rngs
    ):
        t, c = in_shape
        self.embed = nnx.Linear(c, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (t, dim)))
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=num_heads, in_features=dim, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.mlp2 = nnx.Linear(2 * dim, dim, rngs=rngs)
        self.out = nnx.Linear(dim, out_dim, rngs=rngs)
        self.out_dim = out_dim

    def __call__(self, x):
        h = self.embed(x) + self.pos[...]
        h = h + self.attn(self.norm1(h))
        h = h + self.mlp2(jax.nn.gelu(self.mlp1(self.norm2(h))))
        return jax.nn.relu(self.out(jnp.mean(h, axis=1)))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and choices of a :class:`MultimodalModel`.

    Attributes:
      encoder: ``"auto"`` (conv for images, videos and series, MLP for vectors), ``"mlp"``
        (MLP everywhere), ``"conv"`` (same as auto), ``"transformer"`` (a small transformer
        for series, auto otherwise).
      fusion: one of ``FUSIONS``.
      feature_dim: each encoder's output width.
      hidden: the MLP encoders' hidden width.
      channels: the conv encoders' channel counts.
    """

    encoder: str = "auto"
    fusion: str = "concat"
    feature_dim: int = 64
    hidden: int = 128
    channels: tuple[int, ...] = (16, 32)


def make_encoder(kind: str, in_shape: Sequence[int], config: ModelConfig, rngs: nnx.Rngs):
    """The encoder for one modality of ``kind`` (see ``experiments.data.KINDS``)."""
    if config.encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}; got {config.encoder!r}.")
    if config.encoder == "mlp" or kind == "vector":
        return MLPEncoder(in_shape, [config.hidden, config.feature_dim], rngs=rngs)
    if kind in ("image", "video"):
        return Conv2DEncoder(in_shape, config.channels, config.feature_dim, rngs=rngs)
    if kind == "series":
        if config.encoder == "transformer":
            return TransformerEncoder(in_shape, config.channels[-1], config.feature_dim, rngs=rngs)
        return Conv1DEncoder(
            in_shape, [2 * c for c in config.channels], config.feature_dim, rngs=rngs
        )
    raise ValueError(f"no encoder for modality kind {kind!r}.")


class MultimodalModel(nnx.Module):
    """Per-modality encoders, a fusion head and auxiliary per-modality heads."""

    def __init__(
        self,
        input_shapes: Sequence[Sequence[int]],
        kinds: Sequence[str],
        num_classes: int,
        config: ModelConfig = ModelConfig(),
        *,
        rngs: nnx.Rngs,
    ):
        if len(input_shapes) != len(kinds) or len(kinds) < 1:
            raise ValueError(
                f"MultimodalModel: need one kind per input shape; got "
                f"{len(input_shapes)} shapes and {len(kinds)} kinds."
            )
        if config.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}; got {config.fusion!r}.")
        self.num_modalities = len(kinds)
        self.num_classes = num_classes
        self.fusion = config.fusion
        self.encoders = nnx.List(
            [make_encoder(k, s, config, rngs) for k, s in zip(kinds, input_shapes)]
        )
        dims = [e.out_dim for e in self.encoders]
        self.feature_dims = tuple(dims)
        if config.fusion == "sum":
            self.fusion_heads = nnx.List([nnx.Linear(d, num_classes, rngs=rngs) for d in dims])
        else:
            self.fusion_head = nnx.Linear(sum(dims), num_classes, rngs=rngs)
        if config.fusion == "gated":
            self.gates = nnx.List([nnx.Linear(d, 1, rngs=rngs) for d in dims])
        self.heads = nnx.List([nnx.Linear(d, num_classes, rngs=rngs) for d in dims])

    def features(self, xs: Sequence[jax.Array]) -> list[jax.Array]:
        """``[h_m]``: each modality's encoder output ``[B, feature_dim]``."""
        if len(xs) != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} modality inputs; got {len(xs)}.")
        return [enc(x) for enc, x in zip(self.encoders, xs)]

    def branch_logits(self, feats: Sequence[jax.Array]) -> jax.Array:
        """``[M, B, C]``: each modality's share of the fused logits (they sum to it)."""
        m = self.num_modalities
        if self.fusion == "sum":
            return jnp.stack([head(h) for head, h in zip(self.fusion_heads, feats)])
        if self.fusion == "gated":
            feats = [jax.nn.sigmoid(g(h)) * h for g, h in zip(self.gates, feats)]
        kernel, bias = self.fusion_head.kernel[...], self.fusion_head.bias[...]
        offsets = np.cumsum([0] + [h.shape[-1] for h in feats])
        return jnp.stack(
            [h @ kernel[offsets[i] : offsets[i + 1]] + bias / m for i, h in enumerate(feats)]
        )

    def fused_logits(self, feats: Sequence[jax.Array]) -> jax.Array:
        """``[B, C]``: the fusion head's output."""
        if self.fusion == "concat":
            return self.fusion_head(jnp.concatenate(feats, axis=-1))
        return jnp.sum(self.branch_logits(feats), axis=0)

    def head_logits(self, feats: Sequence[jax.Array], stop_gradient: bool = False) -> jax.Array:
        """``[M, B, C]``: the auxiliary heads on the (optionally stop-gradient) features."""
        if stop_gradient:
            feats = [jax.lax.stop_gradient(h) for h in feats]
        return jnp.stack([head(h) for head, h in zip(self.heads, feats)])

    def __call__(self, xs: Sequence[jax.Array]) -> jax.Array:
        return self.fused_logits(self.features(xs))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy ``[..., B]`` with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def source_losses(
    model: MultimodalModel,
    xs: Sequence[jax.Array],
    labels: jax.Array,
    stop_gradient_heads: bool = False,
) -> jax.Array:
    """``[1 + M, B]`` per-example losses: the fusion loss, then each auxiliary head's.

    With ``stop_gradient_heads`` the heads see stop-gradient features (CGGM's classifiers,
    or heads trained only as monitors): their losses then reach the heads only.
    """
    feats = model.features(xs)
    fused = cross_entropy(model.fused_logits(feats), labels)
    heads = cross_entropy(model.head_logits(feats, stop_gradient_heads), labels[None])
    return jnp.concatenate([fused[None], heads], axis=0)


@dataclasses.dataclass(frozen=True)
class Functional:
    """Pure functions of a plain-dict parameter tree for one model architecture.

    Attributes:
      graphdef: the model's static structure (``nnx.split``).
      num_modalities: ``M``.
      apply: ``(params, xs) -> dict`` with ``feats`` (list of ``[B, F]``), ``fused
        [B, C]``, ``branch [M, B, C]`` and ``heads [M, B, C]`` logits.
      forward: ``(params, batch, stop_gradient_heads=False) -> dict``: ``apply``'s
        entries plus ``losses [1 + M, B]``, with ``batch = (xs, labels)``.
      losses: ``(params, batch) -> [1 + M, B]``, heads with gradient: the
        ``losses_fn`` for ``bogc_jax.source_grad_stats``.
      features: ``(params, xs) -> [h_m]``.
      fuse: ``(params, feats) -> [B, C]`` fused logits from given features.
      feature_losses: ``(params, feats, labels) -> [1 + M, B]``: the per-source losses
        of given features (heads with gradient), so that ``losses(params, (xs, y))`` is
        ``feature_losses(params, features(params, xs), y)``; with ``jax.vjp`` of
        ``features`` it gives a step in representation space (feature gradients first,
        then one pull-back through the encoders).
    """

    graphdef: Any
    num_modalities: int
    apply: Callable
    forward: Callable
    losses: Callable
    features: Callable
    fuse: Callable
    feature_losses: Callable


def functional(model: MultimodalModel) -> tuple[Functional, dict]:
    """Split ``model`` into pure functions and its parameters as a plain nested dict."""
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)

    def merge(params):
        return nnx.merge(graphdef, params, copy=True)

    def apply(params, xs):
        m = merge(params)
        feats = m.features(xs)
        return {
            "feats": feats,
            "fused": m.fused_logits(feats),
            "branch": m.branch_logits(feats),
            "heads": m.head_logits(feats),
        }

    def forward(params, batch, stop_gradient_heads=False):
        xs, labels = batch
        m = merge(params)
        feats = m.features(xs)
        fused = m.fused_logits(feats)
        heads = m.head_logits(feats, stop_gradient_heads)
        losses = jnp.concatenate(
            [cross_entropy(fused, labels)[None], cross_entropy(heads, labels[None])], axis=0
        )
        return {
            "feats": feats,
            "fused": fused,
            "branch": m.branch_logits(feats),
            "heads": heads,
            "losses": losses,
        }

    def losses(params, batch):
        xs, labels = batch
        return source_losses(merge(params), xs, labels)

    def features(params, xs):
        return merge(params).features(xs)

    def fuse(params, feats):
        return merge(params).fused_logits(feats)

    def feature_losses(params, feats, labels):
        m = merge(params)
        fused = cross_entropy(m.fused_logits(feats), labels)
        heads = cross_entropy(m.head_logits(feats), labels[None])
        return jnp.concatenate([fused[None], heads], axis=0)

    return (
        Functional(
            graphdef,
            model.num_modalities,
            apply,
            forward,
            losses,
            features,
            fuse,
            feature_losses,
        ),
        params,
    )


@functools.lru_cache(maxsize=32)
def _architecture(
    input_shapes: tuple, kinds: tuple, num_classes: int, config: ModelConfig
) -> tuple[Functional, Callable]:
    """The pure functions of one architecture and a jitted ``key -> params`` initialiser."""

    def construct(key):
        return MultimodalModel(input_shapes, kinds, num_classes, config, rngs=nnx.Rngs(key))

    abstract = nnx.eval_shape(lambda: construct(jax.random.key(0, impl="rbg")))
    fn, _ = functional(abstract)
    init = jax.jit(lambda key: nnx.to_pure_dict(nnx.state(construct(key))))
    return fn, init


def build(
    input_shapes: Sequence[Sequence[int]],
    kinds: Sequence[str],
    num_classes: int,
    config: ModelConfig = ModelConfig(),
    seed: int = 0,
) -> tuple[Functional, dict]:
    """:func:`functional` of a new :class:`MultimodalModel`, initialised from ``seed``.

    The initialisation runs as one compiled program with an ``rbg`` PRNG key: eager
    initialisation compiles every initialiser op separately, and threefry-based
    initialisers compiled ~4x slower than ``rbg`` ones (about 20 s against 5 s for a
    four-modality model on 2 busy CPU cores). The architecture's functions and initialiser
    are cached, so training several seeds compiles each once.
    """
    shapes = tuple(tuple(int(d) for d in s) for s in input_shapes)
    fn, init = _architecture(shapes, tuple(kinds), int(num_classes), config)
    return fn, init(jax.random.key(seed, impl="rbg"))


def param_groups(params: dict) -> dict:
    """A tree like ``params`` naming each leaf's group: ``"encoder/m"``, ``"head/m"``
    (auxiliary head of modality ``m``) or ``"fusion"`` (fusion head(s) and gates)."""

    def group(path, _):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if keys and keys[0] == "encoders":
            return f"encoder/{int(keys[1])}"
        if keys and keys[0] == "heads":
            return f"head/{int(keys[1])}"
        return "fusion"

    return jax.tree_util.tree_map_with_path(group, params)


def encoder_output_mask(params: dict) -> dict:
    """True on each encoder's last layer (the ``"out"`` layer, or an MLP's last ``layers``
    entry): the layer before each modality's outputs, shared by the fusion loss and that
    modality's unimodal loss. False elsewhere."""

    def last_layer(path, _):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if not keys or keys[0] != "encoders":
            return False
        encoder = params["encoders"][keys[1]]
        if "out" in encoder:
            return keys[2] == "out"
        return keys[2] == "layers" and keys[3] == len(encoder["layers"]) - 1

    return jax.tree_util.tree_map_with_path(last_layer, params)
