"""The fast paths agree with the references: the fixed-weight sum, the dense rule over all
sources at once (input shared, cotangents side by side) and the means-only statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bogc_jax as bj
from bogc_jax._fast_stats import dense as fast_dense


def ce(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def two_branch(seed, n=10, width=7):
    """Fusion + two unimodal sources; a grouped einsum tap and a conv on branch ``v``."""
    k = jax.random.split(jax.random.key(seed), 10)
    params = {
        "a": {"w": jax.random.normal(k[0], (6, width)) / 2, "b": jax.random.normal(k[1], (width,))},
        "g": jax.random.normal(k[2], (2, width, 3)) / 2,  # grouped: [groups, in, out]
        "conv": jax.random.normal(k[3], (3, 1, 4)) / 2,  # 1-D conv kernel [W, I, O]
        "head": jax.random.normal(k[4], (6 + 4, 3)) / 3,
        "uni_a": jax.random.normal(k[5], (6, 3)) / 3,
        "uni_v": jax.random.normal(k[6], (4, 3)) / 3,
    }
    batch = {
        "xa": jax.random.normal(k[7], (n, 6)) + 1.0,
        "xv": jax.random.normal(k[8], (n, 9, 1)),
        "y": jax.random.randint(k[9], (n,), 0, 3),
    }

    def losses_fn(p, b):
        ha = jnp.tanh(b["xa"] @ p["a"]["w"] + p["a"]["b"])
        hg = jnp.einsum("nc,gcf->ngf", ha, p["g"]).reshape(ha.shape[0], -1)  # [n, 6]
        hv = jax.lax.conv_general_dilated(
            b["xv"], p["conv"], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
        )
        hv = jnp.mean(jax.nn.relu(hv), axis=1)  # [n, 4]
        fused = jnp.concatenate([hg, hv], axis=-1) @ p["head"]
        return jnp.stack(
            [ce(fused, b["y"]), ce(hg @ p["uni_a"], b["y"]), ce(hv @ p["uni_v"], b["y"])]
        )

    return losses_fn, params, batch


def assert_tree_close(got, want, rtol=1e-4, atol_scale=1e-5):
    scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol_scale * scale)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_fixed_weight_grads_is_the_sum_over_sources(num_sources, seed):
    rng = np.random.default_rng(seed)
    mean = {
        "w": jnp.asarray(rng.normal(size=(num_sources, 5, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(num_sources, 3)), jnp.float32),
    }
    stats = bj.GradStats(jnp.float32(8), mean, jax.tree.map(jnp.ones_like, mean))
    got = jax.jit(lambda s: s.fixed_weight_grads())(stats)
    want = jax.tree.map(lambda m: np.asarray(m, np.float64).sum(0), mean)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@settings(max_examples=3, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 12), st.integers(1, 9))
def test_fast_statistics_match_vmap_on_shared_dense_taps(seed, n, width):
    losses_fn, params, batch = two_branch(seed, n, width)
    fast = jax.jit(lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="fast"))
    ref = jax.jit(lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="vmap"))
    got, want = fast(params, batch), ref(params, batch)
    assert_tree_close(got.mean, want.mean)
    assert_tree_close(got.var, want.var, atol_scale=1e-5 if n > 2 else 1e-4)


def test_dense_sources_of_very_different_scales_in_the_cancelling_regime():
    """Three sources on one tap, cotangents ~1e-3, 1 and 1e3, inputs far from zero (the
    centred recomputation): each source's moments against a float64 truth."""
    n, d = 48, 3
    rng = np.random.default_rng(1)
    x = (500.0 + rng.normal(size=(n, d))).astype(np.float32)
    c = (1.0 + 0.01 * rng.normal(size=(n, 3))).astype(np.float32)
    scales = np.array([1e-3, 1.0, 1e3], np.float32)
    w = rng.normal(size=(d, 3)).astype(np.float32)

    def losses_fn(p, b):
        x, c = b
        y = x @ p["w"]
        return jnp.stack([scales[s] * c[:, s] * y[:, s] for s in range(3)])

    fast = bj.source_grad_stats(losses_fn, {"w": w}, (x, c), method="fast")
    for s in range(3):
        g = np.zeros((n, d, 3))
        g[:, :, s] = x.astype(np.float64) * (scales[s] * c[:, s].astype(np.float64))[:, None]
        var, mean = g.var(axis=0, ddof=1), g.mean(0)
        np.testing.assert_allclose(fast.var["w"][s], var, rtol=1e-4, atol=1e-6 * var.max())
        np.testing.assert_allclose(fast.mean["w"][s], mean, rtol=1e-5, atol=1e-6 * abs(mean).max())


