"""Tests of bj.source_grad_stats and bj.merge_grad_stats against a float64 loop.

The reference takes ``jax.grad`` of one source's loss on one example at a time, in a
plain Python loop, with 64-bit floats enabled, and forms the mean and the unbiased
variance in numpy float64.
"""

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import bogc_jax as bj

SETTINGS = hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# ------------------------------------------------------------------------- models
# Each model: init(rng, num_sources, dim) -> params, and losses(params, batch) -> [S, B]
# with batch = {"x": [B, dim], "y": [B, S]}.


def linear_init(rng, num_sources, dim):
    return {"w": rng.normal(size=dim), "b": rng.normal(size=())}


def linear_losses(params, batch):
    pred = batch["x"] @ params["w"] + params["b"]
    num_sources = batch["y"].shape[1]
    return jnp.stack([(s + 1.0) * (pred - batch["y"][:, s]) ** 2 for s in range(num_sources)])


def mlp_init(rng, num_sources, dim, hidden=4):
    return {
        "l1": {
            "w": rng.normal(size=(dim, hidden)) / np.sqrt(dim),
            "b": 0.1 * rng.normal(size=hidden),
        },
        "l2": {
            "w": rng.normal(size=(hidden, num_sources)) / 2.0,
            "b": 0.1 * rng.normal(size=num_sources),
        },
    }


def mlp_losses(params, batch):
    h = jnp.tanh(batch["x"] @ params["l1"]["w"] + params["l1"]["b"])
    out = h @ params["l2"]["w"] + params["l2"]["b"]  # [B, S]
    losses = (out - batch["y"]) ** 2
    # The last source only sees the first layer (a "unimodal" loss on a shared encoder).
    last = jnp.sum(h, axis=1) * batch["y"][:, -1]
    return jnp.concatenate([losses[:, :-1].T, last[None]], axis=0)


def nested_init(rng, num_sources, dim, hidden=3):
    return {
        "enc": [{"w": rng.normal(size=(dim, hidden))}, rng.normal(size=())],
        "heads": [
            {"v": rng.normal(size=hidden), "c": [rng.normal(size=(1,))]} for _ in range(num_sources)
        ],
    }


def nested_losses(params, batch):
    h = jnp.tanh(batch["x"] @ params["enc"][0]["w"]) * params["enc"][1]
    rows = []
    for s, head in enumerate(params["heads"]):
        pred = jnp.sin(h @ head["v"]) + head["c"][0][0]
        rows.append(jnp.log1p((pred - batch["y"][:, s]) ** 2))
    return jnp.stack(rows)


MODELS = {
    "linear": (linear_init, linear_losses),
    "mlp": (mlp_init, mlp_losses),
    "nested": (nested_init, nested_losses),
}


def make_problem(seed, model, num_sources, batch_size, dim):
    rng = np.random.default_rng(seed)
    init, losses = MODELS[model]
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), init(rng, num_sources, dim))
    batch = {
        "x": rng.normal(size=(batch_size, dim)).astype(np.float32),
        "y": rng.normal(size=(batch_size, num_sources)).astype(np.float32),
    }
    return params, batch, losses


# ---------------------------------------------------------------------- reference


@functools.cache
def _one_example_grad(losses_fn):
    def grad(params, example, select):
        one = jax.tree.map(lambda a: a[None], example)
        return jax.grad(lambda p: jnp.sum(losses_fn(p, one)[:, 0] * select))(params)

    return jax.jit(grad, compiler_options=FAST_COMPILE)


def reference_stats(losses_fn, params, batch):
    """mean, var (ddof=1) of per-example gradients, one example and source at a time."""
    batch_size = batch["x"].shape[0]
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        batch64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), batch)
        num_sources = batch["y"].shape[1]
        grads = []  # [S][B] pytrees
        for s in range(num_sources):
            select = jnp.zeros(num_sources, jnp.float64).at[s].set(1.0)
            row = []
            for i in range(batch_size):
                example = jax.tree.map(lambda a, i=i: a[i], batch64)
                g = _one_example_grad(losses_fn)(params64, example, select)
                assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(g))
                row.append(jax.tree.map(lambda a: np.asarray(a, np.float64), g))
            grads.append(row)
    stacked = jax.tree.map(
        lambda *xs: np.stack(xs), *[jax.tree.map(lambda *ys: np.stack(ys), *row) for row in grads]
    )
    mean = jax.tree.map(lambda g: g.mean(axis=1), stacked)  # leaves [S, B, ...] -> [S, ...]
    var = jax.tree.map(lambda g: g.var(axis=1, ddof=1), stacked)
    return mean, var


