"""Property-based fuzzing of every public entry point with random pytrees and values.

Random parameter trees, shapes, numbers of sources and modalities, and values spanning
many orders of magnitude (with exact zeros, identical sources and untouched coordinates).
For finite inputs every output is finite and the documented invariants hold; the only
exceptions raised are the documented errors. Compiled functions are cached per
structure, so hypothesis mostly varies values.
"""

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import bogc_jax as bj
from bogc_jax import evidence as ev

SETTINGS = hypothesis.settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
FAST_COMPILE = {"xla_backend_optimization_level": 0}
seeds = st.integers(0, 2**32 - 1)

# Parameter templates: ranks 0 to 3, nested dicts, lists and tuples.
TEMPLATES = (
    {"w": (3,)},
    {"enc": {"w": (2, 3), "b": (3,)}, "head": [(), (2, 1, 2)]},
    [(4,), ((2, 2), (1, 3))],
)
AGGREGATIONS = ("dempster", "precision", "dimension_frame", "sum")


def shapes(template):
    return jax.tree.leaves(
        template, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
    )


def build(template, fn):
    leaves = shapes(template)
    treedef = jax.tree.structure(
        template, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
    )
    return jax.tree.unflatten(treedef, [fn(k, s) for k, s in enumerate(leaves)])


def finite(tree) -> bool:
    return all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))


def close(a, b, rtol):
    """Normwise: ``max |a - b| <= rtol * max |b|`` for every leaf."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.size and np.max(np.abs(x - y)) > rtol * max(np.max(np.abs(y)), 1e-300):
            return False
    return True


# ------------------------------------------------------------- source_grad_stats


def coefficient(s, k):
    """Source ``s``'s weight on leaf ``k`` (0: the source does not touch the leaf)."""
    return 0.0 if (s + k) % 3 == 2 else 1.0 + 0.5 * s - 0.25 * k


@functools.cache
def stats_fn(template_index, num_sources, method, chunk_size):
    """Jitted statistics of ``loss[s, i] = sum_k c[s, k] (p_k . x_k,i)**2 / 2``."""
    template = TEMPLATES[template_index]

    def losses_fn(params, batch):
        rows = []
        for s in range(num_sources):
            total = 0.0
            for k, (p, x) in enumerate(zip(jax.tree.leaves(params), jax.tree.leaves(batch))):
                axes = tuple(range(1, x.ndim))
                total = total + coefficient(s, k) * 0.5 * jnp.sum(p * x, axis=axes) ** 2
            rows.append(total)
        return jnp.stack(rows)

    del template
    return jax.jit(
        lambda p, b: bj.source_grad_stats(losses_fn, p, b, method=method, chunk_size=chunk_size)
    )


@SETTINGS
@hypothesis.given(
    template_index=st.integers(0, len(TEMPLATES) - 1),
    num_sources=st.integers(1, 3),
    batch=st.sampled_from([2, 3, 4, 6]),
    method=st.sampled_from(["vmap", "auto"]),
    chunked=st.booleans(),
    log_scale=st.floats(-6, 6),
    seed=seeds,
)
def test_source_grad_stats_match_float64_reference(
    template_index, num_sources, batch, method, chunked, log_scale, seed
):
    template = TEMPLATES[template_index]
    rng = np.random.default_rng(seed)
    scale = 10.0**log_scale
    params = build(template, lambda k, s: jnp.asarray(rng.normal(size=s), jnp.float32))
    xs = build(
        template, lambda k, s: jnp.asarray(scale * rng.normal(size=(batch,) + s), jnp.float32)
    )
    if rng.random() < 0.3:  # identical examples: zero variance up to rounding
        xs = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), xs)
    chunk = 2 if chunked and batch % 2 == 0 else None
    stats = stats_fn(template_index, num_sources, method, chunk)(params, xs)
    assert float(stats.count) == batch
    for k, (p, x, m, v) in enumerate(
        zip(
            jax.tree.leaves(params),
            jax.tree.leaves(xs),
            jax.tree.leaves(stats.mean),
            jax.tree.leaves(stats.var),
        )
    ):
        p64, x64 = np.asarray(p, np.float64), np.asarray(x, np.float64)
        axes = tuple(range(1, x64.ndim))
        inner = np.sum(p64 * x64, axis=axes).reshape((batch,) + (1,) * p64.ndim)
        per_example = np.stack([coefficient(s, k) * inner * x64 for s in range(num_sources)])
        assert m.shape == v.shape == (num_sources,) + p.shape
        assert m.dtype == v.dtype == jnp.float32
        assert finite((m, v)) and np.all(np.asarray(v) >= 0)
        want_m = per_example.mean(axis=1)
        want_v = per_example.var(axis=1, ddof=1)
        top = max(np.max(np.abs(per_example)), 1e-300)
        assert np.max(np.abs(np.asarray(m) - want_m)) <= 1e-5 * top
        assert np.max(np.abs(np.asarray(v) - want_v)) <= 1e-4 * top**2


