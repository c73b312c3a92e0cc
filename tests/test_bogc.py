"""Tests of bj.bogc: the properties of design/bogc.md, an independent reference, errors.

Statistics are built directly (``GradStats`` with random means and variances, some
coordinates untouched by some sources: mean = var = 0) on several pytree shapes.
Property 6 (the Dempster fold against the K x K reference in every order) lives in
test_evidence.py; property 8 (one device vs 8) in test_multidevice_stats.py.
"""

import functools
import itertools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import bogc_jax as bj
from bogc_jax import evidence as ev

SETTINGS = hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
seeds = st.integers(0, 2**32 - 1)
CALIBRATING = ("dempster", "precision", "dimension_frame")
COUNT = 8.0


# The suite compiles many small update functions; XLA's backend optimisations only cost
# compile time here.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _sds(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


# Parameter templates: a dict of leaves of different ranks (scalar to rank 2), and dicts
# nested with a list and a tuple (rank 3 leaf). Each (tree, S, aggregation) compiles
# once, so there are only two.
TREES = {
    "dict_ranks": {"a": _sds(3), "b": _sds(2, 3), "c": _sds()},
    "nested": {"enc": {"w": _sds(3, 2)}, "head": [_sds(4), ({"k": _sds(1, 2, 2)},)]},
}


def build(template, fn):
    return jax.tree.map(lambda s: fn(s.shape), template)


def random_stats(
    rng,
    template,
    num_sources,
    *,
    untouched=0.3,
    zero_var=0.1,
    symmetric=False,
    all_touched_var=False,
):
    """Random GradStats shaped like ``template``.

    untouched: probability that a source does not touch a coordinate (mean = var = 0).
    zero_var: probability that a touched entry has an exactly known gradient (var = 0).
    symmetric: every touching source has the same variance at a coordinate.
    all_touched_var: touched entries have var > 0 (so a zero mean keeps them touched).
    """

    def leaf(shape):
        full = (num_sources,) + shape
        scale = 10.0 ** rng.uniform(-2, 2, size=full)
        mean = rng.normal(size=full) * scale
        var = rng.exponential(size=full) * scale**2 * 10.0 ** rng.uniform(-2, 2, size=full)
        if symmetric:
            var = np.broadcast_to(var[:1], full).copy()
        if zero_var and not all_touched_var:
            zero = rng.random(full) < zero_var
            if symmetric:
                zero = np.broadcast_to(zero[:1], full)
            var[zero] = 0.0
        off = rng.random(full) < untouched
        mean[off] = 0.0
        var[off] = 0.0
        return mean, var

    pairs = build(template, leaf)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], np.ndarray)
    mean = jax.tree.map(lambda p: jnp.asarray(p[0], jnp.float32), pairs, is_leaf=is_pair)
    var = jax.tree.map(lambda p: jnp.asarray(p[1], jnp.float32), pairs, is_leaf=is_pair)
    return bj.GradStats(jnp.asarray(COUNT, jnp.float32), mean, var)


def given_stats(min_sources=1, **strategies):
    """``hypothesis.given`` a seed, a tree of TREES, ``min_sources..4`` sources and more."""
    return hypothesis.given(
        seed=seeds,
        tree=st.sampled_from(sorted(TREES)),
        num_sources=st.integers(min_sources, 4),
        **strategies,
    )


def drawn_stats(seed, tree, num_sources, **options):
    """``(rng, template, stats)``: :func:`random_stats` of ``TREES[tree]`` from ``seed``."""
    rng = np.random.default_rng(seed)
    template = TREES[tree]
    return rng, template, random_stats(rng, template, num_sources, **options)


def run(stats, template, aggregation, *, grads=None, jit=True, mask=None, **hyper):
    num_sources = stats.num_sources
    tx = bj.bogc(num_sources, aggregation=aggregation, mask=mask, **hyper)
    params = build(template, jnp.zeros)
    state = tx.init(params)
    if grads is None:
        grads = stats.fixed_weight_grads()
    update = jax.jit(tx.update, compiler_options=FAST_COMPILE) if jit else tx.update
    return update(grads, state, params, grad_stats=stats)


DEFAULTS = dict(kappa=1.0, gamma=1.0, prior_weight=1.0, eps=1e-3)


@functools.cache
def _traced_update(aggregation, num_sources):
    """One jitted update per (aggregation, S), hyper-parameters traced (no recompiles)."""

    def update(stats, hyper):
        tx = bj.bogc(num_sources, aggregation=aggregation, **hyper)
        params = jax.tree.map(lambda m: jnp.zeros(m.shape[1:], m.dtype), stats.mean)
        grads = stats.fixed_weight_grads()
        return tx.update(grads, tx.init(params), params, grad_stats=stats)

    return jax.jit(update, compiler_options=FAST_COMPILE)


def calibrate(stats, template, aggregation, **hyper):
    """Like ``run`` (fixed-weight grads, default mask), compiled once per shape."""
    del template  # the statistics carry the shapes
    hyper = {k: jnp.asarray(hyper.get(k, v), jnp.float32) for k, v in DEFAULTS.items()}
    return _traced_update(aggregation, stats.num_sources)(stats, hyper)