@functools.cache
def _jitted_stats(losses_fn, method, chunk_size):
    return jax.jit(
        functools.partial(bj.source_grad_stats, losses_fn, method=method, chunk_size=chunk_size),
        compiler_options=FAST_COMPILE,
    )


def assert_stats_close(stats, mean, var, rtol=2e-5):
    for got, want in ((stats.mean, mean), (stats.var, var)):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.shape == w.shape and g.dtype == jnp.float32
            scale = np.max(np.abs(w)) + 1e-12
            np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=rtol * scale)


# -------------------------------------------------------------------------- tests


@SETTINGS
@hypothesis.given(
    seed=st.integers(0, 2**32 - 1),
    model=st.sampled_from(sorted(MODELS)),
    num_sources=st.integers(1, 3),
    batch_size=st.sampled_from([2, 3, 4, 6, 8]),
    dim=st.integers(1, 3),
    method=st.sampled_from(["vmap", "auto"]),
    data=st.data(),
)
def test_matches_float64_loop_with_and_without_chunks(
    seed, model, num_sources, batch_size, dim, method, data
):
    params, batch, losses_fn = make_problem(seed, model, num_sources, batch_size, dim)
    mean, var = reference_stats(losses_fn, params, batch)
    stats = _jitted_stats(losses_fn, method, None)(params, batch)
    assert float(stats.count) == batch_size and stats.count.dtype == jnp.float32
    assert_stats_close(stats, mean, var)
    divisors = [c for c in range(1, batch_size) if batch_size % c == 0]
    chunk = data.draw(st.sampled_from(divisors), label="chunk_size")
    chunked = _jitted_stats(losses_fn, method, chunk)(params, batch)
    assert float(chunked.count) == batch_size
    assert_stats_close(chunked, mean, var)


def test_eager_equals_jit():
    params, batch, losses_fn = make_problem(0, "linear", 2, 6, 2)
    eager = bj.source_grad_stats(losses_fn, params, batch, method="vmap", chunk_size=3)
    jitted = _jitted_stats(losses_fn, "vmap", 3)(params, batch)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_untouched_parameters_have_zero_statistics():
    """A source whose loss does not reach a parameter has mean = var = 0 there."""
    params, batch, losses_fn = make_problem(1, "nested", 3, 4, 2)
    stats = _jitted_stats(losses_fn, "vmap", None)(params, batch)
    for s in range(3):
        for t in range(3):
            leaf_mean = stats.mean["heads"][t]["v"][s]
            if s != t:
                np.testing.assert_array_equal(leaf_mean, 0.0)
                np.testing.assert_array_equal(stats.var["heads"][t]["v"][s], 0.0)
            else:
                assert np.any(np.asarray(leaf_mean) != 0)


@SETTINGS
@hypothesis.given(
    seed=st.integers(0, 2**32 - 1),
    num_sources=st.integers(1, 3),
    shape=st.sampled_from([(), (3,), (2, 2)]),
    split=st.integers(1, 7),
)
def test_merge_of_two_halves_equals_the_whole(seed, num_sources, shape, split):
    """merge_grad_stats on statistics of random per-example gradients, vs numpy."""
    rng = np.random.default_rng(seed)
    per_example = {
        "a": rng.normal(size=(num_sources, 8) + shape) * 3 + 1,
        "b": [rng.normal(size=(num_sources, 8, 2))],
    }

    def stats_of(lo, hi):
        part = jax.tree.map(lambda g: g[:, lo:hi], per_example)
        ddof = 1 if hi - lo > 1 else 0
        return bj.GradStats(
            jnp.asarray(hi - lo, jnp.float32),
            jax.tree.map(lambda g: jnp.asarray(g.mean(1), jnp.float32), part),
            jax.tree.map(lambda g: jnp.asarray(g.var(1, ddof=ddof), jnp.float32), part),
        )

    mean = jax.tree.map(lambda g: g.mean(1), per_example)
    var = jax.tree.map(lambda g: g.var(1, ddof=1), per_example)
    first, second = stats_of(0, split), stats_of(split, 8)
    for merged in (bj.merge_grad_stats(first, second), bj.merge_grad_stats(second, first)):
        assert float(merged.count) == 8
        assert_stats_close(merged, mean, var, rtol=1e-5)


