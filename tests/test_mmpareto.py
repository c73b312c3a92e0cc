"""bj.mmpareto: the Pareto combination against the official update, and its pieces."""

import importlib

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import bogc_jax as bj
from tests._two_encoders import encoders_and_head

mp = importlib.import_module("bogc_jax.mmpareto")  # the module (bj.mmpareto is the transform)


def official_mmpareto(g_total, g_fusion, g_uni, gamma=1.5):
    """Transcription of the official per-encoder update (MMPareto.py, min_norm_solvers.py).

    Args are lists of per-tensor numpy arrays over one encoder. Cosine over the
    concatenation; (0.5, 0.5) if positive, else the two-task min-norm weights (0.999 if
    v12 >= v11, 0.001 if v12 >= v22, else -(v12 - v22) / (v11 + v22 - 2 v12)); per tensor
    new = 2 k0 g_fusion + 2 k1 g_uni, rescaled by |g_total| / |new| when that exceeds 1,
    then times gamma.
    """
    a = np.concatenate([x.ravel() for x in g_fusion])
    b = np.concatenate([x.ravel() for x in g_uni])
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    if cos > 0:
        k0 = k1 = 0.5
    else:
        v11, v12, v22 = a @ a, a @ b, b @ b
        if v12 >= v11:
            c = 0.999
        elif v12 >= v22:
            c = 0.001
        else:
            c = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))
        k0, k1 = c, 1 - c
    out = []
    for t, f, u in zip(g_total, g_fusion, g_uni):
        new = 2 * k0 * f + 2 * k1 * u
        diff = np.linalg.norm(t) / np.linalg.norm(new)
        out.append(diff * new * gamma if diff > 1 else new * gamma)
    return out


def random_stats(params, num_sources, rng, conflict_with=None):
    """GradStats with random per-source means; ``conflict_with=(s, t)`` makes t ~ -s."""

    def leaf(p):
        mean = rng.normal(size=(num_sources,) + p.shape)
        if conflict_with is not None:
            s, t = conflict_with
            mean[t] = -0.8 * mean[s] + 0.3 * mean[t]
        return jnp.asarray(mean, jnp.float32)

    mean = jax.tree.map(leaf, params)
    return bj.GradStats(jnp.float32(16), mean, jax.tree.map(jnp.ones_like, mean))


@pytest.mark.parametrize("conflict", [False, True])
def test_mmpareto_matches_the_official_update(conflict):
    rng = np.random.default_rng(5)
    params, labels = encoders_and_head(2)
    stats = random_stats(params, 3, rng, conflict_with=(0, 1) if conflict else None)
    grads = stats.fixed_weight_grads()
    tx = bj.mmpareto(labels)
    updates, state = tx.update(grads, tx.init(params), params, grad_stats=stats)
    for i in range(2):
        names = sorted(params["enc"][i])
        expected = official_mmpareto(
            [np.asarray(grads["enc"][i][n], np.float64) for n in names],
            [np.asarray(stats.mean["enc"][i][n][0], np.float64) for n in names],
            [np.asarray(stats.mean["enc"][i][n][1 + i], np.float64) for n in names],
        )
        for n, e in zip(names, expected):
            np.testing.assert_allclose(updates["enc"][i][n], e, rtol=2e-5, atol=1e-6)
    assert (float(state.cosines[0]) < 0) == conflict
    np.testing.assert_array_equal(updates["head"]["w"], grads["head"]["w"])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["leaf", "group"]))
def test_mmpareto_on_conflicting_gradients_is_a_common_descent_direction(seed, rescale):
    rng = np.random.default_rng(seed)
    dim = int(rng.integers(2, 12))
    g_f = rng.normal(size=dim)
    g_u = rng.normal(size=dim)
    if g_f @ g_u > 0:
        g_u = g_u - 2 * (g_f @ g_u) / (g_f @ g_f) * g_f  # reflect: now they conflict
    params = {"enc": [jnp.zeros(dim), jnp.zeros(dim)]}
    mean = {
        "enc": [
            jnp.asarray(np.stack([g_f, g_u, np.zeros(dim)]), jnp.float32),
            jnp.asarray(np.stack([g_u, np.zeros(dim), g_f]), jnp.float32),
        ]
    }
    stats = bj.GradStats(jnp.float32(4), mean, mean)
    tx = bj.mmpareto({"enc": [0, 1]}, rescale=rescale)
    updates, state = tx.update(
        stats.fixed_weight_grads(), tx.init(params), params, grad_stats=stats
    )
    for out in updates["enc"]:
        out = np.asarray(out, np.float64)
        assert np.linalg.norm(out) > 0
        assert out @ g_f >= -1e-5 * np.linalg.norm(out) * np.linalg.norm(g_f)
        assert out @ g_u >= -1e-5 * np.linalg.norm(out) * np.linalg.norm(g_u)
        # The rescaling restores at least gamma times the fixed-weight gradient's norm.
        assert np.linalg.norm(out) >= 1.5 * np.linalg.norm(g_f + g_u) * (1 - 1e-5)
    assert np.all(np.asarray(state.cosines) <= 0)