# ------------------------------------------------------------ evidence / Dempster


def wide_values(rng, shape, zero=0.2):
    """Magnitudes 10**U(-30, 30) with random signs and exact zeros."""
    x = rng.normal(size=shape) * 10.0 ** rng.uniform(-30, 30, size=shape)
    x[rng.random(shape) < zero] = 0.0
    return x


@jax.jit
def evidence_chain(mean, var, kappa, gamma, prior_weight):
    """precision -> evidence -> fused masses, pignistic weights; Dirichlet opinions."""
    touched = (mean != 0) | (var != 0)
    lam = ev.precision(var, mean, touched)
    e = ev.evidence(lam, touched, kappa, gamma)
    m, m_theta = ev.fuse_simple_supports(e, prior_weight)
    w = ev.pignistic_weights(m, m_theta, touched)
    b, u = ev.dirichlet_opinion(e)
    return touched, lam, e, m, m_theta, w, b, u, ev.belief_shares(b, u)


@SETTINGS
@hypothesis.given(num_sources=st.sampled_from([1, 2, 3, 5]), seed=seeds)
def test_evidence_chain_is_finite_and_normalised(num_sources, seed):
    rng = np.random.default_rng(seed)
    shape = (num_sources, 4)
    mean = jnp.asarray(wide_values(rng, shape), jnp.float32)
    var = jnp.asarray(np.abs(wide_values(rng, shape)), jnp.float32)
    hyper = [jnp.float32(x) for x in (rng.uniform(0, 3), rng.uniform(0, 3), rng.uniform(0.1, 3))]
    touched, lam, e, m, m_theta, w, b, u, shares = evidence_chain(mean, var, *hyper)
    touched = np.asarray(touched)
    assert finite((lam, e, m, m_theta, w, b, u, shares))
    assert np.all(np.asarray(lam) >= 0) and np.all(np.asarray(lam)[~touched] == 0)
    assert np.all(np.asarray(e) >= 0) and np.all(np.asarray(shares) >= 0)
    np.testing.assert_allclose(np.sum(m, axis=0) + m_theta, 1.0, rtol=1e-5)
    w = np.asarray(w)
    any_touch = touched.any(axis=0)
    np.testing.assert_allclose(w.sum(axis=0)[any_touch], 1.0, rtol=1e-5)
    assert np.all((w >= 0) & (w <= 1 + 1e-6)) and np.all(w.sum(axis=0)[~any_touch] == 0)
    np.testing.assert_allclose(np.sum(b, axis=1) + u[:, 0], 1.0, rtol=1e-5)


@jax.jit
def closed_form_and_fold(e):
    m, m_theta = ev.fuse_simple_supports(e, 1.0)
    b, u = ev.simple_support_opinion(e, 1.0)
    return m, m_theta, *ev.dempster_fold(ev.simple_supports_on_sources(b), u)


