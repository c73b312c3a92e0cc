"""bj.multi_steps: k accumulated micro-batches give the update of their union."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bogc_jax as bj

LABELS = {"enc0": 0, "enc1": 1, "head": None}
SOURCES = 3


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "enc0": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
        "enc1": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
        "head": jnp.asarray(rng.normal(size=(10, 2)), jnp.float32),
    }


def make_batch(seed, n):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    return (
        jnp.asarray(rng.normal(size=(n, 4)) + y[:, None], jnp.float32),
        jnp.asarray(rng.normal(size=(n, 3)) - 0.5 * y[:, None], jnp.float32),
        jnp.asarray(y, jnp.int32),
    )


def split(batch, sizes):
    edges = np.cumsum(sizes)[:-1]
    parts = [np.split(np.asarray(x), edges) for x in batch]
    return [tuple(jnp.asarray(p[i]) for p in parts) for i in range(len(sizes))]


def features(p, batch):
    x0, x1, y = batch
    return jnp.tanh(x0 @ p["enc0"]), jnp.tanh(x1 @ p["enc1"]), y


def losses_fn(p, batch):
    h0, h1, y = features(p, batch)
    ce = optax.softmax_cross_entropy_with_integer_labels
    fused = jnp.concatenate([h0, h1], -1) @ p["head"]
    return jnp.stack([ce(fused, y), ce(h0 @ p["head"][:5], y), ce(h1 @ p["head"][5:], y)])


def accuracy_scores(p, batch):
    h0, h1, y = features(p, batch)
    return jnp.stack(
        [bj.metrics.accuracy(h0 @ p["head"][:5], y), bj.metrics.accuracy(h1 @ p["head"][5:], y)]
    )


def confidence_scores(p, batch):
    h0, h1, y = features(p, batch)
    return jnp.stack(
        [bj.metrics.confidence(h0 @ p["head"][:5], y), bj.metrics.confidence(h1 @ p["head"][5:], y)]
    )


def mean_grads(p, batch):
    return jax.grad(lambda q: jnp.sum(jnp.mean(losses_fn(q, batch), axis=1)))(p)


def extras(family, p, batch):
    """``(grads, extra_args)`` of one (micro-)batch for a family."""
    if family in ("bogc", "mmpareto"):
        stats = bj.source_grad_stats(losses_fn, p, batch, method="vmap")
        return stats.fixed_weight_grads(), {"grad_stats": stats}
    scores = accuracy_scores if family == "cggm" else confidence_scores
    return mean_grads(p, batch), {"modality_scores": scores(p, batch)}


def inner_tx(family):
    first = {
        "bogc": lambda: bj.bogc(SOURCES),
        "mmpareto": lambda: bj.mmpareto(LABELS),
        "cggm": lambda: bj.cggm(LABELS, rho=1.3),
        "ogm_ge": lambda: bj.ogm_ge(LABELS, alpha=0.5, key=4),
    }[family]()
    return optax.chain(first, optax.adam(1e-2))


def assert_close(a, b, rtol=2e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


_bogc_update = jax.jit(bj.bogc(SOURCES).update)
_stats = jax.jit(lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="vmap"))
_accumulators = {k: bj.multi_steps(bj.bogc(SOURCES), k, num_sources=SOURCES) for k in range(1, 4)}
_accumulate = {k: jax.jit(tx.update) for k, tx in _accumulators.items()}


@pytest.mark.parametrize("family", ["bogc", "mmpareto", "cggm", "ogm_ge"])
def test_k_micro_batches_equal_one_big_batch(family):
    """Two windows of k = 4 micro-batches of 8 against two steps on batches of 32."""
    k, micro = 4, 8
    inner = inner_tx(family)
    tx = bj.multi_steps(inner_tx(family), k, num_sources=SOURCES, num_modalities=2)
    params_big = params_acc = init_params()
    state_big, state_acc = inner.init(params_big), tx.init(params_acc)
    traces = []

    @jax.jit
    def acc_step(params, state, batch):
        traces.append(1)
        grads, extra = extras(family, params, batch)
        return tx.update(grads, state, params, **extra)

    @jax.jit
    def big_step(params, state, batch):
        grads, extra = extras(family, params, batch)
        return inner.update(grads, state, params, **extra)

    for window in range(2):
        big = make_batch(window, k * micro)
        big_updates, state_big = big_step(params_big, state_big, big)
        params_big = optax.apply_updates(params_big, big_updates)
        for j, batch in enumerate(split(big, [micro] * k)):
            updates, state_acc = acc_step(params_acc, state_acc, batch)
            if j < k - 1:
                assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
            params_acc = optax.apply_updates(params_acc, updates)
        assert_close(updates, big_updates)
        assert_close(state_acc.inner.inner_opt_state, state_big)
    assert len(traces) == 1  # stable state: one compilation for all 8 calls
    assert int(state_acc.inner.gradient_step) == 2


def test_plain_multisteps_loses_the_statistics():
    """The problem multi_steps solves: optax.MultiSteps sees only the last micro-batch."""
    k, micro = 4, 8
    inner = inner_tx("bogc")
    params = init_params()
    big = make_batch(0, k * micro)
    stats = _stats(params, big)
    want, _ = jax.jit(inner.update)(
        stats.fixed_weight_grads(), inner.init(params), params, grad_stats=stats
    )
    outs = {}
    for name, tx in (
        ("optax", optax.MultiSteps(inner_tx("bogc"), k)),
        ("bj", bj.multi_steps(inner_tx("bogc"), k, num_sources=SOURCES)),
    ):
        state, update = tx.init(params), jax.jit(tx.update)
        for batch in split(big, [micro] * k):
            s = _stats(params, batch)
            outs[name], state = update(s.fixed_weight_grads(), state, params, grad_stats=s)
    assert_close(outs["bj"], want)
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(outs["optax"]), jax.tree.leaves(want))
    )
    assert diff > 1e-3


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(
    sizes=st.lists(st.sampled_from([3, 8]), min_size=1, max_size=3), seed=st.integers(0, 1000)
)
def test_unequal_micro_batches_exact_for_bogc(sizes, seed):
    """bogc's correction depends on the merged statistics only: exact for any sizes.

    bogc corrects the gradient it receives (MultiSteps' mean of the micro-batch gradients)
    by the calibration of the merged statistics.
    """
    params = init_params(seed)
    big = make_batch(seed, sum(sizes))
    stats = _stats(params, big)
    calibrated, _ = _bogc_update(
        stats.fixed_weight_grads(), bj.bogc(SOURCES).init(params), params, grad_stats=stats
    )
    state = _accumulators[len(sizes)].init(params)
    received = []
    for batch in split(big, sizes):
        s = _stats(params, batch)
        received.append(s.fixed_weight_grads())
        updates, state = _accumulate[len(sizes)](
            s.fixed_weight_grads(), state, params, grad_stats=s
        )
    averaged = jax.tree.map(lambda *g: sum(g) / len(g), *received)
    correction = jax.tree.map(jnp.subtract, calibrated, stats.fixed_weight_grads())
    want = jax.tree.map(jnp.add, averaged, correction)
    assert_close(updates, want, rtol=1e-4, atol=1e-6)
    # The window is over: the accumulators are back to zero.
    assert float(state.grad_stats.count) == 0.0
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.grad_stats.mean))


def test_none_leaves_pass_through_with_averaged_grads():
    """Leaves without statistics keep MultiSteps' averaged gradient (bogc passes them)."""
    params = init_params()
    tx = bj.multi_steps(bj.bogc(SOURCES), 2, num_sources=SOURCES)
    state, update = tx.init(params), jax.jit(tx.update)
    big = make_batch(3, 16)
    grads_seen = []
    for batch in split(big, [8, 8]):
        s = _stats(params, batch)
        s = bj.GradStats(s.count, dict(s.mean, head=None), dict(s.var, head=None))
        grads = s.fixed_weight_grads() | {"head": mean_grads(params, batch)["head"]}
        grads_seen.append(grads["head"])
        updates, state = update(grads, state, params, grad_stats=s)
    np.testing.assert_allclose(updates["head"], (grads_seen[0] + grads_seen[1]) / 2, rtol=1e-6)
    s = _stats(params, big)
    np.testing.assert_allclose(
        updates["enc0"],
        _bogc_update(s.fixed_weight_grads(), bj.bogc(SOURCES).init(params), params, grad_stats=s)[
            0
        ]["enc0"],
        rtol=1e-4,
        atol=1e-6,
    )


def test_errors_name_the_fix():
    params = init_params()
    batch = make_batch(0, 8)
    stats = _stats(params, batch)
    tx = bj.multi_steps(bj.bogc(SOURCES), 2)
    with pytest.raises(ValueError, match="num_sources"):
        tx.update(stats.fixed_weight_grads(), tx.init(params), params, grad_stats=stats)
    tx = bj.multi_steps(bj.cggm(LABELS), 2)
    with pytest.raises(ValueError, match="num_modalities"):
        tx.update(mean_grads(params, batch), tx.init(params), params, modality_scores=jnp.ones(2))
    tx = bj.multi_steps(bj.bogc(2), 2, num_sources=2)
    with pytest.raises(ValueError, match=r"expected \(2, 4, 5\)"):
        tx.update(stats.fixed_weight_grads(), tx.init(params), params, grad_stats=stats)
    tx = bj.multi_steps(bj.cggm(LABELS), 2, num_modalities=3)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        tx.update(mean_grads(params, batch), tx.init(params), params, modality_scores=jnp.ones(2))
    with pytest.raises(ValueError, match="num_sources must be a positive int"):
        bj.multi_steps(bj.bogc(2), 2, num_sources=0)
