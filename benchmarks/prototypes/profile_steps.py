"""Where the fast statistics and the bogc / mmpareto steps spend their time.

On each model at one batch size (three loss sources), one run times side by side
(compiled ahead, interleaved repeats, medians):

- pieces: the forward pass; one batch gradient (the unit); each source's own batch
  gradient; per-source means (``jax.jacrev`` and ``bj.source_grad_means``); the fast
  statistics; the fixed-weight sum; the bogc and mmpareto updates on given statistics;
- whole training steps (``timing.training_step``): joint (the unit of the steps), bogc,
  mmpareto.

It also prints the number of fusions in each compiled program, and checks the fast
statistics against the vmap reference. Prints a table, writes JSON.

    python benchmarks/prototypes/profile_steps.py --models mlp512,cnn --batch 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re

from _paths import BENCH  # first: puts bench and timing on sys.path

# isort: split
import bench
from timing import time_interleaved, training_step


def build(model: str, n: int, quick: bool):
    """Name -> (jitted fn, args), the exactness checks and the parameter count."""
    import jax
    import jax.numpy as jnp

    import bogc_jax as bj

    size = bench.model_size(model, quick)
    params, losses_fn, forward = bench.jax_model(model, size)
    batch = tuple(jnp.asarray(x) for x in bench.make_batch(model, size, n))
    labels = bj.label_params(params, {"enc0": 0, "enc1": 1}, default=None)

    def total(p, b):
        return jnp.sum(jnp.mean(losses_fn(p, b), axis=1))

    fns = {
        "forward": (jax.jit(lambda p, b: jnp.sum(losses_fn(p, b))), (params, batch)),
        "grad": (jax.jit(jax.grad(total)), (params, batch)),
    }
    for s in range(bench.NUM_SOURCES):
        fns[f"grad_source{s}"] = (
            jax.jit(jax.grad(lambda p, b, s=s: jnp.mean(losses_fn(p, b)[s]))),
            (params, batch),
        )
    fns["means_jacrev"] = (
        jax.jit(jax.jacrev(lambda p, b: jnp.mean(losses_fn(p, b), axis=1))),
        (params, batch),
    )
    fns["means_library"] = (
        jax.jit(lambda p, b: bj.source_grad_means(losses_fn, p, b)),
        (params, batch),
    )
    fast = jax.jit(lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="fast"))
    fns["fast"] = (fast, (params, batch))

    stats = fast(params, batch)
    grads = stats.fixed_weight_grads()
    fns["fixed_weight_grads"] = (jax.jit(lambda s: s.fixed_weight_grads()), (stats,))
    for name, tx in (("bogc", bj.bogc(3)), ("mmpareto", bj.mmpareto(labels))):
        fns[f"{name}_update"] = (
            jax.jit(lambda g, s, st, tx=tx: tx.update(g, s, None, grad_stats=st)),
            (grads, tx.init(params), stats),
        )
    for kind in ("joint", "bogc", "mmpareto"):
        step, state = training_step(bj, kind, losses_fn, forward, params, labels, n)
        fns[f"step_{kind}"] = (jax.jit(step), (params, state, batch))

    ref = bj.source_grad_stats(losses_fn, params, batch, method="vmap")

    def rel(a, b):
        num = max(
            float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        )
        den = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))
        return num / max(den, 1e-30)

    checks = {
        "fast_vs_vmap_mean": rel(stats.mean, ref.mean),
        "fast_vs_vmap_var": rel(stats.var, ref.var),
    }
    num_params = sum(x.size for x in jax.tree.leaves(params))
    return fns, checks, int(num_params)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp512,cnn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clock", default="cpu", choices=("wall", "cpu"))
    parser.add_argument("--only", default=None, help="regex: time only these pieces (+ grad)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import jax

    rows = []
    for model in args.models.split(","):
        fns, checks, num_params = build(model, args.batch, args.quick)
        if args.only:
            keep = re.compile(args.only)
            fns = {k: v for k, v in fns.items() if k in ("grad", "step_joint") or keep.search(k)}
        compiled, fusions = {}, {}
        for name, (fn, fn_args) in fns.items():
            c = fn.lower(*fn_args).compile()
            compiled[name] = (c, fn_args)
            fusions[name] = len(re.findall(r"^\s*\S+ = \S+ fusion\(", c.as_text(), re.M))
        times = time_interleaved(
            compiled, args.repeats, budget_s=4.0, clock=args.clock, warmup=True
        )
        unit, joint = times["grad"], times["step_joint"]
        row = {"model": model, "batch": args.batch, "params": num_params, "checks": checks}
        row["ms"] = {k: v * 1e3 for k, v in times.items()}
        row["per_grad"] = {k: v / unit for k, v in times.items()}
        row["per_joint_step"] = {k: v / joint for k, v in times.items() if k.startswith("step_")}
        row["fusions"] = fusions
        rows.append(row)
        print(f"\n{model} B={args.batch} P={num_params}")
        print("| piece | ms | / grad | / joint step | fusions |\n|---|---|---|---|---|")
        for k, v in times.items():
            step = f"{v / joint:.2f}" if k.startswith("step_") else ""
            print(f"| {k} | {v * 1e3:.2f} | {v / unit:.2f} | {step} | {fusions[k]} |")
        for k, v in checks.items():
            print(f"check {k}: {v:.2e}")
    out = args.out or os.path.join(
        BENCH, "results", f"profile-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "jax": jax.__version__,
                "cpus": os.cpu_count(),
                "repeats": args.repeats,
                "clock": args.clock,
                "rows": rows,
            },
            f,
            indent=1,
        )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