@SETTINGS
@hypothesis.given(num_sources=st.integers(1, 4), log_evidence=st.floats(-8, 8), seed=seeds)
def test_dempster_fold_equals_the_closed_form(num_sources, log_evidence, seed):
    rng = np.random.default_rng(seed)
    e = rng.exponential(size=(num_sources, 3)) * 10.0**log_evidence
    e[rng.random(e.shape) < 0.2] = 0.0
    m, m_theta, fold_b, fold_u = closed_form_and_fold(jnp.asarray(e, jnp.float32))
    assert finite((m, m_theta))
    if finite((fold_b, fold_u)) and log_evidence < 4:  # the fold itself may underflow
        np.testing.assert_allclose(fold_b, m, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(fold_u, m_theta, rtol=2e-4, atol=1e-6)


# ------------------------------------------------------------------------ bogc


def random_stats(rng, template, num_sources, log_scale, identical):
    def leaf(k, shape):
        full = (num_sources,) + shape
        mean = rng.normal(size=full) * 10.0 ** (log_scale + rng.uniform(-2, 2, size=full))
        var = (
            rng.exponential(size=full)
            * 10.0 ** (2 * log_scale)
            * 10.0 ** rng.uniform(-3, 3, size=full)
        )
        var[rng.random(full) < 0.15] = 0.0
        off = rng.random(full) < 0.3
        mean[off] = 0.0
        var[off] = 0.0
        if identical:
            mean, var = np.broadcast_to(mean[:1], full), np.broadcast_to(var[:1], full)
        return jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)

    pairs = build(template, leaf)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and hasattr(x[0], "shape")
    return bj.GradStats(
        jnp.float32(8.0),
        jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair),
        jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair),
    )


def stats_grads_params(rng, template, num_sources, log_scale=0.0, identical=False):
    """``(stats, grads, params)``: random statistics, their fixed-weight sum, zero params."""
    stats = random_stats(rng, template, num_sources, log_scale, identical)
    grads = stats.fixed_weight_grads()
    return stats, grads, jax.tree.map(jnp.zeros_like, grads)


@functools.cache
def bogc_update(num_sources, aggregation, kappa=1.0, gamma=1.0):
    tx = bj.bogc(num_sources, aggregation=aggregation, kappa=kappa, gamma=gamma)
    return tx, jax.jit(tx.update, compiler_options=FAST_COMPILE)


# A bogc problem: a template, 1..4 sources, an aggregation and the scale of the statistics.
BOGC_PROBLEMS = dict(
    template_index=st.integers(0, len(TEMPLATES) - 1),
    num_sources=st.integers(1, 4),
    aggregation=st.sampled_from(AGGREGATIONS),
    log_scale=st.floats(-8, 8),
)


@SETTINGS
@hypothesis.given(**BOGC_PROBLEMS, identical=st.booleans(), seed=seeds)
def test_bogc_is_finite_and_keeps_the_invariants(
    template_index, num_sources, aggregation, log_scale, identical, seed
):
    rng = np.random.default_rng(seed)
    template = TEMPLATES[template_index]
    stats, grads, params = stats_grads_params(rng, template, num_sources, log_scale, identical)
    tx, update = bogc_update(num_sources, aggregation)
    out, state = update(grads, tx.init(params), params, grad_stats=stats)
    assert finite((out, state)) and bool(state.finite)
    assert all(
        u.dtype == g.dtype and u.shape == g.shape
        for u, g in zip(jax.tree.leaves(out), jax.tree.leaves(grads))
    )
    if aggregation == "sum":
        assert close(out, grads, 0.0)
        return
    for w in jax.tree.leaves(state.source_weights):
        assert np.all(np.asarray(w) >= 0)
    for u in jax.tree.leaves(state.uncertainty):
        assert 0.0 <= float(u) <= 1.0 + 1e-6
    for o, m, v in zip(
        jax.tree.leaves(out), jax.tree.leaves(stats.mean), jax.tree.leaves(stats.var)
    ):
        m, v, o = np.asarray(m, np.float64), np.asarray(v, np.float64), np.asarray(o, np.float64)
        touched = (m != 0) | (v != 0)
        single = touched.sum(axis=0) == 1  # property 2: one source passes its mean through
        np.testing.assert_allclose(o[single], m.sum(axis=0)[single], rtol=1e-5)
        assert np.all(o[touched.sum(axis=0) == 0] == 0)
        if identical:  # property 1: symmetric evidence gives the fixed-weight sum
            np.testing.assert_allclose(
                o, m.sum(axis=0), rtol=1e-4, atol=1e-5 * np.max(np.abs(m.sum(axis=0)), initial=0)
            )
    # Property 3: permuting the sources changes nothing.
    perm = rng.permutation(num_sources)
    permuted = bj.GradStats(
        stats.count,
        jax.tree.map(lambda x: x[perm], stats.mean),
        jax.tree.map(lambda x: x[perm], stats.var),
    )
    out_p, _ = update(grads, tx.init(params), params, grad_stats=permuted)
    assert close(out_p, out, 1e-5)
    # Property 4: scaling every loss by c scales the output by c.
    c = float(10.0 ** rng.uniform(-3, 3))
    scaled = bj.GradStats(
        stats.count,
        jax.tree.map(lambda x: c * x, stats.mean),
        jax.tree.map(lambda x: c * c * x, stats.var),
    )
    out_c, _ = update(
        jax.tree.map(lambda g: c * g, grads), tx.init(params), params, grad_stats=scaled
    )
    assert close(out_c, jax.tree.map(lambda o: c * o, out), 1e-4)


