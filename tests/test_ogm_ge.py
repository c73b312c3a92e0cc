"""bj.ogm_ge: coefficients against the official rule, modulation, Gaussian enhancement."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import bogc_jax as bj
from tests._two_encoders import encoders_and_head


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
