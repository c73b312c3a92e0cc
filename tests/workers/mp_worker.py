"""Worker for tests/test_multiprocess.py: one bogc training step over two processes.

``python tests/workers/mp_worker.py single OUT.npz`` runs the step on the whole batch in
one process, on one device.

``python tests/workers/mp_worker.py PROCESS_ID PORT OUT.npz`` joins a two-process JAX job
(``jax.distributed.initialize`` with the coordinator on 127.0.0.1:PORT, CPU collectives
over gloo, one CPU device per process). Each process holds its half of the batch; the
step runs (a) under ``jit`` over global arrays sharded on a 2-device mesh, and (b) under
``jax.shard_map`` with ``axis_name``. The (replicated) results are written to OUT.npz as
``"{way}/{name}"``, the single-process ones as ``"single/{name}"``.
"""

import os
import sys

INIT_TIMEOUT_S = 60


def _step_fn(axis_name):
    import dp_worker  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top

    import bogc_jax as bj  # pylint: disable=g-import-not-at-top

    tx = optax.chain(bj.bogc(dp_worker.SOURCES), optax.adam(1e-2))

    def step(p, state, batch):
        stats = bj.source_grad_stats(
            dp_worker.losses_fn, p, batch, method="vmap", axis_name=axis_name
        )
        updates, state = tx.update(stats.fixed_weight_grads(), state, p, grad_stats=stats)
        out = {
            "stats": stats,
            "updates": updates,
            "diagnostics": state[0],
            "params": optax.apply_updates(p, updates),
        }
        return out

    return tx, step


def _flat(tree, prefix):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            assert leaf.sharding.is_fully_replicated, jax.tree_util.keystr(path)
            leaf = leaf.addressable_data(0)
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def run_single(out_path):
    import dp_worker  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    params = dp_worker.init_params(0)
    batch = dp_worker.make_batch(10)
    tx, step = _step_fn(None)
    out = jax.jit(step)(params, tx.init(params), batch)
    np.savez(out_path, **_flat(out, "single/"))


def run_process(process_id, port, out_path):
    import dp_worker  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=INIT_TIMEOUT_S,
    )
    try:
        assert jax.process_count() == 2 and jax.device_count() == 2, (
            jax.process_count(),
            jax.device_count(),
        )
        mesh = jax.make_mesh((2,), ("data",))
        replicated = NamedSharding(mesh, P())
        split = NamedSharding(mesh, P("data"))
        params = dp_worker.init_params(0)
        whole = dp_worker.make_batch(10)
        half = whole["y"].shape[0] // 2
        mine = {k: v[process_id * half : (process_id + 1) * half] for k, v in whole.items()}

        def global_array(sharding, local):
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(sharding, x), local
            )

        results = {}
        tx, step = _step_fn(None)
        p = global_array(replicated, params)
        state = global_array(replicated, jax.tree.map(np.asarray, tx.init(params)))
        batch = global_array(split, mine)
        assert batch["x0"].shape[0] == 2 * half  # a global array over both processes
        results.update(_flat(jax.jit(step)(p, state, batch), "sharded/"))

        tx, step = _step_fn("data")
        mapped = jax.jit(
            jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P())
        )
        results.update(_flat(mapped(p, state, batch), "shard_map/"))
        np.savez(out_path, **results)
    finally:
        jax.distributed.shutdown()


def main(argv):
    os.environ["JAX_PLATFORMS"] = "cpu"
    if len(argv) == 3 and argv[1] == "single":
        run_single(argv[2])
    elif len(argv) == 4:
        run_process(int(argv[1]), int(argv[2]), argv[3])
    else:
        raise SystemExit(f"usage: {argv[0]} single OUT.npz | {argv[0]} PROCESS_ID PORT OUT.npz")
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv)
