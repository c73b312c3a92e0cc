"""Cost of a training step of representation-space BOGC and BayesAgg-MTL beside joint_uni.

Two multimodal models (two MLP encoders, a concat fusion head and one head per modality,
softmax cross-entropy, Adam):

- ``wide``: encoders 512 -> 1024 -> 512 per modality, so the fusion head reads a
  1024-dim representation, 50 classes, batch 128;
- ``experiment``: the experiments' two-branch MLP sizes (hidden 128, 64-dim features),
  inputs 96 and 80 dims, 10 classes, batch 64.

For each, one jitted training step (gradient + Adam update) of: ``joint_uni`` (the plain
sum of the fusion and unimodal losses; the unit), representation BOGC with the diagonal
posterior and the delta-method moments (the default), the same with Monte Carlo moments
(S = 32 and S = 256 draws, chunks of 32), and BayesAgg-MTL (S = 1024; the diagonal
posterior on the wide model, the exact one on the small model). Times are medians of
interleaved repeats; memory is the compiled program's temporaries
(``memory_analysis().temp_size_in_bytes``). Prints a table and writes JSON to
``benchmarks/results/``.

    python benchmarks/bench_representation.py           # a few minutes
    python benchmarks/bench_representation.py --quick   # seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bogc_jax as bj

MODELS = {
    "wide": dict(inputs=(512, 512), hidden=1024, feature=512, classes=50, batch=128),
    "experiment": dict(inputs=(96, 80), hidden=128, feature=64, classes=10, batch=64),
}
QUICK = {
    "wide": dict(inputs=(32, 32), hidden=64, feature=32, classes=5, batch=16),
    "experiment": dict(inputs=(12, 10), hidden=16, feature=8, classes=3, batch=8),
}


def build(size, seed=0):
    rng = np.random.default_rng(seed)
    dense = lambda i, o: (
        jnp.asarray(rng.normal(size=(i, o)) / np.sqrt(i), jnp.float32),
        jnp.zeros(o, jnp.float32),
    )
    num = len(size["inputs"])
    params = {
        "enc": [
            [dense(i, size["hidden"]), dense(size["hidden"], size["feature"])]
            for i in size["inputs"]
        ],
        "fusion": dense(num * size["feature"], size["classes"]),
        "uni": [dense(size["feature"], size["classes"]) for _ in range(num)],
    }

    def encode(p, batch):
        out = []
        for layers, x in zip(p["enc"], batch["x"]):
            (w1, b1), (w2, b2) = layers
            out.append(jax.nn.relu(jax.nn.relu(x @ w1 + b1) @ w2 + b2))
        return out

    head_params = lambda p: [p["fusion"], *p["uni"]]
    heads = [bj.LinearHead(tuple(range(num)))] + [bj.LinearHead((m,)) for m in range(num)]

    def joint_loss(p, batch):
        reps = encode(p, batch)
        ce = optax.softmax_cross_entropy_with_integer_labels
        w, b = p["fusion"]
        total = ce(jnp.concatenate(reps, -1) @ w + b, batch["y"]).mean()
        for h, (w, b) in zip(reps, p["uni"]):
            total = total + ce(h @ w + b, batch["y"]).mean()
        return total

    batch = {
        "x": [
            jnp.asarray(rng.normal(size=(size["batch"], i)), jnp.float32) for i in size["inputs"]
        ],
        "y": jnp.asarray(rng.integers(0, size["classes"], size["batch"]), jnp.int32),
    }
    return params, encode, head_params, heads, joint_loss, batch


def make_steps(size, quick):
    params, encode, head_params, heads, joint_loss, batch = build(size)
    tx = optax.adam(1e-3)
    targets = lambda b: b["y"]

    def joint_step(params, opt_state, state, batch, key):
        grads = jax.grad(joint_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state

    def method_step(method):
        def step(params, opt_state, state, batch, key):
            grads, state, _ = method.grads(params, state, batch, key=key)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, state

        return step

    # The exact softmax posterior is a dense P x P matrix: only for small fusion heads.
    full_ok = size["classes"] * (len(size["inputs"]) * size["feature"] + 1) <= 2048
    variants = {
        "joint_uni": (joint_step, None),
        "bogc_repr (diag, linearized)": bj.representation_bogc(encode, head_params, heads, targets_fn=targets),
        "bogc_repr (diag, MC S=32)": bj.representation_bogc(
            encode, head_params, heads, targets_fn=targets, moments="monte_carlo", num_samples=32, chunk_size=32
        ),
        "bogc_repr (diag, MC S=256)": bj.representation_bogc(
            encode, head_params, heads, targets_fn=targets, moments="monte_carlo", num_samples=256, chunk_size=32
        ),
        "bayesagg_mtl (S=1024, " + ("full)" if full_ok else "diag)"): bj.bayesagg_mtl(
            encode, head_params, heads, targets_fn=targets, posterior="full" if full_ok else "diag",
            chunk_size=32, full_data="ema",
        ),
    }  # fmt: skip
    steps = {}
    for name, method in variants.items():
        if name == "joint_uni":
            state = None
            fn = joint_step
        else:
            state = method.init(params)
            fn = method_step(method)
        steps[name] = (jax.jit(fn), state)
    return params, tx.init(params), batch, steps


def measure(size, repeats, quick):
    params, opt_state, batch, steps = make_steps(size, quick)
    key = jax.random.key(0)
    compiled, rows = {}, {}
    for name, (fn, state) in steps.items():
        lowered = fn.lower(params, opt_state, state, batch, key)
        exe = lowered.compile()
        mem = exe.memory_analysis()
        compiled[name] = (exe, state)
        rows[name] = {
            "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)) if mem else None,
            "times": [],
        }
        jax.block_until_ready(exe(params, opt_state, state, batch, key))  # warm up
    for _ in range(repeats):
        for name, (exe, state) in compiled.items():
            reps = 3 if "1024" not in name else 1
            start = time.perf_counter()
            for _ in range(reps):
                out = exe(params, opt_state, state, batch, key)
            jax.block_until_ready(out)
            rows[name]["times"].append((time.perf_counter() - start) / reps)
    unit = float(np.median(rows["joint_uni"]["times"]))
    for row in rows.values():
        row["median_ms"] = 1e3 * float(np.median(row["times"]))
        row["ratio_to_joint_uni"] = row["median_ms"] / (1e3 * unit)
        del row["times"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else MODELS
    repeats = args.repeats or (2 if args.quick else 15)
    results = {}
    for model, size in sizes.items():
        results[model] = {"size": size, "steps": measure(size, repeats, args.quick)}
    print(f"{'model':<11} {'method':<32} {'ms/step':>9} {'x joint':>8} {'temp MiB':>9}")
    for model, res in results.items():
        for name, row in res["steps"].items():
            temp = "-" if row["temp_bytes"] is None else f"{row['temp_bytes'] / 2**20:.1f}"
            print(
                f"{model:<11} {name:<32} {row['median_ms']:9.2f} {row['ratio_to_joint_uni']:8.2f} {temp:>9}"
            )
    record = {
        "benchmark": "bench_representation",
        "quick": args.quick,
        "repeats": repeats,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(
        out_dir, f"bench-representation-{'quick-' if args.quick else ''}{stamp}.json"
    )
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print("wrote", path)
    return record


if __name__ == "__main__":
    main()