@pytest.mark.parametrize("factor", [-3.0, -2.7])
def test_mmpareto_never_zeroes_or_nans_opposite_gradients(factor):
    """Opposite gradients: the min-norm point is 0 (or rounding noise); fall back to g."""
    g = np.random.default_rng(8).normal(size=(4, 3)).astype(np.float32)
    params = {"a": jnp.zeros((4, 3)), "b": jnp.zeros((4, 3))}
    mean = {
        "a": jnp.asarray(np.stack([g, factor * g, 0 * g])),
        "b": jnp.asarray(np.stack([g, 0 * g, g])),
    }
    stats = bj.GradStats(jnp.float32(4), mean, mean)
    grads = stats.fixed_weight_grads()
    tx = bj.mmpareto({"a": 0, "b": 1})
    updates, state = tx.update(grads, tx.init(params), params, grad_stats=stats)
    assert float(state.cosines[0]) == pytest.approx(-1.0, abs=1e-6)
    np.testing.assert_allclose(updates["a"], 1.5 * np.asarray(grads["a"]), rtol=1e-6)
    assert np.all(np.isfinite(updates["b"])) and np.linalg.norm(updates["b"]) > 0


def test_mmpareto_custom_source_layout():
    rng = np.random.default_rng(6)
    params, labels = encoders_and_head(2)
    stats = random_stats(params, 3, rng)
    # Put the fusion source last: same statistics, permuted sources.
    perm = jax.tree.map(lambda m: m[jnp.array([1, 2, 0])], stats.mean)
    permuted = bj.GradStats(stats.count, perm, perm)
    grads = stats.fixed_weight_grads()
    a, _ = bj.mmpareto(labels).update(
        grads, bj.mmpareto(labels).init(params), params, grad_stats=stats
    )
    tx = bj.mmpareto(labels, fusion_source=2)
    b, _ = tx.update(grads, tx.init(params), params, grad_stats=permuted)
    tx = bj.mmpareto(labels, fusion_source=2, modality_sources=(0, 1))
    c, _ = tx.update(grads, tx.init(params), params, grad_stats=permuted)
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c)):
        np.testing.assert_allclose(x, y, rtol=1e-6)
        np.testing.assert_allclose(x, z, rtol=1e-6)


def test_mmpareto_errors():
    rng = np.random.default_rng(7)
    params, labels = encoders_and_head(2)
    tx = bj.mmpareto(labels)
    state = tx.init(params)
    with pytest.raises(ValueError, match="grad_stats"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match="4 sources"):
        tx.update(params, state, params, grad_stats=random_stats(params, 4, rng))
    stats = random_stats(params, 3, rng)
    holes = bj.GradStats(
        stats.count,
        {**stats.mean, "enc": [stats.mean["enc"][0], {"p0": None, "p1": None}]},
        stats.var,
    )
    with pytest.raises(ValueError, match=r"\['enc'\]\[1\]"):
        tx.update(params, state, params, grad_stats=holes)
    with pytest.raises(ValueError, match="rescale"):
        bj.mmpareto(labels, rescale="global")


