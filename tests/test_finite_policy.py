"""The non-finite policy, written once: what ``finite`` covers, for every transform.

An update is used only when its inputs are finite and in their domain and its outputs are
finite; otherwise the incoming gradients pass, the state keeps its previous value and
``state.finite`` is False. Evidence cannot overflow, and infinite hyper-parameters are
refused when the transform is built.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bogc_jax as bj
from bogc_jax import _finite


class Toy(NamedTuple):
    value: jax.Array
    finite: jax.Array
    nonfinite_count: jax.Array


def toy_transform(scale_of_extra):
    def core(updates, state, params=None, *, x=1.0, ok=True, **extra):
        del params, extra
        new = jax.tree.map(lambda g: g * x * scale_of_extra, updates)
        return _finite.Step(new, state._replace(value=state.value + x), inputs=(updates,), valid=ok)

    return _finite.finite_guarded(core)


def test_the_policy_skips_bad_inputs_bad_domains_and_bad_outputs():
    update = jax.jit(toy_transform(1.0))
    state = Toy(jnp.float32(0.0), *_finite.initial_flags())
    g = {"a": jnp.ones(2)}
    out, state = update(g, state, x=2.0)
    assert bool(state.finite) and float(state.value) == 2.0
    np.testing.assert_array_equal(out["a"], 2.0)
    for kwargs in ({"x": jnp.inf}, {"x": 3e38 * 1e1}, {"ok": False}):
        out, new = update(g, state, **kwargs)
        np.testing.assert_array_equal(out["a"], g["a"])  # the incoming gradient
        assert not bool(new.finite) and float(new.value) == 2.0
        assert int(new.nonfinite_count) == int(state.nonfinite_count) + 1
        state = new
    # An output that overflows from finite inputs is flagged too.
    overflow = jax.jit(toy_transform(1e30))
    out, new = overflow({"a": jnp.full(2, 1e30)}, state, x=1e10)
    assert not bool(new.finite)
    np.testing.assert_array_equal(out["a"], jnp.full(2, 1e30))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from(["float32", "float16", "bfloat16", "complex64", "float64"]),
    bad=st.sampled_from([None, np.inf, -np.inf, np.nan]),
    scale=st.sampled_from([1.0, 1e-40, 1e30]),
    seed=st.integers(0, 2**16),
)
def test_all_finite_is_numpy_isfinite_all(shape, dtype, bad, scale, seed):
    """The guard's check flags exactly the arrays numpy finds a non-finite entry in,
    whatever the dtype, the shape (empty ones too) and the scale of the finite ones."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float64)
    if bad is not None and x.size:
        x.reshape(-1)[rng.integers(x.size)] = bad
    if dtype == "float64" and not jax.config.jax_enable_x64:
        dtype = "float32"
    array = jnp.asarray(x).astype(dtype)
    as_numpy = np.asarray(array if dtype == "complex64" else array.astype(jnp.float32))
    want = bool(np.all(np.isfinite(as_numpy)))  # after the cast (float16 overflows at 65504)
    assert bool(jax.jit(_finite.all_finite)({"a": array, "b": None})) == want
    assert bool(_finite.all_finite(array, 1.0, [array])) == want


@pytest.mark.parametrize(
    "num_sources,gamma,aggregation",
    [(10, 40.0, "dempster"), (3, 100.0, "dempster"), (3, 100.0, "dimension_frame")],
)
def test_evidence_never_overflows(num_sources, gamma, aggregation):
    """One source far more precise than the others: e = (lam / mean lam)**gamma overflows."""
    mean = jnp.ones((num_sources, 4))
    var = jnp.ones((num_sources, 4)).at[0].set(1e-6)
    stats = bj.GradStats(jnp.float32(8), {"w": mean}, {"w": var})
    grads = stats.fixed_weight_grads()
    params = {"w": jnp.zeros(4)}
    tx = bj.bogc(num_sources, gamma=gamma, aggregation=aggregation)
    out, state = jax.jit(tx.update)(grads, tx.init(params), params, grad_stats=stats)
    assert bool(state.finite)
    assert np.all(np.isfinite(out["w"])) and np.all(np.isfinite(state.source_weights["w"]))
    # All the weight goes to the precise source: |T| * mean_0 = num_sources.
    np.testing.assert_allclose(out["w"], num_sources, rtol=1e-4)
    w, _, _ = bj.coordinate_weights(mean, var, 8, gamma=gamma, aggregation=aggregation)
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(np.sum(w, axis=0), 1.0, rtol=1e-5)


