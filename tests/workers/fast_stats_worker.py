"""Checks of ``method="fast"`` that need a fresh JAX: devices and float64.

Run with 4 fake CPU devices and JAX_ENABLE_X64=1. The fast statistics inside
``shard_map`` with ``axis_name``, and under ``jit`` with the batch sharded over the
devices, equal the single-device ones; float64 parameters give
float64 statistics, equal to the vmap reference to float64 tolerance. Prints ``ok`` when
every check passed.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bogc_jax as bj


def model(seed, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 6)
    params = {
        "w1": jax.random.normal(k[0], (5, 7), dtype),
        "b1": jax.random.normal(k[1], (7,), dtype),
        "w2": jax.random.normal(k[2], (7, 3), dtype),
        "conv": 0.3 * jax.random.normal(k[3], (3, 5, 5), dtype),
    }
    x = jax.random.normal(k[4], (16, 6, 5), dtype)

    def losses_fn(p, x):
        c = jax.lax.conv_general_dilated(
            x, p["conv"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
        )
        h = jnp.tanh((x + c) @ p["w1"] + p["b1"])
        o = h.mean(1) @ p["w2"]
        return jnp.stack([o.sum(-1), jnp.square(o).sum(-1), jnp.square(h).sum((1, 2))])

    return losses_fn, params, x


def embedding_model(seed):
    k = jax.random.split(jax.random.key(seed), 3)
    params = {"e": jax.random.normal(k[0], (9, 4)), "w": jax.random.normal(k[1], (4, 2))}
    ids = jax.random.randint(k[2], (16, 5), 0, 9)

    def losses_fn(p, ids):
        o = jnp.take(p["e"], ids, axis=0) @ p["w"]
        return jnp.stack([o.sum((1, 2)), jnp.square(o).sum((1, 2))])

    return losses_fn, params, ids


def close(a, b, rtol=1e-5, atol=1e-6):
    """Equal to float32 rounding: sums over devices run in another order, so the absolute
    tolerance also scales with the leaf's largest entry."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype, (x.dtype, y.dtype)
        scale = float(np.max(np.abs(np.asarray(y, np.float64)), initial=0.0))
        np.testing.assert_allclose(x, y, rtol=rtol, atol=max(atol, 2e-5 * scale))


def devices():
    assert jax.device_count() == 4, jax.device_count()
    mesh = jax.make_mesh((4,), ("d",))
    for make in (model, embedding_model):
        losses_fn, params, x = make(0)
        ref = bj.source_grad_stats(losses_fn, params, x, method="fast")
        xs = jax.device_put(x, NamedSharding(mesh, P("d")))
        mapped = jax.jit(
            jax.shard_map(
                lambda p, b, f=losses_fn: bj.source_grad_stats(
                    f, p, b, method="fast", axis_name="d"
                ),
                mesh=mesh,
                in_specs=(P(), P("d")),
                out_specs=P(),
            )
        )
        close(mapped(params, xs), ref)
        if make is embedding_model:  # jnp.take on sharded indices needs an out_sharding
            continue
        with jax.set_mesh(mesh):  # explicit sharding under jit, as jax.make_mesh gives
            got = jax.jit(lambda p, b, f=losses_fn: bj.source_grad_stats(f, p, b, method="fast"))(
                params, xs
            )
        close(got, ref)


def x64():
    losses_fn, params, x = model(1, jnp.float64)
    fast = bj.source_grad_stats(losses_fn, params, x, method="fast")
    ref = bj.source_grad_stats(losses_fn, params, x, method="vmap")
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves((fast.mean, fast.var)))
    close(fast, ref, rtol=1e-10, atol=1e-12)


if __name__ == "__main__":
    devices()
    x64()
    print("ok")
