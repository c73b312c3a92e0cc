"""Tests of bogc_jax.evidence: precision -> evidence -> opinion, reduced Dempster rule.

The reference forms here are written in plain numpy (float64) straight from the
definitions: the two-at-a-time rule with an explicit K x K conflict matrix, and the
unnormalised fused belief as a sum over subsets of sources.
"""

import itertools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from bogc_jax import evidence as ev

SETTINGS = hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
seeds = st.integers(0, 2**32 - 1)


# --------------------------------------------------------------------------- helpers


def random_opinions(rng, num_sources, frame, coords=()):
    """General opinions: ``b`` [S, K, *coords] >= 0, ``u`` [S, *coords], sum b + u = 1."""
    mass = rng.gamma(0.7, size=(num_sources, frame + 1) + tuple(coords)) + 1e-3
    mass /= mass.sum(axis=1, keepdims=True)
    return mass[:, :frame], mass[:, frame]


def ref_combine(b1, u1, b2, u2):
    """Two-at-a-time reduced Dempster rule on one coordinate, K x K conflict matrix."""
    k = b1.shape[0]
    conflict = np.sum(np.outer(b1, b2) * (1.0 - np.eye(k)))  # sum_{i != j} b1_i b2_j
    b = (b1 * b2 + b1 * u2 + b2 * u1) / (1.0 - conflict)
    u = u1 * u2 / (1.0 - conflict)
    return b, u


def ref_fold(beliefs, uncertainties):
    """Fold ``ref_combine`` over sources, coordinate by coordinate (loops, no vectors)."""
    beliefs = np.asarray(beliefs, np.float64)
    uncertainties = np.asarray(uncertainties, np.float64)
    coords = beliefs.shape[2:]
    out_b = np.zeros(beliefs.shape[1:])
    out_u = np.zeros(coords)
    for idx in np.ndindex(*coords):
        sel = (slice(None), slice(None)) + idx
        b, u = beliefs[sel][0], uncertainties[(slice(None),) + idx][0]
        for s in range(1, beliefs.shape[0]):
            b, u = ref_combine(b, u, beliefs[sel][s], uncertainties[(slice(None),) + idx][s])
        out_b[(slice(None),) + idx] = b
        out_u[idx] = u
    return out_b, out_u


def brute_force_shares(beliefs, uncertainties):
    """Shares by subset enumeration: each nonempty A splits its mass 1/|A| per member.

    ``beliefs`` [S, D], ``uncertainties`` [S] (one frame mass per source). Returns the
    shares [S, D] and the unnormalised fused singleton mass [D].
    """
    beliefs = np.asarray(beliefs, np.float64)
    uncertainties = np.asarray(uncertainties, np.float64)
    num_sources, num_coords = beliefs.shape
    shares = np.zeros_like(beliefs)
    total = np.zeros(num_coords)
    for d in range(num_coords):
        for r in range(1, num_sources + 1):
            for subset in itertools.combinations(range(num_sources), r):
                term = 1.0
                for s in range(num_sources):
                    term *= beliefs[s, d] if s in subset else uncertainties[s]
                total[d] += term
                for s in subset:
                    shares[s, d] += term / len(subset)
    return shares, total


# One compilation per shape instead of one dispatch per primitive per permutation.
jit_fold = jax.jit(ev.dempster_fold)