# --- The pieces of the update, each on its own -----------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(-20, 20))
def test_gram_is_scale_free_and_matches_numpy(seed, log_scale):
    rng = np.random.default_rng(seed)
    f = [rng.normal(size=(3, 2)) * 10.0**log_scale, rng.normal(size=4) * 10.0**log_scale]
    u = [rng.normal(size=(3, 2)) * 10.0**log_scale, rng.normal(size=4) * 10.0**log_scale]
    g = mp.gram([jnp.asarray(x, jnp.float32) for x in f], [jnp.asarray(x, jnp.float32) for x in u])
    a = np.concatenate([x.ravel() for x in f])
    b = np.concatenate([x.ravel() for x in u])
    s = float(g.scale)
    np.testing.assert_allclose(float(g.v11) * s * s, a @ a, rtol=1e-5)
    np.testing.assert_allclose(float(g.v22) * s * s, b @ b, rtol=1e-5)
    np.testing.assert_allclose(float(g.v12) * s * s, a @ b, rtol=1e-4, atol=1e-5 * s * s)
    cos = float(mp.pair_cosine(g))
    np.testing.assert_allclose(cos, a @ b / np.linalg.norm(a) / np.linalg.norm(b), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_combination_weight_gives_the_min_norm_point_on_conflict(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=5), rng.normal(size=5)
    if a @ b > 0:
        b = -b
    g = mp.gram([jnp.asarray(a, jnp.float32)], [jnp.asarray(b, jnp.float32)])
    c = float(mp.combination_weight(mp.pair_cosine(g), g))
    grid = np.linspace(0, 1, 2001)
    norms = [np.linalg.norm(t * a + (1 - t) * b) for t in grid]
    best = grid[int(np.argmin(norms))]
    if 0.001 < best < 0.999:
        assert abs(c - best) < 2e-3
    d = np.asarray(mp.combine(c, [jnp.asarray(a)], [jnp.asarray(b)])[0])
    assert d @ a >= -1e-5 * np.linalg.norm(d) * np.linalg.norm(a)
    assert d @ b >= -1e-5 * np.linalg.norm(d) * np.linalg.norm(b)
    g_pos = mp.gram([jnp.asarray(a, jnp.float32)], [jnp.asarray(-b, jnp.float32)])
    assert float(mp.combination_weight(mp.pair_cosine(g_pos), g_pos)) == 0.5


def test_is_degenerate_only_for_opposite_collinear_gradients():
    a = jnp.array([1.0, 2.0, -0.5])
    across = jnp.array([2.0, -1.0, 0.0])  # orthogonal to a
    for b, expected in [(-a, True), (-0.5 * a, True), (-0.5 * a + across, False), (a, False)]:
        g = mp.gram([a], [b])
        c = mp.combination_weight(mp.pair_cosine(g), g)
        d = mp.combine(c, [a], [b])
        assert bool(mp.is_degenerate([x / g.scale for x in d], g)) == expected


@pytest.mark.parametrize("rescale", ["leaf", "group"])
def test_rescaled_restores_at_least_the_target_norm_times_gamma(rescale):
    rng = np.random.default_rng(0)
    d = [jnp.asarray(rng.normal(size=3), jnp.float32), jnp.asarray(rng.normal(size=2), jnp.float32)]
    target = [
        jnp.asarray(rng.normal(size=3) * 10, jnp.float32),
        jnp.asarray(rng.normal(size=2) * 10, jnp.float32),
    ]
    out = mp.rescaled(d, d, target, jnp.float32(1.0), jnp.bool_(False), 1.5, rescale)
    norm = lambda xs: np.sqrt(sum(float(jnp.sum(x * x)) for x in xs))
    if rescale == "group":
        np.testing.assert_allclose(norm(out), 1.5 * max(norm(target), norm(d)), rtol=1e-5)
    else:
        for o, dn, t in zip(out, d, target):
            np.testing.assert_allclose(norm([o]), 1.5 * max(norm([t]), norm([dn])), rtol=1e-5)
            cos = float(jnp.sum(o * dn)) / norm([o]) / norm([dn])
            assert cos == pytest.approx(1.0, abs=1e-6)  # the direction is d's
    fallback = mp.rescaled(d, d, target, jnp.float32(1.0), jnp.bool_(True), 1.5, rescale)
    for f, t in zip(fallback, target):
        np.testing.assert_allclose(f, 1.5 * t, rtol=1e-6)


def test_encoder_update_is_the_official_rule_on_one_encoder():
    rng = np.random.default_rng(1)
    f = [rng.normal(size=(2, 3)), rng.normal(size=4)]
    u = [-0.7 * f[0] + 0.2 * rng.normal(size=(2, 3)), rng.normal(size=4)]
    total = [x + y for x, y in zip(f, u)]
    out, cos, c = mp.encoder_update(
        [jnp.asarray(x, jnp.float32) for x in f],
        [jnp.asarray(x, jnp.float32) for x in u],
        [jnp.asarray(x, jnp.float32) for x in total],
        gamma=1.5,
        rescale="leaf",
    )
    expected = official_mmpareto(total, f, u)
    for o, e in zip(out, expected):
        np.testing.assert_allclose(o, e, rtol=2e-5, atol=1e-6)
    assert float(cos) < 0 and 0 < float(c) < 1
