"""Worker for tests/test_multidevice_stats.py: statistics on 1 device vs 8 fake devices.

Run as ``python tests/multidevice_stats_worker.py``. It fakes 8 CPU devices (the flag
must be set before jax is imported), computes gradient statistics of a small
three-source model on a batch of 32 once on a single device and then split over the 8
devices

- inside ``jax.shard_map`` (batch split on the "data" axis, params replicated,
  ``axis_name="data"``), with and without ``chunk_size``, with and without ``check_vma``;
- under plain ``jit`` with the batch sharded by a ``NamedSharding`` (no ``axis_name``);
- under plain ``jit`` on the explicit mesh with params never placed on it (no
  ``device_put``);
- inside ``jax.pmap`` with ``axis_name``;

and the same for ``bj.laplace_grad_stats`` (same PRNG key on every device), then feeds
every result to ``bj.bogc`` (each aggregation). It also checks that forgetting
``axis_name`` inside ``shard_map`` is an error that names it (``guards``). It prints one
JSON line ``{"device_count": 8, "errors": {name: relative error}, "guards": {...}}`` and
exits with status 1 if any error exceeds the tolerance or a guard did not hold.
"""

import functools
import json
import os
import sys
import time

NUM_DEVICES = 8
BATCH = 32
TOLERANCE = 2e-5


def _force_devices():
    flag = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


_force_devices()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

import bogc_jax as bj  # pylint: disable=g-import-not-at-top,wrong-import-position

LAPLACE_MASK = {"enc0": False, "enc1": False, "head": True, "uni": [True, True]}


def init_params(key):
    k = jax.random.split(key, 4)
    return {
        "enc0": jax.random.normal(k[0], (4, 5)) / 2.0,
        "enc1": jax.random.normal(k[1], (3, 5)) / 2.0,
        "head": jax.random.normal(k[2], (10,)) / 3.0,
        "uni": [jax.random.normal(k[3], (5,)), jnp.asarray(0.3)],
    }


def losses_fn(p, batch):
    """Fusion loss, then one unimodal loss per modality: [3, B]."""
    h0 = jnp.tanh(batch["x0"] @ p["enc0"])
    h1 = jnp.tanh(batch["x1"] @ p["enc1"])
    fused = jnp.concatenate([h0, h1], axis=-1) @ p["head"]
    uni0 = h0 @ p["uni"][0] + p["uni"][1]
    uni1 = h1 @ p["uni"][0] - p["uni"][1]
    y = batch["y"]
    return jnp.stack([(fused - y) ** 2, (uni0 - y) ** 2, jnp.abs(uni1 - y) ** 1.5])


def make_batch(key):
    k = jax.random.split(key, 3)
    return {
        "x0": jax.random.normal(k[0], (BATCH, 4)),
        "x1": jax.random.normal(k[1], (BATCH, 3)),
        "y": jax.random.normal(k[2], (BATCH,)),
    }


def relative_error(got, want):
    """max |got - want| / max |want| over the leaves (None leaves must match)."""
    got_l = jax.tree.leaves(got, is_leaf=lambda x: x is None)
    want_l = jax.tree.leaves(want, is_leaf=lambda x: x is None)
    assert len(got_l) == len(want_l)
    worst = 0.0
    for g, w in zip(got_l, want_l):
        if w is None:
            assert g is None
            continue
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (g.shape, w.shape)
        worst = max(worst, float(np.max(np.abs(g - w))) / (float(np.max(np.abs(w))) + 1e-30))
    return worst


AGGREGATIONS = ("dempster", "precision", "dimension_frame")
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # compile time dominates here


def bogc_update(stats, params, aggregation):
    """The bogc update of the fixed-weight gradient ``sum_s mean[s]`` (diagnostics too)."""
    grads = jax.tree.map(
        lambda m, p: p if m is None else jnp.sum(m, 0),
        stats.mean,
        params,
        is_leaf=lambda x: x is None,
    )
    tx = bj.bogc(3, aggregation=aggregation)
    return tx.update(grads, tx.init(params), params, grad_stats=stats)


def with_update(stats_fn):
    """``(params, batch, **kw) -> (stats, default bogc update)`` in one program.

    The update is computed where the statistics are: inside ``shard_map``/``pmap`` or under
    ``jit`` with the sharded batch.
    """

    def fn(params, batch, **kw):
        stats = stats_fn(params, batch, **kw)
        return stats, bogc_update(stats, params, "dempster")

    return fn


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def all_updates(stats, params):
    """Every aggregation's update, on one device (one compilation for all checks)."""
    return {a: bogc_update(stats, params, a) for a in AGGREGATIONS}


def to_host(tree):
    return jax.tree.map(np.asarray, tree)