def touched_count(stats):
    return jax.tree.map(
        lambda m, v: np.sum((np.asarray(m) != 0) | (np.asarray(v) != 0), 0), stats.mean, stats.var
    )


def assert_tree_close(actual, expected, scale=None, rtol=1e-5):
    """|actual - expected| <= rtol * (scale + |expected|), leaf by leaf."""
    actual_l = jax.tree.leaves(actual)
    expected_l = jax.tree.leaves(expected)
    scale_l = jax.tree.leaves(scale) if scale is not None else [0.0] * len(actual_l)
    assert len(actual_l) == len(expected_l) == len(scale_l)
    for a, e, s in zip(actual_l, expected_l, scale_l):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape
        bound = rtol * (np.asarray(s, np.float64) + np.abs(e)) + 1e-30
        assert np.all(np.abs(a - e) <= bound), (np.max(np.abs(a - e) - bound), a, e)


def abs_sum(stats):
    """The natural scale of a coordinate: sum_s |mu[s, d]|."""
    return jax.tree.map(lambda m: np.sum(np.abs(np.asarray(m, np.float64)), 0), stats.mean)


# -------------------------------------------------------- an independent reference


def ref_combine(b1, u1, b2, u2):
    conflict = np.sum(np.outer(b1, b2) * (1.0 - np.eye(len(b1))))
    return (b1 * b2 + b1 * u2 + b2 * u1) / (1 - conflict), u1 * u2 / (1 - conflict)


def reference_leaf(mean, var, count, aggregation, kappa=1.0, gamma=1.0, prior_weight=1.0, eps=1e-3):
    """bogc.md's maths for one leaf, in float64 loops: (calibrated, weights, uncertainty)."""
    mean = np.asarray(mean, np.float64).reshape(mean.shape[0], -1)
    v = np.asarray(var, np.float64).reshape(mean.shape) / count
    num_sources, num_coords = mean.shape
    touched = (mean != 0) | (v != 0)
    lam = np.zeros_like(v)
    e = np.zeros_like(v)
    for d in range(num_coords):
        t = touched[:, d]
        if not t.any():
            continue
        floor = eps * (mean[t, d] ** 2).mean()  # signal-to-noise floor
        lam[t, d] = 1.0 / (v[t, d] + floor)  # > 0: a touched source has mu != 0 or v != 0
        e[t, d] = kappa * (lam[t, d] / lam[t, d].mean()) ** gamma
    weights = np.zeros_like(v)
    thetas = []
    if aggregation == "dimension_frame":
        k = num_coords
        strength = e.sum(axis=1) + k
        b, u = e / strength[:, None], k / strength
        fused_u = u[0]
        fused_b = b[0]
        for s in range(1, num_sources):
            fused_b, fused_u = ref_combine(fused_b, fused_u, b[s], u[s])
        for d in range(num_coords):
            share = np.zeros(num_sources)
            for r in range(1, num_sources + 1):
                for subset in itertools.combinations(range(num_sources), r):
                    term = np.prod([b[s, d] if s in subset else u[s] for s in range(num_sources)])
                    for s in subset:
                        share[s] += term / r
            t = touched[:, d]
            if share.sum() > 0:
                weights[:, d] = share / share.sum()
            elif t.any():
                weights[t, d] = 1.0 / t.sum()
        uncertainty = fused_u
    else:
        for d in range(num_coords):
            t = np.flatnonzero(touched[:, d])
            if not len(t):
                continue
            if aggregation == "precision":
                weights[t, d] = lam[t, d] / lam[t, d].sum()
                continue
            # Simple support opinions on the frame T_d, fused two at a time (K x K form).
            frame = len(t)
            bel = [np.eye(frame)[i] * e[s, d] / (e[s, d] + prior_weight) for i, s in enumerate(t)]
            unc = [prior_weight / (e[s, d] + prior_weight) for s in t]
            fb, fu = bel[0], unc[0]
            for i in range(1, frame):
                fb, fu = ref_combine(fb, fu, bel[i], unc[i])
            weights[t, d] = fb + fu / frame
            thetas.append(fu)
        uncertainty = np.mean(thetas) if thetas else 0.0
        if aggregation == "precision":
            uncertainty = 0.0
    n_t = touched.sum(axis=0)
    calibrated = n_t * np.sum(weights * mean, axis=0)
    relative = n_t * weights
    per_source = np.array(
        [relative[s, touched[s]].mean() if touched[s].any() else 0.0 for s in range(num_sources)]
    )
    return calibrated, per_source, uncertainty, weights


