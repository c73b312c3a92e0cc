"""Training runs of every transform, for the determinism tests.

Imported by ``tests/test_determinism.py``; run as a script (``python
determinism_worker.py OUT.json [NAME ...]``) it writes the SHA-256 of the final
parameters and state of each named run (default: all), so that a second process can be
compared bit for bit with the first.
"""

import hashlib
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from toy_model import init_params, losses_fn, make_batch, scores_of

import bogc_jax as bj

LABELS = {"enc0": 0, "enc1": 1, "head": None}
SOURCES = 3
STEPS = 3
LAST_LAYER = {"enc0": False, "enc1": False, "head": True}


def transforms():
    """name -> factory of the transform under test (a fresh one per call)."""
    out = {
        f"bogc_{a}": (lambda a=a: bj.bogc(SOURCES, aggregation=a))
        for a in ("dempster", "precision", "dimension_frame", "sum")
    }
    out.update(
        {
            "cggm": lambda: bj.cggm(LABELS),
            "cggm_reference": lambda: bj.cggm(LABELS, mode="reference"),
            "ogm_ge": lambda: bj.ogm_ge(LABELS, alpha=0.5, key=7),
            "mmpareto": lambda: bj.mmpareto(LABELS),
            "multi_steps_bogc": lambda: bj.multi_steps(
                bj.bogc(SOURCES), 2, num_sources=SOURCES, num_modalities=2
            ),
            "inject_hyperparams_bogc": lambda: optax.inject_hyperparams(
                bj.bogc, static_args=("num_sources",)
            )(num_sources=SOURCES, kappa=0.5),
        }
    )
    return out


# How each run computes its statistics: the transforms above use "vmap"; these use the
# bogc transform with the other estimators.
STATS_VARIANTS = {
    "stats_auto": dict(method="auto"),
    "stats_chunked": dict(method="vmap", chunk_size=4),
    "stats_laplace": dict(laplace=True),
}


def make_step(name):
    """``(tx, step)``: ``step(params, state, batch, key) -> (params, state)``, not jitted."""
    variant = STATS_VARIANTS.get(name)
    factory = transforms()["bogc_dempster" if variant else name]
    tx = optax.chain(factory(), optax.adam(1e-2))

    def step(params, state, batch, key):
        if variant and variant.get("laplace"):
            stats = bj.laplace_grad_stats(
                losses_fn, params, batch, key, mask=LAST_LAYER, num_samples=4
            )
            grads = jax.grad(lambda p: jnp.sum(jnp.mean(losses_fn(p, batch), axis=1)))(params)
        else:
            kwargs = variant or {"method": "vmap"}
            stats = bj.source_grad_stats(losses_fn, params, batch, **kwargs)
            grads = stats.fixed_weight_grads()
        updates, state = tx.update(
            grads, state, params, grad_stats=stats, modality_scores=scores_of(params, batch)
        )
        return optax.apply_updates(params, updates), state

    return tx, step


def names():
    return sorted(transforms()) + sorted(STATS_VARIANTS)


def train(name, step=None, key=0):
    """Final ``(params, state)`` after ``STEPS`` steps; ``step`` defaults to a jitted one."""
    tx, plain = make_step(name)
    step = jax.jit(plain) if step is None else step
    params = init_params()
    state = tx.init(params)
    keys = jax.random.split(jax.random.key(key), STEPS)
    for t in range(STEPS):
        params, state = step(params, state, make_batch(t), keys[t])
    return params, state


def raw_leaves(tree):
    out = []
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(x))
    return out


def digest(tree) -> str:
    h = hashlib.sha256()
    for x in raw_leaves(tree):
        h.update(str((x.dtype, x.shape)).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def main(out_path, chosen):
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({name: digest(train(name)) for name in chosen or names()}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