def test_merge_of_real_statistics():
    params, batch, losses_fn = make_problem(4, "mlp", 3, 8, 2)
    stats_fn = _jitted_stats(losses_fn, "vmap", None)
    whole = stats_fn(params, batch)
    halves = [
        stats_fn(params, jax.tree.map(lambda a, lo=lo: a[lo : lo + 4], batch)) for lo in (0, 4)
    ]
    merged = bj.merge_grad_stats(*halves)
    assert_stats_close(
        merged,
        jax.tree.map(lambda a: np.asarray(a, np.float64), whole.mean),
        jax.tree.map(lambda a: np.asarray(a, np.float64), whole.var),
        rtol=1e-5,
    )


def test_bf16_params_give_float32_statistics():
    params, batch, losses_fn = make_problem(2, "mlp", 2, 8, 3)
    params16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    stats16 = _jitted_stats(losses_fn, "vmap", 4)(params16, batch)
    stats32 = _jitted_stats(losses_fn, "vmap", None)(
        jax.tree.map(lambda a: np.asarray(a, np.float32), params16), batch
    )
    assert stats16.count.dtype == jnp.float32
    for a, b in zip(
        jax.tree.leaves((stats16.mean, stats16.var)), jax.tree.leaves((stats32.mean, stats32.var))
    ):
        assert a.dtype == jnp.float32
        scale = float(np.max(np.abs(b))) + 1e-6
        np.testing.assert_allclose(a, b, atol=0.05 * scale)


# ------------------------------------------------------------------------- errors


def _small():
    return make_problem(3, "linear", 2, 4, 2)


@pytest.mark.parametrize(
    "bad_losses",
    [
        lambda p, b: linear_losses(p, b)[0],  # [B]: sources missing
        lambda p, b: linear_losses(p, b).T,  # [B, S]: transposed
        lambda p, b: linear_losses(p, b)[:, :-1],  # [S, B - 1]
        lambda p, b: jnp.mean(linear_losses(p, b), axis=1),  # averaged over the batch
    ],
)
def test_error_losses_of_the_wrong_shape(bad_losses):
    params, batch, _ = _small()
    with pytest.raises(
        ValueError,
        match=r"losses_fn must return per-source, per-example "
        r"losses of shape \[S, B\] = \[S, 4\]",
    ):
        bj.source_grad_stats(bad_losses, params, batch, method="vmap")


def test_error_integer_losses():
    params, batch, _ = _small()
    with pytest.raises(TypeError, match="losses_fn must return floating losses"):
        bj.source_grad_stats(
            lambda p, b: jnp.zeros((2, 4), jnp.int32), params, batch, method="vmap"
        )


@pytest.mark.parametrize(
    "chunk_size, message",
    [
        (3, "chunk_size=3 does not divide the batch size 4"),
        (0, "chunk_size must be a positive int"),
        (2.0, "chunk_size must be a positive int"),
    ],
)
def test_error_bad_chunk_size(chunk_size, message):
    params, batch, losses_fn = _small()
    with pytest.raises(ValueError, match=message):
        bj.source_grad_stats(losses_fn, params, batch, method="vmap", chunk_size=chunk_size)


def test_error_integer_params_names_the_leaf():
    params, batch, losses_fn = _small()
    params = {**params, "step": jnp.asarray(3, jnp.int32)}
    with pytest.raises(TypeError, match=r"params\['step'\] has dtype int32"):
        bj.source_grad_stats(
            lambda p, b: losses_fn({"w": p["w"], "b": p["b"]}, b), params, batch, method="vmap"
        )


def test_error_bad_method_and_batch():
    params, batch, losses_fn = _small()
    with pytest.raises(ValueError, match="method must be one of"):
        bj.source_grad_stats(losses_fn, params, batch, method="loop")
    ragged = {"x": batch["x"], "y": batch["y"][:3]}
    with pytest.raises(ValueError, match="batch: every leaf needs the same leading"):
        bj.source_grad_stats(losses_fn, params, ragged, method="vmap")
