"""Every transform's state round-trips through orbax; a resumed run is bit-for-bit the same.

Plain ``orbax.checkpoint`` is all it takes: states are NamedTuples of arrays (``None`` and
empty states allowed), typed PRNG keys (``optax.add_noise``) are saved and restored as
keys, and the abstract target for a restore is the state of a fresh ``tx.init``
(``jax.tree.map(ocp.utils.to_shape_dtype_struct, ...)``) or ``jax.eval_shape(tx.init,
params)``.
"""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import toy_model
from toy_model import init_params, losses_fn, scores_of

import bogc_jax as bj


def make_batch(step, n=16):
    return toy_model.make_batch(step, n)


LABELS = {"enc0": 0, "enc1": 1, "head": None}
SOURCES = 3


TRANSFORMS = {
    "bogc": lambda: optax.chain(bj.bogc(SOURCES), optax.adam(1e-2)),
    "cggm": lambda: optax.chain(bj.cggm(LABELS), optax.clip_by_global_norm(0.8), optax.adam(1e-2)),
    "ogm_ge": lambda: optax.chain(bj.ogm_ge(LABELS, alpha=0.5, key=1), optax.adam(1e-2)),
    "ogm_ge_typed_key_noise": lambda: optax.chain(
        bj.ogm_ge(LABELS, key=jax.random.key(2)), optax.add_noise(0.01, 0.55, 3), optax.adam(1e-2)
    ),
    "mmpareto": lambda: optax.chain(bj.mmpareto(LABELS), optax.adam(1e-2)),
    "multi_steps_bogc": lambda: bj.multi_steps(
        optax.chain(bj.bogc(SOURCES), optax.adam(1e-2)), 2, num_sources=SOURCES, num_modalities=2
    ),
    "multi_steps_cggm": lambda: bj.multi_steps(
        optax.chain(bj.cggm(LABELS), optax.adam(1e-2)), 2, num_sources=SOURCES, num_modalities=2
    ),
    "inject_hyperparams_bogc": lambda: optax.chain(
        optax.inject_hyperparams(bj.bogc, static_args=("num_sources",))(
            num_sources=SOURCES, kappa=0.5
        ),
        optax.adam(1e-2),
    ),
}


_STEPS = {}


def make_step(name):
    """The jitted training step of ``TRANSFORMS[name]`` (one compilation per name)."""
    if name in _STEPS:
        return _STEPS[name]
    tx = TRANSFORMS[name]()

    @jax.jit
    def step(params, state, batch):
        stats = bj.source_grad_stats(losses_fn, params, batch, method="vmap")
        updates, state = tx.update(
            stats.fixed_weight_grads(),
            state,
            params,
            grad_stats=stats,
            modality_scores=scores_of(params, batch),
        )
        return optax.apply_updates(params, updates), state

    _STEPS[name] = step
    return step


def raw(tree):
    """Leaves as numpy arrays, typed keys as their key data (for bitwise comparison)."""

    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(x))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
    for x, y in zip(jax.tree.leaves(raw(a)), jax.tree.leaves(raw(b))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_state_round_trips(name, tmp_path):
    tx = TRANSFORMS[name]()
    step = make_step(name)
    params = init_params()
    state = tx.init(params)
    for i in range(3):
        params, state = step(params, state, make_batch(i))
    if name == "ogm_ge_typed_key_noise":
        keys = [
            x for x in jax.tree.leaves(state) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        ]
        assert keys, "the state should hold a typed PRNG key"

    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tx.init(init_params(1)))
        restored = checkpointer.restore(path, abstract)
    assert type(restored) is type(state)
    assert_trees_equal(restored, state)
    # The restored state drives the next update exactly like the original.
    batch = make_batch(3)
    assert_trees_equal(step(params, restored, batch), step(params, state, batch))


@pytest.mark.parametrize("name", ["bogc", "ogm_ge_typed_key_noise", "multi_steps_cggm"])
def test_resume_is_bit_for_bit(name, tmp_path):
    total, stop = 6, 3
    step = make_step(name)

    def train(params, state, start, end):
        for i in range(start, end):
            params, state = step(params, state, make_batch(i))
        return params, state

    tx = TRANSFORMS[name]()
    params = init_params()
    uninterrupted = train(params, tx.init(params), 0, total)

    first = train(params, tx.init(params), 0, stop)
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        manager.save(stop, args=ocp.args.StandardSave({"params": first[0], "opt": first[1]}))
        manager.wait_until_finished()
    del first

    # A new process would do this: build the target from a fresh init, restore, go on.
    fresh_tx = TRANSFORMS[name]()
    fresh = init_params(seed=7)
    target = {"params": fresh, "opt": fresh_tx.init(fresh)}
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        latest = manager.latest_step()
        restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
    assert latest == stop
    resumed = train(restored["params"], restored["opt"], latest, total)
    assert_trees_equal(resumed, uninterrupted)


def test_eval_shape_target_restores_typed_keys(tmp_path):
    """``jax.eval_shape(tx.init, params)`` also works as the target, keys included."""
    tx = TRANSFORMS["ogm_ge_typed_key_noise"]()
    params = init_params()
    state = tx.init(params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "c", state)
        checkpointer.wait_until_finished()
        target = jax.eval_shape(tx.init, params)
        target = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(
                s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
            ),
            target,
        )
        restored = checkpointer.restore(tmp_path / "c", target)
    assert_trees_equal(restored, state)
