"""The usual sharding recipe for every transform, on 8 fake CPU devices.

param PartitionSpecs -> optax.tree.map_params -> NamedSharding -> device_put -> a jitted
step with donated params and state. Prints one JSON line per transform: the update
matches the unsharded one, the shardings of params and state are unchanged by the step.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bogc_jax as bj

LABELS = {"enc0": 0, "enc1": 1, "head": None}


def make(seed):
    rng = np.random.default_rng(seed)
    params = {
        "enc0": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
        "enc1": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
        "head": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
    }
    mean = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(3,) + p.shape), jnp.float32), params)
    var = jax.tree.map(lambda m: jnp.abs(m) + 0.1, mean)
    return params, bj.GradStats(jnp.float32(16), mean, var)


TRANSFORMS = {
    "bogc": (lambda: bj.bogc(3), "grad_stats"),
    "cggm": (lambda: bj.cggm(LABELS), "modality_scores"),
    "ogm_ge": (lambda: bj.ogm_ge(LABELS, key=0), "modality_scores"),
    "mmpareto": (lambda: bj.mmpareto(LABELS), "grad_stats"),
}


def main():
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("d",))
    specs = {"enc0": P("d", None), "enc1": P("d"), "head": P(None, "d")}
    for name, (factory, reads) in TRANSFORMS.items():
        params, stats = make(0)
        tx = optax.chain(factory(), optax.adam(1e-2))
        state = tx.init(params)
        state_specs = optax.tree.map_params(
            tx, lambda _, spec: spec, state, specs, transform_non_params=lambda _: P()
        )
        to_sharding = lambda spec: NamedSharding(mesh, spec)
        is_spec = lambda x: isinstance(x, P)
        param_sh = jax.tree.map(to_sharding, specs, is_leaf=is_spec)
        state_sh = jax.tree.map(to_sharding, state_specs, is_leaf=is_spec)
        extra = (
            {"grad_stats": stats}
            if reads == "grad_stats"
            else {"modality_scores": jnp.array([0.75, 0.5])}
        )

        def step(params, state, grads, extra, tx=tx):
            updates, state = tx.update(grads, state, params, **extra)
            return optax.apply_updates(params, updates), state

        grads = stats.fixed_weight_grads()
        expected_params, expected_state = jax.jit(step)(params, state, grads, extra)
        sharded_params = jax.device_put(params, param_sh)
        sharded_state = jax.device_put(state, state_sh)
        jitted = jax.jit(step, donate_argnums=(0, 1), out_shardings=(param_sh, state_sh))
        new_params, new_state = jitted(sharded_params, sharded_state, grads, extra)
        new_params, new_state = jitted(new_params, new_state, grads, extra)  # donated again
        once_params, _ = jax.jit(step)(expected_params, expected_state, grads, extra)
        close = all(
            np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
            for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(once_params))
        )
        kept = all(
            x.sharding.is_equivalent_to(s, x.ndim)
            for x, s in zip(jax.tree.leaves(new_params), jax.tree.leaves(param_sh))
        )
        mu_specs = [leaf.sharding.spec for leaf in jax.tree.leaves(optax.tree.get(new_state, "mu"))]
        print(
            json.dumps(
                {
                    "name": name,
                    "close": bool(close),
                    "kept": bool(kept),
                    "mu_specs": [str(s) for s in mu_specs],
                    "finite": bool(optax.tree.get(new_state, "finite")),
                }
            )
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