def close(actual, expected, rtol=1e-4, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------- the Dempster rule


@SETTINGS
@hypothesis.given(seed=seeds, frame=st.integers(1, 4), coords=st.sampled_from([(), (3,), (2, 2)]))
def test_dempster_combine_commutative_associative_and_normalised(seed, frame, coords):
    rng = np.random.default_rng(seed)
    b, u = random_opinions(rng, 3, frame, coords)
    b, u = jnp.asarray(b, jnp.float32), jnp.asarray(u, jnp.float32)
    ab = ev.dempster_combine(b[0], u[0], b[1], u[1])
    ba = ev.dempster_combine(b[1], u[1], b[0], u[0])
    close(ab[0], np.asarray(ba[0]), rtol=1e-6)
    close(ab[1], np.asarray(ba[1]), rtol=1e-6)
    left = ev.dempster_combine(*ab, b[2], u[2])
    bc = ev.dempster_combine(b[1], u[1], b[2], u[2])
    right = ev.dempster_combine(b[0], u[0], *bc)
    close(left[0], np.asarray(right[0]), rtol=1e-5)
    close(left[1], np.asarray(right[1]), rtol=1e-5)
    # A fused opinion is an opinion: non-negative masses summing to 1.
    assert np.all(np.asarray(left[0]) >= 0) and np.all(np.asarray(left[1]) >= 0)
    close(jnp.sum(left[0], axis=0) + left[1], np.ones(coords), rtol=1e-5)


@SETTINGS
@hypothesis.given(
    seed=seeds,
    num_sources=st.integers(1, 4),
    frame=st.integers(1, 4),
    coords=st.sampled_from([(), (2,), (1, 3)]),
)
def test_fold_equals_kxk_reference_in_every_order_general_opinions(
    seed, num_sources, frame, coords
):
    rng = np.random.default_rng(seed)
    b, u = random_opinions(rng, num_sources, frame, coords)
    want_b, want_u = ref_fold(b, u)
    for perm in itertools.permutations(range(num_sources)):
        perm = list(perm)
        got_b, got_u = jit_fold(
            jnp.asarray(b[perm], jnp.float32), jnp.asarray(u[perm], jnp.float32)
        )
        assert got_b.shape == (frame,) + coords and got_u.shape == coords
        close(got_b, want_b)
        close(got_u, want_u)


@SETTINGS
@hypothesis.given(
    seed=seeds,
    num_sources=st.integers(1, 4),
    coords=st.sampled_from([(), (3,), (2, 2)]),
    prior_weight=st.floats(0.1, 5.0),
    zero_frac=st.sampled_from([0.0, 0.4]),
)
def test_fold_of_simple_supports_equals_closed_form_and_reference_in_every_order(
    seed, num_sources, coords, prior_weight, zero_frac
):
    rng = np.random.default_rng(seed)
    e = rng.exponential(2.0, size=(num_sources,) + coords)
    e[rng.random(e.shape) < zero_frac] = 0.0  # vacuous sources
    b, u = ev.simple_support_opinion(jnp.asarray(e, jnp.float32), prior_weight)
    close(b + u, np.ones(e.shape), rtol=1e-6)
    vectors = np.asarray(ev.simple_supports_on_sources(b))  # [S, K=S, ...]
    assert vectors.shape == (num_sources, num_sources) + coords
    m, m_theta = ev.fuse_simple_supports(jnp.asarray(e, jnp.float32), prior_weight)
    # Closed form, straight from its definition.
    total = prior_weight + e.sum(axis=0)
    close(m, e / total)
    close(m_theta, prior_weight / total)
    want_b, want_u = ref_fold(vectors, np.asarray(u))
    close(m, want_b)
    close(m_theta, want_u)
    for perm in itertools.permutations(range(num_sources)):
        perm = list(perm)  # the order of folding; the frame's labels stay put
        got_b, got_u = jit_fold(vectors[perm], np.asarray(u)[perm])
        close(got_b, np.asarray(m))
        close(got_u, np.asarray(m_theta))


def test_reference_detects_a_wrong_conflict():
    """The K x K reference is not a tautology: dropping the conflict changes it."""
    rng = np.random.default_rng(0)
    b, u = random_opinions(rng, 2, 3)
    got_b, _ = ev.dempster_combine(*(jnp.asarray(x) for x in (b[0], u[0], b[1], u[1])))
    unnormalised = b[0] * b[1] + b[0] * u[1] + b[1] * u[0]
    assert not np.allclose(np.asarray(got_b), unnormalised, rtol=1e-3)


# ------------------------------------------------- precision, evidence, weights


@SETTINGS
@hypothesis.given(
    seed=seeds,
    num_sources=st.integers(1, 4),
    coords=st.sampled_from([(5,), (2, 3)]),
    kappa=st.floats(0.0, 5.0),
    gamma=st.floats(0.0, 3.0),
    prior_weight=st.floats(0.1, 5.0),
    eps=st.floats(1e-4, 1.0),
)
def test_pignistic_weights_sum_to_one_over_touched_sources(
    seed, num_sources, coords, kappa, gamma, prior_weight, eps
):
    rng = np.random.default_rng(seed)
    shape = (num_sources,) + coords
    var = rng.exponential(size=shape) * 10.0 ** rng.uniform(-3, 3, size=shape)
    var[rng.random(shape) < 0.1] = 0.0  # exactly known gradients stay touched
    touched = rng.random(shape) < 0.7
    var, touched = jnp.asarray(var, jnp.float32), jnp.asarray(touched)
    mean = jnp.asarray(rng.normal(size=shape), jnp.float32)
    lam = ev.precision(var, mean, touched, eps)
    e = ev.evidence(lam, touched, kappa, gamma)
    assert np.all(np.isfinite(np.asarray(e))) and np.all(np.asarray(e) >= 0)
    assert np.all(np.asarray(e)[~np.asarray(touched)] == 0)
    m, m_theta = ev.fuse_simple_supports(e, prior_weight)
    w = np.asarray(ev.pignistic_weights(m, m_theta, touched), np.float64)
    any_touch = np.asarray(touched).any(axis=0)
    assert np.all(w >= 0)
    assert np.all(w[~np.asarray(touched)] == 0)
    close(w.sum(axis=0), np.where(any_touch, 1.0, 0.0), rtol=1e-5)


@SETTINGS
@hypothesis.given(
    seed=seeds,
    num_sources=st.integers(1, 4),
    scale=st.floats(-3.0, 3.0),
    kappa=st.floats(0.1, 5.0),
    gamma=st.floats(0.1, 3.0),
)
def test_precision_is_scale_free_and_equal_variances_give_equal_evidence(
    seed, num_sources, scale, kappa, gamma
):
    rng = np.random.default_rng(seed)
    shape = (num_sources, 6)
    var = rng.exponential(size=shape)
    mean = rng.normal(size=shape)
    touched = jnp.asarray(rng.random(shape) < 0.8)
    c = 10.0**scale
    lam = ev.precision(jnp.asarray(var, jnp.float32), jnp.asarray(mean, jnp.float32), touched, 1e-3)
    lam_scaled = ev.precision(
        jnp.asarray(var * c * c, jnp.float32), jnp.asarray(mean * c, jnp.float32), touched, 1e-3
    )
    close(lam_scaled, np.asarray(lam), rtol=1e-5)  # means * c, variances * c**2
    # Equal variances across the touching sources: every one gets evidence kappa.
    equal = jnp.broadcast_to(jnp.asarray(rng.exponential(size=(1, 6)), jnp.float32), shape)
    e = ev.evidence(
        ev.precision(equal, jnp.asarray(mean, jnp.float32), touched, 1e-3), touched, kappa, gamma
    )
    close(e, np.where(np.asarray(touched), kappa, 0.0), rtol=1e-5)


def test_precision_edge_cases():
    touched = jnp.asarray([[True, True, False], [True, False, False]])
    var = jnp.asarray([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    mean = jnp.asarray([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    lam = np.asarray(ev.precision(var, mean, touched, eps=0.5))
    # All touching sources exactly known: the floor alone, equally precise.
    np.testing.assert_allclose(lam[:, 0], [1.0, 1.0])
    # One touching source: its noise equals the mean noise.
    np.testing.assert_allclose(lam[:, 1], [1.0, 0.0])
    np.testing.assert_array_equal(lam[:, 2], [0.0, 0.0])
    np.testing.assert_allclose(ev.touched_mean(var, touched), [0.0, 2.0, 0.0])
    # Raising one source's variance leaves the others' precision ratios unchanged.
    var2 = jnp.asarray([[1.0], [2.0], [4.0]])
    mean2 = jnp.ones((3, 1))
    all_touched = jnp.ones((3, 1), bool)
    lam_a = np.asarray(ev.precision(var2, mean2, all_touched))
    lam_b = np.asarray(ev.precision(var2.at[0].set(100.0), mean2, all_touched))
    np.testing.assert_allclose(lam_a[1] / lam_a[2], lam_b[1] / lam_b[2], rtol=1e-6)
    assert lam_b[0] / lam_b[1] < lam_a[0] / lam_a[1]


# ------------------------------------------------ Dirichlet opinions, belief shares


@SETTINGS
@hypothesis.given(
    seed=seeds,
    num_sources=st.integers(1, 4),
    coords=st.sampled_from([(1,), (4,), (2, 3), (2, 1, 2)]),
)
def test_dirichlet_opinion_is_an_opinion(seed, num_sources, coords):
    rng = np.random.default_rng(seed)
    e = rng.exponential(3.0, size=(num_sources,) + coords)
    e[0] = 0.0  # a source without evidence is vacuous
    b, u = ev.dirichlet_opinion(jnp.asarray(e, jnp.float32))
    assert b.shape == e.shape and u.shape == (num_sources,) + (1,) * len(coords)
    frame_axes = tuple(range(1, e.ndim))
    close(jnp.sum(b, axis=frame_axes) + u.reshape(num_sources), np.ones(num_sources), rtol=1e-5)
    close(b[0], np.zeros(coords))
    close(u[0], np.ones(u.shape[1:]))
    k = int(np.prod(coords))
    close(b, e / (e.sum(axis=frame_axes, keepdims=True) + k))


@SETTINGS
@hypothesis.given(seed=seeds, num_sources=st.integers(1, 4), num_coords=st.integers(1, 5))
def test_belief_shares_match_subset_enumeration(seed, num_sources, num_coords):
    rng = np.random.default_rng(seed)
    # General non-negative inputs (not necessarily opinions).
    beliefs = rng.exponential(size=(num_sources, num_coords))
    beliefs[rng.random(beliefs.shape) < 0.2] = 0.0
    uncertainties = rng.uniform(0.05, 1.0, size=(num_sources, 1))
    want, total = brute_force_shares(beliefs, uncertainties[:, 0])
    got = ev.belief_shares(
        jnp.asarray(beliefs, jnp.float32), jnp.asarray(uncertainties, jnp.float32)
    )
    close(got, want)
    close(jnp.sum(got, axis=0), total)


@SETTINGS
@hypothesis.given(seed=seeds, num_sources=st.integers(1, 4), num_coords=st.integers(1, 4))
def test_belief_shares_sum_to_the_unnormalised_fused_belief(seed, num_sources, num_coords):
    """On Dirichlet opinions, shares sum to the fold's belief times its normaliser."""
    rng = np.random.default_rng(seed)
    e = rng.exponential(2.0, size=(num_sources, num_coords))
    b, u = ev.dirichlet_opinion(jnp.asarray(e, jnp.float32))
    shares = np.asarray(ev.belief_shares(b, u), np.float64)
    _, unnormalised = brute_force_shares(np.asarray(b), np.asarray(u)[:, 0])
    close(shares.sum(axis=0), unnormalised)
    # The fold normalises by the non-conflicting mass: sum_d unnormalised + prod_s u_s.
    fused_b, fused_u = ev.dempster_fold(b, u[:, 0])
    norm = unnormalised.sum() + np.prod(np.asarray(u, np.float64))
    close(fused_b, unnormalised / norm)
    close(fused_u, np.prod(np.asarray(u, np.float64)) / norm)
    ref_b, ref_u = ref_fold(np.asarray(b), np.asarray(u)[:, 0])
    close(fused_b, ref_b)
    close(fused_u, ref_u)


@pytest.mark.parametrize("num_sources", [1, 2, 3])
def test_belief_shares_equal_evidence_gives_equal_shares(num_sources):
    e = np.tile(np.array([[0.5, 2.0, 1.0]]), (num_sources, 1))
    b, u = ev.dirichlet_opinion(jnp.asarray(e, jnp.float32))
    shares = np.asarray(ev.belief_shares(b, u))
    close(shares, np.broadcast_to(shares[:1], shares.shape), rtol=1e-6)


# ------------------------------------------- the few-pass form of the default reading


def _chain_and_two_pass(num_sources, kappa, gamma, prior_weight, eps):
    import importlib

    from bogc_jax import _fused_calibration

    bogc_module = importlib.import_module("bogc_jax.bogc")
    hyper = dict(kappa=kappa, gamma=gamma, prior_weight=prior_weight, eps=eps)

    def chain(mean, var, count):
        return bogc_module._calibration(
            mean, var, count, aggregation="dempster", noise="absolute", **hyper
        )

    def two_pass(mean, var, count):
        return _fused_calibration.leaf_calibration(mean, var, count, **hyper)[:3]

    return jax.jit(chain), jax.jit(two_pass)


@pytest.mark.parametrize("num_sources", [2, 3])
@pytest.mark.parametrize(
    "gamma,kappa,prior_weight", [(1.0, 1.0, 1.0), (1.0, 3.0, 0.5), (0.0, 1.0, 1.0)]
)
def test_two_pass_calibration_equals_the_chain(num_sources, gamma, kappa, prior_weight):
    chain, two_pass = _chain_and_two_pass(num_sources, kappa, gamma, prior_weight, 1e-3)

    @SETTINGS
    @hypothesis.given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-15.0, 15.0))
    def check(seed, log_scale):
        rng = np.random.default_rng(seed)
        shape = (num_sources, 7, 5)
        scale = 10.0**log_scale
        mean = rng.normal(size=shape) * scale * 10.0 ** rng.uniform(-3, 3, (num_sources, 1, 1))
        var = (
            rng.exponential(size=shape) * scale**2 * 10.0 ** rng.uniform(-4, 4, (num_sources, 1, 1))
        )
        mean[rng.random(shape) < 0.2] = 0.0  # only a variance
        var[rng.random(shape) < 0.3] = 0.0  # exactly known
        off = rng.random(shape) < 0.2  # untouched
        mean[off], var[off] = 0.0, 0.0
        mean, var = jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)
        count = jnp.float32(rng.integers(1, 200))
        d0, w0, u0 = chain(mean, var, count)
        d1, w1, u1 = two_pass(mean, var, count)
        top = float(jnp.max(jnp.abs(mean))) or 1.0
        np.testing.assert_allclose(np.asarray(d1) / top, np.asarray(d0) / top, atol=5e-6)
        np.testing.assert_allclose(w1, w0, atol=5e-6)
        np.testing.assert_allclose(u1, u0, atol=5e-6)

    check()


def test_two_pass_checks_flag_bad_statistics():
    from bogc_jax import _fused_calibration

    mean = jnp.ones((3, 4))
    for var in (jnp.ones((3, 4)).at[1, 2].set(-1.0), jnp.ones((3, 4)).at[0, 0].set(jnp.nan)):
        *_, counts = _fused_calibration.leaf_calibration(
            mean, var, 4.0, kappa=1.0, gamma=1.0, prior_weight=1.0, eps=1e-3
        )
        assert not bool(jnp.all(jnp.isfinite(counts)))
    *_, counts = _fused_calibration.leaf_calibration(
        mean, jnp.ones((3, 4)), 4.0, kappa=1.0, gamma=1.0, prior_weight=1.0, eps=1e-3
    )
    np.testing.assert_array_equal(counts, [4.0, 4.0, 4.0])
