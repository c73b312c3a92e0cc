"""Worker for tests/test_data_parallel.py: one family's training steps, four ways.

Run as ``python tests/workers/dp_worker.py FAMILY OUT.npz`` (FAMILY is bogc, cggm,
ogm_ge or mmpareto). It fakes 8 CPU devices, runs two training steps of a small
two-modality model on a batch of 32

- ``single``: plain ``jit`` on one device, the whole batch;
- ``sharded``: ``jit`` over global arrays, batch sharded over 8 devices with a
  ``NamedSharding`` (no ``axis_name``);
- ``shard_map``: ``jax.shard_map`` over the 8 devices with ``axis_name="data"``;
- ``pmap``: ``jax.pmap`` over the 8 devices with ``axis_name="data"``;

and writes every statistic, coefficient, update and parameter of each step, for each
way, to OUT.npz as ``"{way}/{step}/{name}"``. For pmap it also writes the largest
difference between the 8 devices' copies (``"pmap_spread/..."``), which must be 0.
"""

import os
import sys

NUM_DEVICES = 8
BATCH = 32
SOURCES = 3  # fusion loss, then one unimodal loss per modality


def _force_devices():
    flag = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def init_params(seed):
    import numpy as np  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(seed)
    dense = lambda i, o: {
        "w": (rng.normal(size=(i, o)) / i**0.5).astype(np.float32),
        "b": (0.1 * rng.normal(size=(o,))).astype(np.float32),
    }
    return {
        "enc0": dense(5, 6),
        "enc1": dense(4, 6),
        "head": dense(12, 3),
        "uni0": dense(6, 3),
        "uni1": dense(6, 3),
    }


PARAM_LABELS = {"enc0": 0, "enc1": 1, "head": None, "uni0": None, "uni1": None}


def make_batch(seed, n=BATCH):
    import numpy as np  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n).astype(np.int32)
    x0 = rng.normal(size=(n, 5)).astype(np.float32) + 0.8 * np.eye(5, dtype=np.float32)[y]
    x1 = rng.normal(size=(n, 4)).astype(np.float32) + 0.3 * np.eye(4, dtype=np.float32)[y]
    return {"x0": x0, "x1": x1, "y": y}


def forward(p, batch):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    h0 = jnp.tanh(batch["x0"] @ p["enc0"]["w"] + p["enc0"]["b"])
    h1 = jnp.tanh(batch["x1"] @ p["enc1"]["w"] + p["enc1"]["b"])
    fused = jnp.concatenate([h0, h1], -1) @ p["head"]["w"] + p["head"]["b"]
    uni = [h0 @ p["uni0"]["w"] + p["uni0"]["b"], h1 @ p["uni1"]["w"] + p["uni1"]["b"]]
    return fused, uni


def losses_fn(p, batch):
    """``[3, B]``: the fusion loss and each modality's unimodal loss, per example."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top

    fused, uni = forward(p, batch)
    ce = optax.softmax_cross_entropy_with_integer_labels
    return jnp.stack([ce(fused, batch["y"])] + [ce(u, batch["y"]) for u in uni])


def make_family(family):
    """``(tx, step)``: the optimiser and ``step(params, state, batch, axis_name)``."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top

    import bogc_jax as bj  # pylint: disable=g-import-not-at-top
    from bogc_jax import _moments  # pylint: disable=g-import-not-at-top

    def mean_grads(p, batch, axis_name):
        loss = lambda q: jnp.sum(jnp.mean(losses_fn(q, batch), axis=1))
        if axis_name is None:
            return jax.grad(loss)(p)
        # Under shard_map (check_vma), the gradient with respect to replicated params is
        # already summed over devices; marking them varying first gives this device's
        # gradient, and the same line is right under pmap.
        local = jax.grad(loss)(_moments.as_varying(p, axis_name))
        return jax.lax.pmean(local, axis_name)

    if family == "bogc":
        tx = optax.chain(bj.bogc(SOURCES), optax.adam(1e-2))
        head_mask = {k: {"w": k == "head", "b": k == "head"} for k in PARAM_LABELS}

        def step(p, state, batch, axis_name):
            stats = bj.source_grad_stats(losses_fn, p, batch, method="vmap", axis_name=axis_name)
            # chunk_size counts the examples a chunk holds over all devices under jit, and
            # on one device under shard_map/pmap (where the batch is the local one).
            chunked = bj.source_grad_stats(
                losses_fn,
                p,
                batch,
                method="vmap",
                chunk_size=16 if axis_name is None else 2,
                axis_name=axis_name,
            )
            grads = stats.fixed_weight_grads()
            updates, state = tx.update(grads, state, p, grad_stats=stats)
            lap = bj.laplace_grad_stats(
                losses_fn,
                p,
                batch,
                jax.random.key(7),
                mask=head_mask,
                num_samples=4,
                method="vmap",
                axis_name=axis_name,
            )
            out = {
                "stats": stats,
                "chunked_stats": chunked,
                "updates": updates,
                "diagnostics": state[0],
                "laplace_stats": lap,
            }
            return optax.apply_updates(p, updates), state, out

    elif family == "mmpareto":
        tx = optax.chain(bj.mmpareto(PARAM_LABELS), optax.adam(1e-2))

        def step(p, state, batch, axis_name):
            stats = bj.source_grad_stats(losses_fn, p, batch, method="vmap", axis_name=axis_name)
            updates, state = tx.update(stats.fixed_weight_grads(), state, p, grad_stats=stats)
            out = {"stats": stats, "updates": updates, "diagnostics": state[0]}
            return optax.apply_updates(p, updates), state, out

    elif family in ("cggm", "ogm_ge"):
        if family == "cggm":
            first = bj.cggm(PARAM_LABELS, rho=1.3)
            metric = bj.metrics.accuracy
        else:
            first = bj.ogm_ge(PARAM_LABELS, alpha=0.5, key=3)
            metric = bj.metrics.confidence
        tx = optax.chain(first, optax.clip_by_global_norm(0.8), optax.adam(1e-2))

        def step(p, state, batch, axis_name):
            _, uni = forward(p, batch)
            scores = jnp.stack([metric(u, batch["y"], axis_name=axis_name) for u in uni])
            grads = mean_grads(p, batch, axis_name)
            updates, state = tx.update(grads, state, p, modality_scores=scores)
            out = {"scores": scores, "grads": grads, "updates": updates, "diagnostics": state[0]}
            return optax.apply_updates(p, updates), state, out

    else:
        raise SystemExit(f"unknown family {family!r}")
    return tx, step