@SETTINGS
@hypothesis.given(
    num_sources=st.integers(1, 3),
    aggregation=st.sampled_from(AGGREGATIONS),
    where=st.sampled_from(["mean", "var", "grads"]),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
    seed=seeds,
)
def test_bogc_nonfinite_inputs_never_reach_the_state(num_sources, aggregation, where, value, seed):
    rng = np.random.default_rng(seed)
    template = TEMPLATES[1]
    stats, grads, params = stats_grads_params(rng, template, num_sources)
    tx, update = bogc_update(num_sources, aggregation)
    _, state = update(grads, tx.init(params), params, grad_stats=stats)
    bad_leaf = lambda x: x.at[(0,) * x.ndim].set(value)
    bad_stats, bad_grads = stats, grads
    if where == "grads":
        bad_grads = {**grads, "enc": {**grads["enc"], "w": bad_leaf(grads["enc"]["w"])}}
    else:
        tree = getattr(stats, where)
        tree = {**tree, "enc": {**tree["enc"], "w": bad_leaf(tree["enc"]["w"])}}
        bad_stats = stats._replace(**{where: tree})
    if where == "var" and value < 0:
        return  # -inf is not a variance; covered by the NaN and +inf cases
    out, new_state = update(bad_grads, state, params, grad_stats=bad_stats)
    reads = aggregation != "sum" or where == "grads"
    assert bool(new_state.finite) == (not reads)
    if reads:
        for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(bad_grads)):
            np.testing.assert_array_equal(x, y)  # grads pass through (NaN stays NaN)
        for x, y in zip(jax.tree.leaves(new_state[:2]), jax.tree.leaves(state[:2])):
            np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------- modality transforms


def modality_problem(rng, num_modalities, log_scale):
    params = {
        "enc": [{"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)} for _ in range(num_modalities)],
        "head": jnp.zeros(4),
    }
    labels = bj.label_params(params, {"enc": bj.labels.INDEX, "head": None})
    scale = lambda shape: 10.0 ** (log_scale + rng.uniform(-1, 1, size=shape))
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape) * scale(p.shape), jnp.float32), params
    )
    return params, labels, grads


score_values = st.sampled_from([0.0, 0.125, 0.25, 0.5, 0.625, 1.0, 0.3333, 0.9])


