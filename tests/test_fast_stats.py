"""``method="fast"`` equals the vmap reference on every layer type it serves.

Random models of each kind (dense on [B, D] and on [B, T, D], 1-D and 2-D convolutions in
two layouts, embeddings with repeated indices, LayerNorm scale and bias, an NNX
transformer block, tied and reparameterised weights), plus the fallback for a parameter
used inside ``scan``, streaming with ``chunk_size``, the cancellation-prone regime of the
dense rule against a float64 truth, and hypothesis over random dense shapes. Devices and
float64 run in a subprocess (``tests/workers/fast_stats_worker.py``).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import bogc_jax as bj
from bogc_jax._fast_stats import kernels as fast_stats_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_stats_close(got, want, rtol=1e-4, atol_scale=1e-5):
    """Leaf by leaf: ``|got - want| <= atol_scale * max|want| + rtol * |want|``.

    The absolute part scales with the largest entry of that statistic over all leaves:
    coordinates whose true gradient is zero (e.g. attention key biases) hold only rounding
    noise in both methods.
    """
    assert float(got.count) == float(want.count)
    for name in ("mean", "var"):
        g_leaves = jax.tree_util.tree_flatten_with_path(getattr(got, name))[0]
        w_leaves = jax.tree.leaves(getattr(want, name))
        assert len(g_leaves) == len(w_leaves)
        scale = max(float(jnp.max(jnp.abs(w))) for w in w_leaves)
        for (path, g), w in zip(g_leaves, w_leaves):
            assert g.shape == w.shape and g.dtype == w.dtype, (path, g.shape, w.shape)
            np.testing.assert_allclose(
                g,
                w,
                rtol=rtol,
                atol=atol_scale * scale,
                err_msg=f"{name}{jax.tree_util.keystr(path)}",
            )


def both(losses_fn, params, batch, **kwargs):
    fast = jax.jit(lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="fast", **kwargs))
    ref = jax.jit(lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="vmap", **kwargs))
    return fast(params, batch), ref(params, batch)


def labels(losses_fn, params, batch):
    return jax.tree.leaves(bj.fast_stats_plan(losses_fn, params, batch))


def ce(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------------------
# Dense layers.


def two_branch_mlp(seed, n=12):
    k = jax.random.split(jax.random.key(seed), 9)
    params = {
        "a": {"w": jax.random.normal(k[0], (6, 8)) / 2, "b": jax.random.normal(k[1], (8,))},
        "v": {"w": jax.random.normal(k[2], (5, 8)) / 2, "b": jax.random.normal(k[3], (8,))},
        "head": {"w": jax.random.normal(k[4], (16, 3)) / 4},
        "uni_a": {"w": jax.random.normal(k[5], (8, 3)) / 3},
        "unused": {"w": jnp.ones((2, 2))},
    }
    batch = {
        "xa": jax.random.normal(k[6], (n, 6)) + 1.0,
        "xv": jax.random.normal(k[7], (n, 5)),
        "y": jax.random.randint(k[8], (n,), 0, 3),
    }

    def losses_fn(p, b):
        ha = jax.nn.relu(b["xa"] @ p["a"]["w"] + p["a"]["b"])
        hv = jnp.tanh(b["xv"] @ p["v"]["w"] + p["v"]["b"])
        fused = jnp.concatenate([ha, hv], axis=-1) @ p["head"]["w"]
        return jnp.stack(
            [
                ce(fused, b["y"]),
                ce(ha @ p["uni_a"]["w"], b["y"]),
                jnp.sum(jnp.square(hv), -1),
                jnp.zeros(b["y"].shape),
            ]
        )

    return losses_fn, params, batch


def test_mlp_matches_vmap_and_uses_closed_forms():
    losses_fn, params, batch = two_branch_mlp(0)
    fast, ref = both(losses_fn, params, batch)
    assert_stats_close(fast, ref)
    plan = bj.fast_stats_plan(losses_fn, params, batch)
    assert plan["a"] == {"w": "dense", "b": "bias"} and plan["head"]["w"] == "dense"
    assert plan["unused"]["w"].startswith("zero")
    # Sources that never reach a leaf give exact zeros there (the last source is constant).
    assert not np.any(np.asarray(fast.mean["uni_a"]["w"])[[0, 2, 3]])
    assert not np.any(np.asarray(fast.var["v"]["w"])[[1, 3]])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((fast.mean, fast.var)))


def test_chunked_fast_matches_vmap():
    losses_fn, params, batch = two_branch_mlp(1, n=12)
    assert_stats_close(*both(losses_fn, params, batch, chunk_size=4))


def test_shared_positions_dense_and_dot_general_layouts():
    k = jax.random.split(jax.random.key(2), 6)
    params = {
        "w": jax.random.normal(k[0], (4, 5)),
        "u": jax.random.normal(k[1], (3, 4, 2)),
        "left": jax.random.normal(k[2], (6, 4)),
    }
    x = jax.random.normal(k[3], (7, 6, 4))  # [B, T, D]

    def losses_fn(p, x):
        h = jnp.tanh(x @ p["w"])  # weight shared over T
        g = jnp.einsum("btd,hdk->bthk", x, p["u"])  # multi-axis output
        left = jnp.einsum("td,btd->bt", p["left"], x)  # weight as the lhs, batch dims
        return jnp.stack([h.sum((1, 2)), jnp.square(g).sum((1, 2, 3)), (left * h[..., 0]).sum(1)])

    # "left" has one position per group t (dot_general batch dims): still a closed form.
    assert labels(losses_fn, params, x) == ["dense"] + ["dense (shared positions)"] * 2
    assert_stats_close(*both(losses_fn, params, x))


def test_cancellation_regime_against_float64_truth():
    """Inputs far from zero and nearly constant cotangents: sum g**2 ~ 1e4 x m2."""
    n, d = 64, 3
    rng = np.random.default_rng(0)
    x = (1000.0 + rng.normal(size=(n, d))).astype(np.float32)
    c = (1.0 + 0.01 * rng.normal(size=(n,))).astype(np.float32)
    w = rng.normal(size=(d, 2)).astype(np.float32)

    def losses_fn(p, b):
        x, c = b
        return jnp.stack([c * (x @ p["w"])[:, 0], (x @ p["w"])[:, 1]])

    fast = bj.source_grad_stats(losses_fn, {"w": w}, (x, c), method="fast")
    g = np.zeros((2, n, d, 2))  # per-example gradients, f64
    g[0, :, :, 0] = x.astype(np.float64) * c.astype(np.float64)[:, None]
    g[1, :, :, 1] = x
    var = g.var(axis=1, ddof=1)
    np.testing.assert_allclose(fast.var["w"], var, rtol=1e-4, atol=1e-6 * var.max())
    np.testing.assert_allclose(fast.mean["w"], g.mean(axis=1), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("input_scale", [1e-20, 1e20])
def test_dense_keeps_the_variance_when_factors_square_out_of_range(input_scale):
    """Inputs ~1e-20 with cotangents ~1e20 (and the reverse): every per-example gradient is
    of order one, but ``x**2`` or ``delta**2`` alone under- or overflows float32."""
    k = jax.random.split(jax.random.key(11), 3)
    n, d, out = 16, 4, 3
    x = jax.random.normal(k[0], (n, d)) * input_scale
    params = {"w": jax.random.normal(k[1], (d, out)), "v": jax.random.normal(k[2], (out,))}

    def losses_fn(p, x):
        y = (x @ p["w"]) / input_scale  # the cotangent of x @ w carries 1 / input_scale
        return jnp.stack([y @ p["v"], jnp.square(y).sum(-1)])

    assert labels(losses_fn, params, x) == ["dense", "dense"]
    fast = bj.source_grad_stats(losses_fn, params, x, method="fast")
    xs = np.asarray(x, np.float64) / input_scale
    w, v = (np.asarray(params[name], np.float64) for name in ("w", "v"))
    cotangents = [np.broadcast_to(v, (n, out)), 2 * (xs @ w)]  # per source, times input_scale
    for s, delta in enumerate(cotangents):
        g = xs[:, :, None] * delta[:, None, :]  # per-example gradients of w, float64
        var = g.var(axis=0, ddof=1)
        np.testing.assert_allclose(fast.var["w"][s], var, rtol=1e-4, atol=1e-6 * var.max())
        np.testing.assert_allclose(fast.mean["w"][s], g.mean(0), rtol=1e-4, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(2, 9),
    d=st.integers(1, 5),
    k=st.integers(1, 4),
    t=st.sampled_from([None, 1, 3]),
    sources=st.integers(1, 3),
    seed=st.integers(0, 99),
)
def test_dense_random_shapes(n, d, k, t, sources, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {"w": jax.random.normal(keys[0], (d, k)), "b": jax.random.normal(keys[1], (k,))}
    shape = (n, d) if t is None else (n, t, d)
    x = jax.random.normal(keys[2], shape) + 0.5

    def losses_fn(p, x):
        h = jnp.tanh(x @ p["w"] + p["b"]).reshape(x.shape[0], -1)
        return jnp.stack([jnp.sum(h ** (s + 1), -1) for s in range(sources)])

    got, want = both(losses_fn, params, x)
    assert_stats_close(got, want, atol_scale=1e-5 if n > 2 else 1e-4)


# ----------------------------------------------------------------------------------------
# Convolutions, embeddings, normalisation, attention.


class SmallCNN(nnx.Module):
    def __init__(self, rngs):
        self.c2 = nnx.Conv(2, 3, (3, 3), strides=2, padding=((1, 0), (2, 1)), rngs=rngs)
        self.c2b = nnx.Conv(3, 4, (2, 2), kernel_dilation=2, padding="VALID", rngs=rngs)
        self.c1 = nnx.Conv(3, 4, (3,), strides=2, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, img, seq):
        a = jnp.tanh(self.c2b(jnp.tanh(self.c2(img)))).mean((1, 2))
        b = jnp.tanh(self.c1(seq)).mean(1)
        return self.head(jnp.concatenate([a, b], -1)), a, b


def small_cnn(seed):
    model = SmallCNN(nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero biases
    k = jax.random.split(jax.random.key(3 + seed), 3)
    batch = (
        jax.random.normal(k[0], (5, 9, 8, 2)),
        jax.random.normal(k[1], (5, 10, 3)),
        jax.random.randint(k[2], (5,), 0, 3),
    )

    def losses_fn(p, b):
        img, seq, y = b
        logits, a, c = nnx.merge(graphdef, p)(img, seq)
        return jnp.stack([ce(logits, y), jnp.square(a).sum(-1), jnp.square(c).sum(-1)])

    return losses_fn, params, batch


def test_nnx_conv1d_conv2d():
    losses_fn, params, batch = small_cnn(0)
    plan = bj.fast_stats_plan(losses_fn, params, batch)
    assert plan["c2"]["kernel"] == "conv" and plan["c1"]["kernel"] == "conv"
    assert_stats_close(*both(losses_fn, params, batch))


def test_lax_conv_channels_first_layout():
    """PyTorch's NCHW / OIHW layout, rhs dilation and strides, through lax directly."""
    k = jax.random.split(jax.random.key(4), 2)
    params = {"k": jax.random.normal(k[0], (4, 2, 3, 2))}  # O, I, H, W
    x = jax.random.normal(k[1], (6, 2, 9, 7))  # N, C, H, W

    def losses_fn(p, x):
        y = jax.lax.conv_general_dilated(
            x,
            p["k"],
            (2, 1),
            ((1, 1), (0, 2)),
            rhs_dilation=(1, 2),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )
        return jnp.stack([jnp.tanh(y).sum((1, 2, 3)), y[:, 0].mean((1, 2))])

    assert labels(losses_fn, params, x) == ["conv"]
    assert_stats_close(*both(losses_fn, params, x))


