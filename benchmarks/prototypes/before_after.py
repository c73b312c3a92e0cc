"""The library at another git revision and the working tree's, timed side by side in one run.

The other revision's ``bogc_jax`` is extracted with ``git archive`` under the name
``bogc_jax_before`` (its own imports renamed), so both load in one process. Per model at
one batch size (three sources): one batch gradient (the unit of ``fast``), fast
statistics, and training steps (statistics + transform + Adam): joint (the unit of the
steps), bogc, bogc_repr (representation-space BOGC, where the revision has it), mmpareto
(before: ``jacrev`` means as in ``bench.py``; after: ``bj.source_grad_means``); and the bogc update alone on given fast statistics
(``update_bogc``). Interleaved repeats, medians; each model in its own process.
Prints a table, writes JSON.

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
import types

from _paths import BENCH, ROOT  # first: puts bench and timing on sys.path

# isort: split
import bench
from timing import in_fresh_process, time_interleaved, training_step


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


def steps(bj, model, n):
    """Name -> (compiled fn, args): grad, fast statistics, and the joint, bogc and
    mmpareto training steps (``timing.training_step``)."""
    import jax
    import jax.numpy as jnp

    size = bench.model_size(model)
    params, losses_fn, forward = bench.jax_model(model, size)
    batch = tuple(jnp.asarray(x) for x in bench.make_batch(model, size, n))
    labels = bj.label_params(params, {"enc0": 0, "enc1": 1}, default=None)

    def total(p, b):
        return jnp.sum(jnp.mean(losses_fn(p, b), axis=1))

    def compiled(fn, *args):
        start = time.perf_counter()
        out = jax.jit(fn).lower(*args).compile()
        return out, args, time.perf_counter() - start

    fns = {
        "grad": compiled(jax.grad(total), params, batch),
        "fast": compiled(
            lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="fast"), params, batch
        ),
    }
    parts = bench.representation_parts(forward)
    for kind in ("joint", "bogc", "bogc_repr", "mmpareto"):
        if kind == "bogc_repr" and not hasattr(bj, "representation_bogc"):
            continue
        step, state = training_step(bj, kind, losses_fn, forward, params, labels, n, parts=parts)
        fns[f"step_{kind}"] = compiled(step, params, state, batch)
    # The bogc update alone, on statistics computed once (outside the timed call).
    stats = jax.jit(lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="fast"))(
        params, batch
    )
    tx = bj.bogc(3, kappa=1.0, gamma=1.0)
    fns["update_bogc"] = compiled(
        lambda g, s, p, gs: tx.update(g, s, p, grad_stats=gs),
        stats.fixed_weight_grads(),
        tx.init(params),
        params,
        stats,
    )
    return fns


def torch_peers(model: str, args) -> dict:
    """PyTorch on the same model and batch (wall clock): seconds per call, ratio to its grad."""
    size = bench.model_size(model)
    params = bench.jax_model(model, size)[0]
    import jax

    num_params = sum(x.size for x in jax.tree.leaves(params))
    spec = types.SimpleNamespace(threads=args.threads, repeats=args.repeats)
    out = {}
    for method in args.torch.split(","):
        if method == "func" and num_params > args.torch_func_max_params:
            out[method] = {"error": f"skipped: {num_params / 1e6:.1f}M parameters"}
            continue
        out[method] = bench.run_torch(model, size, args.batch, method, spec)
    grad_s = out.get("grad", {}).get("time_s")
    for res in out.values():
        if grad_s and "time_s" in res:
            res["per_grad"] = res["time_s"] / grad_s
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="main")
    parser.add_argument("--models", default="mlp512,cnn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=os.path.join(BENCH, "results", "before-after.json"))
    parser.add_argument(
        "--torch",
        default="",
        help="PyTorch peers to time on each model after the JAX functions, each in a fresh "
        "process (bench.run_torch): any of grad,func,backpack",
    )
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--torch-func-max-params",
        type=float,
        default=5e6,
        help="skip torch.func (per-example gradients) on larger models: minutes per call",
    )
    args = parser.parse_args(argv)
    models = args.models.split(",")
    if len(models) > 1:  # one process per model (timing.in_fresh_process says why)
        rest = list(argv if argv is not None else sys.argv[1:])
        rows = []
        for model in models:
            rows += in_fresh_process(__file__, rest + ["--models", model])["rows"]
        _write(args.out, args.before, rows)
        return

    sys.path.insert(0, extract(args.before))
    import bogc_jax_before as before

    import bogc_jax as after

    rows = []
    for model in args.models.split(","):
        fns = {}
        for tag, bj in (("before", before), ("after", after)):
            for name, fn in steps(bj, model, args.batch).items():
                fns[(tag, name)] = fn
        med = time_interleaved(
            {key: (fn, a) for key, (fn, a, _) in fns.items()},
            args.repeats,
            budget_s=1e9,
            clock="cpu",
            warmup=True,
        )
        for tag in ("before", "after"):
            row = {"model": model, "B": args.batch, "version": tag}
            row.update({name: 1e3 * med[(t, name)] for (t, name) in med if t == tag})
            row.update({f"compile_{name}": fns[(t, name)][2] for (t, name) in fns if t == tag})
            row["fast/grad"] = row["fast"] / row["grad"]
            row["update_bogc/grad"] = row["update_bogc"] / row["grad"]
            joint_compile = row["compile_step_joint"]
            for kind in ("bogc", "bogc_repr", "mmpareto"):
                if f"step_{kind}" in row:
                    row[f"{kind}/joint"] = row[f"step_{kind}"] / row["step_joint"]
                    row[f"compile {kind}/joint"] = row[f"compile_step_{kind}"] / joint_compile
            if tag == "after" and args.torch:
                row["torch"] = torch_peers(model, args)
                print(f"{model:8s} torch  {row['torch']}", flush=True)
            rows.append(row)
            print(
                f"{model:8s} {tag:6s} grad {row['grad']:7.1f} ms  fast {row['fast']:7.1f} ms "
                f"({row['fast/grad']:.2f}x)  joint {row['step_joint']:7.1f} ms  bogc "
                f"{row['step_bogc']:7.1f} ms ({row['bogc/joint']:.2f}x)  update "
                f"{row['update_bogc']:6.1f} ms  mmpareto "
                f"{row['step_mmpareto']:7.1f} ms ({row['mmpareto/joint']:.2f}x)  bogc_repr "
                f"{row.get('bogc_repr/joint', float('nan')):.2f}x  compile bogc "
                f"{row['compile bogc/joint']:.1f}x mmpareto {row['compile mmpareto/joint']:.1f}x",
                flush=True,
            )
    _write(args.result_file or args.out, args.before, rows)


def _write(path, before, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"clock": "cpu (process_time)", "before": before, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
