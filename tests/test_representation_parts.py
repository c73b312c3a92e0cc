"""Head posteriors, representation-gradient moments and source weights, on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bogc_jax import head_posterior as hp
from bogc_jax import representation_moments as rm
from bogc_jax import representation_weights as rw


def _inputs(loss, seed, batch=9, dim=4, num_out=3):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (batch, dim), jnp.float64)
    width = dim if loss == "mse" else dim + 1
    theta = 0.5 * jax.random.normal(k[1], (num_out, width), jnp.float64)
    if loss == "softmax":
        y = jax.random.randint(k[2], (batch,), 0, num_out)
    elif loss == "sigmoid":
        y = jax.random.bernoulli(k[2], 0.5, (batch, num_out)).astype(jnp.float64)
    else:
        y = jax.random.normal(k[2], (batch, num_out), jnp.float64)
    return h, theta, y


def _nll(loss, theta, h, y):
    x = hp.design(h, loss)
    logits = x @ theta.T
    if loss == "softmax":
        return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(h.shape[0]), y])
    if loss == "sigmoid":
        return jnp.sum(jnp.logaddexp(0, logits) - y * logits)
    return 0.5 * jnp.sum(jnp.square(logits - y))


@pytest.mark.parametrize("loss", ["softmax", "sigmoid", "mse"])
def test_curvature_stats_match_autodiff(loss):
    """grad = d nll / d theta; full GGN = J^T H_out J; diag = its diagonal."""
    with jax.enable_x64(True):
        h, theta, y = _inputs(loss, 1)
        full = hp.curvature_stats(loss, "full", theta, h, y)
        diag = hp.curvature_stats(loss, "diag", theta, h, y)
        np.testing.assert_allclose(full.grad, jax.grad(_nll, 1)(loss, theta, h, y), rtol=1e-10)
        # The GGN of the (convex in the logits) nll of a linear model is its Hessian.
        size = theta.size
        hess = jax.hessian(lambda t: _nll(loss, t.reshape(theta.shape), h, y))(theta.reshape(-1))
        if loss == "softmax":
            ggn = full.ggn
        elif loss == "sigmoid":
            ggn = jax.scipy.linalg.block_diag(*full.ggn)
        else:
            ggn = jnp.kron(jnp.eye(theta.shape[0]), full.ggn)
        np.testing.assert_allclose(ggn, hess.reshape(size, size), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(diag.ggn.reshape(-1), jnp.diagonal(ggn), rtol=1e-10)


@pytest.mark.parametrize("form", ["full", "diag"])
def test_mse_posterior_is_exact_from_any_start(form):
    """One Newton step of a quadratic is its minimiser: the start does not matter."""
    with jax.enable_x64(True):
        h, theta, y = _inputs("mse", 2)
        prior = hp.isotropic_prior("mse", form, 3, 4, 0.7, jnp.float64)
        a = hp.head_posterior("mse", theta, h, y, prior, form=form)
        b = hp.head_posterior("mse", 5 * theta + 1, h, y, prior, form=form)
        if form == "full":
            np.testing.assert_allclose(a.mean, b.mean, rtol=1e-10)
            exact = jnp.linalg.solve(h.T @ h + jnp.eye(4) / 0.7, h.T @ y).T
            np.testing.assert_allclose(a.mean, exact, rtol=1e-10)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_samples_have_the_posterior_covariance(loss):
    with jax.enable_x64(True):
        h, theta, y = _inputs(loss, 3, num_out=2, dim=2)
        post = hp.full_data_posterior(loss, theta, h, y, prior_variance=0.5, form="full")
        draws = hp.sample(loss, "full", post, jax.random.key(0), 20000).reshape(20000, -1)
        cov = hp.covariance(loss, "full", post)
        np.testing.assert_allclose(jnp.cov(draws.T), cov, atol=0.05 * float(jnp.max(cov)))
        np.testing.assert_allclose(draws.mean(0), post.mean.reshape(-1), atol=0.05)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_monte_carlo_streaming_equals_direct_moments(chunk):
    """Chunked (with a remainder) Chan merges give the direct mean and population variance."""
    with jax.enable_x64(True):
        h, theta, y = _inputs("sigmoid", 4)
        draws = theta + 0.3 * jax.random.normal(jax.random.key(5), (50,) + theta.shape, jnp.float64)
        m = rm.monte_carlo_moments("sigmoid", h, y, draws=draws, chunk_size=chunk)
        g = jax.vmap(lambda t: rm.input_gradients("sigmoid", t, h, y))(draws)
        np.testing.assert_allclose(m.mean, g.mean(0), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(m.var, g.var(0), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("form", ["full", "diag"])
def test_mse_exact_moments_match_monte_carlo(form):
    with jax.enable_x64(True):
        h, theta, y = _inputs("mse", 6)
        post = hp.full_data_posterior("mse", theta, h, y, prior_variance=0.3, form=form)
        exact = rm.mse_moments(post, h, y, form=form)
        mc = rm.monte_carlo_moments(
            "mse",
            h,
            y,
            posterior=post,
            form=form,
            key=jax.random.key(1),
            num_samples=20000,
            chunk_size=5000,
        )
        se = jnp.sqrt(exact.var / 20000)
        assert float(jnp.max(jnp.abs(mc.mean - exact.mean) / se)) < 5
        np.testing.assert_allclose(mc.var, exact.var, rtol=0.1)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_linearized_moments_match_monte_carlo_for_a_narrow_posterior(loss):
    with jax.enable_x64(True):
        h, theta, y = _inputs(loss, 7)
        post = hp.HeadPosterior(theta, jnp.full(theta.shape, 1e4, jnp.float64))
        lin = rm.linearized_moments(loss, post, h, y)
        mc = rm.monte_carlo_moments(
            loss,
            h,
            y,
            posterior=post,
            form="diag",
            key=jax.random.key(2),
            num_samples=8000,
            chunk_size=2000,
        )
        np.testing.assert_allclose(lin.var, mc.var, rtol=0.15, atol=1e-3 * float(mc.var.max()))
        np.testing.assert_allclose(lin.mean, mc.mean, atol=5e-3)


def test_linearized_rejects_full_posterior():
    with jax.enable_x64(True):
        h, theta, y = _inputs("softmax", 0)
        prior = hp.isotropic_prior("softmax", "full", 3, 5, 1.0)
        with pytest.raises(ValueError, match="diag"):
            rm.linearized_moments("softmax", prior, h, y)


def test_full_softmax_refuses_huge_heads():
    with pytest.raises(ValueError, match="form='diag'"):
        hp.isotropic_prior("softmax", "full", 50, 1025, 1.0)


arrays = st.integers(0, 2**31 - 1)


@settings(max_examples=8, deadline=None)
@given(
    seed=arrays, sources=st.integers(2, 4), aggregation=st.sampled_from(["precision", "dempster"])
)
def test_weights_equal_variances_give_the_sum(seed, sources, aggregation):
    k = jax.random.split(jax.random.key(seed), 2)
    mean = jax.random.normal(k[0], (sources, 3, 5))
    var = jnp.broadcast_to(jnp.abs(jax.random.normal(k[1], (1, 3, 5))), mean.shape)
    out, w, _ = rw.calibrate(mean, var, aggregation=aggregation)
    np.testing.assert_allclose(out, mean.sum(0), rtol=1e-5, atol=1e-6)
    # p = 0 and kappa = 0 ignore the variances altogether.
    var = jnp.abs(jax.random.normal(k[1], mean.shape)) + 0.1
    np.testing.assert_allclose(
        rw.calibrate(mean, var, aggregation=aggregation, power=0.0)[0],
        mean.sum(0),
        rtol=1e-5,
        atol=1e-6,
    )
    if aggregation == "dempster":
        np.testing.assert_allclose(
            rw.calibrate(mean, var, kappa=0.0)[0], mean.sum(0), rtol=1e-5, atol=1e-6
        )


@settings(max_examples=8, deadline=None)
@given(
    seed=arrays,
    aggregation=st.sampled_from(["precision", "dempster"]),
    p=st.sampled_from([0.1, 0.5, 1.0]),
)
def test_weights_permutation_and_monotonicity(seed, aggregation, p):
    k = jax.random.split(jax.random.key(seed), 3)
    mean = jax.random.normal(k[0], (3, 4, 6))
    var = jnp.exp(jax.random.normal(k[1], (3, 4, 6)))
    out, w, _ = rw.calibrate(mean, var, aggregation=aggregation, power=p)
    perm = jnp.array([2, 0, 1])
    out_p, w_p, _ = rw.calibrate(mean[perm], var[perm], aggregation=aggregation, power=p)
    np.testing.assert_allclose(out_p, out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w_p, w[perm], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-5)
    # Raising source 0's variance never raises its weight.
    factor = 1 + jnp.exp(jax.random.normal(k[2], (4, 6)))
    _, w_up, _ = rw.calibrate(mean, var.at[0].multiply(factor), aggregation=aggregation, power=p)
    assert bool(jnp.all(w_up[0] <= w[0] * (1 + 1e-5) + 1e-7))


def test_one_source_passes_through():
    mean = jax.random.normal(jax.random.key(0), (1, 3, 4))
    for aggregation in ("precision", "dempster"):
        for scale in ("sum", "mean"):
            out, _, _ = rw.calibrate(
                mean, jnp.ones_like(mean) * 7, aggregation=aggregation, scale=scale
            )
            np.testing.assert_array_equal(out, mean[0])
