"""Guards of the statistics' entry points, and Flax NNX modules as params.

Each guard turns a silent wrong result (or a raw error) into a clear one: a transposed
``losses_fn`` output when ``B = S``, a forgotten ``axis_name`` inside ``shard_map``, a
``None`` leaf in one of two merged statistics, integer options given as NumPy ints or bools,
a bad PRNG key for the Laplace draws. A Flax NNX module is taken as ``nnx.grad`` takes it.
"""

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import bogc_jax as bj

SETTINGS = hypothesis.settings(max_examples=8, deadline=None, derandomize=True)


def dense_problem(seed, n=6, dim=3, num_sources=3):
    k = jax.random.split(jax.random.key(seed), 3)
    params = {"w": jax.random.normal(k[0], (dim, num_sources)), "b": jnp.zeros(num_sources)}
    batch = {"x": jax.random.normal(k[1], (n, dim)), "y": jax.random.normal(k[2], (n,))}

    def losses_fn(p, b):  # [S, B]
        out = b["x"] @ p["w"] + p["b"]
        return jnp.square(out - b["y"][:, None]).T

    return losses_fn, params, batch


# ----------------------------------------------------------------------------------------
# losses_fn transposed when B == S.


@pytest.mark.parametrize("method", ["vmap", "fast", "auto"])
def test_transposed_losses_with_as_many_examples_as_sources_is_an_error(method):
    losses_fn, params, batch = dense_problem(0, n=3, num_sources=3)
    transposed = lambda p, b: losses_fn(p, b).T  # [B, S] with B = S = 3
    with pytest.raises(ValueError, match=r"(?s)on a batch of one example \(1, 3\).*transposed"):
        bj.source_grad_stats(transposed, params, batch, method=method)
    # The same losses, the right way round, pass.
    stats = bj.source_grad_stats(losses_fn, params, batch, method=method)
    assert stats.mean["w"].shape == (3, 3, 3)


@hypothesis.given(n=st.integers(2, 5), seed=st.integers(0, 100))
@SETTINGS
def test_losses_mixing_examples_are_rejected_whatever_the_batch_size(n, seed):
    """``[S, B]`` losses whose column ``i`` does not come from example ``i`` alone (here a
    transposed ``[B, B]`` block) fail the one-example check for every ``B``."""
    losses_fn, params, batch = dense_problem(seed, n=n, num_sources=n)
    with pytest.raises(ValueError, match="transposed"):
        bj.source_grad_stats(lambda p, b: losses_fn(p, b).T, params, batch, method="vmap")


# ----------------------------------------------------------------------------------------
# axis_name forgotten inside shard_map.


def _one_device_mesh():
    return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])


def _shard_map(fn, in_specs, out_specs):
    """``fn`` under ``jit`` of ``shard_map`` over a one-device mesh (types vary as on many),
    its arguments placed by ``in_specs``."""
    mesh = _one_device_mesh()
    mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))

    def call(*args):
        placed = [
            jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))
            for a, spec in zip(args, in_specs)
        ]
        return mapped(*placed)

    return call


def test_forgetting_axis_name_inside_shard_map_is_an_error():
    losses_fn, params, batch = dense_problem(1, n=4)

    def run(**kw):
        return _shard_map(
            lambda p, b: bj.source_grad_stats(losses_fn, p, b, method="vmap", **kw),
            in_specs=(P(), P("data")),
            out_specs=P(),
        )(params, batch)

    with pytest.raises(ValueError, match=r"mapped axis 'data'.*axis_name='data'"):
        run()
    with pytest.raises(ValueError, match=r"laplace_grad_stats: .*axis_name='data'"):
        _shard_map(
            lambda p, b: bj.laplace_grad_stats(
                losses_fn, p, b, jax.random.key(0), mask={"w": True, "b": False}
            ),
            in_specs=(P(), P("data")),
            out_specs=P(),
        )(params, batch)
    whole = bj.source_grad_stats(losses_fn, params, batch, method="vmap")
    got = run(axis_name="data")
    np.testing.assert_allclose(got.var["w"], whole.var["w"], rtol=1e-5)