def test_embedding_with_repeated_and_out_of_range_rows():
    k = jax.random.split(jax.random.key(5), 3)
    params = {"table": jax.random.normal(k[0], (7, 3)), "w": jax.random.normal(k[1], (3,))}
    ids = jax.random.randint(k[2], (9, 6), 0, 7)
    ids = ids.at[:, 1].set(ids[:, 0]).at[:, 2].set(ids[:, 0])  # each example repeats a row
    ids = ids.at[0, 5].set(3).at[1, 4].set(0)

    def losses_fn(p, ids):
        e = jnp.take(p["table"], ids, axis=0, mode="clip")  # [B, T, 3]
        e2 = p["table"].at[ids[:, :2] + 5].get(mode="fill", fill_value=0.0)  # 7, 8 dropped
        h = jnp.tanh(e @ p["w"])
        return jnp.stack([h.sum(-1), jnp.square(h).sum(-1) + e2.sum((1, 2))])

    assert labels(losses_fn, params, ids)[0].startswith("per-layer")  # two gathers: tied
    assert_stats_close(*both(losses_fn, params, ids))

    def single_use(p, ids):
        h = jnp.tanh(jnp.take(p["table"], ids, axis=0) @ p["w"])
        return jnp.stack([h.sum(-1), jnp.square(h).sum(-1)])

    assert labels(single_use, params, ids) == ["embedding", "dense (shared positions)"]
    assert_stats_close(*both(single_use, params, ids))