@SETTINGS
@hypothesis.given(
    num_modalities=st.integers(2, 4),
    mode=st.sampled_from(["stable", "reference"]),
    scores=st.lists(st.lists(score_values, min_size=4, max_size=4), min_size=2, max_size=4),
    nan_at=st.integers(-1, 3),
    log_scale=st.floats(-20, 20),
    seed=seeds,
)
def test_cggm_coefficients_bounded_and_state_unpoisoned(
    num_modalities, mode, scores, nan_at, log_scale, seed
):
    rng = np.random.default_rng(seed)
    params, labels, grads = modality_problem(rng, num_modalities, log_scale)
    tx = bj.cggm(labels, mode=mode)
    sequence = [jnp.asarray(s[:num_modalities], jnp.float32) for s in scores]
    clean_state = tx.init(params)
    for s in sequence:
        out, clean_state = tx.update(grads, clean_state, params, modality_scores=s)
        b = np.asarray(clean_state.coefficients)
        assert finite((out, clean_state)) and bool(clean_state.finite)
        if mode == "stable":
            assert np.all((b > 0) & (b < 1))
            np.testing.assert_allclose(b.sum(), num_modalities - 1, rtol=1e-5)
    if 0 <= nan_at < len(sequence):
        state = tx.init(params)
        noisy = sequence[:nan_at] + [jnp.full(num_modalities, jnp.nan)] + sequence[nan_at:]
        for s in noisy:
            _, state = tx.update(grads, state, params, modality_scores=s)
        for x, y in zip(jax.tree.leaves(state[:5]), jax.tree.leaves(clean_state[:5])):
            np.testing.assert_array_equal(x, y)
        assert int(state.nonfinite_count) == 1


@SETTINGS
@hypothesis.given(
    num_modalities=st.integers(2, 4),
    mode=st.sampled_from(["continuous", "reference"]),
    scores=st.lists(score_values, min_size=4, max_size=4),
    noise=st.booleans(),
    log_scale=st.floats(-20, 20),
    seed=seeds,
)
def test_ogm_ge_is_finite(num_modalities, mode, scores, noise, log_scale, seed):
    rng = np.random.default_rng(seed)
    params, labels, grads = modality_problem(rng, num_modalities, log_scale)
    tx = bj.ogm_ge(labels, alpha=float(rng.uniform(0, 2)), noise=noise, key=seed % 1000, mode=mode)
    out, state = tx.update(
        grads,
        tx.init(params),
        params,
        modality_scores=jnp.asarray(scores[:num_modalities], jnp.float32),
    )
    assert finite((out, state)) and bool(state.finite)
    k = np.asarray(state.coefficients)
    assert np.all((k >= 0) & (k <= 1)) and np.sum(k < 1) <= 1
    np.testing.assert_array_equal(out["head"], grads["head"])


@SETTINGS
@hypothesis.given(
    num_modalities=st.integers(2, 3),
    rescale=st.sampled_from(["leaf", "group"]),
    log_scale=st.floats(-30, 30),
    opposite=st.booleans(),
    seed=seeds,
)
def test_mmpareto_is_finite_and_scale_equivariant(
    num_modalities, rescale, log_scale, opposite, seed
):
    rng = np.random.default_rng(seed)
    params, labels, grads = modality_problem(rng, num_modalities, log_scale)
    s = num_modalities + 1

    def mean_leaf(g):
        m = np.asarray(rng.normal(size=(s,) + g.shape), np.float64) * np.max(np.abs(g))
        if opposite:  # fusion and unimodal gradients in exactly opposite directions
            m[1:] = -m[:1] * rng.uniform(0.5, 2)
        m[:, rng.random(g.shape) < 0.2] = 0.0
        return jnp.asarray(m, jnp.float32)

    mean = jax.tree.map(mean_leaf, grads)
    stats = bj.GradStats(jnp.float32(8), mean, jax.tree.map(jnp.abs, mean))
    tx = bj.mmpareto(labels, rescale=rescale)
    out, state = tx.update(grads, tx.init(params), params, grad_stats=stats)
    assert finite((out, state)) and bool(state.finite)
    assert np.all(np.abs(np.asarray(state.cosines)) <= 1 + 1e-5)
    w = np.asarray(state.weights)
    assert np.all((w >= 0) & (w <= 1)) and np.allclose(w.sum(axis=1), 1.0)
    c = 2.0 ** int(rng.integers(-20, 20))  # a power of two: scaling is exact
    scaled = bj.GradStats(stats.count, jax.tree.map(lambda x: c * x, mean), stats.var)
    out_c, _ = tx.update(
        jax.tree.map(lambda g: c * g, grads), tx.init(params), params, grad_stats=scaled
    )
    if abs(log_scale) < 25:  # c * out stays inside float32's range
        assert close(out_c, jax.tree.map(lambda o: c * np.asarray(o, np.float64), out), 1e-5)


