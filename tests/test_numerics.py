"""Numerical edge cases: every transform gives a finite, documented result, or flags the
problem in its state (``finite``, ``nonfinite_count``) and keeps its previous state.

Covers zero variance, gradient scales from 1e-30 to 1e30, NaN and infinity in a source's
statistics, in the scores and in the gradients, all-zero and constant scores, a
modality whose gradients are all zero, float16/bfloat16 parameters, and the
compositions with ``optax.apply_if_finite``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_model import init_params, losses_fn, make_batch, scores_of

import bogc_jax as bj

LABELS = {"enc0": 0, "enc1": 1, "head": None}
SOURCES = 3
CALIBRATING = ("dempster", "precision", "dimension_frame")
FAST_COMPILE = {"xla_backend_optimization_level": 0}

FACTORIES = {
    **{
        f"bogc_{a}": functools.partial(bj.bogc, SOURCES, aggregation=a)
        for a in CALIBRATING + ("sum",)
    },
    "cggm": functools.partial(bj.cggm, LABELS),
    "cggm_reference": functools.partial(bj.cggm, LABELS, mode="reference"),
    "ogm_ge": functools.partial(bj.ogm_ge, LABELS, alpha=0.5, key=3),
    "mmpareto": functools.partial(bj.mmpareto, LABELS),
}
FAMILIES = ("bogc_dempster", "cggm", "ogm_ge", "mmpareto")
FLAGS = ("finite", "nonfinite_count")


@functools.cache
def stats_fn(scale=1.0):
    return jax.jit(
        lambda p, b: bj.source_grad_stats(lambda q, x: scale * losses_fn(q, x), p, b, method="vmap")
    )


@functools.cache
def update_fn(name):
    return jax.jit(FACTORIES[name]().update, compiler_options=FAST_COMPILE)


def extra_args(stats, scores):
    return {"grad_stats": stats, "modality_scores": scores}


def payload(state):
    """The state without the two flag fields."""
    return {k: v for k, v in state._asdict().items() if k not in FLAGS}


def leaves64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def assert_all_finite(tree):
    for x in leaves64(tree):
        assert np.all(np.isfinite(x))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_close_normwise(a, b, rtol):
    """``max |a - b| <= rtol * max |b|`` leaf by leaf (robust to entries near 0)."""
    for x, y in zip(leaves64(a), leaves64(b)):
        assert np.max(np.abs(x - y)) <= rtol * max(np.max(np.abs(y)), 1e-300)


PARAMS = init_params()
BATCH = make_batch(0)
STATS = stats_fn()(PARAMS, BATCH)
GRADS = STATS.fixed_weight_grads()
SCORES = scores_of(PARAMS, BATCH)


def with_nonfinite(tree, key, value, index=(1, 0, 0)):
    """A copy of ``tree`` with ``value`` at ``tree[key][index]``."""
    return {**tree, key: tree[key].at[index].set(value)}


def after_one_good_step(name):
    """``(tx state after one finite update, its updates)``: a non-trivial previous state."""
    state = FACTORIES[name]().init(PARAMS)
    return update_fn(name)(GRADS, state, PARAMS, **extra_args(STATS, SCORES))


# ------------------------------------------------------------- degenerate statistics


@pytest.mark.parametrize("aggregation", CALIBRATING)
def test_zero_variance_gives_the_fixed_weight_sum(aggregation):
    """Identical examples: every variance is 0 up to float rounding (which must not decide
    the weights), so all sources are equally precise."""
    same = jax.tree.map(lambda x: jnp.repeat(x[:1], 8, axis=0), BATCH)
    stats = stats_fn()(PARAMS, same)
    for m, v in zip(leaves64(stats.mean), leaves64(stats.var)):
        assert np.all(v <= 1e-10 * np.max(m**2))
    name = f"bogc_{aggregation}"
    out, state = update_fn(name)(
        stats.fixed_weight_grads(), FACTORIES[name]().init(PARAMS), PARAMS, grad_stats=stats
    )
    assert_close_normwise(out, stats.fixed_weight_grads(), 1e-6)
    assert bool(state.finite) and int(state.nonfinite_count) == 0


@pytest.mark.parametrize("aggregation", CALIBRATING)
@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1e6, 1e12])
def test_moderate_gradient_scales_scale_the_output(scale, aggregation):
    """bogc.md property 4 at scales whose variances float32 represents."""
    name = f"bogc_{aggregation}"
    base, _ = after_one_good_step(name)
    stats = stats_fn(scale)(PARAMS, BATCH)
    out, state = update_fn(name)(
        stats.fixed_weight_grads(), FACTORIES[name]().init(PARAMS), PARAMS, grad_stats=stats
    )
    assert_close_normwise(out, jax.tree.map(lambda g: scale * g, base), 1e-5)
    assert bool(state.finite)


@pytest.mark.parametrize("aggregation", CALIBRATING)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_gradient_scales_give_the_scaled_fixed_weight_sum(scale, aggregation):
    """Past float32's range for variances (|g| below ~1e-19 or above ~1e18) the output is
    the fixed-weight sum at that scale, finite: at 1e-30 the variances underflow to 0
    (equal precisions); at 1e30 they overflow to inf, so the update falls back to grads
    and says so in ``state.finite``."""
    name = f"bogc_{aggregation}"
    stats = stats_fn(scale)(PARAMS, BATCH)
    fixed = stats.fixed_weight_grads()
    assert_all_finite(fixed)
    out, state = update_fn(name)(fixed, FACTORIES[name]().init(PARAMS), PARAMS, grad_stats=stats)
    assert_all_finite(out)
    assert_close_normwise(out, jax.tree.map(lambda g: scale * g, GRADS), 1e-5)
    overflowed = not all(np.all(np.isfinite(v)) for v in leaves64(stats.var))
    assert overflowed == (scale > 1)
    assert bool(state.finite) == (not overflowed)
    assert int(state.nonfinite_count) == int(overflowed)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_gradient_scales_in_the_modality_transforms(scale):
    """mmpareto and cggm are scale-equivariant over float32's whole range; OGM-GE's noise
    scales with the gradient above its fixed 1e-8 floor."""
    grads = jax.tree.map(lambda g: scale * g, GRADS)
    stats = bj.GradStats(STATS.count, jax.tree.map(lambda m: scale * m, STATS.mean), STATS.var)
    for name in ("mmpareto", "cggm"):
        base, _ = after_one_good_step(name)
        out, state = update_fn(name)(
            grads, FACTORIES[name]().init(PARAMS), PARAMS, **extra_args(stats, SCORES)
        )
        assert bool(state.finite)
        assert_close_normwise(out, jax.tree.map(lambda g: scale * g, base), 1e-5)
    tx = bj.ogm_ge(LABELS, alpha=0.5, key=3)
    out, state = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS, modality_scores=SCORES)
    assert_all_finite(out)
    assert bool(state.finite)
    if scale > 1:
        no_noise, _ = bj.ogm_ge(LABELS, alpha=0.5, noise=False).update(
            grads, tx.init(PARAMS), PARAMS, modality_scores=SCORES
        )
        noise = np.asarray(out["enc0"], np.float64) - np.asarray(no_noise["enc0"], np.float64)
        assert 0.1 < np.std(noise) / np.std(np.asarray(grads["enc0"], np.float64)) < 10


# ------------------------------------------------------------ non-finite inputs


NONFINITE_STATS = {
    "nan_in_a_source_mean": lambda s: s._replace(mean=with_nonfinite(s.mean, "enc0", jnp.nan)),
    "inf_in_a_source_var": lambda s: s._replace(var=with_nonfinite(s.var, "head", jnp.inf)),
    "neg_inf_in_a_source_mean": lambda s: s._replace(mean=with_nonfinite(s.mean, "enc1", -jnp.inf)),
    "nan_count": lambda s: s._replace(count=jnp.float32(jnp.nan)),
    "zero_count": lambda s: s._replace(count=jnp.float32(0.0)),
}


@pytest.mark.parametrize("aggregation", CALIBRATING)
@pytest.mark.parametrize("kind", sorted(NONFINITE_STATS))
def test_nonfinite_grad_stats_fall_back_to_grads_and_keep_the_state(kind, aggregation):
    name = f"bogc_{aggregation}"
    state, _ = after_one_good_step(name)[::-1]
    bad = NONFINITE_STATS[kind](STATS)
    out, new_state = update_fn(name)(GRADS, state, PARAMS, grad_stats=bad)
    assert_trees_equal(out, GRADS)  # the fixed-weight sum, finite
    assert_trees_equal(payload(new_state), payload(state))
    assert not bool(new_state.finite) and int(new_state.nonfinite_count) == 1
    # The next finite update is unaffected and clears the flag (the count stays).
    good, after = update_fn(name)(GRADS, new_state, PARAMS, grad_stats=STATS)
    assert_trees_equal(good, after_one_good_step(name)[0])
    assert bool(after.finite) and int(after.nonfinite_count) == 1


def test_mmpareto_nonfinite_mean_falls_back_to_grads():
    state, _ = after_one_good_step("mmpareto")[::-1]
    for value in (jnp.nan, jnp.inf):
        bad = STATS._replace(mean=with_nonfinite(STATS.mean, "enc1", value, (2, 1, 1)))
        out, new_state = update_fn("mmpareto")(GRADS, state, PARAMS, grad_stats=bad)
        assert_trees_equal(out, GRADS)
        assert_trees_equal(payload(new_state), payload(state))
        assert not bool(new_state.finite)


@pytest.mark.parametrize("name", ["cggm", "cggm_reference", "ogm_ge"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_scores_leave_grads_and_state_unchanged(name, value):
    state, _ = after_one_good_step(name)[::-1]
    bad = SCORES.at[1].set(value)
    out, new_state = update_fn(name)(GRADS, state, PARAMS, modality_scores=bad)
    assert_trees_equal(out, GRADS)
    assert_trees_equal(payload(new_state), payload(state))
    assert not bool(new_state.finite) and int(new_state.nonfinite_count) == 1


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_nonfinite_grads_pass_through_and_keep_the_state(name):
    """A NaN gradient is not hidden: it reaches the next transform (apply_if_finite)."""
    state, _ = after_one_good_step(name)[::-1]
    bad = with_nonfinite(GRADS, "enc0", jnp.nan, (0, 0))
    out, new_state = update_fn(name)(bad, state, PARAMS, **extra_args(STATS, SCORES))
    assert_trees_equal(out, bad)
    assert_trees_equal(payload(new_state), payload(state))
    assert not bool(new_state.finite) and int(new_state.nonfinite_count) == 1


@functools.cache
def guarded_step(name):
    """A jitted training step with ``chain(tx, apply_if_finite(adam))``."""
    tx = optax.chain(FACTORIES[name](), optax.apply_if_finite(optax.adam(1e-2), 3))

    def step(params, state, batch):
        stats = stats_fn()(params, batch)
        updates, state = tx.update(
            stats.fixed_weight_grads(), state, params, **extra_args(stats, scores_of(params, batch))
        )
        return optax.apply_updates(params, updates), state

    return tx, jax.jit(step)


def poisoned(batch):
    """The batch with a NaN input: NaN losses, statistics and gradients."""
    x0, x1, y = batch
    return x0.at[0, 0].set(jnp.nan), x1, y


@pytest.mark.parametrize("name", FAMILIES)
def test_nan_step_then_good_steps_equal_the_good_steps_alone(name):
    tx, step = guarded_step(name)

    def train(batches):
        params, state = PARAMS, tx.init(PARAMS)
        for batch in batches:
            params, state = step(params, state, batch)
        return params, state

    good = [make_batch(i) for i in range(1, 4)]
    clean_params, clean_state = train(good)
    params, state = train([poisoned(make_batch(0))] + good)
    assert_trees_equal(params, clean_params)
    inner, clean_inner = state[0], clean_state[0]
    assert_trees_equal(payload(inner), payload(clean_inner))
    assert_trees_equal(state[1].inner_state, clean_state[1].inner_state)  # adam
    assert int(inner.nonfinite_count) == 1 and bool(inner.finite)
    assert int(state[1].total_notfinite) == 1


def test_apply_if_finite_outside_bogc_never_sees_nonfinite_grad_stats():
    """``apply_if_finite(chain(bogc, adam))`` checks only the incoming grads. With finite
    grads and non-finite statistics, bogc falls back to the grads, so adam's state stays
    finite; the step is taken with the fixed-weight gradient and bogc flags it."""
    tx = optax.apply_if_finite(optax.chain(bj.bogc(SOURCES), optax.adam(1e-2)), 3)
    state = tx.init(PARAMS)
    bad = STATS._replace(var=with_nonfinite(STATS.var, "enc0", jnp.nan))
    updates, state = jax.jit(tx.update)(GRADS, state, PARAMS, grad_stats=bad)
    assert_all_finite((updates, state.inner_state[1]))
    assert int(state.total_notfinite) == 0  # apply_if_finite saw nothing wrong ...
    assert not bool(state.inner_state[0].finite)  # ... bogc did, and fell back
    plain = optax.adam(1e-2)
    want, _ = plain.update(GRADS, plain.init(PARAMS), PARAMS)
    assert_close_normwise(updates, want, 1e-6)


# -------------------------------------------------------------- scores and zeros


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_all_zero_and_constant_scores_give_finite_documented_coefficients(num_modalities):
    labels = {f"enc{i}": i for i in range(num_modalities)}
    params = {f"enc{i}": jnp.ones(3) for i in range(num_modalities)}
    m = num_modalities
    for scores in (jnp.zeros(m), jnp.full((m,), 0.625)):
        stable = bj.cggm(labels, rho=1.0)
        reference = bj.cggm(labels, rho=1.0, mode="reference")
        s_state, r_state = stable.init(params), reference.init(params)
        for t in range(3):
            s_out, s_state = stable.update(params, s_state, params, modality_scores=scores)
            r_out, r_state = reference.update(params, r_state, params, modality_scores=scores)
            assert_all_finite((s_out, r_out))
            np.testing.assert_allclose(s_state.coefficients, np.full(m, (m - 1) / m), rtol=1e-6)
            if t > 0 or not np.any(scores):  # d = 0: B = guard / guard = 1
                np.testing.assert_allclose(r_state.coefficients, np.ones(m), rtol=1e-6)
            assert bool(s_state.finite) and bool(r_state.finite)
        k, _, ratio = bj.ogm_ge_coefficients(scores, alpha=0.5)
        assert float(ratio) == 1.0 and np.all(np.asarray(k) == 1.0)
        k_ref, _, _ = bj.ogm_ge_coefficients(scores, alpha=0.5, mode="reference")
        np.testing.assert_allclose(np.sort(np.asarray(k_ref))[0], 1 - np.tanh(0.5), rtol=1e-6)


def test_a_modality_with_all_zero_gradients():
    """Encoder 1 receives no gradient from any source: every transform stays finite and
    leaves it at zero (OGM-GE adds only its 1e-8 noise floor)."""
    grads = {**GRADS, "enc1": jnp.zeros_like(GRADS["enc1"])}
    zero = lambda t: {**t, "enc1": jnp.zeros_like(t["enc1"])}
    stats = bj.GradStats(STATS.count, zero(STATS.mean), zero(STATS.var))
    for name in sorted(FACTORIES):
        out, state = update_fn(name)(
            grads, FACTORIES[name]().init(PARAMS), PARAMS, **extra_args(stats, SCORES)
        )
        assert_all_finite((out, state))
        assert bool(state.finite)
        limit = 1e-6 if name == "ogm_ge" else 0.0
        assert np.max(np.abs(np.asarray(out["enc1"]))) <= limit, name
    _, state = update_fn("bogc_dempster")(
        grads, FACTORIES["bogc_dempster"]().init(PARAMS), PARAMS, grad_stats=stats
    )
    np.testing.assert_array_equal(state.source_weights["enc1"], np.zeros(SOURCES))
    _, state = update_fn("mmpareto")(
        grads, FACTORIES["mmpareto"]().init(PARAMS), PARAMS, grad_stats=stats
    )
    assert float(state.cosines[1]) == 0.0


# ------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype, rtol", [(jnp.float16, 5e-3), (jnp.bfloat16, 3e-2)])
def test_half_precision_params(dtype, rtol):
    """Statistics stay float32; updates keep the params' dtype, finite, close to float32."""
    params = init_params(dtype=dtype)
    stats = bj.source_grad_stats(losses_fn, params, BATCH, method="vmap")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(stats))
    grads = jax.tree.map(lambda g: g.astype(dtype), stats.fixed_weight_grads())
    params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    for name in sorted(FACTORIES):
        if name == "ogm_ge":
            continue  # random noise; its dtype handling is covered by test_contract
        tx, update = FACTORIES[name](), update_fn(name)
        out, state = update(grads, tx.init(params), params, **extra_args(stats, SCORES))
        want, _ = update(
            jax.tree.map(lambda g: g.astype(jnp.float32), grads),
            tx.init(params32),
            params32,
            **extra_args(stats, SCORES),
        )
        assert all(u.dtype == dtype for u in jax.tree.leaves(out)), name
        assert_all_finite(out)
        assert bool(state.finite)
        assert_close_normwise(out, want, rtol)


