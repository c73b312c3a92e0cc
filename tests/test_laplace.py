"""Tests of bj.laplace_grad_stats: shapes, limits, the Fisher formula, errors, with bogc.

The Fisher check uses quadratic losses, whose batch-mean gradient is linear in the
parameters, ``G(w) = A w - c``; under the posterior ``w' = w + eps / sqrt(F + delta)`` its
variance is exactly ``Var G_d = sum_j A_dj**2 / (F_j + delta)``, with ``F`` computed here
by hand from the per-example gradients.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bogc_jax as bj

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def mlp_problem(seed=0, batch_size=8):
    rng = np.random.default_rng(seed)
    params = {
        "body": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
        "heads": [
            {"w": rng.normal(size=(4,)).astype(np.float32), "b": np.float32(0.1)},
            {"w": rng.normal(size=(4, 2)).astype(np.float32)},
        ],
    }
    x = rng.normal(size=(batch_size, 3)).astype(np.float32)
    y = rng.normal(size=(batch_size,)).astype(np.float32)

    def losses_fn(p, batch):
        x, y = batch
        h = jnp.tanh(x @ p["body"]["w"])
        fused = h @ p["heads"][0]["w"] + p["heads"][0]["b"]
        uni = (h @ p["heads"][1]["w"]).sum(axis=1)
        return jnp.stack([(fused - y) ** 2, jnp.log1p((uni - y) ** 2)])

    mask = {"body": {"w": False}, "heads": [{"w": True, "b": True}, {"w": True}]}
    return params, (x, y), losses_fn, mask


@functools.cache
def jitted_laplace(losses_fn, mask_key, num_samples, damping, dataset_size=None, center="draws"):
    mask = jax.tree.unflatten(*mask_key)

    def fn(params, batch, key):
        return bj.laplace_grad_stats(
            losses_fn,
            params,
            batch,
            key,
            mask=mask,
            num_samples=num_samples,
            damping=damping,
            dataset_size=dataset_size,
            center=center,
            method="vmap",
        )

    return jax.jit(fn, compiler_options=FAST_COMPILE)


def exact_stats(losses_fn, params, batch):
    fn = lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="vmap")
    return jax.jit(fn, compiler_options=FAST_COMPILE)(params, batch)


def laplace(
    losses_fn,
    params,
    batch,
    key,
    mask,
    num_samples=8,
    damping=1.0,
    dataset_size=None,
    center="draws",
):
    leaves, treedef = jax.tree.flatten(mask)
    return jitted_laplace(
        losses_fn, (treedef, tuple(leaves)), num_samples, damping, dataset_size, center
    )(params, batch, key)


def test_shapes_dtypes_and_none_leaves():
    params, batch, losses_fn, mask = mlp_problem()
    stats = laplace(losses_fn, params, batch, jax.random.key(0), mask, num_samples=5)
    assert float(stats.count) == 5.0 and stats.count.dtype == jnp.float32
    assert stats.num_sources == 2
    assert stats.mean["body"]["w"] is None and stats.var["body"]["w"] is None
    for tree in (stats.mean, stats.var):
        assert tree["heads"][0]["w"].shape == (2, 4)
        assert tree["heads"][0]["b"].shape == (2,)
        assert tree["heads"][1]["w"].shape == (2, 4, 2)
        for leaf in jax.tree.leaves(tree):
            assert leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf))
    assert all(np.all(np.asarray(v) >= 0) for v in jax.tree.leaves(stats.var))
    # The fusion head is not reached by the unimodal source and vice versa.
    np.testing.assert_array_equal(stats.mean["heads"][0]["w"][1], 0.0)
    np.testing.assert_array_equal(stats.var["heads"][1]["w"][0], 0.0)
    # A callable mask gives the same statistics.
    by_fn = jax.jit(
        lambda p, b, k: bj.laplace_grad_stats(
            losses_fn,
            p,
            b,
            k,
            num_samples=5,
            method="vmap",
            mask=lambda q: {
                "body": {"w": False},
                "heads": jax.tree.map(lambda _: True, q["heads"]),
            },
        ),
        compiler_options=FAST_COMPILE,
    )(params, batch, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(by_fn), jax.tree.leaves(stats)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_same_key_same_draws_other_key_other_draws():
    params, batch, losses_fn, mask = mlp_problem()
    a = laplace(losses_fn, params, batch, jax.random.key(3), mask)
    b = laplace(losses_fn, params, batch, jax.random.key(3), mask)
    c = laplace(losses_fn, params, batch, jax.random.key(4), mask)
    np.testing.assert_array_equal(a.var["heads"][0]["w"], b.var["heads"][0]["w"])
    assert not np.allclose(a.var["heads"][0]["w"], c.var["heads"][0]["w"])


def test_infinite_damping_collapses_to_the_batch_mean_gradient():
    params, batch, losses_fn, mask = mlp_problem(seed=1)
    stats = laplace(losses_fn, params, batch, jax.random.key(1), mask, num_samples=4, damping=1e12)
    exact = exact_stats(losses_fn, params, batch)
    for path in (("heads", 0, "w"), ("heads", 0, "b"), ("heads", 1, "w")):
        got_mean, got_var, want = stats.mean, stats.var, exact.mean
        for k in path:
            got_mean, got_var, want = got_mean[k], got_var[k], want[k]
        scale = float(np.max(np.abs(want))) + 1e-6
        np.testing.assert_allclose(got_mean, want, rtol=1e-4, atol=1e-5 * scale)
        assert float(np.max(got_var)) <= 1e-9 * scale**2
    # Moderate damping does spread the draws.
    spread = laplace(losses_fn, params, batch, jax.random.key(1), mask, num_samples=4, damping=1.0)
    assert float(np.max(spread.var["heads"][0]["w"])) > 1e-4


def test_center_batch_keeps_the_batch_gradient_and_the_draws_variance():
    params, batch, losses_fn, mask = mlp_problem(seed=2)
    key = jax.random.key(5)
    draws = laplace(losses_fn, params, batch, key, mask, num_samples=6, damping=0.3)
    centred = laplace(
        losses_fn, params, batch, key, mask, num_samples=6, damping=0.3, center="batch"
    )
    exact = exact_stats(losses_fn, params, batch)
    is_none = lambda x: x is None
    for got, want, d_mean in zip(
        jax.tree.leaves(centred.mean, is_leaf=is_none),
        jax.tree.leaves(exact.mean),
        jax.tree.leaves(draws.mean, is_leaf=is_none),
    ):
        if got is None:
            assert d_mean is None
            continue
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert not np.allclose(d_mean, want, rtol=1e-3)  # the draws' average moved
    for a, b in zip(jax.tree.leaves(centred.var), jax.tree.leaves(draws.var)):
        np.testing.assert_array_equal(a, b)
    assert centred.count == draws.count == 6


def _quadratic_problem():
    rng = np.random.default_rng(7)
    n = 16
    x = rng.normal(size=(n, 3))
    y0 = rng.normal(size=n) + 2.0
    y1 = rng.normal(size=n) - 1.0
    w = np.array([1.0, -1.5, 0.5])
    body = rng.normal(size=(2, 2))
    params = {"w": w.astype(np.float32), "body": body.astype(np.float32)}
    batch = {"x": x.astype(np.float32), "y0": y0.astype(np.float32), "y1": y1.astype(np.float32)}

    def losses_fn(p, b):
        shift = 0.1 * jnp.tanh(b["x"][:, :2] @ p["body"]).sum(axis=1)  # constant in w
        r0 = b["x"] @ p["w"] + shift - b["y0"]
        r1 = 2.0 * b["x"][:, :2] @ p["w"][:2] - b["y1"]
        return jnp.stack([0.5 * r0**2, 0.5 * r1**2])

    # By hand, in float64: per-example gradients, Fisher, and the linear map A.
    shift = 0.1 * np.tanh(x[:, :2] @ body).sum(axis=1)
    r0 = x @ w + shift - y0
    x1 = np.concatenate([2.0 * x[:, :2], np.zeros((n, 1))], axis=1)
    r1 = x1 @ w - y1
    per_example = [x * r0[:, None], x1 * r1[:, None]]  # [n, 3] each
    fisher = [np.sum(g**2, axis=0) for g in per_example]  # F_s = sum_i g_si**2
    linear = [x.T @ x / n, x1.T @ x1 / n]  # G_s(w) = A_s w - c_s
    mean_grad = [g.mean(axis=0) for g in per_example]
    return params, batch, losses_fn, np.stack(fisher), np.stack(linear), np.stack(mean_grad)


@pytest.mark.parametrize(
    "damping, dataset_size", [(0.5, None), (20.0, None), (20.0, 16), (20.0, 400)]
)
def test_fisher_posterior_gives_the_predicted_gradient_variance(damping, dataset_size):
    params, batch, losses_fn, fisher, linear, mean_grad = _quadratic_problem()
    num_samples = 8192
    stats = laplace(
        losses_fn,
        params,
        batch,
        jax.random.key(11),
        {"w": True, "body": False},
        num_samples=num_samples,
        damping=damping,
        dataset_size=dataset_size,
    )
    assert stats.mean["body"] is None
    n = batch["x"].shape[0]
    # The batch Fisher stands for N examples: scaled by N / n (N = n by default).
    fisher = fisher * (n if dataset_size is None else dataset_size) / n
    predicted = np.einsum("sdj,sj->sd", linear**2, 1.0 / (fisher + damping))
    got_var = np.asarray(stats.var["w"], np.float64)
    got_mean = np.asarray(stats.mean["w"], np.float64)
    # Source 1 never reaches w[2]: exactly zero there.
    assert got_var[1, 2] == 0.0 and got_mean[1, 2] == 0.0
    touched = predicted > 0
    # Sample variance of 8192 Gaussian draws: relative standard error sqrt(2 / K) ~ 1.6%.
    np.testing.assert_allclose(got_var[touched], predicted[touched], rtol=0.08)
    np.testing.assert_array_less(
        np.abs(got_mean - mean_grad), 5 * np.sqrt(predicted / num_samples) + 1e-5
    )
    # The Fisher is the sum over examples of squared gradients, mean**2 term included: a
    # posterior from (n - 1) var alone, or from the mean of g**2, predicts another spread.
    if dataset_size is not None:
        return
    centred = fisher - n * mean_grad**2
    for wrong in (centred, fisher / n):
        other = np.einsum("sdj,sj->sd", linear**2, 1.0 / (wrong + damping))
        assert np.max(np.abs(other[touched] / predicted[touched] - 1)) > 0.3


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize("num_samples", [1, 0, 2.5, True])
def test_error_num_samples(num_samples):
    params, batch, losses_fn, mask = mlp_problem()
    with pytest.raises((ValueError, TypeError), match="num_samples"):
        bj.laplace_grad_stats(
            losses_fn, params, batch, jax.random.key(0), mask=mask, num_samples=num_samples
        )


@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan")])
def test_error_damping(damping):
    params, batch, losses_fn, mask = mlp_problem()
    with pytest.raises(ValueError, match="damping"):
        bj.laplace_grad_stats(
            losses_fn, params, batch, jax.random.key(0), mask=mask, damping=damping
        )


def test_error_center():
    params, batch, losses_fn, mask = mlp_problem()
    with pytest.raises(ValueError, match="center must be one of"):
        bj.laplace_grad_stats(losses_fn, params, batch, jax.random.key(0), mask=mask, center="mode")


@pytest.mark.parametrize("dataset_size", [0, -5, 2.5, True])
def test_error_dataset_size(dataset_size):
    params, batch, losses_fn, mask = mlp_problem()
    with pytest.raises((ValueError, TypeError), match="dataset_size"):
        bj.laplace_grad_stats(
            losses_fn, params, batch, jax.random.key(0), mask=mask, dataset_size=dataset_size
        )


def test_error_empty_or_malformed_mask():
    params, batch, losses_fn, mask = mlp_problem()
    nothing = jax.tree.map(lambda _: False, mask)
    with pytest.raises(ValueError, match="mask selects no parameter"):
        bj.laplace_grad_stats(losses_fn, params, batch, jax.random.key(0), mask=nothing)
    with pytest.raises(ValueError, match="mask must be a pytree of booleans"):
        bj.laplace_grad_stats(losses_fn, params, batch, jax.random.key(0), mask={"heads": True})


# ------------------------------------------------------------------- with bj.bogc


@pytest.mark.parametrize("aggregation", ["dempster", "precision", "dimension_frame"])
def test_bogc_calibrates_only_the_laplace_leaves(aggregation):
    params, batch, losses_fn, mask = mlp_problem(seed=2)
    stats = laplace(losses_fn, params, batch, jax.random.key(5), mask, num_samples=6)
    grads = exact_stats(losses_fn, params, batch).fixed_weight_grads()
    tx = optax.chain(bj.bogc(2, aggregation=aggregation))
    state = tx.init(params)
    update = jax.jit(tx.update, compiler_options=FAST_COMPILE)
    out, state = update(grads, state, params, grad_stats=stats)
    # The body has no statistics: its gradient passes through bit for bit.
    np.testing.assert_array_equal(out["body"]["w"], grads["body"]["w"])
    weights = optax.tree.get(state, "source_weights")
    np.testing.assert_array_equal(weights["body"]["w"], np.zeros(2))
    # The heads are calibrated: bogc adds to the incoming gradient the calibration of the
    # Laplace means minus their fixed-weight sum, the same as with an explicit mask.
    explicit = optax.chain(bj.bogc(2, aggregation=aggregation, mask=mask))
    out_explicit, _ = jax.jit(explicit.update, compiler_options=FAST_COMPILE)(
        grads, explicit.init(params), params, grad_stats=stats
    )
    for a, b in zip(jax.tree.leaves(out["heads"]), jax.tree.leaves(out_explicit["heads"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # The fusion head is touched by source 0 alone: no correction, the incoming gradient
    # passes through, and the fusion source's weight is 1.
    np.testing.assert_allclose(out["heads"][0]["w"], grads["heads"][0]["w"], rtol=1e-5, atol=1e-7)
    assert float(weights["heads"][0]["w"][0]) == pytest.approx(1.0, rel=1e-5)
