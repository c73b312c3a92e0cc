"""Linear heads on representations: their description, inputs, losses and plain gradients.

A :class:`LinearHead` says which representations a final linear layer reads (one, or
several fused by concatenation or by sum), its loss and its weight in the total loss. The
helpers here turn a head's ``(kernel [d_in, K], bias [K])`` (Flax's ``Linear`` layout)
into the rows ``theta`` of :mod:`bogc_jax.head_posterior`, fuse its input, and give its
per-example losses and the exact gradient of ``weight * mean_n loss_n`` with respect to
its own parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from bogc_jax import head_posterior as hp

Array = jax.Array

FUSIONS = ("concat", "sum")


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """A final linear layer on one or more representations.

    Attributes:
      reads: indices of the representations it reads (``encode_fn``'s outputs).
      loss: ``"softmax"`` (integer labels), ``"sigmoid"`` (one binary target per output)
        or ``"mse"`` (squared error per output).
      fusion: how several reads are combined: ``"concat"`` (in ``reads`` order) or
        ``"sum"`` (equal widths).
      weight: the head's weight in the total loss ``sum_t weight_t mean_n loss_t``.
      split_outputs: ``"sigmoid"``/``"mse"``: each output is a source of its own
        (BayesAgg-MTL's convention); otherwise their gradients are summed into one.
      power: this head's variance power ``p`` (default: the method's).

    Example:
      >>> import bogc_jax as bj
      >>> bj.LinearHead(reads=(0, 1), loss="softmax").fusion
      'concat'
    """

    reads: tuple[int, ...]
    loss: str = "softmax"
    fusion: str = "concat"
    weight: float = 1.0
    split_outputs: bool = True
    power: float | None = None

    def __post_init__(self):
        reads = (self.reads,) if isinstance(self.reads, int) else tuple(self.reads)
        object.__setattr__(self, "reads", reads)
        if not reads or any((not isinstance(m, int)) or m < 0 for m in reads):
            raise ValueError(
                f"LinearHead: reads must be a non-empty tuple of representation indices >= 0; "
                f"got {self.reads!r}."
            )
        if len(set(reads)) != len(reads):
            raise ValueError(f"LinearHead: reads has a repeated index: {reads}.")
        if self.loss not in hp.LOSSES:
            raise ValueError(f"LinearHead: loss must be one of {hp.LOSSES}; got {self.loss!r}.")
        if self.fusion not in FUSIONS:
            raise ValueError(f"LinearHead: fusion must be one of {FUSIONS}; got {self.fusion!r}.")
        if not self.weight > 0:
            raise ValueError(f"LinearHead: weight must be > 0; got {self.weight}.")
        if self.power is not None and not self.power >= 0:
            raise ValueError(f"LinearHead: power must be >= 0; got {self.power}.")


def head_power(head: LinearHead, power: float | Mapping[str, float]) -> float:
    """The head's ``p``: its own, else ``power[head.loss]`` or the number ``power``."""
    if head.power is not None:
        return float(head.power)
    if isinstance(power, Mapping):
        if head.loss not in power:
            raise ValueError(f"power has no entry for loss {head.loss!r}: {dict(power)}.")
        return float(power[head.loss])
    return float(power)


def fuse(head: LinearHead, reps: Sequence[Array]) -> tuple[Array, list[tuple[int, int]]]:
    """The head's input and, per read, the ``(start, stop)`` columns it occupies."""
    if max(head.reads) >= len(reps):
        raise ValueError(
            f"LinearHead(reads={head.reads}) reads representation {max(head.reads)}, but "
            f"encode_fn returned {len(reps)} representation(s)."
        )
    parts = [reps[m] for m in head.reads]
    if head.fusion == "sum":
        widths = {p.shape[-1] for p in parts}
        if len(widths) != 1:
            raise ValueError(
                f"LinearHead(reads={head.reads}, fusion='sum') needs representations of equal "
                f"width; got {[p.shape[-1] for p in parts]}. Use fusion='concat'."
            )
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total, [(0, parts[0].shape[-1])] * len(parts)
    offsets, start = [], 0
    for p in parts:
        offsets.append((start, start + p.shape[-1]))
        start += p.shape[-1]
    return jnp.concatenate(parts, axis=-1), offsets


def check_head_params(index: int, head: LinearHead, kernel, bias, in_dim: int) -> None:
    """Clear errors for a head's parameters, at trace time."""
    name = f"head_params_fn(params)[{index}]"
    if kernel.ndim != 2 or kernel.shape[0] != in_dim:
        raise ValueError(
            f"{name}: the kernel must be [d_in, K] with d_in = {in_dim} (the width of the "
            f"fused input of LinearHead(reads={head.reads}, fusion={head.fusion!r})); got "
            f"shape {kernel.shape}. Flax's Linear layout is kernel [in, out]."
        )
    if bias is None and head.loss != "mse":
        raise ValueError(
            f"{name}: a {head.loss!r} head needs a bias (its posterior is over [W | b]); got None."
        )
    if bias is not None and bias.shape != (kernel.shape[1],):
        raise ValueError(f"{name}: the bias must be [{kernel.shape[1]}]; got {bias.shape}.")


def theta_of(head: LinearHead, kernel: Array, bias: Array | None) -> Array:
    """The rows ``theta`` (``[K, d + 1]``, or ``[K, d]`` for ``"mse"``)."""
    if head.loss == "mse":
        return kernel.T
    if bias is None:
        raise ValueError(f"a {head.loss!r} head needs a bias (its posterior is over [W | b]).")
    return jnp.concatenate([kernel.T, bias[:, None]], axis=1)


def per_example_loss(loss: str, logits: Array, y: Array) -> Array:
    """``[B]`` training losses: cross-entropy, summed BCE, or summed squared error."""
    if loss == "softmax":
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)
    if loss == "sigmoid":
        return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, y.astype(logits.dtype)), -1)
    return jnp.sum(jnp.square(logits - y.astype(logits.dtype)), axis=-1)


def check_targets(index: int, head: LinearHead, y: Array, batch: int, num_out: int) -> None:
    """Clear errors for a head's targets, at trace time."""
    want = (batch,) if head.loss == "softmax" else (batch, num_out)
    if tuple(y.shape) != want:
        kind = "integer labels" if head.loss == "softmax" else "targets"
        raise ValueError(
            f"targets of head {index} ({head.loss!r}): expected {kind} of shape {want}; got "
            f"{tuple(y.shape)}."
        )


def head_gradients(head: LinearHead, x: Array, kernel: Array, bias, y: Array, total: Array):
    """``(losses [B], d kernel, d bias)`` of ``weight * sum_n loss_n / total``."""
    logits = x @ kernel + (0.0 if bias is None else bias)
    r, _ = hp.residual(head.loss, logits, y)
    if head.loss == "mse":
        r = 2 * r
    scale = head.weight / total
    d_kernel = (scale * (x.T @ r)).astype(kernel.dtype)
    d_bias = None if bias is None else (scale * jnp.sum(r, axis=0)).astype(bias.dtype)
    return per_example_loss(head.loss, logits, y), d_kernel, d_bias