def test_params_varying_with_the_batch_give_this_devices_statistics():
    """Params split like the batch vary over the axis too: per-device statistics, no error."""
    losses_fn, params, batch = dense_problem(2, n=4)

    def local_var(p, b):
        p = jax.tree.map(lambda x: x[0], p)  # this device's params, varying over "data"
        return bj.source_grad_stats(losses_fn, p, b, method="vmap").var["w"][None]

    got = _shard_map(local_var, in_specs=(P("data"), P("data")), out_specs=P("data"))(
        jax.tree.map(lambda x: x[None], params), batch
    )
    want = bj.source_grad_stats(losses_fn, params, batch, method="vmap")
    np.testing.assert_allclose(got[0], want.var["w"], rtol=1e-5)


# ----------------------------------------------------------------------------------------
# merge_grad_stats with None leaves.


def test_merge_grad_stats_with_none_in_one_input_only_names_the_leaf():
    losses_fn, params, batch = dense_problem(3)
    a = bj.source_grad_stats(losses_fn, params, batch, method="vmap")
    b = bj.source_grad_stats(losses_fn, params, batch, method="vmap")
    partial = a._replace(mean={**a.mean, "b": None}, var={**a.var, "b": None})
    with pytest.raises(ValueError, match=r"merge_grad_stats: a\.mean\['b'\] is None but b\.mean"):
        bj.merge_grad_stats(partial, b)
    with pytest.raises(ValueError, match=r"merge_grad_stats: b\.mean\['b'\] is None but a\.mean"):
        bj.merge_grad_stats(b, partial)
    both = bj.merge_grad_stats(partial, partial)  # None in both: stays None
    assert both.mean["b"] is None and both.var["b"] is None
    np.testing.assert_allclose(both.var["w"], bj.merge_grad_stats(a, b).var["w"], rtol=1e-6)
    with pytest.raises(TypeError, match="merge_grad_stats: b must be a bogc_jax.GradStats"):
        bj.merge_grad_stats(a, (a.count, a.mean, a.var))