def main():
    assert jax.device_count() == NUM_DEVICES, jax.devices()
    params = init_params(jax.random.key(0))
    batch = make_batch(jax.random.key(1))
    key = jax.random.key(2)
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
    batch_sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    params_replicated = jax.device_put(params, NamedSharding(mesh, P()))
    # method="auto" with a vmap fallback leaf needs Auto mesh axes under plain jit (on an
    # Explicit mesh jax's vmap rejects the mixed batch shardings): a documented limitation.
    auto_mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    stats = with_update(
        lambda p, b, **kw: bj.source_grad_stats(losses_fn, p, b, method="vmap", **kw)
    )
    auto = with_update(lambda p, b, **kw: bj.source_grad_stats(losses_fn, p, b, **kw))

    def laplace_fn(method):
        return with_update(
            lambda p, b, **kw: bj.laplace_grad_stats(
                losses_fn,
                p,
                b,
                key,
                mask=LAPLACE_MASK,
                num_samples=6,
                damping=0.5,
                method=method,
                **kw,
            )
        )

    laplace, laplace_auto = laplace_fn("vmap"), laplace_fn("auto")
    seconds = {}
    single = {}
    for name, fn in (("stats", stats), ("auto", auto), ("laplace", laplace)):
        start = time.process_time()
        single[name] = jax.block_until_ready(
            jax.jit(fn, compiler_options=FAST_COMPILE)(params, batch)
        )
        seconds[f"single_{name}"] = round(time.process_time() - start, 2)

    want_all = {name: all_updates(to_host(value[0]), params) for name, value in single.items()}

    def sharded(fn, check_vma=True, **kw):
        mapped = jax.shard_map(
            lambda p, b: fn(p, b, axis_name="data", **kw),
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=P(),
            check_vma=check_vma,
        )
        return jax.jit(mapped, compiler_options=FAST_COMPILE)(params_replicated, batch_sharded)

    def jit_sharded(fn, on=None, place_params=True, **kw):
        # Explicit-axes mesh (jax.make_mesh's default) unless told otherwise; set, as jax asks.
        on = on or mesh
        with jax.set_mesh(on):
            return jax.jit(functools.partial(fn, **kw), compiler_options=FAST_COMPILE)(
                jax.device_put(params, NamedSharding(on, P())) if place_params else params,
                jax.device_put(batch, NamedSharding(on, P("data"))),
            )

    def pmapped(fn, **kw):
        per_device = jax.tree.map(
            lambda x: x.reshape((NUM_DEVICES, BATCH // NUM_DEVICES) + x.shape[1:]), batch
        )
        out = jax.pmap(
            lambda p, b: fn(p, b, axis_name="data", **kw), axis_name="data", in_axes=(None, 0)
        )(params, per_device)
        for leaf in jax.tree.leaves(out):  # every device holds the same result
            leaf = np.asarray(leaf, np.float64)
            assert np.max(np.abs(leaf - leaf[:1])) <= 1e-6 * (np.max(np.abs(leaf)) + 1e-30)
        return jax.tree.map(lambda x: x[0], out)

    checks = {  # name: (single-device reference, computation on the split batch)
        "shard_map": ("stats", lambda: sharded(stats)),
        "shard_map_chunked": ("stats", lambda: sharded(stats, chunk_size=2)),
        "shard_map_no_check_vma": ("stats", lambda: sharded(stats, check_vma=False)),
        "shard_map_auto": ("auto", lambda: sharded(auto)),
        "jit_sharded": ("stats", lambda: jit_sharded(stats)),
        "jit_sharded_chunked": ("stats", lambda: jit_sharded(stats, chunk_size=8)),
        "jit_sharded_auto": ("auto", lambda: jit_sharded(auto, on=auto_mesh)),
        "jit_unplaced_params": ("stats", lambda: jit_sharded(stats, place_params=False)),
        "jit_unplaced_params_chunked": (
            "stats",
            lambda: jit_sharded(stats, place_params=False, chunk_size=8),
        ),
        "pmap_chunked": ("stats", lambda: pmapped(stats, chunk_size=2)),
        "laplace_shard_map": ("laplace", lambda: sharded(laplace)),
        "laplace_shard_map_no_check_vma": ("laplace", lambda: sharded(laplace, check_vma=False)),
        "laplace_jit_sharded": ("laplace", lambda: jit_sharded(laplace)),
        "laplace_jit_unplaced_params": (
            "laplace",
            lambda: jit_sharded(laplace, place_params=False),
        ),
        "laplace_shard_map_auto": ("laplace", lambda: sharded(laplace_auto)),
    }
    errors, failures = {}, {}
    for name, (reference, compute) in checks.items():
        want_stats, want_update = single[reference]
        start = time.process_time()
        try:
            got_stats, got_update = jax.block_until_ready(compute())
            seconds[name] = round(time.process_time() - start, 2)
            assert float(got_stats.count) == float(want_stats.count), name
            errors[name] = relative_error(got_stats, want_stats)
            # Property 8: the calibrated update (and its diagnostics) from the split batch
            # equals the single-device one: computed in the distributed program for the default
            # aggregation, and from the gathered statistics for every aggregation.
            errors[f"{name}/bogc_in_program"] = relative_error(got_update, want_update)
            got_all = all_updates(to_host(got_stats), params)
            for aggregation in AGGREGATIONS:
                errors[f"{name}/bogc_{aggregation}"] = relative_error(
                    got_all[aggregation], want_all[reference][aggregation]
                )
        except Exception as err:  # pylint: disable=broad-except
            failures[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    guards = {}
    for name, fn in (("stats", stats), ("laplace", laplace)):
        try:  # the batch split over "data", axis_name forgotten
            sharded(lambda p, b, fn=fn, **kw: fn(p, b))
            guards[f"{name}_forgotten_axis_name"] = "no error"
        except ValueError as err:
            message = str(err).splitlines()[0]
            ok = "axis_name='data'" in message and "mapped axis 'data'" in message
            guards[f"{name}_forgotten_axis_name"] = "ok" if ok else message[:300]
    verdict = {
        "device_count": jax.device_count(),
        "tolerance": TOLERANCE,
        "errors": errors,
        "exceptions": failures,
        "guards": guards,
        "cpu_seconds": seconds,
    }
    print(json.dumps(verdict))
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    bad.update({k: v for k, v in guards.items() if v != "ok"})
    if bad or failures:
        print(f"FAILED: {bad} {failures}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