EMBEDDING_LOOKUPS = {
    "index": lambda t, i: t[i],
    "take_fill": lambda t, i: jnp.take(t, i, axis=0, mode="fill", fill_value=0.0),
    "take_clip": lambda t, i: jnp.take(t, i, axis=0, mode="clip"),
    "take_wrap": lambda t, i: jnp.take(t, i, axis=0, mode="wrap"),
    "get_promise_in_bounds": lambda t, i: t.at[i].get(mode="promise_in_bounds"),
    "get_clip": lambda t, i: t.at[i].get(mode="clip"),
    "get_fill": lambda t, i: t.at[i].get(mode="fill", fill_value=0.0),
    "get_drop": lambda t, i: t.at[i].get(mode="drop", fill_value=0.0),
}


@pytest.mark.parametrize("lookup", sorted(EMBEDDING_LOOKUPS))
def test_embedding_out_of_range_ids_follow_autodiff_in_every_mode(lookup):
    """A padding id equal to the vocabulary size (and ids below ``-vocab``) are credited as
    ``jax.grad`` credits them in the lookup's mode: clamped, wrapped or dropped."""
    vocab = 6
    k = jax.random.split(jax.random.key(sorted(EMBEDDING_LOOKUPS).index(lookup)), 3)
    params = {"table": jax.random.normal(k[0], (vocab, 3)), "w": jax.random.normal(k[1], (3,))}
    ids = jax.random.randint(k[2], (8, 5), -vocab - 3, vocab + 3)
    ids = ids.at[:, 0].set(vocab).at[::2, 1].set(-vocab - 1)  # padding id, far negative ids
    look = EMBEDDING_LOOKUPS[lookup]

    def losses_fn(p, ids):
        o = look(p["table"], ids) @ p["w"]
        return jnp.stack([o.sum(-1), jnp.square(o).sum(-1)])

    assert labels(losses_fn, params, ids)[0] == "embedding"
    assert_stats_close(*both(losses_fn, params, ids))


