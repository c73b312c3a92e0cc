"""The bogc step on the 512-wide MLP at B = 128 with and without an optimization barrier
between the statistics and the update (library and prototype pieces), CPU-time clock.

    python benchmarks/prototypes/bogc_step_barrier.py
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

import bench
import fast_paths as fp
import jax
import jax.numpy as jnp
import optax

import bogc_jax as bj


def main(model="mlp512", n=128, repeats=7):
    size = bench.model_size(model)
    params, losses_fn, _ = bench.jax_model(model, size)
    batch = tuple(jnp.asarray(x) for x in bench.make_batch(model, size, n))
    adam = optax.adam(1e-3)

    def total(p, b):
        return jnp.sum(jnp.mean(losses_fn(p, b), axis=1))

    def make(kind, barrier):
        tx = optax.chain(bj.bogc(3), adam) if kind == "lib" else adam
        state = tx.init(params)

        def step(p, s, b):
            if kind == "joint":
                u, s = adam.update(jax.grad(total)(p, b), s, p)
                return optax.apply_updates(p, u), s
            if kind == "lib":
                sts = bj.source_grad_stats(losses_fn, p, b, method="fast")
            else:
                sts = fp.source_grad_stats(losses_fn, p, b)
            if barrier:
                sts = jax.lax.optimization_barrier(sts)
            if kind == "lib":
                u, s = tx.update(sts.fixed_weight_grads(), s, p, grad_stats=sts)
            else:
                g = fp.bogc_update(fp.sum_over_sources(sts.mean), sts)
                if barrier:
                    g = jax.lax.optimization_barrier(g)
                u, s = adam.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.jit(step).lower(params, state, batch).compile(), (params, state, batch)

    fns = {"step_joint": make("joint", False)}
    for kind in ("lib", "proto"):
        for barrier in (False, True):
            fns[f"step_bogc_{kind}{'_barrier' if barrier else ''}"] = make(kind, barrier)
    times = bench.time_interleaved(fns, repeats, budget_s=6.0, clock="cpu")
    for k, v in times.items():
        print(f"| {k} | {v * 1e3:.1f} ms | {v / times['step_joint']:.2f}x joint |")


if __name__ == "__main__":
    main()