@hypothesis.given(
    none_a=st.lists(st.booleans(), min_size=3, max_size=3),
    none_b=st.lists(st.booleans(), min_size=3, max_size=3),
    counts=st.tuples(st.integers(2, 9), st.integers(2, 9)),
    seed=st.integers(0, 1000),
)
@SETTINGS
def test_merge_grad_stats_none_patterns(none_a, none_b, counts, seed):
    """An error exactly when the None leaves differ; else None where both are None and, on
    every other leaf, the moments of the concatenated samples."""
    rng = np.random.default_rng(seed)
    names = ("u", "v", "w")
    samples = [{k: rng.normal(size=(c, 2, 3)).astype(np.float32) for k in names} for c in counts]

    def stats_of(sample, nones):
        mean = {k: None if off else jnp.asarray(sample[k].mean(0)) for k, off in zip(names, nones)}
        var = {
            k: None if off else jnp.asarray(sample[k].var(0, ddof=1))
            for k, off in zip(names, nones)
        }
        return bj.GradStats(jnp.float32(len(sample["u"])), mean, var)

    a, b = stats_of(samples[0], none_a), stats_of(samples[1], none_b)
    if none_a != none_b:
        with pytest.raises(ValueError, match="is None but"):
            bj.merge_grad_stats(a, b)
        return
    merged = bj.merge_grad_stats(a, b)
    assert float(merged.count) == sum(counts)
    for k, off in zip(names, none_a):
        if off:
            assert merged.mean[k] is None and merged.var[k] is None
            continue
        whole = np.concatenate([samples[0][k], samples[1][k]]).astype(np.float64)
        np.testing.assert_allclose(merged.mean[k], whole.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(merged.var[k], whole.var(0, ddof=1), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Integer options: NumPy ints accepted, bools rejected; keyword-only hyper-parameters.


def test_numpy_int_options_accepted_and_bools_rejected():
    losses_fn, params, batch = dense_problem(4, n=6)
    want = bj.source_grad_stats(losses_fn, params, batch, method="vmap", chunk_size=2)
    got = bj.source_grad_stats(losses_fn, params, batch, method="vmap", chunk_size=np.int64(2))
    np.testing.assert_allclose(got.var["w"], want.var["w"], rtol=1e-6)
    for bad in (True, np.bool_(True)):
        with pytest.raises(ValueError, match=r"chunk_size must be a positive int or None"):
            bj.source_grad_stats(losses_fn, params, batch, method="vmap", chunk_size=bad)
    lap = bj.laplace_grad_stats(
        losses_fn,
        params,
        batch,
        jax.random.key(0),
        mask={"w": True, "b": False},
        num_samples=np.int64(3),
        dataset_size=np.int32(60),
        chunk_size=np.int64(3),
    )
    assert float(lap.count) == 3.0
    tx = bj.multi_steps(optax.sgd(0.1), 2, num_sources=np.int64(3), num_modalities=np.int8(2))
    assert tx.init(params).grad_stats.mean["w"].shape == (3, 3, 3)
    with pytest.raises(ValueError, match="num_sources must be a positive int or None; got True"):
        bj.multi_steps(optax.sgd(0.1), 2, num_sources=True)


def test_hyper_parameters_are_keyword_only():
    losses_fn, params, batch = dense_problem(5)
    with pytest.raises(TypeError, match="positional"):
        bj.source_grad_stats(losses_fn, params, batch, "vmap")  # pylint: disable=too-many-function-args
    with pytest.raises(TypeError, match="positional"):
        bj.laplace_grad_stats(losses_fn, params, batch, jax.random.key(0), {"w": True, "b": False})


# ----------------------------------------------------------------------------------------
# Bad PRNG keys for the Laplace draws.


@pytest.mark.parametrize(
    "key",
    [0, None, jnp.zeros(2, jnp.float32), jax.random.split(jax.random.key(0), 3)],
    ids=["int", "none", "float-array", "batch-of-keys"],
)
def test_laplace_bad_key_is_an_early_error(key):
    losses_fn, params, batch = dense_problem(6)
    with pytest.raises(TypeError, match=r"laplace_grad_stats: key must be one PRNG key"):
        bj.laplace_grad_stats(losses_fn, params, batch, key, mask={"w": True, "b": False})


def test_laplace_takes_typed_and_raw_keys_alike():
    losses_fn, params, batch = dense_problem(7)
    run = functools.partial(
        bj.laplace_grad_stats, losses_fn, params, batch, mask={"w": True, "b": False}
    )
    typed, raw = run(jax.random.key(3)), run(jax.random.PRNGKey(3))
    np.testing.assert_allclose(typed.var["w"], raw.var["w"], rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Flax NNX modules, as nnx.grad takes them.


def test_nnx_module_as_params_like_nnx_grad():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.enc = nnx.Linear(3, 4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)
            self.calls = nnx.Variable(jnp.zeros((), jnp.int32))  # not a Param: no statistics

        def __call__(self, x):
            h = jnp.tanh(self.enc(x))
            return self.head(h), h

    x = jax.random.normal(jax.random.key(0), (8, 3))
    y = jax.random.normal(jax.random.key(1), (8, 2))
    batch = (x, y)

    def losses_fn(model, batch):  # [2, B]: the head's loss and an encoder-only loss
        out, h = model(batch[0])
        return jnp.stack([jnp.square(out - batch[1]).sum(-1), jnp.square(h).sum(-1)])

    model = Net(nnx.Rngs(0))
    stats = bj.source_grad_stats(losses_fn, model, batch)
    # The split/merge idiom gives the same statistics.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure = bj.source_grad_stats(
        lambda p, b: losses_fn(nnx.merge(graphdef, p, rest), b), nnx.as_pure(params), batch
    )
    got = jax.tree.leaves(nnx.as_pure(stats.mean)) + jax.tree.leaves(nnx.as_pure(stats.var))
    want = jax.tree.leaves(pure.mean) + jax.tree.leaves(pure.var)
    assert len(got) == len(want) == 8
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Shaped like nnx.grad's result: nnx.Optimizer takes it as an extra argument.
    grads = nnx.grad(lambda m: jnp.sum(losses_fn(m, batch)) / x.shape[0])(model)
    assert jax.tree.structure(nnx.as_pure(stats.mean)) == jax.tree.structure(
        jax.tree.map(lambda g: g[None], nnx.as_pure(grads))
    )
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    opt = nnx.Optimizer(model, optax.chain(bj.bogc(2), optax.sgd(0.1)), wrt=nnx.Param)
    updates = opt.update(model, grads, grad_stats=stats)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    for b, u, a in zip(jax.tree.leaves(before), jax.tree.leaves(updates), jax.tree.leaves(after)):
        np.testing.assert_allclose(a, b + u, rtol=1e-6, atol=1e-7)
    assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates))
    # Inside nnx.jit too.
    jitted = nnx.jit(lambda m, b: bj.source_grad_stats(losses_fn, m, b, method="vmap"))(
        model, batch
    )
    assert jax.tree.structure(jitted.mean) == jax.tree.structure(stats.mean)