def flat(tree, prefix):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(_raw(leaf))
    return out


def run(family):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
    from jax.sharding import PartitionSpec as P

    if jax.device_count() != NUM_DEVICES:
        raise SystemExit(f"expected {NUM_DEVICES} devices, got {jax.device_count()}")
    tx, step = make_family(family)
    params0 = init_params(0)
    batches = [make_batch(10 + i) for i in range(2)]
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
    replicated = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P("data"))

    plain = jax.jit(lambda p, s, b: step(p, s, b, None))
    mapped = jax.jit(
        jax.shard_map(
            lambda p, s, b: step(p, s, b, "data"),
            mesh=mesh,
            in_specs=(P(), P(), P("data")),
            out_specs=(P(), P(), P()),
        )
    )
    pmapped = jax.pmap(
        lambda p, s, b: step(p, s, b, "data"), axis_name="data", in_axes=(None, None, 0)
    )

    def per_device(batch):
        return jax.tree.map(lambda x: x.reshape((NUM_DEVICES, -1) + x.shape[1:]), batch)

    results = {}
    for way in ("single", "sharded", "shard_map", "pmap"):
        params, state = params0, tx.init(params0)
        if way in ("sharded", "shard_map"):
            params, state = jax.device_put((params, state), replicated)
        elif way == "single":
            params, state = jax.device_put((params, state), jax.devices()[0])
        for i, batch in enumerate(batches):
            if way == "single":
                params, state, out = plain(params, state, batch)
            elif way == "sharded":
                params, state, out = plain(params, state, jax.device_put(batch, split))
                assert out["updates"]["head"]["w"].sharding.is_fully_replicated
            elif way == "shard_map":
                params, state, out = mapped(params, state, jax.device_put(batch, split))
            else:
                host = lambda t: jax.tree.map(np.asarray, t)  # same placement every call
                params, state, out = pmapped(host(params), host(state), per_device(batch))
                stacked = jax.tree.map(lambda x: np.asarray(_raw(x)), (params, state, out))
                spread = jax.tree.map(
                    lambda a: np.max(np.abs(a.astype(np.float64) - a[:1])) if a.size else 0.0,
                    stacked,
                )
                results.update(flat(spread, f"pmap_spread/{i}/"))
                params, state, out = jax.tree.map(lambda a: a[0], stacked)
            results.update(flat(out, f"{way}/{i}/"))
            results.update(flat(params, f"{way}/{i}/params"))
    return results


def _raw(x):
    """Key data of a typed PRNG key array; anything else unchanged."""
    import jax  # pylint: disable=g-import-not-at-top

    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def main(argv):
    if len(argv) != 3:
        raise SystemExit(f"usage: {argv[0]} FAMILY OUT.npz")
    _force_devices()
    import numpy as np  # pylint: disable=g-import-not-at-top

    results = run(argv[1])
    np.savez(argv[2], **results)
    print(f"{argv[1]}: wrote {len(results)} arrays to {argv[2]}")


if __name__ == "__main__":
    main(sys.argv)
