"""What reaches bogc and mmpareto from outside the statistics survives, and optax wrappers.

bogc and mmpareto apply their reading of the statistics as a correction to the incoming
gradient: an L2 term, weight decay or any loss outside ``losses_fn`` passes through, and
the "no calibration" settings are the identity on any input. bogc also works inside
``optax.masked``, ``optax.multi_transform`` and ``optax.partition``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bogc_jax as bj

PARAMS = {"enc": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "head": jnp.arange(4.0)}


def random_stats(seed, num_sources=3, params=PARAMS):
    """Statistics with distinct precisions per source, so that bogc reweighs."""
    rng = np.random.default_rng(seed)

    def leaf(p):
        shape = (num_sources,) + p.shape
        mean = rng.normal(size=shape)
        var = rng.exponential(size=shape) * 10.0 ** rng.uniform(-2, 2, size=shape)
        return jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)

    pairs = {k: leaf(v) for k, v in params.items()}
    return bj.GradStats(
        jnp.float32(8.0),
        {k: m for k, (m, _) in pairs.items()},
        {k: v for k, (_, v) in pairs.items()},
    )


def allclose(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@pytest.mark.parametrize("aggregation", ["dempster", "precision", "dimension_frame"])
def test_bogc_keeps_an_extra_loss_term(aggregation):
    stats = random_stats(0)
    grads = stats.fixed_weight_grads()
    l2 = jax.tree.map(lambda p: 0.5 * p, PARAMS)  # gradient of 0.25 |params|^2
    tx = bj.bogc(3, aggregation=aggregation)
    calibrated, _ = tx.update(grads, tx.init(PARAMS), PARAMS, grad_stats=stats)
    with_l2, _ = tx.update(
        jax.tree.map(jnp.add, grads, l2), tx.init(PARAMS), PARAMS, grad_stats=stats
    )
    assert not np.allclose(calibrated["enc"], grads["enc"])  # it does calibrate
    allclose(with_l2, jax.tree.map(jnp.add, calibrated, l2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("settings", [{"kappa": 0.0}, {"gamma": 0.0}, {"aggregation": "sum"}])
def test_bogc_without_calibration_is_the_identity_on_any_input(settings):
    stats = random_stats(1)
    anything = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 2.0, PARAMS)  # not the stats' sum
    tx = bj.bogc(3, **settings)
    out, state = tx.update(anything, tx.init(PARAMS), PARAMS, grad_stats=stats)
    allclose(out, anything, rtol=1e-6, atol=1e-6)
    assert bool(state.finite)


def test_bogc_equal_precisions_are_the_identity():
    stats = random_stats(2)
    same = bj.GradStats(
        stats.count,
        jax.tree.map(lambda m: jnp.broadcast_to(m[:1], m.shape), stats.mean),
        jax.tree.map(lambda v: jnp.broadcast_to(v[:1], v.shape), stats.var),
    )
    anything = jax.tree.map(lambda p: p**2 - 1.0, PARAMS)
    tx = bj.bogc(3)
    out, _ = tx.update(anything, tx.init(PARAMS), PARAMS, grad_stats=same)
    allclose(out, anything, rtol=1e-5, atol=1e-5)


def test_weight_decay_before_bogc_survives():
    stats = random_stats(3)
    grads = stats.fixed_weight_grads()
    decayed = optax.chain(optax.add_decayed_weights(0.1), bj.bogc(3))
    plain = bj.bogc(3)
    a, _ = decayed.update(grads, decayed.init(PARAMS), PARAMS, grad_stats=stats)
    b, _ = plain.update(grads, plain.init(PARAMS), PARAMS, grad_stats=stats)
    allclose(a, jax.tree.map(lambda x, p: x + 0.1 * p, b, PARAMS), rtol=1e-5, atol=1e-6)


def test_mmpareto_keeps_an_extra_loss_term():
    params = {"enc0": jnp.ones(3), "enc1": jnp.ones(2), "head": jnp.ones(2)}
    stats = random_stats(4, params=params)
    grads = stats.fixed_weight_grads()
    extra = jax.tree.map(lambda p: 0.3 * p, params)
    tx = bj.mmpareto({"enc0": 0, "enc1": 1, "head": None})
    out, _ = tx.update(grads, tx.init(params), params, grad_stats=stats)
    out_extra, _ = tx.update(
        jax.tree.map(jnp.add, grads, extra), tx.init(params), params, grad_stats=stats
    )
    assert not np.allclose(out["enc0"], grads["enc0"])
    allclose(out_extra, jax.tree.map(jnp.add, out, extra), rtol=1e-5, atol=1e-6)


def head_only(tree):
    return {"enc": False, "head": True}


@pytest.mark.parametrize("wrapper", ["masked", "multi_transform", "partition"])
def test_bogc_inside_optax_wrappers_ignores_masked_out_statistics(wrapper):
    stats = random_stats(5)
    grads = stats.fixed_weight_grads()
    labels = {"enc": "frozen", "head": "bogc"}
    if wrapper == "masked":
        tx = optax.masked(bj.bogc(3), head_only(PARAMS))
    elif wrapper == "multi_transform":
        tx = optax.multi_transform({"bogc": bj.bogc(3), "frozen": optax.identity()}, labels)
    else:
        tx = optax.partition({"bogc": bj.bogc(3), "frozen": optax.identity()}, labels)
    bare = bj.bogc(3, mask=head_only(PARAMS))
    step = jax.jit(lambda g, s, st: tx.update(g, s, PARAMS, grad_stats=st))
    out, state = step(grads, tx.init(PARAMS), stats)
    expected, _ = bare.update(grads, bare.init(PARAMS), PARAMS, grad_stats=stats)
    allclose(out, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out["enc"], grads["enc"])
    assert not np.allclose(out["head"], grads["head"])
    finite = optax.tree.get(state, "finite")
    assert bool(finite)
