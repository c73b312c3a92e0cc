"""bj.ogm_ge and bj.mmpareto: coefficients, noise statistics, Pareto combination."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import bogc_jax as bj


def encoders_and_head(num_modalities, shapes=((5, 3), (4,)), seed=0):
    """Params with ``num_modalities`` encoders (leaves of ``shapes``) and a shared head."""
    rng = np.random.default_rng(seed)
    params = {
        "enc": [
            {f"p{k}": jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in enumerate(shapes)}
            for _ in range(num_modalities)
        ],
        "head": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
    }
    labels = bj.label_params(params, {"enc": bj.labels.INDEX, "head": None})
    return params, labels


# --- OGM-GE --------------------------------------------------------------------------


def official_ogm_coefficients(score_a, score_v, alpha):
    """Transcription of the official two-modality rule (main.py, OGM-GE_CVPR2022):
    ratio_v = score_v / score_a; if ratio_v > 1 the visual coefficient is
    1 - tanh(alpha * relu(ratio_v)) and audio's is 1; otherwise audio's is
    1 - tanh(alpha * relu(1 / ratio_v)) and visual's is 1."""
    ratio_v = score_v / score_a
    if ratio_v > 1:
        return 1.0, 1 - math.tanh(alpha * max(ratio_v, 0.0))
    return 1 - math.tanh(alpha * max(1 / ratio_v, 0.0)), 1.0


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 5), st.integers(0, 2**31 - 1), st.sampled_from(["continuous", "reference"]))
def test_ogm_dominant_modality_is_slowed_and_others_are_exactly_one(m, seed, mode):
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.05, 1.0, m).astype(np.float32)
    k, j, ratio = bj.ogm_ge_coefficients(jnp.asarray(scores), alpha=0.5, mode=mode)
    k = np.asarray(k)
    assert int(j) == int(np.argmax(scores))
    assert k[int(j)] < 1.0 and k[int(j)] > 0.0
    assert np.all(np.delete(k, int(j)) == 1.0)
    others = np.delete(scores, int(j)).mean()
    assert float(ratio) == pytest.approx(scores[int(j)] / others, rel=1e-6)
    r = scores[int(j)] / np.float64(others)
    expected = 1 - np.tanh(0.5 * (r - 1)) if mode == "continuous" else 1 - np.tanh(0.5 * r)
    assert k[int(j)] == pytest.approx(float(expected), rel=1e-5)


def test_ogm_reference_mode_matches_the_official_two_modality_rule():
    rng = np.random.default_rng(0)
    for _ in range(20):
        score_a, score_v = rng.uniform(1.0, 30.0, 2)  # sums of true-class probabilities
        alpha = rng.uniform(0.05, 1.0)
        k, _, _ = bj.ogm_ge_coefficients(jnp.array([score_a, score_v]), alpha, "reference")
        np.testing.assert_allclose(
            k, official_ogm_coefficients(score_a, score_v, alpha), rtol=1e-5, atol=1e-7
        )


def test_ogm_continuous_mode_is_neutral_at_parity():
    k, _, ratio = bj.ogm_ge_coefficients(jnp.full(3, 0.4), alpha=0.8)
    np.testing.assert_array_equal(k, 1.0)
    assert float(ratio) == 1.0
    k, _, ratio = bj.ogm_ge_coefficients(jnp.zeros(2), alpha=0.8)  # no NaN
    np.testing.assert_array_equal(k, 1.0)


def test_ogm_without_noise_scales_only_the_dominant_encoder():
    params, labels = encoders_and_head(3)
    tx = bj.ogm_ge(labels, alpha=0.5, noise=False)
    updates, state = tx.update(
        params, tx.init(params), params, modality_scores=jnp.array([0.2, 0.7, 0.3])
    )
    k = np.asarray(state.coefficients)
    assert int(state.dominant) == 1 and k[1] < 1
    for i in range(3):
        for name, g in params["enc"][i].items():
            if i == 1:
                np.testing.assert_allclose(updates["enc"][i][name], g * k[1], rtol=1e-6)
            else:
                np.testing.assert_array_equal(updates["enc"][i][name], g)
    np.testing.assert_array_equal(updates["head"]["w"], params["head"]["w"])


def test_ge_noise_has_the_gradients_own_standard_deviation():
    """Noise = update - k * grad; its std must equal std(grad) (ddof=1) + 1e-8 per leaf."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    n = 20_000
    grads = {
        "enc": [
            {"w": jnp.asarray(rng.normal(0.3, 0.01, n), jnp.float32)},
            {"w": jnp.asarray(rng.normal(-2.0, 7.0, n), jnp.float32)},
        ],
        "head": jnp.asarray(rng.normal(size=50), jnp.float32),
    }
    labels = {"enc": [{"w": 0}, {"w": 1}], "head": None}
    tx = bj.ogm_ge(labels, alpha=0.7, key=123)
    state = tx.init(grads)
    scores = jnp.array([0.9, 0.3])  # modality 0 dominant: its gradient is also scaled
    updates, state2 = jax.jit(tx.update)(grads, state, grads, modality_scores=scores)
    k = np.asarray(state2.coefficients)
    assert k[0] < 1 and k[1] == 1
    for i in range(2):
        g = np.asarray(grads["enc"][i]["w"], np.float64)
        noise = np.asarray(updates["enc"][i]["w"], np.float64) - k[i] * g
        sigma = g.std(ddof=1) + 1e-8
        se = sigma / math.sqrt(2 * (n - 1))  # standard error of a sample std
        assert abs(noise.std(ddof=1) - sigma) < 5 * se, (i, noise.std(), sigma)
        assert abs(noise.mean()) < 5 * sigma / math.sqrt(n)
        assert stats.kstest(noise / sigma, "norm").pvalue > 1e-3
    np.testing.assert_array_equal(updates["head"], grads["head"])  # shared: no noise
    # The key advances: the next update draws fresh noise; the same state repeats it.
    again, _ = jax.jit(tx.update)(grads, state, grads, modality_scores=scores)
    nxt, _ = jax.jit(tx.update)(grads, state2, grads, modality_scores=scores)
    np.testing.assert_array_equal(again["enc"][1]["w"], updates["enc"][1]["w"])
    assert not np.allclose(nxt["enc"][1]["w"], updates["enc"][1]["w"])


def test_ogm_errors():
    params, labels = encoders_and_head(2)
    tx = bj.ogm_ge(labels)
    with pytest.raises(ValueError, match="modality_scores"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="mode"):
        bj.ogm_ge(labels, mode="paper")


# --- MMPareto ------------------------------------------------------------------------


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