@pytest.mark.parametrize("aggregation", CALIBRATING)
@SETTINGS
@given_stats(
    kappa=st.floats(0.0, 4.0),
    gamma=st.floats(0.0, 2.0),
    prior_weight=st.floats(0.2, 4.0),
    eps=st.floats(1e-4, 0.5),
)
def test_matches_reference(aggregation, seed, tree, num_sources, kappa, gamma, prior_weight, eps):
    _, template, stats = drawn_stats(seed, tree, num_sources)
    # The transform receives float32 hyper-parameters (a kappa of 1e-228 is 0 there).
    hyper = dict(kappa=kappa, gamma=gamma, prior_weight=prior_weight, eps=eps)
    hyper = {k: float(np.float32(v)) for k, v in hyper.items()}
    out, state = calibrate(stats, template, aggregation, **hyper)
    for g, m, v, w, u in zip(
        jax.tree.leaves(out),
        jax.tree.leaves(stats.mean),
        jax.tree.leaves(stats.var),
        jax.tree.leaves(state.source_weights),
        jax.tree.leaves(state.uncertainty),
    ):
        want_g, want_w, want_u, _ = reference_leaf(m, v, COUNT, aggregation, **hyper)
        scale = np.sum(np.abs(np.asarray(m, np.float64)), 0).reshape(-1)
        np.testing.assert_array_less(
            np.abs(np.asarray(g).reshape(-1) - want_g), 1e-4 * (scale + 1e-30)
        )
        np.testing.assert_allclose(w, want_w, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(u, want_u, rtol=1e-4, atol=1e-6)
        assert g.dtype == jnp.float32 and w.dtype == jnp.float32 and u.dtype == jnp.float32


# --------------------------------------------------------------- the eight properties


@pytest.mark.parametrize("aggregation", CALIBRATING)
@SETTINGS
@given_stats(kappa=st.floats(0.0, 4.0), gamma=st.floats(0.0, 3.0))
def test_property1_symmetric_evidence_gives_the_fixed_weight_sum(
    aggregation, seed, tree, num_sources, kappa, gamma
):
    _, template, stats = drawn_stats(seed, tree, num_sources, symmetric=True)
    fixed = stats.fixed_weight_grads()
    out, state = calibrate(stats, template, aggregation, kappa=kappa, gamma=gamma)
    assert_tree_close(out, fixed, abs_sum(stats))
    # Every source's weight relative to the plain sum is 1 where it touches something.
    for w, m, v in zip(
        jax.tree.leaves(state.source_weights),
        jax.tree.leaves(stats.mean),
        jax.tree.leaves(stats.var),
    ):
        touches = np.asarray((m != 0) | (v != 0)).reshape(num_sources, -1).any(axis=1)
        np.testing.assert_allclose(np.asarray(w), np.where(touches, 1.0, 0.0), rtol=1e-5)


@pytest.mark.parametrize("aggregation", ["dempster", "dimension_frame"])
@pytest.mark.parametrize("zero", ["kappa", "gamma"])
@SETTINGS
@given_stats(other=st.floats(0.1, 4.0))
def test_property1_no_evidence_gives_the_fixed_weight_sum(
    aggregation, zero, seed, tree, num_sources, other
):
    _, template, stats = drawn_stats(seed, tree, num_sources)  # asymmetric variances
    hyper = {"kappa": 0.0, "gamma": other} if zero == "kappa" else {"kappa": other, "gamma": 0.0}
    out, _ = calibrate(stats, template, aggregation, **hyper)
    assert_tree_close(out, stats.fixed_weight_grads(), abs_sum(stats))


@pytest.mark.parametrize("aggregation", ["dempster", "dimension_frame"])
@pytest.mark.parametrize("hyper", [{"kappa": 0.0}, {"gamma": 0.0}])
def test_property1_no_evidence_python_floats(aggregation, hyper):
    rng = np.random.default_rng(8)
    template = {"w": _sds(2, 4)}
    stats = random_stats(rng, template, 3)
    out, _ = run(stats, template, aggregation, **hyper)
    assert_tree_close(out, stats.fixed_weight_grads(), abs_sum(stats))


@pytest.mark.parametrize("aggregation", CALIBRATING)
def test_property1_is_not_vacuous(aggregation):
    """Asymmetric variances do move the output away from the plain sum."""
    rng = np.random.default_rng(0)
    stats = random_stats(rng, TREES["dict_ranks"], 3, untouched=0.0, zero_var=0.0)
    out, _ = calibrate(stats, TREES["dict_ranks"], aggregation)
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(stats.fixed_weight_grads()))
    )
    assert diff > 1e-2


@pytest.mark.parametrize("aggregation", CALIBRATING)
@SETTINGS
@given_stats(gamma=st.floats(0.0, 3.0))
def test_property2_single_source_coordinates_pass_through(
    aggregation, seed, tree, num_sources, gamma
):
    _, template, stats = drawn_stats(seed, tree, num_sources, untouched=0.6)
    out, _ = calibrate(stats, template, aggregation, gamma=gamma)
    counts = touched_count(stats)
    checked = 0
    for g, m, n in zip(jax.tree.leaves(out), jax.tree.leaves(stats.mean), jax.tree.leaves(counts)):
        g, m = np.asarray(g, np.float64), np.asarray(m, np.float64)
        one = n == 1
        np.testing.assert_allclose(g[one], m.sum(axis=0)[one], rtol=1e-6)
        np.testing.assert_array_equal(g[n == 0], 0.0)
        checked += one.sum()
    hypothesis.note(f"single-source coordinates checked: {checked}")


