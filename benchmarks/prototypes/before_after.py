"""The library at another git revision and the working tree's, timed side by side in one run.

The other revision's ``bogc_jax`` is extracted with ``git archive`` under the name
``bogc_jax_before`` (its own imports renamed), so both load in one process. Per model at
one batch size (three sources): one batch gradient (the unit of ``fast``), fast
statistics, and training steps (statistics + transform + Adam): joint (the unit of the
steps), bogc, mmpareto (before: ``jacrev`` means as in ``bench.py``; after:
``bj.source_grad_means``). Interleaved repeats, medians. Prints a table, writes JSON.

    python benchmarks/prototypes/before_after.py --before main --models mlp512,cnn --batch 128
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
for path in (ROOT, BENCH):
    if path not in sys.path:
        sys.path.insert(0, path)

import bench


def extract(rev: str) -> str:
    """``bogc_jax`` at ``rev`` as the package ``bogc_jax_before`` in a temporary folder."""
    out = tempfile.mkdtemp()
    tar = subprocess.run(
        ["git", "-C", ROOT, "archive", rev, "bogc_jax"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", out], input=tar, check=True)
    src = pathlib.Path(out, "bogc_jax")
    for f in src.rglob("*.py"):
        f.write_text(f.read_text().replace("bogc_jax", "bogc_jax_before"))
    src.rename(pathlib.Path(out, "bogc_jax_before"))
    return out


def steps(bj, model, n, new):
    import jax
    import jax.numpy as jnp
    import optax

    size = bench.model_size(model)
    params, losses_fn, _ = bench.jax_model(model, size)
    batch = tuple(jnp.asarray(x) for x in bench.make_batch(model, size, n))
    labels = bj.label_params(params, {"enc0": 0, "enc1": 1}, default=None)
    adam = optax.adam(1e-3)

    def total(p, b):
        return jnp.sum(jnp.mean(losses_fn(p, b), axis=1))

    def make(kind):
        tx = {
            "bogc": optax.chain(bj.bogc(3), adam),
            "mmpareto": optax.chain(bj.mmpareto(labels), adam),
        }.get(kind, adam)
        state = tx.init(params)

        def step(p, s, b):
            extra = {}
            if kind == "joint":
                g = jax.grad(total)(p, b)
            elif kind == "bogc":
                sts = bj.source_grad_stats(losses_fn, p, b, method="fast")
                g, extra = sts.fixed_weight_grads(), {"grad_stats": sts}
            elif new:
                sts = bj.source_grad_means(losses_fn, p, b)
                g, extra = sts.fixed_weight_grads(), {"grad_stats": sts}
            else:
                mean = jax.jacrev(lambda q: jnp.mean(losses_fn(q, b), axis=1))(p)
                sts = bj.GradStats(jnp.float32(n), mean, jax.tree.map(jnp.zeros_like, mean))
                g, extra = sts.fixed_weight_grads(), {"grad_stats": sts}
            u, s = tx.update(g, s, p, **extra)
            return optax.apply_updates(p, u), s

        return jax.jit(step).lower(params, state, batch).compile(), (params, state, batch)

    fns = {
        "grad": (jax.jit(jax.grad(total)).lower(params, batch).compile(), (params, batch)),
        "fast": (
            jax.jit(lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="fast"))
            .lower(params, batch)
            .compile(),
            (params, batch),
        ),
    }
    for kind in ("joint", "bogc", "mmpareto"):
        fns[f"step_{kind}"] = make(kind)
    return fns


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="main")
    parser.add_argument("--models", default="mlp512,cnn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(BENCH, "results", "before-after.json"))
    args = parser.parse_args(argv)
    import jax

    sys.path.insert(0, extract(args.before))
    import bogc_jax_before as before

    import bogc_jax as after

    rows = []
    for model in args.models.split(","):
        fns = {}
        for tag, bj, new in (("before", before, False), ("after", after, True)):
            for name, fn in steps(bj, model, args.batch, new).items():
                fns[(tag, name)] = fn
        times = {key: [] for key in fns}
        for fn, a in fns.values():  # warm up
            jax.block_until_ready(fn(*a))
        for _ in range(args.repeats):
            for key, (fn, a) in fns.items():
                t = time.process_time()
                jax.block_until_ready(fn(*a))
                times[key].append(time.process_time() - t)
        med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
        for tag in ("before", "after"):
            row = {"model": model, "B": args.batch, "version": tag}
            row.update({name: 1e3 * med[(t, name)] for (t, name) in med if t == tag})
            row["fast/grad"] = row["fast"] / row["grad"]
            row["bogc/joint"] = row["step_bogc"] / row["step_joint"]
            row["mmpareto/joint"] = row["step_mmpareto"] / row["step_joint"]
            rows.append(row)
            print(
                f"{model:8s} {tag:6s} grad {row['grad']:7.1f} ms  fast {row['fast']:7.1f} ms "
                f"({row['fast/grad']:.2f}x)  joint {row['step_joint']:7.1f} ms  bogc "
                f"{row['step_bogc']:7.1f} ms ({row['bogc/joint']:.2f}x)  mmpareto "
                f"{row['step_mmpareto']:7.1f} ms ({row['mmpareto/joint']:.2f}x)",
                flush=True,
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"clock": "cpu (process_time)", "before": args.before, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