def test_documented_errors_only():
    """Misuse found while fuzzing raises the documented error types, nothing else."""
    params = {"w": jnp.zeros(3)}
    stats = bj.GradStats(jnp.float32(4), {"w": jnp.ones((2, 3))}, {"w": jnp.ones((2, 3))})
    for bad in ({"w": jnp.ones((3, 3))}, {"w": jnp.ones((2, 4))}, {"v": jnp.ones((2, 3))}):
        with pytest.raises(ValueError, match="grad_stats"):
            bj.bogc(2).update(
                params, bj.bogc(2).init(params), params, grad_stats=stats._replace(mean=bad)
            )
    # Checks added with the non-finite policy and the correction semantics.
    with pytest.raises(TypeError, match="mask"):
        bj.bogc(2, mask={"w": "False"}).update(
            params, bj.bogc(2).init(params), params, grad_stats=stats
        )
    with pytest.raises(ValueError, match="modality_sources"):
        bj.mmpareto({"a": 0, "b": 1}, modality_sources=(1, 1))
    with pytest.raises(ValueError, match="same path"):
        bj.label_params({"a": jnp.ones(1)}, {"a": 0, "a/": 1})
    with pytest.raises(ValueError, match="finite"):
        bj.bogc(2, kappa=np.inf)


# ------------------------------------------- correction, overflow, domains (fuzzed)


@SETTINGS
@hypothesis.given(**BOGC_PROBLEMS, seed=seeds)
def test_bogc_corrects_any_incoming_gradient(
    template_index, num_sources, aggregation, log_scale, seed
):
    """out(g + r) = out(g) + r; without evidence (kappa = 0) out(x) = x for any x."""
    rng = np.random.default_rng(seed)
    template = TEMPLATES[template_index]
    stats, grads, params = stats_grads_params(rng, template, num_sources, log_scale)
    extra = jax.tree.map(
        lambda g: jnp.asarray(rng.normal(size=g.shape) * 10.0**log_scale, jnp.float32), grads
    )
    tx, update = bogc_update(num_sources, aggregation)
    out, _ = update(grads, tx.init(params), params, grad_stats=stats)
    moved = jax.tree.map(jnp.add, grads, extra)
    out_extra, state = update(moved, tx.init(params), params, grad_stats=stats)
    assert bool(state.finite)
    expected = jax.tree.map(lambda o, r: np.asarray(o, np.float64) + np.asarray(r), out, extra)
    scale = jax.tree.map(lambda a, b: np.abs(np.asarray(a)) + np.abs(np.asarray(b)), out, extra)
    for a, e, s in zip(
        jax.tree.leaves(out_extra), jax.tree.leaves(expected), jax.tree.leaves(scale)
    ):
        assert np.all(np.abs(np.asarray(a, np.float64) - e) <= 1e-5 * s + 1e-30)
    if aggregation != "precision":  # the precision reading has no evidence (no kappa)
        tx0, update0 = bogc_update(num_sources, aggregation, 0.0, 1.0)
        identity, state0 = update0(moved, tx0.init(params), params, grad_stats=stats)
        assert bool(state0.finite) and close(identity, moved, 1e-6)


@SETTINGS
@hypothesis.given(
    num_sources=st.integers(2, 10),
    gamma=st.sampled_from([10.0, 40.0, 100.0, 300.0]),
    aggregation=st.sampled_from(["dempster", "dimension_frame"]),
    seed=seeds,
)
def test_bogc_sharp_evidence_never_overflows(num_sources, gamma, aggregation, seed):
    rng = np.random.default_rng(seed)
    stats, grads, params = stats_grads_params(rng, TEMPLATES[0], num_sources)
    tx, update = bogc_update(num_sources, aggregation, 1.0, gamma)
    out, state = update(grads, tx.init(params), params, grad_stats=stats)
    assert bool(state.finite) and finite((out, state))
    for w in jax.tree.leaves(state.source_weights):
        assert np.all(np.asarray(w) >= 0)


