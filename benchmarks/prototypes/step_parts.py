"""A bogc training step against its parts, each jitted alone, side by side in one process.

On one model at one batch size (three sources): the fast statistics, the bogc update on
given statistics, both in one program, both in one program with a barrier between them,
and the whole training step (``timing.training_step``: statistics, bogc, Adam). Where the
one-program times exceed the sum of the parts, running the two together costs more than
their work (on XLA:CPU, the larger set of live ``[S, P]`` buffers). Interleaved repeats,
medians, CPU time. Prints a table, writes JSON.

    python benchmarks/prototypes/step_parts.py --model mlp1024 --batch 128
"""

from __future__ import annotations

import argparse
import json
import os

from _paths import BENCH  # first: puts bench and timing on sys.path

# isort: split
import bench
from timing import time_interleaved, training_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp1024")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(BENCH, "results", "step-parts.json"))
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import bogc_jax as bj

    size = bench.model_size(args.model)
    params, losses_fn, forward = bench.jax_model(args.model, size)
    batch = tuple(jnp.asarray(x) for x in bench.make_batch(args.model, size, args.batch))
    labels = bj.label_params(params, {"enc0": 0, "enc1": 1}, default=None)
    tx = bj.bogc(3, kappa=1.0, gamma=1.0)
    opt_state = tx.init(params)

    def statistics(p, b):
        return bj.source_grad_stats(losses_fn, p, b, method="fast")

    def update(g, s, p, stats):
        return tx.update(g, s, p, grad_stats=stats)

    def together(p, s, b, barrier=False):
        stats = statistics(p, b)
        if barrier:
            stats = jax.lax.optimization_barrier(stats)
        return update(stats.fixed_weight_grads(), s, p, stats)

    stats = jax.jit(statistics)(params, batch)
    step, step_state = training_step(bj, "bogc", losses_fn, forward, params, labels, args.batch)

    def compiled(fn, *fn_args):
        return jax.jit(fn).lower(*fn_args).compile(), fn_args

    fns = {
        "statistics": compiled(statistics, params, batch),
        "update": compiled(update, stats.fixed_weight_grads(), opt_state, params, stats),
        "statistics + update": compiled(together, params, opt_state, batch),
        "statistics, barrier, update": compiled(
            lambda p, s, b: together(p, s, b, barrier=True), params, opt_state, batch
        ),
        "bogc step (with Adam)": compiled(step, params, step_state, batch),
    }
    med = time_interleaved(fns, args.repeats, budget_s=1e9, clock="cpu", warmup=True)
    parts = med["statistics"] + med["update"]
    print(f"{args.model}, B = {args.batch} (CPU time, medians of {args.repeats})")
    print("| program | ms | / (statistics + update alone) |")
    print("|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {1e3 * t:.1f} | {t / parts:.2f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "model": args.model,
                "B": args.batch,
                "clock": "cpu",
                "ms": {k: 1e3 * v for k, v in med.items()},
            },
            f,
            indent=1,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