@pytest.mark.parametrize(
    "factory", [bj.cggm, functools.partial(bj.ogm_ge, key=3)], ids=["cggm", "ogm_ge"]
)
def test_one_device_with_a_nan_flags_every_device(factory):
    """With ``axis_name``, a NaN gradient on one device makes every device keep its state
    (replicated states stay equal), here with ``vmap`` standing in for the devices."""
    tx = factory(LABELS, axis_name="devices")
    state = tx.init(PARAMS)
    grads = jax.tree.map(lambda g: jnp.stack([g, g]), GRADS)
    grads["enc0"] = grads["enc0"].at[1, 0, 0].set(jnp.nan)  # device 1 only
    out, new_state = jax.vmap(
        lambda g: tx.update(g, state, PARAMS, modality_scores=SCORES), axis_name="devices"
    )(grads)
    assert not np.any(new_state.finite) and np.all(new_state.nonfinite_count == 1)
    for k in ("scores", "coefficients") if "scores" in new_state._fields else ("key",):
        field = np.asarray(getattr(new_state, k))
        np.testing.assert_array_equal(field[0], field[1])
        np.testing.assert_array_equal(field[0], np.asarray(getattr(state, k)))
    np.testing.assert_array_equal(out["enc1"][0], GRADS["enc1"])  # passed through


