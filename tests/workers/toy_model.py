"""A two-modality toy model shared by tests and their subprocess workers.

Two tanh encoders (``enc0``: 4 -> 5, ``enc1``: 3 -> 5) and one linear head on their concat
(10 -> 2 classes); three loss sources (fusion, then one unimodal loss per modality, each
through its own slice of the head).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bogc_jax as bj

SOURCES = 3


def init_params(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {
        "enc0": jnp.asarray(rng.normal(size=(4, 5)), dtype),
        "enc1": jnp.asarray(rng.normal(size=(3, 5)), dtype),
        "head": jnp.asarray(rng.normal(size=(10, 2)), dtype),
    }


def make_batch(step, n=8):
    rng = np.random.default_rng(100 + step)
    y = rng.integers(0, 2, size=n)
    return (
        jnp.asarray(rng.normal(size=(n, 4)) + y[:, None], jnp.float32),
        jnp.asarray(rng.normal(size=(n, 3)) - 0.5 * y[:, None], jnp.float32),
        jnp.asarray(y, jnp.int32),
    )


def losses_fn(p, batch):
    """``[3, B]``: the fusion loss and one unimodal loss per modality (float32 maths)."""
    x0, x1, y = batch
    p = jax.tree.map(lambda w: w.astype(jnp.float32), p)
    h0, h1 = jnp.tanh(x0 @ p["enc0"]), jnp.tanh(x1 @ p["enc1"])
    fused = jnp.concatenate([h0, h1], -1) @ p["head"]
    ce = optax.softmax_cross_entropy_with_integer_labels
    uni = [h0 @ p["head"][:5], h1 @ p["head"][5:]]
    return jnp.stack([ce(fused, y)] + [ce(u, y) for u in uni])


def scores_of(p, batch):
    """``[2]``: each modality's unimodal accuracy on the batch."""
    x0, x1, y = batch
    h0, h1 = jnp.tanh(x0 @ p["enc0"]), jnp.tanh(x1 @ p["enc1"])
    return jnp.stack(
        [bj.metrics.accuracy(h0 @ p["head"][:5], y), bj.metrics.accuracy(h1 @ p["head"][5:], y)]
    )
