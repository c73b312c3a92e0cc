"""Worker for tests/test_representation.py: one device against 8 (shard_map, axis_name).

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Two steps of
representation-space BOGC (Monte Carlo moments, the same key on every device, and
full-data sums in the state) on a batch of 16, once on one device and once split over 8
devices inside ``jax.shard_map`` with ``axis_name="data"``; prints ``same`` when the
gradients and states agree, exits 1 otherwise.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

import bogc_jax as bj


def main() -> int:
    if jax.device_count() != 8:
        print(f"need 8 devices, got {jax.device_count()}")
        return 1
    k = jax.random.split(jax.random.key(0), 8)
    params = {
        "enc": [jax.random.normal(k[0], (5, 4)), jax.random.normal(k[1], (3, 4))],
        "fusion": (0.5 * jax.random.normal(k[2], (8, 3)), jnp.zeros(3)),
        "uni": [(0.5 * jax.random.normal(k[3 + m], (4, 3)), jnp.zeros(3)) for m in range(2)],
    }
    encode = lambda p, b: [jnp.tanh(x @ w) for x, w in zip(b["x"], p["enc"])]
    heads = [bj.LinearHead((0, 1)), bj.LinearHead((0,)), bj.LinearHead((1,))]
    options = dict(moments="monte_carlo", num_samples=32, chunk_size=8, gamma=2.0, full_data="ema")
    batches = [
        {
            "x": [jax.random.normal(jax.random.fold_in(k[5], s), (16, 5)),
                  jax.random.normal(jax.random.fold_in(k[6], s), (16, 3))],
            "y": jax.random.randint(jax.random.fold_in(k[7], s), (16,), 0, 3),
        }
        for s in range(2)
    ]  # fmt: skip
    key = jax.random.key(42)

    def run(method, step_fn):
        state, out = method.init(params), []
        for batch in batches:
            grads, state, info = step_fn(params, state, batch, key)
            out.append((grads, state, info.weights))
        return out

    single = bj.representation_bogc(
        encode, lambda p: [p["fusion"], *p["uni"]], heads, targets_fn=lambda b: b["y"], **options
    )
    one = run(single, jax.jit(lambda p, s, b, kk: single.grads(p, s, b, key=kk)))

    multi = bj.representation_bogc(
        encode,
        lambda p: [p["fusion"], *p["uni"]],
        heads,
        targets_fn=lambda b: b["y"],
        axis_name="data",
        **options,
    )
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rep, split = PartitionSpec(), PartitionSpec("data")
    sharded = jax.jit(
        jax.shard_map(
            lambda p, s, b, kk: (lambda g, st, info: (g, st, info.weights))(
                *multi.grads(p, s, b, key=kk)
            ),
            mesh=mesh,
            in_specs=(rep, rep, split, rep),
            out_specs=(rep, rep, rep),
            check_vma=False,
        )
    )
    state, ok = multi.init(params), True
    for (grads_1, state_1, weights_1), batch in zip(one, batches):
        grads_8, state, weights_8 = sharded(params, state, batch, key)
        for a, b in zip(
            jax.tree.leaves((grads_1, state_1, weights_1)),
            jax.tree.leaves((grads_8, state, weights_8)),
        ):
            if not np.allclose(a, b, rtol=2e-4, atol=1e-5):
                print("differ:", np.max(np.abs(np.asarray(a) - np.asarray(b))))
                ok = False
    print("same" if ok else "different")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