def test_log_evidence_matches_evidence_where_both_are_finite():
    rng = np.random.default_rng(0)
    lam = jnp.asarray(rng.exponential(size=(3, 5)), jnp.float32)
    touched = jnp.asarray(rng.random((3, 5)) < 0.8)
    for kappa, gamma in [(1.0, 1.0), (2.5, 3.0), (0.0, 2.0), (1.0, 0.0)]:
        e = bj.evidence.evidence(lam, touched, kappa, gamma)
        log_e = bj.evidence.log_evidence(lam, touched, kappa, gamma)
        np.testing.assert_allclose(jnp.exp(log_e), e, rtol=1e-5, atol=1e-30)
        m, m_theta = bj.evidence.fuse_simple_supports(e)
        m_log, m_theta_log = bj.evidence.fuse_log_simple_supports(log_e)
        np.testing.assert_allclose(m_log, m, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(m_theta_log, m_theta, rtol=1e-5, atol=1e-7)
        b, u = bj.evidence.dirichlet_opinion(e)
        b_log, u_log = bj.evidence.dirichlet_opinion_from_log(log_e)
        np.testing.assert_allclose(b_log, b, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(u_log, u, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "build",
    [
        lambda: bj.bogc(2, kappa=float("inf")),
        lambda: bj.bogc(2, gamma=np.inf),
        lambda: bj.cggm({"a": 0, "b": 1}, rho=float("inf")),
        lambda: bj.mmpareto({"a": 0, "b": 1}, gamma=float("inf")),
        lambda: bj.ogm_ge({"a": 0, "b": 1}, alpha=float("inf")),
    ],
    ids=["bogc_kappa", "bogc_gamma", "cggm_rho", "mmpareto_gamma", "ogm_ge_alpha"],
)
def test_infinite_hyperparameters_are_refused(build):
    with pytest.raises(ValueError, match="finite"):
        build()


def test_negative_variance_is_flagged():
    stats = bj.GradStats(
        jnp.float32(8),
        {"w": jnp.array([[1.0, 2.0], [0.5, 1.0]])},
        {"w": jnp.array([[1.0, -0.5], [1.0, 1.0]])},
    )
    grads = stats.fixed_weight_grads()
    params = {"w": jnp.zeros(2)}
    tx = bj.bogc(2)
    out, state = tx.update(grads, tx.init(params), params, grad_stats=stats)
    assert not bool(state.finite) and int(state.nonfinite_count) == 1
    np.testing.assert_array_equal(out["w"], grads["w"])


PARAMS = {"a": jnp.ones(3), "b": jnp.ones(2), "head": jnp.ones(2)}
LABELS = {"a": 0, "b": 1, "head": None}


@pytest.mark.parametrize("scores", [[0.5, -0.1], [0.5, -0.4], [-0.2, 0.6]])
def test_ogm_ge_flags_negative_scores(scores):
    tx = bj.ogm_ge(LABELS, alpha=1.0, noise=False)
    state = tx.init(PARAMS)
    out, new = tx.update(PARAMS, state, PARAMS, modality_scores=jnp.asarray(scores))
    assert not bool(new.finite)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(PARAMS)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(new.coefficients, state.coefficients)
    k, _, ratio = bj.ogm_ge_coefficients(jnp.asarray(scores))
    assert np.all(np.isnan(k)) and np.isnan(ratio)


@pytest.mark.parametrize("metric", ["accuracy", "sign_accuracy", "dice", "confidence"])
def test_cggm_and_ogm_ge_flag_scores_of_nan_logits(metric):
    nan = jnp.full((4, 3), jnp.nan)
    labels = jnp.array([0, 1, 2, 0])
    score = {
        "accuracy": lambda: bj.metrics.accuracy(nan, labels),
        "sign_accuracy": lambda: bj.metrics.sign_accuracy(nan[:, 0], jnp.ones(4)),
        "dice": lambda: bj.metrics.dice(jnp.full((1, 2, 2, 4), jnp.nan), jnp.zeros((1, 2, 2), int)),
        "confidence": lambda: bj.metrics.confidence(nan, labels),
    }[metric]()
    assert np.isnan(score)
    for tx in (bj.cggm(LABELS), bj.ogm_ge(LABELS, noise=False)):
        state = tx.init(PARAMS)
        out, new = tx.update(PARAMS, state, PARAMS, modality_scores=jnp.stack([score, 0.5]))
        assert not bool(new.finite)
        for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(PARAMS)):
            np.testing.assert_array_equal(x, y)
