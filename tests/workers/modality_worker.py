"""Worker for tests/test_multidevice_modality.py: metrics, cggm, ogm_ge and mmpareto on
one device and on 8 fake CPU devices inside ``jax.shard_map``.

Run as ``python tests/workers/modality_worker.py OUT.npz``. It fakes 8 devices before
importing jax and writes, for each quantity, ``"single/..."`` (plain ``jit``, whole batch)
and ``"shard_map/..."`` (the batch split over the 8 devices, ``axis_name="data"``):

- the four metrics, with a mask that leaves the devices unequal numbers of examples
  (``axis_name`` given to the metric: psum of totals and counts);
- two training steps of each transform, where under ``shard_map`` the modality scores are
  the *per-device* batch scores and the transform's own ``axis_name`` averages them
  (cggm, ogm_ge), the gradient is the all-reduced mean gradient, and mmpareto reads the
  all-reduced statistics of ``bj.source_grad_stats(..., axis_name=...)``.
"""

import os
import sys

NUM_DEVICES = 8
BATCH = 32
AXIS = "data"
PARAM_LABELS = {"enc0": 0, "enc1": 1, "head": None, "uni0": None, "uni1": None}


def _force_devices():
    flag = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def build():
    """Params, two batches, metric inputs, and the per-transform step functions."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top

    import bogc_jax as bj  # pylint: disable=g-import-not-at-top

    ks = jax.random.split(jax.random.key(0), 8)
    dense = lambda k, i, o: {
        "w": jax.random.normal(k, (i, o)) / i**0.5,
        "b": 0.1 * jax.random.normal(jax.random.fold_in(k, 1), (o,)),
    }
    params = {
        "enc0": dense(ks[0], 5, 6),
        "enc1": dense(ks[1], 4, 6),
        "head": dense(ks[2], 12, 3),
        "uni0": dense(ks[3], 6, 3),
        "uni1": dense(ks[4], 6, 3),
    }

    def batch(key):
        k0, k1, k2 = jax.random.split(key, 3)
        y = jax.random.randint(k2, (BATCH,), 0, 3)
        return {
            "x0": jax.random.normal(k0, (BATCH, 5)) + 0.8 * jax.nn.one_hot(y, 5),
            "x1": jax.random.normal(k1, (BATCH, 4)) + 0.3 * jax.nn.one_hot(y, 4),
            "y": y.astype(jnp.int32),
        }

    batches = [batch(jax.random.key(10 + i)) for i in range(2)]

    def forward(p, b):
        h0 = jnp.tanh(b["x0"] @ p["enc0"]["w"] + p["enc0"]["b"])
        h1 = jnp.tanh(b["x1"] @ p["enc1"]["w"] + p["enc1"]["b"])
        fused = jnp.concatenate([h0, h1], -1) @ p["head"]["w"] + p["head"]["b"]
        return fused, [h0 @ p["uni0"]["w"] + p["uni0"]["b"], h1 @ p["uni1"]["w"] + p["uni1"]["b"]]

    def losses_fn(p, b):
        fused, uni = forward(p, b)
        ce = optax.softmax_cross_entropy_with_integer_labels
        return jnp.stack([ce(fused, b["y"])] + [ce(u, b["y"]) for u in uni])

    def mean_grads(p, b, axis_name):
        if axis_name is not None:
            # Marked varying, the replicated params get each device's local gradient (a
            # gradient w.r.t. unvarying params would come back already psum-ed); then the mean.
            p = jax.lax.pcast(p, axis_name, to="varying")
        g = jax.grad(lambda q: jnp.sum(jnp.mean(losses_fn(q, b), axis=1)))(p)
        return g if axis_name is None else jax.lax.pmean(g, axis_name)

    kr = jax.random.split(jax.random.key(1), 6)
    metric_inputs = {
        "logits": jax.random.normal(kr[0], (BATCH, 5)),
        "labels": jax.random.randint(kr[1], (BATCH,), 0, 5),
        "pred": jax.random.normal(kr[2], (BATCH,)),
        "target": jnp.round(jax.random.normal(kr[3], (BATCH,))),
        "seg_logits": jax.random.normal(kr[4], (BATCH, 6, 6, 4)),
        "seg_labels": jax.random.randint(kr[5], (BATCH, 6, 6), 0, 4),
        # 4 examples per device; the mask keeps 0..4 of them, unevenly.
        "mask": (jnp.arange(BATCH) % 4) < (jnp.arange(BATCH) // 4) % 5,
    }

    def metrics(m, axis_name):
        return {
            "accuracy": bj.metrics.accuracy(
                m["logits"], m["labels"], where=m["mask"], axis_name=axis_name
            ),
            "sign_accuracy": bj.metrics.sign_accuracy(
                m["pred"], m["target"], exclude_zero=True, axis_name=axis_name
            ),
            "dice": bj.metrics.dice(
                m["seg_logits"], m["seg_labels"], where=m["mask"], axis_name=axis_name
            ),
            "confidence": bj.metrics.confidence(
                m["logits"], m["labels"], where=m["mask"], axis_name=axis_name
            ),
        }

    def score_family(make_tx, metric):
        def factory(axis_name):
            tx = optax.chain(make_tx(axis_name), optax.clip_by_global_norm(0.8), optax.adam(1e-2))

            def step(p, state, b):
                _, uni = forward(p, b)
                # Per-device scores: the transform's axis_name averages them over devices.
                scores = jnp.stack([metric(u, b["y"]) for u in uni])
                grads = mean_grads(p, b, axis_name)
                updates, state = tx.update(grads, state, p, modality_scores=scores)
                return (
                    optax.apply_updates(p, updates),
                    state,
                    {"updates": updates, "diagnostics": state[0]},
                )

            return tx, step

        return factory

    def mmpareto_family(axis_name):
        tx = optax.chain(bj.mmpareto(PARAM_LABELS), optax.adam(1e-2))

        def step(p, state, b):
            stats = bj.source_grad_stats(losses_fn, p, b, method="vmap", axis_name=axis_name)
            updates, state = tx.update(stats.fixed_weight_grads(), state, p, grad_stats=stats)
            return (
                optax.apply_updates(p, updates),
                state,
                {"updates": updates, "diagnostics": state[0]},
            )

        return tx, step

    families = {
        "cggm_stable": score_family(
            lambda a: bj.cggm(PARAM_LABELS, rho=1.3, axis_name=a), bj.metrics.accuracy
        ),
        "cggm_reference": score_family(
            lambda a: bj.cggm(PARAM_LABELS, rho=1.3, mode="reference", axis_name=a),
            bj.metrics.accuracy,
        ),
        "ogm_ge": score_family(
            lambda a: bj.ogm_ge(PARAM_LABELS, alpha=0.5, key=3, axis_name=a), bj.metrics.confidence
        ),
        "mmpareto": mmpareto_family,
    }
    return params, batches, metric_inputs, metrics, families


def flat(tree, prefix):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    return {
        prefix + jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def run():
    import jax  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
    from jax.sharding import PartitionSpec as P

    if jax.device_count() != NUM_DEVICES:
        raise SystemExit(f"expected {NUM_DEVICES} devices, got {jax.device_count()}")
    mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    params0, batches, metric_inputs, metrics, families = build()
    results = {}

    single = jax.jit(lambda m: metrics(m, None))(metric_inputs)
    mapped = jax.jit(
        jax.shard_map(lambda m: metrics(m, AXIS), mesh=mesh, in_specs=(P(AXIS),), out_specs=P())
    )(jax.device_put(metric_inputs, split))
    results.update(flat(single, "single/metrics"))
    results.update(flat(mapped, "shard_map/metrics"))

    for name, factory in families.items():
        tx, step = factory(None)
        p, s = params0, tx.init(params0)
        one = jax.jit(step)
        for i, b in enumerate(batches):
            p, s, out = one(p, s, b)
            results.update(flat(out, f"single/{name}/{i}/"))
            results.update(flat(p, f"single/{name}/{i}/params"))
        tx, step = factory(AXIS)
        p, s = jax.device_put((params0, tx.init(params0)), replicated)
        many = jax.jit(
            jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(AXIS)), out_specs=(P(), P(), P()))
        )
        for i, b in enumerate(batches):
            p, s, out = many(p, s, jax.device_put(b, split))
            results.update(flat(out, f"shard_map/{name}/{i}/"))
            results.update(flat(p, f"shard_map/{name}/{i}/params"))
    return results


def main(argv):
    if len(argv) != 2:
        raise SystemExit(f"usage: {argv[0]} OUT.npz")
    _force_devices()
    import numpy as np  # pylint: disable=g-import-not-at-top

    results = run()
    np.savez(argv[1], **results)
    print(f"wrote {len(results)} arrays to {argv[1]}")


if __name__ == "__main__":
    main(sys.argv)
