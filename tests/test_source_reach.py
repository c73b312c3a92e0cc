"""Sources known not to reach a leaf: the fast statistics mark them, ``bj.bogc`` leaves
their zero slabs out, and the results are those of the full computation.

- marks follow one array object, are lost on any operation and go with their array;
- the fast statistics mark every leaf with exactly the sources whose slabs may be nonzero;
- the few-pass calibration on the reaching slabs equals it on all slabs (hypothesis over
  zero patterns, S = 1..3, gamma 0 and 1);
- a bogc update in the same trace as the statistics reads fewer slabs and gives the
  update of statistics without marks; ``fixed_weight_grads`` likewise.
"""

import gc

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import bogc_jax as bj
from bogc_jax import _fused_calibration, _source_reach

SETTINGS = hypothesis.settings(max_examples=25, deadline=None)


def test_a_mark_belongs_to_one_array_object():
    x = jnp.zeros((3, 4)).at[1].set(1.0)
    assert _source_reach.reaching(3, x) == (0, 1, 2)
    assert _source_reach.mark(x, [1]) is x
    assert _source_reach.reaching(3, x) == (1,)
    y = x * 2.0
    assert _source_reach.reaching(3, y) == (0, 1, 2)  # a new array: no mark
    assert _source_reach.carry(x, y) is y and _source_reach.reaching(3, y) == (1,)
    assert _source_reach.reaching(3, np.zeros(3)) == (0, 1, 2)
    z = _source_reach.mark(jnp.zeros((3, 4)), [2])
    assert _source_reach.reaching(3, x, z) == (1, 2)  # the union over a leaf's statistics
    assert _source_reach.reaching(3, x, x * 1.0) == (0, 1, 2)


def test_marks_go_with_their_arrays():
    before = len(_source_reach._REACHING)
    arrays = [_source_reach.mark(jnp.full((2, 3), float(i)), [0]) for i in range(5)]
    assert len(_source_reach._REACHING) == before + 5
    del arrays
    gc.collect()
    assert len(_source_reach._REACHING) == before


def two_branch(seed, widths=(6, 5, 8)):
    """Two encoders, a fusion head reading both, one auxiliary head per encoder; a leaf
    no source reaches."""
    a_in, b_in, hidden = widths
    k = jax.random.split(jax.random.key(seed), 6)
    params = {
        "a": jax.random.normal(k[0], (a_in, hidden)) / 2,
        "b": jax.random.normal(k[1], (b_in, hidden)) / 2,
        "head": jax.random.normal(k[2], (2 * hidden, 3)) / 4,
        "aux_a": jax.random.normal(k[3], (hidden, 3)) / 3,
        "aux_b": jax.random.normal(k[4], (hidden, 3)) / 3,
        "unused": jnp.ones((2, 2)),
    }
    n = 12
    batch = {
        "a": jax.random.normal(k[5], (n, a_in)),
        "b": jax.random.normal(jax.random.fold_in(k[5], 1), (n, b_in)),
        "y": jax.random.randint(jax.random.fold_in(k[5], 2), (n,), 0, 3),
    }

    def ce(logits, y):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]

    def losses_fn(p, b):
        ha = jax.nn.relu(b["a"] @ p["a"])
        hb = jnp.tanh(b["b"] @ p["b"])
        fused = jnp.concatenate([ha, hb], axis=1) @ p["head"]
        return jnp.stack(
            [ce(fused, b["y"]), ce(ha @ p["aux_a"], b["y"]), ce(hb @ p["aux_b"], b["y"])]
        )

    return losses_fn, params, batch


REACHING = {"a": (0, 1), "b": (0, 2), "head": (0,), "aux_a": (1,), "aux_b": (2,), "unused": ()}


def test_fast_statistics_mark_the_sources_that_reach_each_leaf():
    losses_fn, params, batch = two_branch(0)
    seen = {}

    def statistics(p, b):  # the marks, read while tracing
        stats = bj.source_grad_stats(losses_fn, p, b, method="fast")
        for name in REACHING:
            seen[name] = [_source_reach.reaching(3, x[name]) for x in (stats.mean, stats.var)]
        return stats

    stats = jax.jit(statistics)(params, batch)
    vmap = bj.source_grad_stats(losses_fn, params, batch, method="vmap")
    assert _source_reach.reaching(3, vmap.mean["a"]) == (0, 1, 2)  # not marked
    for name, want in REACHING.items():
        assert seen[name] == [want, want], name
        # Absent: zero in the fast statistics and in the reference; present: not zero.
        for leaf in (stats.mean[name], stats.var[name], vmap.mean[name], vmap.var[name]):
            for s in range(3):
                assert np.any(np.asarray(leaf[s])) == (s in want), (name, s)