@pytest.mark.parametrize("aggregation", CALIBRATING)
@SETTINGS
@given_stats(min_sources=2, gamma=st.floats(0.0, 3.0))
def test_property3_permuting_sources_changes_nothing(aggregation, seed, tree, num_sources, gamma):
    rng, template, stats = drawn_stats(seed, tree, num_sources)
    perm = rng.permutation(num_sources)
    permuted = bj.GradStats(
        stats.count,
        jax.tree.map(lambda x: x[perm], stats.mean),
        jax.tree.map(lambda x: x[perm], stats.var),
    )
    out, state = calibrate(stats, template, aggregation, gamma=gamma)
    out_p, state_p = calibrate(permuted, template, aggregation, gamma=gamma)
    assert_tree_close(out_p, out, abs_sum(stats))
    assert_tree_close(
        state_p.source_weights, jax.tree.map(lambda w: w[perm], state.source_weights), rtol=1e-5
    )
    assert_tree_close(state_p.uncertainty, state.uncertainty, rtol=1e-5)


@pytest.mark.parametrize("aggregation", CALIBRATING)
@SETTINGS
@given_stats(log_c=st.floats(-3.0, 3.0))
def test_property4_scaling_means_by_c_and_variances_by_c2_scales_output(
    aggregation, seed, tree, num_sources, log_c
):
    _, template, stats = drawn_stats(seed, tree, num_sources)
    c = 10.0**log_c
    scaled = bj.GradStats(
        stats.count,
        jax.tree.map(lambda m: m * c, stats.mean),
        jax.tree.map(lambda v: v * c**2, stats.var),
    )
    out, state = calibrate(stats, template, aggregation)
    out_c, state_c = calibrate(scaled, template, aggregation)
    assert_tree_close(
        out_c,
        jax.tree.map(lambda g: g * c, out),
        jax.tree.map(lambda s: s * c, abs_sum(stats)),
        rtol=1e-4,
    )
    assert_tree_close(state_c.source_weights, state.source_weights, rtol=1e-4)


def _two_source_losses(params, x):
    z = jnp.tanh(x @ params["w"] + params["b"])
    return jnp.stack(
        [(z - x[:, 0]) ** 2, 0.5 * (x[:, 1] * params["w"][0] - 1.0) ** 2, jnp.cos(z) * x[:, 2]]
    )


@pytest.mark.parametrize("aggregation", CALIBRATING)
def test_property4_scaling_the_losses_scales_output(aggregation):
    params = {"w": jnp.asarray([0.3, -0.2, 0.5]), "b": jnp.asarray(0.1)}
    x = jax.random.normal(jax.random.key(0), (16, 3))
    template = jax.tree.map(lambda p: _sds(*p.shape), params)

    @jax.jit
    def stats_fn(params, x, c):
        scaled = lambda p, b: c * _two_source_losses(p, b)
        return bj.source_grad_stats(scaled, params, x, method="vmap")

    outs = [calibrate(stats_fn(params, x, c), template, aggregation)[0] for c in (1.0, 7.5, 1e-3)]
    for c, out in zip((7.5, 1e-3), outs[1:]):
        assert_tree_close(out, jax.tree.map(lambda g, c=c: c * g, outs[0]), rtol=1e-4)


def per_coordinate_weights(stats, template, aggregation, source, **hyper):
    """w[source, d] for every coordinate, read off the output by linearity in the means.

    With every touched entry of positive variance, the set of touching sources does not
    depend on the means, and the output is |T_d| sum_s w[s, d] mu[s, d]: set mu to the
    indicator of ``source`` and divide by |T_d|.
    """
    probe_mean = jax.tree.map(
        lambda v: jnp.zeros_like(v).at[source].set(jnp.where(v[source] != 0, 1.0, 0.0)), stats.var
    )
    probe = bj.GradStats(stats.count, probe_mean, stats.var)
    out, _ = calibrate(probe, template, aggregation, **hyper)
    counts = touched_count(stats)
    return jax.tree.map(lambda g, n: np.asarray(g, np.float64) / np.maximum(n, 1), out, counts)


def _check_monotone(aggregation, seed, tree, num_sources, hyper):
    rng, template, stats = drawn_stats(seed, tree, num_sources, all_touched_var=True)
    leaves_v, treedef = jax.tree.flatten(stats.var)
    for _ in range(2):  # a few random (source, leaf, coordinate) triples per draw
        source = int(rng.integers(num_sources))
        li = int(rng.integers(len(leaves_v)))
        v = np.asarray(leaves_v[li])
        touched_idx = np.argwhere(v[source] != 0)
        if not len(touched_idx):
            continue
        d = tuple(touched_idx[rng.integers(len(touched_idx))])
        before = jax.tree.leaves(
            per_coordinate_weights(stats, template, aggregation, source, **hyper)
        )[li][d]
        bigger = v.copy()
        bigger[(source,) + d] *= 10.0 ** rng.uniform(0.01, 3)
        new_leaves = list(leaves_v)
        new_leaves[li] = jnp.asarray(bigger)
        raised = bj.GradStats(stats.count, stats.mean, jax.tree.unflatten(treedef, new_leaves))
        after = jax.tree.leaves(
            per_coordinate_weights(raised, template, aggregation, source, **hyper)
        )[li][d]
        assert 0.0 <= after <= before * (1 + 1e-5) + 1e-7, (before, after)


@pytest.mark.parametrize("aggregation", CALIBRATING)
@SETTINGS
@given_stats(
    min_sources=2,
    kappa=st.floats(0.0, 5.0),
    gamma=st.floats(0.0, 1.0),
    prior_weight=st.floats(0.1, 4.0),
    eps=st.floats(1e-4, 1.0),
)
def test_property5_weight_never_rises_with_own_variance(
    aggregation, seed, tree, num_sources, kappa, gamma, prior_weight, eps
):
    hyper = dict(kappa=kappa, gamma=gamma, prior_weight=prior_weight, eps=eps)
    _check_monotone(aggregation, seed, tree, num_sources, hyper)