def test_tiny_mean_with_zero_variance_has_a_finite_precision():
    """A |mean| whose square underflows float32 (7e-26), variance 0: precision stays finite
    under jit and eagerly (XLA may fold ``var / unit / unit`` into ``var / unit**2``)."""
    mean = jnp.array([[3.9e19, 5.1e-15, 7.5e-26, 0.0]], jnp.float32)
    var = jnp.array([[8.3e-6, 3.2e-14, 0.0, 3.4e23]], jnp.float32)
    touched = (mean != 0) | (var != 0)
    for fn in (bj.evidence.precision, jax.jit(bj.evidence.precision)):
        lam = fn(var, mean, touched)
        assert np.all(np.isfinite(lam)) and np.all(np.asarray(lam) > 0)


@pytest.mark.parametrize("gamma", [10.0, 100.0, 300.0, 3000.0])
def test_dimension_frame_stays_finite_when_the_sources_totally_conflict(gamma):
    """Two sources each sure of a different coordinate: at sharp evidence their Dirichlet
    uncertainties leave float32's range (the fold's ``1 - C`` cancels to 0). The weights
    go to the surer source at each coordinate and the fused uncertainty stays finite."""
    mean = jnp.array([[0.336, -1.09, 0.0], [5.77, -9.82, 0.0037]], jnp.float32)
    var = jnp.array([[0.143, 0.0249, 0.0], [0.00473, 33.3, 2.70]], jnp.float32)
    touched = (mean != 0) | (var != 0)
    lam = bj.evidence.precision(var, mean, touched)
    weights, uncertainty = jax.jit(
        lambda lam: bj.weightings.dimension_frame(lam, touched, gamma=gamma)
    )(lam)
    assert np.isfinite(float(uncertainty)) and 0.0 <= float(uncertainty) <= 1.0
    np.testing.assert_allclose(weights.sum(0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(weights, [[0, 1, 0], [1, 0, 1]], atol=1e-6)


@pytest.mark.parametrize("aggregation", ["dempster", "dimension_frame"])
def test_a_strength_below_float32s_range_keeps_its_logarithm(aggregation):
    """kappa = 1e-88 is 0 in float32, but its evidence is not 0: the weights follow the
    precisions (dimension_frame: shares proportional to the evidence) instead of 1/|T_d|."""
    lam = jnp.array([[3.0, 1.0], [1.0, 1.0]])
    touched = jnp.ones((2, 2), bool)
    log_e = bj.evidence.log_evidence(lam, touched, kappa=1e-88)
    np.testing.assert_allclose(log_e[:, 1], np.log(1e-88), rtol=1e-6)
    weights, _ = bj.weightings.WEIGHTINGS[aggregation](lam, touched, kappa=1e-88)
    assert np.all(np.isfinite(weights))
    if aggregation == "dimension_frame":
        np.testing.assert_allclose(weights[:, 0], [0.75, 0.25], rtol=1e-5)