@pytest.mark.parametrize("num_sources", [1, 2, 3])
@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_calibration_on_the_reaching_slabs_equals_the_full_one(num_sources, gamma):
    hyper = dict(kappa=1.5, gamma=gamma, prior_weight=0.7, eps=1e-3)

    @jax.jit
    def full(mean, var):
        return _fused_calibration.leaf_calibration(mean, var, 9.0, **hyper)

    @SETTINGS
    @hypothesis.given(
        seed=st.integers(0, 2**31 - 1),
        present=st.sets(st.integers(0, num_sources - 1), max_size=num_sources),
    )
    def check(seed, present):
        rng = np.random.default_rng(seed)
        shape = (num_sources, 6, 5)
        mean = rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 3, (num_sources, 1, 1))
        var = rng.exponential(size=shape) * 10.0 ** rng.uniform(-4, 4, (num_sources, 1, 1))
        off = rng.random(shape) < 0.2
        mean[off], var[off] = 0.0, 0.0
        absent = [s for s in range(num_sources) if s not in present]
        mean[absent], var[absent] = 0.0, 0.0
        mean, var = jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)
        sources = sorted(present)
        part = jax.jit(
            lambda m, v: _fused_calibration.leaf_calibration(m, v, 9.0, sources=sources, **hyper)
        )(mean, var)
        want = full(mean, var)
        top = float(jnp.max(jnp.abs(mean))) or 1.0
        np.testing.assert_allclose(np.asarray(part[0]) / top, np.asarray(want[0]) / top, atol=1e-6)
        np.testing.assert_allclose(part[1], want[1], atol=1e-6)
        np.testing.assert_allclose(part[2], want[2], atol=1e-6)
        np.testing.assert_array_equal(part[3], want[3])
        for got, ref in zip(part, want):
            assert got.shape == ref.shape and got.dtype == ref.dtype
        if absent:  # the absent slabs are not read: NaN there changes nothing
            poisoned = jax.jit(
                lambda m, v: _fused_calibration.leaf_calibration(
                    m.at[absent[0]].set(jnp.nan), v, 9.0, sources=sources, **hyper
                )
            )(mean, var)
            for got, ref in zip(poisoned, part):
                np.testing.assert_array_equal(got, ref)

    check()


@pytest.mark.parametrize("seed,hidden,noise", [(0, 2, "absolute"), (1, 7, "relative")])
def test_bogc_in_one_trace_with_the_statistics_equals_the_full_update(seed, hidden, noise):
    losses_fn, params, batch = two_branch(seed, widths=(6, 5, hidden))
    tx = optax.chain(bj.bogc(3, kappa=1.0, gamma=1.0, noise=noise), optax.sgd(0.1))
    state = tx.init(params)
    calls = []
    calibrate = _fused_calibration.leaf_calibration

    def recorded(mean, var, count, **kwargs):
        calls.append(kwargs.get("sources"))
        return calibrate(mean, var, count, **kwargs)

    def step(p, s, b, unmark):
        stats = bj.source_grad_stats(losses_fn, p, b, method="fast")
        if unmark:  # new array objects: every slab is read
            stats = jax.tree.map(lambda x: x + 0.0, stats)
        grads = stats.fixed_weight_grads()
        updates, s = tx.update(grads, s, p, grad_stats=stats)
        return grads, updates, s

    mp = pytest.MonkeyPatch()
    with mp.context() as m:
        m.setattr(_fused_calibration, "leaf_calibration", recorded)
        marked = jax.jit(step, static_argnums=3)(params, state, batch, False)
        assert sorted(map(tuple, calls)) == sorted(REACHING.values())
        calls.clear()
        full = jax.jit(step, static_argnums=3)(params, state, batch, True)
        assert all(tuple(c) == (0, 1, 2) for c in calls)
    for got, want in zip(jax.tree.leaves(marked), jax.tree.leaves(full)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert bool(marked[2][0].finite)


@pytest.mark.parametrize("shape", [(), (4,), (0, 3), (3, 0), (2, 3, 2)])
@pytest.mark.parametrize("sources", [None, (0, 2), (1,), ()])
def test_calibration_of_any_leaf_shape(shape, sources):
    """Scalar, vector and empty leaves, with all, some or none of the sources."""
    rng = np.random.default_rng(len(shape))
    mean = rng.normal(size=(3,) + shape).astype(np.float32)
    var = rng.exponential(size=(3,) + shape).astype(np.float32)
    absent = [s for s in range(3) if sources is not None and s not in sources]
    mean[absent], var[absent] = 0.0, 0.0
    hyper = dict(kappa=1.0, gamma=1.0, prior_weight=1.0, eps=1e-3)
    got = _fused_calibration.leaf_calibration(
        jnp.asarray(mean), jnp.asarray(var), 5.0, sources=sources, **hyper
    )
    want = _fused_calibration.leaf_calibration(jnp.asarray(mean), jnp.asarray(var), 5.0, **hyper)
    assert got[0].shape == shape and got[1].shape == (3,) and got[3].shape == (3,)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    size = int(np.prod(shape))
    np.testing.assert_array_equal(got[3], [0.0 if s in absent else size for s in range(3)])