@pytest.mark.parametrize("aggregation", CALIBRATING)
@SETTINGS
@given_stats(min_sources=2, gamma=st.floats(1.0, 4.0))
def test_property5_sharp_evidence(aggregation, seed, tree, num_sources, gamma):
    _check_monotone(aggregation, seed, tree, num_sources, dict(gamma=gamma))


@pytest.mark.parametrize("gamma", [1.0, 2.0, 4.0])
def test_property5_precise_source_beside_noisy_ones(gamma):
    # A relative floor eps * mean(v) would grow with source 0's own variance, flatten the
    # others' precisions and, with gamma > 1, raise source 0's weight (0.0335 -> 0.0469
    # at gamma = 2); the signal-to-noise floor depends on the means only.
    stats = bj.GradStats(
        jnp.asarray(1.0), {"w": jnp.ones((3, 1))}, {"w": jnp.asarray([[1.0], [1e-3], [1.0]])}
    )
    raised = stats._replace(var={"w": jnp.asarray([[1000.0], [1e-3], [1.0]])})
    template = {"w": _sds(1)}
    before = per_coordinate_weights(stats, template, "dempster", 0, gamma=gamma)["w"][0]
    after = per_coordinate_weights(raised, template, "dempster", 0, gamma=gamma)["w"][0]
    assert after < before