@SETTINGS
@hypothesis.given(num_sources=st.integers(1, 4), seed=seeds)
def test_bogc_negative_variance_is_flagged(num_sources, seed):
    rng = np.random.default_rng(seed)
    stats, grads, params = stats_grads_params(rng, TEMPLATES[1], num_sources)
    leaves, treedef = jax.tree.flatten(stats.var)
    k = int(rng.integers(0, len(leaves)))
    index = tuple(int(rng.integers(0, d)) for d in leaves[k].shape)
    leaves[k] = leaves[k].at[index].set(-float(rng.uniform(1e-6, 1.0)))
    bad = stats._replace(var=jax.tree.unflatten(treedef, leaves))
    tx, update = bogc_update(num_sources, "dempster")
    out, state = update(grads, tx.init(params), params, grad_stats=bad)
    assert not bool(state.finite) and int(state.nonfinite_count) == 1
    assert close(out, grads, 0.0)


@SETTINGS
@hypothesis.given(
    num_modalities=st.integers(2, 4),
    negative_at=st.integers(0, 3),
    scores=st.lists(score_values, min_size=4, max_size=4),
    seed=seeds,
)
def test_ogm_ge_negative_scores_are_flagged(num_modalities, negative_at, scores, seed):
    rng = np.random.default_rng(seed)
    params, labels, grads = modality_problem(rng, num_modalities, 0.0)
    scores = np.asarray(scores[:num_modalities], np.float32)
    scores[negative_at % num_modalities] = -float(rng.uniform(1e-3, 1.0))
    tx = bj.ogm_ge(labels, noise=bool(seed % 2), key=seed % 1000)
    state = tx.init(params)
    out, new = tx.update(grads, state, params, modality_scores=jnp.asarray(scores))
    assert not bool(new.finite) and close(out, grads, 0.0)
    for x, y in zip(jax.tree.leaves(new[:4]), jax.tree.leaves(state[:4])):
        np.testing.assert_array_equal(x, y)


@SETTINGS
@hypothesis.given(
    num_classes=st.integers(2, 5),
    batch=st.integers(2, 6),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
    padding=st.sampled_from([-100, -1, 5]),
    seed=seeds,
)
def test_scores_of_nonfinite_logits_are_nonfinite(num_classes, batch, value, padding, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, batch)
    row = int(rng.integers(0, batch))
    bad = logits.copy()
    bad[row, int(rng.integers(0, num_classes))] = value
    keep = np.arange(batch) != row
    padded = labels.copy()
    padded[row] = padding if padding != 5 else num_classes
    for metric in (bj.metrics.accuracy, bj.metrics.confidence):
        assert np.isnan(metric(bad, labels))
        masked = metric(bad, padded, where=keep)
        assert np.isfinite(masked) and masked == metric(logits[keep], labels[keep])
        assert np.isnan(metric(logits, padded))  # a counted label outside [0, C)
    assert np.isnan(bj.metrics.sign_accuracy(bad.sum(1), logits[:, 0]))


@SETTINGS
@hypothesis.given(num_modalities=st.integers(2, 3), log_scale=st.floats(-10, 10), seed=seeds)
def test_mmpareto_keeps_what_the_statistics_do_not_explain(num_modalities, log_scale, seed):
    rng = np.random.default_rng(seed)
    params, labels, _ = modality_problem(rng, num_modalities, log_scale)
    s = num_modalities + 1
    mean = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=(s,) + p.shape) * 10.0**log_scale, jnp.float32),
        params,
    )
    stats = bj.GradStats(jnp.float32(8), mean, jax.tree.map(jnp.abs, mean))
    grads = stats.fixed_weight_grads()
    extra = jax.tree.map(
        lambda g: jnp.asarray(rng.normal(size=g.shape) * 10.0**log_scale, jnp.float32), grads
    )
    tx = bj.mmpareto(labels)
    out, _ = tx.update(grads, tx.init(params), params, grad_stats=stats)
    moved = jax.tree.map(jnp.add, grads, extra)
    out_extra, state = tx.update(moved, tx.init(params), params, grad_stats=stats)
    assert bool(state.finite)
    expected = jax.tree.map(lambda o, r: np.asarray(o, np.float64) + np.asarray(r), out, extra)
    assert close(out_extra, expected, 1e-5)