class Block(nnx.Module):
    """Pre-norm transformer block: embedding, attention, MLP, LayerNorm scale and bias."""

    def __init__(self, rngs, d=8, vocab=13):
        self.emb = nnx.Embed(vocab, d, rngs=rngs)
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.att = nnx.MultiHeadAttention(num_heads=2, in_features=d, decode=False, rngs=rngs)
        self.up = nnx.Linear(d, 2 * d, rngs=rngs)
        self.down = nnx.Linear(2 * d, d, rngs=rngs)
        self.head = nnx.Linear(d, 3, rngs=rngs)

    def __call__(self, ids):
        x = self.emb(ids)
        x = x + self.att(self.ln1(x))
        x = x + self.down(nnx.gelu(self.up(self.ln2(x))))
        return self.head(x.mean(1)), x


def test_nnx_transformer_block():
    model = Block(nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(
        lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params
    )  # LayerNorm scale != 1
    k = jax.random.split(jax.random.key(6), 2)
    batch = (jax.random.randint(k[0], (6, 5), 0, 13), jax.random.randint(k[1], (6,), 0, 3))

    def losses_fn(p, b):
        logits, x = nnx.merge(graphdef, p)(b[0])
        return jnp.stack([ce(logits, b[1]), jnp.square(x).mean((1, 2))])

    plan = bj.fast_stats_plan(losses_fn, params, batch)
    assert plan["ln1"]["scale"] == "scale" and plan["ln1"]["bias"] == "bias"
    assert plan["emb"]["embedding"] == "embedding" and plan["head"]["kernel"] == "dense"
    assert "vmap" not in " ".join(jax.tree.leaves(plan))
    assert_stats_close(*both(losses_fn, params, batch))


# ----------------------------------------------------------------------------------------
# Unsupported uses: the fallback, and the error of method="fast".


def scan_model(recurrent=True):
    k = jax.random.split(jax.random.key(7), 3)
    params = {
        "rec": 0.5 * jax.random.normal(k[0], (3, 3)),
        "out": jax.random.normal(k[1], (3,)),
        "tied": jax.random.normal(k[2], (3, 3)),
        "raw": jnp.linspace(-1.0, 1.0, 3),
    }
    x = jax.random.normal(jax.random.key(8), (6, 3))

    def losses_fn(p, x):
        def step(h, _):
            return jnp.tanh(h @ p["rec"]), None

        h = jax.lax.scan(step, x, None, length=3)[0] if recurrent else x @ p["rec"]
        h = (h @ p["tied"]) @ p["tied"].T  # tied: two uses
        h = h * jax.nn.softplus(p["raw"])  # raw: reparameterised
        return jnp.stack([h @ p["out"], jnp.square(h).sum(-1)])

    return losses_fn, params, x


def test_fast_names_the_leaves_it_cannot_serve():
    losses_fn, params, x = scan_model()
    with pytest.raises(ValueError, match=r"(?s)params\['rec'\].*scan.*method='auto'"):
        bj.source_grad_stats(losses_fn, params, x, method="fast")
    plan = bj.fast_stats_plan(losses_fn, params, x)
    assert plan["rec"].startswith("vmap") and plan["out"] == "dense"
    assert plan["tied"].startswith("per-layer (2 uses") and plan["raw"] == "scale"


def test_auto_falls_back_per_leaf():
    losses_fn, params, x = scan_model()
    for chunk in (None, 3):
        auto = jax.jit(
            lambda p, b, c=chunk: bj.source_grad_stats(losses_fn, p, b, method="auto", chunk_size=c)
        )(params, x)
        ref = jax.jit(
            lambda p, b, c=chunk: bj.source_grad_stats(losses_fn, p, b, method="vmap", chunk_size=c)
        )(params, x)
        assert_stats_close(auto, ref)


@pytest.mark.parametrize("method", ["fast", "auto"])
@pytest.mark.parametrize("model", ["mlp", "cnn", "scan"])
def test_one_batch_variances_equal_the_finalised_moments(method, model, monkeypatch):
    """On one batch on one device the rules form the variances where they place their
    results; they equal ``m2 / (n - 1)`` taken afterwards, bit for bit, and keep the
    marks of the sources that reach each leaf."""
    from bogc_jax import _fast_stats, _moments, _source_reach

    if model == "scan" and method == "fast":
        pytest.skip("the scan model's recurrent leaf needs the vmap fallback")
    cases = {"mlp": lambda: two_branch_mlp(3), "cnn": lambda: small_cnn(1), "scan": scan_model}
    losses_fn, params, batch = cases[model]()
    num_sources = jax.eval_shape(losses_fn, params, batch).shape[0]
    moments_fn = {"fast": _fast_stats.fast_moments, "auto": _fast_stats.auto_moments}[method]
    marks = {}

    def one_batch(p, b):
        stats = bj.source_grad_stats(losses_fn, p, b, method=method)
        for field in ("mean", "var"):
            leaves = jax.tree.leaves(getattr(stats, field))
            marks[field] = [_source_reach.reaching(num_sources, x) for x in leaves]
        return stats

    def no_second_pass(moments):
        raise AssertionError("one batch on one device: the rules form the variances")

    with monkeypatch.context() as patch:
        patch.setattr(bj.stats._moments, "grad_stats_from_moments", no_second_pass)
        got = jax.jit(one_batch)(params, batch)
    want = jax.jit(lambda p, b: _moments.grad_stats_from_moments(moments_fn(losses_fn, p, b)))(
        params, batch
    )
    assert float(got.count) == float(want.count)
    for field in ("mean", "var"):
        for g, w in zip(
            jax.tree.leaves(getattr(got, field)), jax.tree.leaves(getattr(want, field))
        ):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert marks["var"] == marks["mean"]
    if model == "mlp":  # the head is reached by the fusion loss alone
        assert (0,) in marks["var"] and () in marks["var"]


def test_materialised_leaves_stream_in_chunks(monkeypatch):
    """A budget smaller than one batch forces the chunked (scan + Chan) path."""
    monkeypatch.setattr(fast_stats_kernels, "materialise_budget", lambda: 64)
    losses_fn, params, x = scan_model(recurrent=False)  # tied and softplus leaves
    assert_stats_close(*both(losses_fn, params, x))
    model = SmallCNN(nnx.Rngs(2))
    graphdef, cnn_params = nnx.split(model, nnx.Param)
    batch = (
        jax.random.normal(jax.random.key(9), (4, 6, 6, 2)),
        jax.random.normal(jax.random.key(10), (4, 7, 3)),
    )

    def cnn_losses(p, b):
        logits, a, c = nnx.merge(graphdef, p)(*b)
        return jnp.stack([logits.sum(-1), jnp.square(a).sum(-1) + c.sum(-1)])

    assert_stats_close(*both(cnn_losses, cnn_params, batch))


def test_accelerators_stream_sequence_layers_in_larger_chunks(monkeypatch):
    """A dense layer on ``[B, T, D]`` too wide for the CPU's chunk budget is streamed one
    example at a time with it (a ``scan``); with the GPU's budget it is one chunk (no
    ``scan``), and the moments are the same. The budget follows the platform."""
    rng = np.random.default_rng(3)
    d_in, d_out = 64, int(rng.integers(4100, 4400))  # S x leaf > 2**19 numbers
    n, t = 4, int(rng.integers(2, 5))
    params = {"w": jnp.asarray(rng.normal(size=(d_in, d_out)) / 8, jnp.float32)}
    x = jnp.asarray(rng.normal(size=(n, t, d_in)), jnp.float32)

    def losses_fn(p, b):
        h = jnp.tanh(b @ p["w"])  # [n, t, d_out]
        return jnp.stack([h.sum((1, 2)), jnp.square(h[..., :7]).mean((1, 2))])

    assert labels(losses_fn, params, x) == ["dense (shared positions)"]

    def traced(budget):  # a new function each time: no cached trace of the other budget
        monkeypatch.setattr(fast_stats_kernels, "materialise_budget", lambda: budget)

        def fast(p, b):
            return bj.source_grad_stats(losses_fn, p, b, method="fast")

        return "scan" in str(jax.make_jaxpr(fast)(params, x)), jax.jit(fast)(params, x)

    streamed, on_cpu = traced(fast_stats_kernels.MATERIALISE_BUDGET)
    assert streamed
    streamed, on_gpu = traced(fast_stats_kernels.ACCELERATOR_MATERIALISE_BUDGET)
    assert not streamed
    assert_stats_close(on_gpu, on_cpu, rtol=1e-5, atol_scale=1e-6)
    monkeypatch.undo()
    for platform, budget in [
        ("cpu", fast_stats_kernels.MATERIALISE_BUDGET),
        ("gpu", fast_stats_kernels.ACCELERATOR_MATERIALISE_BUDGET),
        ("tpu", fast_stats_kernels.ACCELERATOR_MATERIALISE_BUDGET),
    ]:
        monkeypatch.setattr(fast_stats_kernels.jax, "default_backend", lambda p=platform: p)
        assert fast_stats_kernels.materialise_budget() == budget, platform
        assert fast_stats_kernels.chunk_for(n, 2 * d_in * d_out) == (1 if platform == "cpu" else n)


def test_devices_and_float64_in_a_subprocess():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_ENABLE_X64"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    worker = os.path.join(ROOT, "tests", "workers", "fast_stats_worker.py")
    proc = subprocess.run(
        [sys.executable, worker], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
