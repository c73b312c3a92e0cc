"""Where the fast statistics and the bogc / mmpareto steps spend time, and the prototypes.

On each model at one batch size (three loss sources), one run times side by side
(interleaved repeats, medians, compiled ahead):

- pieces: the forward pass; one batch gradient (the unit); each source's own batch
  gradient; per-source means (``jacrev``: one forward, one S-wide backward); the library's
  per-source cotangents (``fast_stats._cotangents``) and the prototype's single S-wide
  backward; the per-layer products (library, and prototype fused / two matmuls / without
  the cancellation check) on given cotangents; the bogc and mmpareto updates on given
  statistics (library and prototype);
- whole: the library's fast statistics and the prototype's; joint, bogc and mmpareto
  training steps (statistics + transform + Adam) with the library's and with the
  prototype's pieces.

Exactness: the prototype's statistics against the vmap reference (and the library's), the
prototype updates against the library's. Prints tables, writes JSON.

    python benchmarks/prototypes/profile_steps.py --models mlp512,cnn --batch 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
for path in (ROOT, BENCH, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import bench
import fast_paths as fp


def build(model: str, n: int, quick: bool, checks_on: bool = True):
    import jax
    import jax.numpy as jnp
    import optax

    import bogc_jax as bj
    from bogc_jax import fast_stats as fs
    from bogc_jax import stats as st

    size = bench.model_size(model, quick)
    params, losses_fn, _ = bench.jax_model(model, size)
    batch = tuple(jnp.asarray(x) for x in bench.make_batch(model, size, n))
    num_sources = bench.NUM_SOURCES
    labels = bj.label_params(params, {"enc0": 0, "enc1": 1}, default=None)
    leaf_labels = jax.tree.leaves(labels, is_leaf=lambda x: x is None)

    def total(p, b):
        return jnp.sum(jnp.mean(losses_fn(p, b), axis=1))

    fns = {}
    fns["forward"] = (jax.jit(lambda p, b: jnp.sum(losses_fn(p, b))), (params, batch))
    fns["grad"] = (jax.jit(jax.grad(total)), (params, batch))
    for s in range(num_sources):
        fns[f"grad_source{s}"] = (
            jax.jit(jax.grad(lambda p, b, s=s: jnp.mean(losses_fn(p, b)[s]))),
            (params, batch),
        )
    fns["means_jacrev"] = (jax.jit(lambda p, b: fp.source_means(losses_fn, p, b)), (params, batch))

    # The library's cotangents, and the products on given cotangents.
    program, treedef, param_leaves, _, example_leaves = fs._trace(losses_fn, params, batch)
    tap_nodes = []
    for plan in program.plans:
        for node, _ in plan.uses:
            if all(node is not t for t in tap_nodes):
                tap_nodes.append(node)

    def lib_cotangents(p_leaves, e_leaves):
        return fs._cotangents(program, p_leaves, e_leaves, num_sources, tap_nodes)

    def proto_cotangents(p_leaves, e_leaves):
        return fp.stacked_cotangents(program, p_leaves, e_leaves, num_sources, tap_nodes)[:2]

    leaf_args = (list(param_leaves), list(example_leaves))
    fns["cotangents_lib"] = (jax.jit(lib_cotangents), leaf_args)
    fns["cotangents_proto"] = (jax.jit(proto_cotangents), leaf_args)
    deltas, inputs = jax.jit(lib_cotangents)(*leaf_args)
    cts, inputs_p = jax.jit(proto_cotangents)(*leaf_args)
    reach = {}
    targets = fs._source_targets(program.outvar, num_sources, program.producer)
    for s, (var, _) in enumerate(targets):
        for node in fs._needed(program.nodes, program.producer, [var]):
            reach.setdefault(node.index, []).append(s)
    dtypes = [st.accumulation_dtype(jnp.result_type(x)) for x in param_leaves]
    dense = [(k, plan) for k, plan in enumerate(program.plans) if plan.rule == "dense"]
    positions = [(k, plan) for k, plan in enumerate(program.plans) if plan.rule == "positions"]

    def lib_products(deltas, inputs):
        out = []
        for k, plan in dense:
            node, pos = plan.uses[0]
            srcs = [s for s in range(num_sources) if (s, node.index) in deltas]
            out.append(
                fs._dense_moments(
                    plan,
                    inputs[id(node.invars[1 - pos])],
                    [deltas[(s, node.index)][0] for s in srcs],
                    dtypes[k],
                )
            )
        return out

    def lib_positions(deltas, inputs):
        out = []
        for k, plan in positions:
            node, pos = plan.uses[0]
            srcs = [s for s in range(num_sources) if (s, node.index) in deltas]
            out.append(
                fs._positions_moments(
                    plan,
                    inputs[id(node.invars[1 - pos])],
                    [deltas[(s, node.index)][0] for s in srcs],
                    dtypes[k],
                )
            )
        return out

    def proto_products(deltas, inputs, fused=False, check=True):
        out = []
        for k, plan in dense:
            node, pos = plan.uses[0]
            srcs = [s for s in range(num_sources) if (s, node.index) in deltas]
            out.append(
                fp.dense_moments(
                    plan,
                    inputs[id(node.invars[1 - pos])],
                    [deltas[(s, node.index)][0] for s in srcs],
                    srcs,
                    num_sources,
                    dtypes[k],
                    fused=fused,
                    check=check,
                )
            )
        return out

    if dense:
        fns["dense_products_lib"] = (jax.jit(lib_products), (deltas, inputs))
        fns["dense_products_proto"] = (jax.jit(proto_products), (deltas, inputs))
        fns["dense_products_proto_fused"] = (
            jax.jit(lambda c, i: proto_products(c, i, fused=True)),
            (deltas, inputs),
        )
        fns["dense_products_proto_nocheck"] = (
            jax.jit(lambda c, i: proto_products(c, i, check=False)),
            (deltas, inputs),
        )
    if positions:
        fns["positions_products_lib"] = (jax.jit(lib_positions), (deltas, inputs))

    fns["fast_lib"] = (
        jax.jit(lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="fast")),
        (params, batch),
    )
    for name, kw in (
        ("fast_proto", {}),
        ("fast_proto_nocheck", dict(check=False)),
        ("fast_proto_stacked", dict(stacked=True)),
    ):
        fns[name] = (
            jax.jit(lambda p, b, kw=kw: fp.source_grad_stats(losses_fn, p, b, **kw)),
            (params, batch),
        )
    fns["means_fast_proto"] = (
        jax.jit(lambda p, b: fp.fast_source_means(losses_fn, p, b)),
        (params, batch),
    )

    # Updates on given statistics.
    stats = jax.jit(lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="fast"))(
        params, batch
    )
    grads = stats.fixed_weight_grads()
    bogc_tx = bj.bogc(num_sources)
    bogc_state = bogc_tx.init(params)
    fns["bogc_update_lib"] = (
        jax.jit(lambda g, s, st_: bogc_tx.update(g, s, None, grad_stats=st_)[0]),
        (grads, bogc_state, stats),
    )
    fns["bogc_update_proto"] = (jax.jit(fp.bogc_update), (grads, stats))
    fns["bogc_update_proto_blocked"] = (
        jax.jit(lambda g, s: fp.bogc_update(g, s, blocked=True)),
        (grads, stats),
    )
    fns["fixed_weight_grads_lib"] = (jax.jit(lambda s: s.fixed_weight_grads()), (stats,))
    fns["fixed_weight_grads_proto"] = (jax.jit(lambda s: fp.sum_over_sources(s.mean)), (stats,))
    mmp_tx = bj.mmpareto(labels)
    mmp_state = mmp_tx.init(params)
    fns["mmpareto_update_lib"] = (
        jax.jit(lambda g, s, st_: mmp_tx.update(g, s, None, grad_stats=st_)[0]),
        (grads, mmp_state, stats),
    )
    fns["mmpareto_update_proto"] = (
        jax.jit(lambda g, m: fp.mmpareto_update(g, m, leaf_labels)),
        (grads, stats.mean),
    )

    # Whole training steps (+ Adam).
    adam = optax.adam(1e-3)

    def make_step(kind):
        if kind in ("bogc", "bogc_sum"):
            tx = optax.chain(bj.bogc(num_sources), adam)
        elif kind in ("mmpareto", "mmpareto_sum"):
            tx = optax.chain(bj.mmpareto(labels), adam)
        else:  # joint and the prototypes: the transform is inlined, Adam after it
            tx = adam
        state = tx.init(params)

        def step(p, s, b):
            extra = {}
            if kind == "joint":
                g = jax.grad(total)(p, b)
            elif kind == "bogc":
                sts = bj.source_grad_stats(losses_fn, p, b, method="fast")
                g, extra = sts.fixed_weight_grads(), {"grad_stats": sts}
            elif kind == "bogc_proto":
                sts = fp.source_grad_stats(losses_fn, p, b)
                g = fp.bogc_update(fp.sum_over_sources(sts.mean), sts)
            elif kind == "bogc_sum":  # the library's, the fixed-weight sum as S - 1 adds
                sts = bj.source_grad_stats(losses_fn, p, b, method="fast")
                g, extra = fp.sum_over_sources(sts.mean), {"grad_stats": sts}
            elif kind == "mmpareto_sum":  # the library's, the fixed-weight sum as S - 1 adds
                mean = fp.source_means(losses_fn, p, b)
                sts = bj.GradStats(jnp.float32(n), mean, jax.tree.map(jnp.zeros_like, mean))
                g, extra = fp.sum_over_sources(mean), {"grad_stats": sts}
            elif kind == "mmpareto":
                mean = fp.source_means(losses_fn, p, b)
                sts = bj.GradStats(jnp.float32(n), mean, jax.tree.map(jnp.zeros_like, mean))
                g, extra = sts.fixed_weight_grads(), {"grad_stats": sts}
            else:  # mmpareto_proto
                mean = fp.fast_source_means(losses_fn, p, b)
                g = fp.mmpareto_update(fp.sum_over_sources(mean), mean, leaf_labels)
            u, s = tx.update(g, s, p, **extra)
            return optax.apply_updates(p, u), s

        return jax.jit(step), (params, state, batch)

    for kind in ("joint", "bogc", "bogc_sum", "bogc_proto", "mmpareto", "mmpareto_sum",
                 "mmpareto_proto"):  # fmt: skip
        fns[f"step_{kind}"] = make_step(kind)

    checks = {}
    if not checks_on:
        return fns, checks, int(fp.num_params(params))
    ref = bj.source_grad_stats(losses_fn, params, batch, method="vmap")
    proto = jax.jit(lambda p, b: fp.source_grad_stats(losses_fn, p, b))(params, batch)

    def rel(a, b):
        num = max(
            float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        )
        den = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))
        return num / max(den, 1e-30)

    checks["proto_vs_vmap_mean"] = rel(proto.mean, ref.mean)
    checks["proto_vs_vmap_var"] = rel(proto.var, ref.var)
    checks["lib_vs_vmap_mean"] = rel(stats.mean, ref.mean)
    checks["lib_vs_vmap_var"] = rel(stats.var, ref.var)
    checks["bogc_update_proto_blocked_vs_lib"] = rel(
        fns["bogc_update_proto_blocked"][0](*fns["bogc_update_proto_blocked"][1]),
        fns["bogc_update_lib"][0](*fns["bogc_update_lib"][1]),
    )
    checks["means_fast_proto_vs_vmap"] = rel(
        jax.jit(lambda p, b: fp.fast_source_means(losses_fn, p, b))(params, batch), ref.mean
    )
    checks["bogc_update_proto_vs_lib"] = rel(
        fns["bogc_update_proto"][0](*fns["bogc_update_proto"][1]),
        fns["bogc_update_lib"][0](*fns["bogc_update_lib"][1]),
    )
    checks["mmpareto_update_proto_vs_lib"] = rel(
        fns["mmpareto_update_proto"][0](*fns["mmpareto_update_proto"][1]),
        fns["mmpareto_update_lib"][0](*fns["mmpareto_update_lib"][1]),
    )
    means_j = jax.jit(lambda p, b: fp.source_means(losses_fn, p, b))(params, batch)
    checks["means_jacrev_vs_vmap"] = rel(means_j, ref.mean)
    return fns, checks, int(fp.num_params(params))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp512,cnn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clock", default="cpu", choices=("wall", "cpu"))
    parser.add_argument("--only", default=None, help="regex: time only these pieces (+ grad)")
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import jax

    rows = []
    for model in args.models.split(","):
        fns, checks, num_params = build(model, args.batch, args.quick, not args.no_checks)
        if args.only:
            keep = re.compile(args.only)
            fns = {k: v for k, v in fns.items() if k in ("grad", "step_joint") or keep.search(k)}
        compiled, flops = {}, {}
        for name, (fn, fn_args) in fns.items():
            c = fn.lower(*fn_args).compile()
            compiled[name] = (c, fn_args)
            try:
                flops[name] = float(c.cost_analysis().get("flops", 0.0))
            except Exception:  # pylint: disable=broad-except
                flops[name] = None
        times = bench.time_interleaved(compiled, args.repeats, budget_s=4.0, clock=args.clock)
        unit, joint = times["grad"], times["step_joint"]
        row = {"model": model, "batch": args.batch, "params": num_params, "checks": checks}
        row["ms"] = {k: v * 1e3 for k, v in times.items()}
        row["per_grad"] = {k: v / unit for k, v in times.items()}
        row["flops"] = flops
        get = lambda k, times=times: times.get(k, float("nan"))
        row["ratios"] = {
            "fast_lib / grad": get("fast_lib") / unit,
            "fast_proto / grad": get("fast_proto") / unit,
            "means_fast_proto / grad": get("means_fast_proto") / unit,
            "means_jacrev / grad": get("means_jacrev") / unit,
            "step_bogc / step_joint": get("step_bogc") / joint,
            "step_bogc_proto / step_joint": get("step_bogc_proto") / joint,
            "step_mmpareto / step_joint": get("step_mmpareto") / joint,
            "step_mmpareto_proto / step_joint": get("step_mmpareto_proto") / joint,
            "step_bogc_sum / step_joint": get("step_bogc_sum") / joint,
            "step_mmpareto_sum / step_joint": get("step_mmpareto_sum") / joint,
        }
        rows.append(row)
        print(f"\n{model} B={args.batch} P={num_params}")
        print("| piece | ms | / grad | GFLOP |\n|---|---|---|---|")
        for k, v in times.items():
            f = flops.get(k)
            print(f"| {k} | {v * 1e3:.2f} | {v / unit:.2f} | {f / 1e9 if f else 0:.3f} |")
        for k, v in row["ratios"].items():
            print(f"{k}: {v:.2f}")
        for k, v in checks.items():
            print(f"check {k}: {v:.2e}")
    out = args.out or os.path.join(
        BENCH,
        "results",
        f"profile-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json",
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
