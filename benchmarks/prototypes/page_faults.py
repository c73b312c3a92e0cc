"""Page faults and CPU time per call under several glibc ``MALLOC_*`` settings.

For one model at one batch size, each setting runs in its own process (the allocator
reads its environment at start-up): one batch gradient, the fast statistics and the
joint, bogc and mmpareto training steps, compiled ahead, called in interleaved rounds;
per call, the CPU time of the process, its minor page faults and its system time
(``resource.getrusage``); medians over the rounds. Prints a table, writes JSON.

    python benchmarks/prototypes/page_faults.py --model mlp1024 --batch 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _paths import BENCH, HERE  # first: puts bench and timing on sys.path

# isort: split
import bench
from timing import training_step

PREVIOUS = {  # the settings of the earlier measurements in docs/benchmarks.md
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "1073741824",
}
SETTINGS = {
    "glibc defaults": {},
    "earlier runs (three settings)": PREVIOUS,
    "MALLOC_ARENA_MAX=1 alone": {"MALLOC_ARENA_MAX": "1"},
    "bench.STEADY_ALLOCATOR (all four)": dict(bench.STEADY_ALLOCATOR),
}


def measure(model: str, n: int, rounds: int) -> dict:
    """This process's CPU time, faults and system time per call of each function."""
    import jax
    import jax.numpy as jnp

    import bogc_jax as bj

    size = bench.model_size(model)
    params, losses_fn, forward = bench.jax_model(model, size)
    batch = tuple(jnp.asarray(x) for x in bench.make_batch(model, size, n))
    labels = bj.label_params(params, {"enc0": 0, "enc1": 1}, default=None)

    def grad(p, b):
        return jax.grad(lambda q: jnp.sum(jnp.mean(losses_fn(q, b), axis=1)))(p)

    def fast(p, b):
        return bj.source_grad_stats(losses_fn, p, b, method="fast")

    fns = {
        "grad": (jax.jit(grad).lower(params, batch).compile(), (params, batch)),
        "fast": (jax.jit(fast).lower(params, batch).compile(), (params, batch)),
    }
    for name in ("joint", "bogc", "mmpareto"):
        step, state = training_step(bj, name, losses_fn, forward, params, labels, n)
        args = (params, state, batch)
        fns[f"step_{name}"] = (jax.jit(step).lower(*args).compile(), args)
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    samples: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
            jax.block_until_ready(fn(*args))
            cpu, after = time.process_time() - start, resource.getrusage(resource.RUSAGE_SELF)
            faults = after.ru_minflt - before.ru_minflt
            samples[name].append((cpu, faults, after.ru_stime - before.ru_stime))

    def median(values):
        return sorted(values)[len(values) // 2]

    return {
        name: {
            "cpu_ms": 1e3 * median([s[0] for s in rows]),
            "faults": median([s[1] for s in rows]),
            "sys_ms": 1e3 * median([s[2] for s in rows]),
        }
        for name, rows in samples.items()
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp1024")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=os.path.join(BENCH, "results", "page-faults.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.model, args.batch, args.rounds)))
        return
    results = {}
    for label, settings in SETTINGS.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(settings)
        cmd = [sys.executable, os.path.join(HERE, "page_faults.py"), "--worker"]
        cmd += ["--model", args.model, "--batch", str(args.batch), "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results[label] = {"settings": settings, "calls": json.loads(out.splitlines()[-1])}
    print(f"{args.model}, B = {args.batch}: per call, medians of {args.rounds} rounds")
    print(
        "| MALLOC_* settings | function | CPU ms | / joint step or grad | page faults | system ms |"
    )
    print("|---|---|---|---|---|---|")
    for label, result in results.items():
        calls = result["calls"]
        for name, call in calls.items():
            unit = calls["grad" if name in ("grad", "fast") else "step_joint"]["cpu_ms"]
            print(
                f"| {label} | {name} | {call['cpu_ms']:.1f} | {call['cpu_ms'] / unit:.2f} | "
                f"{call['faults']:.0f} | {call['sys_ms']:.1f} |"
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"model": args.model, "B": args.batch, "rounds": args.rounds, "results": results},
            f,
            indent=1,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