def _float64_moments(x, cotangent):
    """Mean and variance (ddof 1) over examples of ``x_i (x) cotangent_i``, in float64."""
    g = np.asarray(x, np.float64)[:, :, None] * np.asarray(cotangent, np.float64)[:, None, :]
    return g.mean(0), g.var(axis=0, ddof=1)


def _operands(a, d):
    """A ``_Scaled`` of float32 ``[n, g, c]`` inputs and ``[n, g, f]`` cotangents."""
    a, d = (jnp.asarray(np.asarray(x, np.float32)) for x in (a, d))
    return fast_dense._Scaled(a, d, None, None, None)


def _largest_ratio(a, d):
    """The largest ``n mean**2 / m2`` over coordinates ``(g, c, f)``, in float64."""
    u = np.asarray(a, np.float64)[:, :, :, None] * np.asarray(d, np.float64)[:, :, None, :]
    n, total, squares = u.shape[0], u.sum(0), (u**2).sum(0)
    return (total**2 / np.maximum(n * squares - total**2, 1e-300)).max()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 400),
    g=st.integers(1, 3),
    c=st.integers(1, 4),
    f=st.integers(1, 4),
    zero_rate=st.floats(0.0, 0.06),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_zero_count_that_passes_bounds_every_coordinates_cancellation(
    n, g, c, f, zero_rate, seed
):
    """Where the dense rule skips the check on the products (enough zeros in every input
    column or every cotangent column of each group), no coordinate has ``n mean**2 / m2``
    above the limit: inputs and cotangents nearly constant, so only the zeros keep it down
    (zero rates around ``1 / (1 + L)``, where the count decides)."""
    rng = np.random.default_rng(seed)
    a = (3.0 + 0.01 * rng.normal(size=(n, g, c))) * (rng.random((n, g, c)) >= zero_rate)
    d = (2.0 + 0.01 * rng.normal(size=(n, g, f))) * (rng.random((n, g, f)) >= zero_rate)
    if bool(fast_dense._cannot_cancel(_operands(a, d))):
        assert _largest_ratio(a, d) <= fast_dense.CANCELLATION_LIMIT * (1 + 1e-6)


def test_the_zero_count_passes_at_its_threshold_and_not_below():
    """Constant non-zero values with ``k`` zeros have the ratio ``(n - k) / k`` exactly:
    ``n = 130`` and ``L = 64`` need ``k = 2`` zeros (ratio 64, the limit), and ``k = 1``
    (ratio 129) must send the leaf to the check."""
    n, limit = 130, fast_dense.CANCELLATION_LIMIT
    assert limit == 64.0
    d = np.ones((n, 1, 3))
    for zeros, passes in ((2, True), (1, False)):
        a = np.ones((n, 1, 2))
        a[:zeros, :, :] = 0.0  # every input column has `zeros` zeros
        assert _largest_ratio(a, d) == pytest.approx((n - zeros) / zeros)
        assert bool(fast_dense._cannot_cancel(_operands(a, d))) is passes
        # Zeros in every cotangent column serve as well; in only some of them, not.
        assert bool(fast_dense._cannot_cancel(_operands(d[:, :, :2], a.repeat(2, -1)))) is passes
        partly = np.ones((n, 1, 4))
        partly[:zeros, :, :2] = 0.0
        assert not bool(fast_dense._cannot_cancel(_operands(np.ones((n, 1, 2)), partly)))


def _wide_dense_model(cancelling: bool, small_cancelling: bool = False):
    """A dense leaf with more than ``SMALL_PRODUCT`` entries in its products (two sources
    side by side), and a small one; either may be in the cancelling regime."""
    n, d, out = 48, 160, 256
    assert d * 2 * out > fast_dense.SMALL_PRODUCT
    rng = np.random.default_rng(5)
    offset = 500.0 if cancelling else 0.0
    x = (offset + rng.normal(size=(n, d))).astype(np.float32)
    if not cancelling:
        x = np.maximum(x, 0.0)  # ReLU features: zeros in every column
    c = (1.0 + 0.01 * rng.normal(size=(n, 2))).astype(np.float32)
    z = ((500.0 if small_cancelling else 0.0) + rng.normal(size=(n, 3))).astype(np.float32)
    params = {
        "w": (rng.normal(size=(d, out)) / d).astype(np.float32),
        "v": rng.normal(size=(3, 2)).astype(np.float32),
    }

    def losses_fn(p, b):
        x, c, z = b
        y, small = x @ p["w"], z @ p["v"]
        return jnp.stack([c[:, 0] * y[:, 0] + small[:, 0], c[:, 1] * y[:, 1] + small[:, 1]])

    # Per source, the cotangents of w (column s: c[:, s]) and of v (column s: 1).
    truth = {"w": [], "v": []}
    for s in range(2):
        delta = np.zeros((n, out))
        delta[:, s] = c[:, s]
        truth["w"].append(_float64_moments(x, delta))
        delta = np.zeros((n, 2))
        delta[:, s] = 1.0
        truth["v"].append(_float64_moments(z, delta))
    return losses_fn, params, (x, c, z), truth