def _max_intermediate_size(jaxpr):
    """Largest number of elements of any value produced anywhere in a (closed) jaxpr."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            largest = max(largest, int(np.prod(shape)) if shape else 1)
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    largest = max(largest, _max_intermediate_size(sub))
    return largest


@pytest.mark.parametrize("aggregation", CALIBRATING)
def test_property7_memory_is_linear_in_sources_times_params(aggregation):
    num_sources = 5
    template = {"big": _sds(6, 7), "vec": _sds(9), "nested": [_sds(2, 3, 2), _sds()]}
    p_max = 42  # elements of the largest leaf
    stats = random_stats(np.random.default_rng(0), template, num_sources)
    tx = bj.bogc(num_sources, aggregation=aggregation)
    params = build(template, jnp.zeros)
    state = tx.init(params)
    grads = stats.fixed_weight_grads()
    jaxpr = jax.make_jaxpr(jax.jit(functools.partial(tx.update, grad_stats=stats)))(
        grads, state, params
    )
    largest = _max_intermediate_size(jaxpr)
    # S x P_max times a small constant; an S x S x P array (1050) or a P x P one (1764)
    # would break it.
    assert num_sources * p_max <= largest <= 2 * num_sources * p_max, largest


def test_property7_check_sees_quadratic_intermediates():
    """The jaxpr walk does find an S x S x P array (it descends into sub-jaxprs)."""
    beliefs = jnp.ones((5, 42))
    jaxpr = jax.make_jaxpr(jax.jit(ev.simple_supports_on_sources))(beliefs)
    assert _max_intermediate_size(jaxpr) == 5 * 5 * 42


# ------------------------------------------------------------- the transform itself


def test_sum_is_the_identity():
    rng = np.random.default_rng(1)
    template = TREES["nested"]
    stats = random_stats(rng, template, 3)
    grads = build(template, lambda s: jnp.asarray(rng.normal(size=s), jnp.float32))
    out, state = run(stats, template, "sum", grads=grads)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
        np.testing.assert_array_equal(a, b)
    for w in jax.tree.leaves(state.source_weights):
        np.testing.assert_array_equal(w, np.ones(3))
    # "sum" does not even need statistics.
    tx = bj.bogc(3, aggregation="sum")
    out2, _ = tx.update(grads, tx.init(grads))
    jax.tree.map(np.testing.assert_array_equal, out2, grads)


@pytest.mark.parametrize("aggregation", CALIBRATING)
def test_mask_passes_unmasked_leaves_through(aggregation):
    rng = np.random.default_rng(2)
    template = TREES["dict_ranks"]
    stats = random_stats(rng, template, 3, untouched=0.0, zero_var=0.0)
    grads = build(template, lambda s: jnp.asarray(rng.normal(size=s), jnp.float32))
    mask = {"a": True, "b": False, "c": True}
    out, state = run(stats, template, aggregation, grads=grads, mask=mask)
    full, _ = calibrate(stats, template, aggregation)
    fixed = stats.fixed_weight_grads()
    np.testing.assert_array_equal(out["b"], grads["b"])
    np.testing.assert_array_equal(state.source_weights["b"], np.zeros(3))
    for k in ("a", "c"):  # the calibration is a correction to the incoming grads
        expected = np.asarray(grads[k]) + (np.asarray(full[k]) - np.asarray(fixed[k]))
        atol = 1e-6 * np.max(np.abs(np.asarray(fixed[k])) + np.abs(np.asarray(full[k])))
        np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=atol)
        assert not np.allclose(out[k], grads[k])
    if aggregation == "dempster":  # the mask is applied before any aggregation
        # The same mask as a callable of the grads.
        out_fn, _ = run(
            stats,
            template,
            aggregation,
            grads=grads,
            mask=lambda g: jax.tree.map(lambda x: x.ndim != 2, g),
        )
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), out_fn, out)


@pytest.mark.parametrize("aggregation", CALIBRATING)
def test_default_mask_skips_leaves_without_statistics(aggregation):
    rng = np.random.default_rng(3)
    template = TREES["nested"]
    stats = random_stats(rng, template, 2)
    grads = build(template, lambda s: jnp.asarray(rng.normal(size=s), jnp.float32))
    drop = lambda tree: {"enc": {"w": None}, "head": tree["head"]}
    partial_stats = bj.GradStats(stats.count, drop(stats.mean), drop(stats.var))
    out, state = run(partial_stats, template, aggregation, grads=grads)
    full, _ = calibrate(stats, template, aggregation)
    fixed = stats.fixed_weight_grads()
    np.testing.assert_array_equal(out["enc"]["w"], grads["enc"]["w"])
    np.testing.assert_array_equal(state.source_weights["enc"]["w"], np.zeros(2))
    for get in (lambda t: t["head"][0], lambda t: t["head"][1][0]["k"]):
        # The calibrated leaves: the incoming grads plus the calibration's correction.
        expected = np.asarray(get(grads)) + (np.asarray(get(full)) - np.asarray(get(fixed)))
        atol = 1e-6 * np.max(np.abs(np.asarray(get(fixed))) + np.abs(np.asarray(get(full))))
        np.testing.assert_allclose(get(out), expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("aggregation", CALIBRATING)
def test_diagnostics_readable_with_optax_tree_get(aggregation):
    rng = np.random.default_rng(4)
    template = TREES["nested"]
    num_sources = 3
    stats = random_stats(rng, template, num_sources)
    params = build(template, jnp.zeros)
    tx = optax.chain(bj.bogc(num_sources, aggregation=aggregation), optax.sgd(0.1))
    state = tx.init(params)
    _, state = tx.update(stats.fixed_weight_grads(), state, params, grad_stats=stats)
    weights = optax.tree.get(state, "source_weights")
    uncertainty = optax.tree.get(state, "uncertainty")
    assert jax.tree.structure(weights) == jax.tree.structure(params)
    for w, u, m, v in zip(
        jax.tree.leaves(weights),
        jax.tree.leaves(uncertainty),
        jax.tree.leaves(stats.mean),
        jax.tree.leaves(stats.var),
    ):
        assert w.shape == (num_sources,) and w.dtype == jnp.float32
        assert u.shape == () and u.dtype == jnp.float32
        assert 0.0 <= float(u) <= 1.0
        assert np.all(np.asarray(w) >= 0) and np.all(np.asarray(w) <= num_sources + 1e-5)
        touches = np.asarray((m != 0) | (v != 0)).reshape(num_sources, -1).any(axis=1)
        assert np.all(np.asarray(w)[~touches] == 0)
    if aggregation == "precision":
        assert all(float(u) == 0.0 for u in jax.tree.leaves(uncertainty))


def test_diagnostics_symmetric_values():
    """Equal evidence kappa on |T| sources: weights 1, uncertainty W / (W + |T| kappa)."""
    num_sources, kappa, prior_weight = 3, 2.0, 0.5
    stats = bj.GradStats(
        jnp.asarray(4.0), {"w": jnp.ones((num_sources, 5))}, {"w": jnp.full((num_sources, 5), 0.3)}
    )
    out, state = run(stats, {"w": _sds(5)}, "dempster", kappa=kappa, prior_weight=prior_weight)
    np.testing.assert_allclose(out["w"], np.full(5, 3.0), rtol=1e-6)
    np.testing.assert_allclose(state.source_weights["w"], np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(
        state.uncertainty["w"], prior_weight / (prior_weight + num_sources * kappa), rtol=1e-6
    )


@pytest.mark.parametrize("aggregation", CALIBRATING)
def test_bf16_grads_keep_their_dtype(aggregation):
    rng = np.random.default_rng(5)
    template = TREES["dict_ranks"]
    stats = random_stats(rng, template, 2)
    grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), stats.fixed_weight_grads())
    out, state = run(stats, template, aggregation, grads=grads)
    out32, _ = calibrate(stats, template, aggregation)
    for g, g32 in zip(jax.tree.leaves(out), jax.tree.leaves(out32)):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), g32, rtol=1e-2, atol=1e-2)
    assert all(w.dtype == jnp.float32 for w in jax.tree.leaves(state.source_weights))


@pytest.mark.parametrize("aggregation", CALIBRATING + ("sum",))
def test_jit_and_eager_agree(aggregation):
    rng = np.random.default_rng(6)
    template = TREES["nested"]
    stats = random_stats(rng, template, 3)
    eager, eager_state = run(stats, template, aggregation, jit=False)
    jitted, jitted_state = run(stats, template, aggregation, jit=True)
    assert_tree_close(jitted, eager, abs_sum(stats), rtol=1e-5)
    assert_tree_close(jitted_state, eager_state, rtol=1e-5)
    assert jax.tree.structure(jitted_state) == jax.tree.structure(eager_state)


# ------------------------------------------------------------------------- errors


def _setup(num_sources=2):
    template = TREES["dict_ranks"]
    stats = random_stats(np.random.default_rng(7), template, num_sources)
    params = build(template, jnp.zeros)
    return template, stats, params


def _extra_leaf(stats):
    return bj.GradStats(
        stats.count,
        {**stats.mean, "extra": stats.mean["a"]},
        {**stats.var, "extra": stats.var["a"]},
    )


_NO_STATS = object()


@pytest.mark.parametrize(
    "bogc_args, bad_stats, error, match",
    [
        pytest.param({}, lambda s: _NO_STATS, ValueError, "grad_stats", id="missing_grad_stats"),
        pytest.param(
            {},
            lambda s: (s.count, s.mean, s.var),
            TypeError,
            "grad_stats must be a bogc_jax.GradStats",
            id="wrong_type",
        ),
        pytest.param(
            {}, _extra_leaf, ValueError, "grad_stats.mean/var .*structure", id="wrong_structure"
        ),
        pytest.param(
            {},
            lambda s: bj.GradStats(s.count, {**s.mean, "b": s.mean["b"][:, :1]}, s.var),
            ValueError,
            r"grad_stats.mean\['b'\] has shape \(2, 1, 3\); expected \(2, 2, 3\)",
            id="wrong_shape_names_the_leaf",
        ),
        pytest.param(
            {"num_sources": 3}, lambda s: s, ValueError, "num_sources=3", id="wrong_num_sources"
        ),
        pytest.param(
            {"mask": {"a": True, "b": True, "c": True}},
            lambda s: bj.GradStats(s.count, {**s.mean, "c": None}, {**s.var, "c": None}),
            ValueError,
            r"grad_stats.mean\['c'\] is None",
            id="none_stats_on_a_masked_leaf",
        ),
        pytest.param({"mask": {"a": True}}, lambda s: s, ValueError, "mask", id="mask_structure"),
    ],
)
def test_error_in_update(bogc_args, bad_stats, error, match):
    _, stats, params = _setup()
    tx = bj.bogc(**{"num_sources": 2, **bogc_args})
    grad_stats = bad_stats(stats)
    extra = {} if grad_stats is _NO_STATS else {"grad_stats": grad_stats}
    with pytest.raises(error, match=match):
        tx.update(stats.fixed_weight_grads(), tx.init(params), params, **extra)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"kappa": -1.0}, "kappa"),
        ({"gamma": -0.5}, "gamma"),
        ({"prior_weight": 0.0}, "prior_weight"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-3}, "eps"),
        ({"kappa": float("nan")}, "kappa"),
        ({"aggregation": "mean"}, "aggregation"),
        ({"noise": "snr"}, "noise"),
    ],
)
def test_error_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        bj.bogc(2, **kwargs)


@pytest.mark.parametrize("num_sources", [0, -1, 2.0, True])
def test_error_bad_num_sources(num_sources):
    with pytest.raises(ValueError, match="num_sources"):
        bj.bogc(num_sources)


# ------------------------------------------------ noise="relative" (scale-free sources)


@functools.cache
def _relative_weights(aggregation):
    def weights(mean, var, hyper):
        return bj.coordinate_weights(
            mean, var, COUNT, aggregation=aggregation, noise="relative", **hyper
        )[0]

    return jax.jit(weights, compiler_options=FAST_COMPILE)


def relative_reference(mean, var, aggregation, **hyper):
    """float64: rescale each source by its mean squared touched mean, then the reference."""
    mean64 = np.asarray(mean, np.float64)
    var64 = np.asarray(var, np.float64)
    flat_m = mean64.reshape(mean64.shape[0], -1)
    flat_v = var64.reshape(flat_m.shape)
    touched = (flat_m != 0) | (flat_v != 0)
    power = np.array(
        [
            np.mean(flat_m[s, touched[s]] ** 2) if touched[s].any() else 1.0
            for s in range(flat_m.shape[0])
        ]
    )
    power = np.where(power > 0, power, 1e-30)  # a pure-noise source: no trust
    scaled_m = flat_m / np.sqrt(power)[:, None]
    scaled_v = flat_v / power[:, None]
    _, _, _, weights = reference_leaf(scaled_m, scaled_v, COUNT, aggregation, **hyper)
    n_t = touched.sum(axis=0)
    return n_t * np.sum(weights * flat_m, axis=0), weights


@pytest.mark.parametrize("aggregation", CALIBRATING)
@SETTINGS
@given_stats(kappa=st.floats(0.0, 4.0), gamma=st.floats(0.0, 2.0), eps=st.floats(1e-4, 0.5))
def test_relative_noise_matches_reference(aggregation, seed, tree, num_sources, kappa, gamma, eps):
    _, _, stats = drawn_stats(seed, tree, num_sources, all_touched_var=True)
    hyper = dict(kappa=kappa, gamma=gamma, eps=eps)
    tx = bj.bogc(num_sources, aggregation=aggregation, noise="relative", **hyper)
    params = jax.tree.map(lambda m: jnp.zeros(m.shape[1:]), stats.mean)
    out, _ = jax.jit(tx.update)(
        stats.fixed_weight_grads(), tx.init(params), params, grad_stats=stats
    )
    for g, m, v in zip(
        jax.tree.leaves(out), jax.tree.leaves(stats.mean), jax.tree.leaves(stats.var)
    ):
        want, _ = relative_reference(m, v, aggregation, **hyper)
        scale = np.sum(np.abs(np.asarray(m, np.float64)), 0).reshape(-1)
        np.testing.assert_array_less(
            np.abs(np.asarray(g, np.float64).reshape(-1) - want), 1e-4 * (scale + 1e-30)
        )


@pytest.mark.parametrize("aggregation", CALIBRATING)
@SETTINGS
@hypothesis.given(
    seed=seeds,
    num_sources=st.integers(2, 4),
    log_c=st.lists(st.floats(-12, 12), min_size=4, max_size=4),
)
def test_relative_noise_rescaling_one_source_changes_no_weight(
    aggregation, seed, num_sources, log_c
):
    # "absolute" moves weight toward a source whose loss is scaled down; "relative" does
    # not: each source is measured against its own signal.
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(num_sources, 5, 3)) * 10.0 ** rng.uniform(-2, 2, (num_sources, 1, 1))
    var = (
        rng.exponential(size=mean.shape) * mean.std() ** 2 * 10.0 ** rng.uniform(-2, 2, mean.shape)
    )
    c = 10.0 ** np.asarray(log_c[:num_sources])[:, None, None]
    hyper = {k: jnp.asarray(v, jnp.float32) for k, v in DEFAULTS.items() if k != "prior_weight"}
    hyper["prior_weight"] = jnp.asarray(1.0, jnp.float32)
    weights = _relative_weights(aggregation)
    before = weights(jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32), hyper)
    after = weights(
        jnp.asarray(mean * c, jnp.float32), jnp.asarray(var * c * c, jnp.float32), hyper
    )
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-6)
    absolute = [
        bj.coordinate_weights(
            jnp.asarray(m, jnp.float32), jnp.asarray(v, jnp.float32), COUNT, aggregation=aggregation
        )[0]
        for m, v in ((mean, var), (mean * c, var * c * c))
    ]
    if np.ptp(log_c[:num_sources]) > 3:  # the property is not vacuous
        assert np.max(np.abs(np.asarray(absolute[0]) - np.asarray(absolute[1]))) > 1e-3


@pytest.mark.parametrize("aggregation", CALIBRATING)
@SETTINGS
@hypothesis.given(seed=seeds, num_sources=st.integers(1, 4), gamma=st.floats(0.0, 4.0))
def test_relative_noise_properties_1_2_5(aggregation, seed, num_sources, gamma):
    rng = np.random.default_rng(seed)
    shape = (num_sources, 6, 2)
    mean = rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 3, (num_sources, 1, 1))
    off = rng.random(shape) < 0.3
    off[:, 0, 0] = True
    off[0, 0, 0] = False  # coordinate (0, 0): source 0 alone
    mean[off] = 0.0
    power = np.array([np.mean(mean[s][~off[s]] ** 2) for s in range(num_sources)])
    hyper = {k: jnp.asarray(v, jnp.float32) for k, v in DEFAULTS.items()}
    hyper["gamma"] = jnp.asarray(gamma, jnp.float32)
    weights = _relative_weights(aggregation)
    touched = ~off
    n_t = touched.sum(0)
    # 1: equal noise-to-signal ratios at every coordinate -> the fixed-weight sum.
    ratio = rng.exponential(size=shape[1:])
    var = np.where(off, 0.0, power[:, None, None] * ratio)
    w = np.asarray(weights(jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32), hyper))
    np.testing.assert_allclose(w, np.where(touched, 1.0 / np.maximum(n_t, 1), 0.0), atol=1e-5)
    # 2: a coordinate touched by one source gives it the whole weight.
    assert w[0, 0, 0] == pytest.approx(1.0)
    # 5: raising a source's own variance at a coordinate never raises its weight there.
    var = np.where(off, 0.0, rng.exponential(size=shape) * power[:, None, None])
    w = np.asarray(weights(jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32), hyper))
    for _ in range(4):
        s, i, j = (int(rng.integers(n)) for n in shape)
        if off[s, i, j]:
            continue
        raised = var.copy()
        raised[s, i, j] *= 10.0 ** rng.uniform(0.01, 3)
        w2 = np.asarray(
            weights(jnp.asarray(mean, jnp.float32), jnp.asarray(raised, jnp.float32), hyper)
        )
        assert w2[s, i, j] <= w[s, i, j] * (1 + 1e-5) + 1e-7


def test_relative_noise_trusts_the_still_learning_source():
    # Two sources touch a shared leaf: "fusion" has converged (gradients and noise both
    # 100x smaller), "unimodal" is still learning with the same noise-to-signal ratio
    # plus a 2x noisier fusion signal. Absolute precision hands the fusion loss almost
    # all the weight; relative noise prefers the cleaner unimodal gradient.
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(2, 50))
    mean = signal * np.array([[0.01], [1.0]])
    var = np.abs(signal) ** 2 * np.array([[4e-4], [1.0]])
    w_abs = bj.coordinate_weights(
        jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32), COUNT
    )[0]
    w_rel = bj.coordinate_weights(
        jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32), COUNT, noise="relative"
    )[0]
    assert float(jnp.mean(w_abs[0])) > 0.75
    assert float(jnp.mean(w_rel[1])) > 0.6