def _poisoned(op, products=None):
    """A checked form that gives NaN: the outputs show whether it was taken."""
    mean, m2 = fast_dense._finish(op, *fast_dense._products(op.a, op.d))
    return mean * jnp.nan, m2 * jnp.nan


@pytest.mark.parametrize(
    "cancelling, small_cancelling", [(False, False), (True, False), (False, True)]
)
def test_wide_dense_leaves_against_float64_truth(cancelling, small_cancelling, monkeypatch):
    """Wide leaves share one check: ReLU inputs pass the zero count and take the two-product
    form; inputs far from zero, or a small leaf that cancels, send every leaf to its own
    check and the wide one to the centred form where it cancels."""
    losses_fn, params, batch, truth = _wide_dense_model(cancelling, small_cancelling)
    if not (cancelling or small_cancelling):  # the shared two-product form, unchecked
        monkeypatch.setattr(fast_dense, "_checked", _poisoned)
    fast = jax.jit(lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="fast"))
    got = fast(params, batch)
    for name in ("w", "v"):
        for s, (mean, var) in enumerate(truth[name]):
            np.testing.assert_allclose(got.var[name][s], var, rtol=1e-4, atol=1e-6 * var.max())
            atol = 1e-6 * abs(mean).max()
            np.testing.assert_allclose(got.mean[name][s], mean, rtol=1e-5, atol=atol)


@settings(max_examples=3, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 12))
def test_source_grad_means_equal_the_vmap_means(seed, n):
    losses_fn, params, batch = two_branch(seed, n)
    got = jax.jit(lambda p, b: bj.source_grad_means(losses_fn, p, b))(params, batch)
    assert got.var is None and float(got.count) == n
    if n >= 2:
        want = bj.source_grad_stats(losses_fn, params, batch, method="vmap").mean
    else:  # the reference needs two examples: the mean of one is its gradient
        want = jax.jacrev(lambda p: losses_fn(p, batch)[:, 0])(params)
    assert_tree_close(got.mean, want, rtol=1e-5, atol_scale=1e-6)


def test_source_grad_means_through_scan_and_nnx():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.enc = nnx.Linear(4, 5, rngs=rngs)
            self.rec = nnx.Param(jax.random.normal(rngs.params(), (5, 5)) / 3)
            self.head = nnx.Linear(5, 2, rngs=rngs)

    model = Model(nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (6, 4))

    def losses_fn(m, x):
        def step(h, _):
            return jnp.tanh(h @ m.rec[...]), None

        h, _ = jax.lax.scan(step, m.enc(x), None, length=3)
        return jnp.stack([jnp.sum(m.head(h) ** 2, -1), jnp.sum(h, -1)])

    got = bj.source_grad_means(losses_fn, model, x)
    want = bj.source_grad_stats(losses_fn, model, x, method="vmap")
    assert_tree_close(got.mean, want.mean, rtol=1e-5, atol_scale=1e-6)


def test_mmpareto_with_means_only_equals_mmpareto_with_full_statistics():
    losses_fn, params, batch = two_branch(7, n=16)
    labels = {"a": 0, "g": 0, "conv": 1, "head": None, "uni_a": None, "uni_v": None}
    tx = bj.mmpareto(labels)
    full = jax.jit(lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="fast"))(params, batch)
    means = jax.jit(lambda p, b: bj.source_grad_means(losses_fn, p, b))(params, batch)

    @jax.jit
    def step(stats):
        return tx.update(stats.fixed_weight_grads(), tx.init(params), params, grad_stats=stats)

    (u_full, s_full), (u_means, s_means) = step(full), step(means)
    assert_tree_close(u_means, u_full, rtol=1e-5, atol_scale=1e-6)
    for a, b in zip(jax.tree.leaves(s_means), jax.tree.leaves(s_full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
