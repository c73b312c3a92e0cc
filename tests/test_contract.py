"""The optax contract every transform of the library passes.

Each case gives the bare factory, its arguments and the extra argument it reads; every
test below runs for every case: bj.bogc (each aggregation), bj.cggm (both modes),
bj.ogm_ge and bj.mmpareto.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bogc_jax as bj

LABELS = {"enc0": 0, "enc1": 1, "head": None, "uni0": None, "uni1": None}


class Net(nnx.Module):
    """Two encoders, a fusion head and one unimodal head per modality."""

    def __init__(self, rngs):
        self.enc0 = nnx.Linear(5, 6, rngs=rngs)
        self.enc1 = nnx.Linear(4, 6, use_bias=False, rngs=rngs)
        self.head = nnx.Linear(12, 3, rngs=rngs)
        self.uni0 = nnx.Linear(6, 3, use_bias=False, rngs=rngs)
        self.uni1 = nnx.Linear(6, 3, use_bias=False, rngs=rngs)

    def __call__(self, x0, x1):
        h0, h1 = jnp.tanh(self.enc0(x0)), jnp.tanh(self.enc1(x1))
        return self.head(jnp.concatenate([h0, h1], -1)), [self.uni0(h0), self.uni1(h1)]


def make_batch(seed, n=8):
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    y = jax.random.randint(k2, (n,), 0, 3)
    return {
        "x0": jax.random.normal(k0, (n, 5)) + jax.nn.one_hot(y, 5),
        "x1": jax.random.normal(k1, (n, 4)),
        "y": y,
    }


GRAPHDEF, PARAMS = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
PARAMS = nnx.as_pure(PARAMS)


def losses_fn(params, batch):
    """``[3, B]``: fusion loss, then each modality's unimodal loss, per example."""
    fused, uni = nnx.merge(GRAPHDEF, params)(batch["x0"], batch["x1"])
    ce = optax.softmax_cross_entropy_with_integer_labels
    return jnp.stack([ce(fused, batch["y"])] + [ce(u, batch["y"]) for u in uni])


STATS = [bj.source_grad_stats(losses_fn, PARAMS, make_batch(i), method="vmap") for i in range(3)]
SCORES = [jnp.array([0.5, 0.25]), jnp.array([0.625, 0.5]), jnp.array([0.75, 0.5])]


class Case(NamedTuple):
    name: str
    factory: Callable[..., Any]
    kwargs: dict
    reads: str  # the extra argument: "grad_stats" or "modality_scores"
    static_args: tuple = ()

    def tx(self, **overrides):
        return self.factory(**{**self.kwargs, **overrides})

    def extra(self, step):
        if self.reads == "grad_stats":
            return {"grad_stats": STATS[step % len(STATS)]}
        return {"modality_scores": SCORES[step % len(SCORES)]}


def encoder0_only(grads):
    """bogc mask: calibrate enc0 only (the contract is about the optax interface; fewer
    calibrated leaves keep the compile times of this suite small)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "enc0" in jax.tree_util.keystr(path), grads
    )


CASES = [
    *[
        Case(
            f"bogc_{agg}",
            bj.bogc,
            {"num_sources": 3, "aggregation": agg, "mask": encoder0_only},
            "grad_stats",
            ("num_sources", "mask"),
        )
        for agg in ("dempster", "precision", "dimension_frame", "sum")
    ],
    Case("cggm_stable", bj.cggm, {"param_labels": LABELS, "rho": 1.3}, "modality_scores"),
    Case(
        "cggm_reference", bj.cggm, {"param_labels": LABELS, "mode": "reference"}, "modality_scores"
    ),
    Case("ogm_ge", bj.ogm_ge, {"param_labels": LABELS, "alpha": 0.5, "key": 1}, "modality_scores"),
    Case("mmpareto", bj.mmpareto, {"param_labels": LABELS}, "grad_stats"),
]
IDS = [c.name for c in CASES]
parametrize = pytest.mark.parametrize("case", CASES, ids=IDS)


def grads_at(step, dtype=None):
    grads = STATS[step % len(STATS)].fixed_weight_grads()
    return grads if dtype is None else jax.tree.map(lambda g: g.astype(dtype), grads)


def avals(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def assert_trees_close(a, b, **kw):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **kw)


@parametrize
def test_chain_with_adam_under_jit_keeps_state_avals(case):
    tx = optax.chain(case.tx(), optax.adam(1e-2))
    state = tx.init(PARAMS)
    traces = []

    @jax.jit
    def step(params, state, grads, extra):
        traces.append(1)
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    params = PARAMS
    for t in range(3):
        params, new_state = step(params, state, grads_at(t), case.extra(t))
        assert avals(new_state) == avals(state)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        state = new_state
    assert len(traces) == 1  # no re-compilation across steps
    moved = [
        not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(PARAMS))
    ]
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params)) and any(moved)


@parametrize
def test_unknown_extra_args_are_ignored(case):
    tx = case.tx()
    state = tx.init(PARAMS)

    @jax.jit
    def both(grads, state, extra):
        return (
            tx.update(grads, state, PARAMS, **extra),
            tx.update(
                grads, state, PARAMS, **extra, not_an_argument=3.0, learning_rate=jnp.ones(2)
            ),
        )

    a, b = both(grads_at(0), state, case.extra(0))
    assert_trees_close(a, b, rtol=0, atol=0)


@parametrize
def test_missing_extra_arg_is_an_error_naming_it(case):
    if case.name == "bogc_sum":
        pytest.skip("the fixed-weight sum reads no statistics")
    tx = case.tx()
    with pytest.raises((ValueError, TypeError), match=case.reads):
        tx.update(grads_at(0), tx.init(PARAMS), PARAMS)


@parametrize
def test_nnx_optimizer_update_passes_extra_args(case):
    model = nnx.merge(GRAPHDEF, PARAMS)
    opt = nnx.Optimizer(model, optax.chain(case.tx(), optax.sgd(0.1)), wrt=nnx.Param)
    batch = make_batch(0)

    def loss(model):
        fused, uni = model(batch["x0"], batch["x1"])
        ce = optax.softmax_cross_entropy_with_integer_labels
        return sum(ce(o, batch["y"]).mean() for o in [fused, *uni])

    grads = nnx.grad(loss)(model)
    updates = nnx.jit(lambda opt, model, grads, extra: opt.update(model, grads, **extra))(
        opt, model, grads, case.extra(0)
    )
    # The extra argument reached the transform (it raises without it) and the model moved.
    assert_trees_close(
        nnx.as_pure(nnx.state(model, nnx.Param)),
        optax.apply_updates(PARAMS, updates),
        rtol=1e-6,
        atol=1e-7,
    )
    assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates))
    assert int(opt.step[...]) == 1


@parametrize
def test_inject_hyperparams_wrapping(case):
    injected = optax.inject_hyperparams(case.factory, static_args=case.static_args)(**case.kwargs)
    plain = case.tx()

    @jax.jit
    def both(grads, states, extra):
        u_inj, s_inj = injected.update(grads, states[0], PARAMS, **extra)
        u_plain, s_plain = plain.update(grads, states[1], PARAMS, **extra)
        return (u_inj, u_plain), (s_inj, s_plain)

    states = (injected.init(PARAMS), plain.init(PARAMS))
    for t in range(2):
        (u_inj, u_plain), new_states = both(grads_at(t), states, case.extra(t))
        assert avals(new_states) == avals(states)
        states = new_states
        assert_trees_close(u_inj, u_plain, rtol=1e-5, atol=1e-7)
    assert_trees_close(states[0].inner_state, states[1], rtol=1e-5, atol=1e-7)
    assert set(states[0].hyperparams) >= {k for k, v in case.kwargs.items() if isinstance(v, float)}


@parametrize
def test_bf16_params_and_grads_keep_their_dtype(case):
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
    tx = case.tx()
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(
        grads_at(0, jnp.bfloat16), state, params, **case.extra(0)
    )
    for u in jax.tree.leaves(updates):
        assert u.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(u, np.float32)))
    assert avals(new_state) == avals(state)
    new_params = optax.apply_updates(params, updates)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(new_params))


@parametrize
def test_state_survives_lax_cond(case):
    tx = case.tx()
    state = tx.init(PARAMS)

    @jax.jit
    def run(state, grads, extra):
        cond = lambda pred: jax.lax.cond(
            pred, lambda s: tx.update(grads, s, PARAMS, **extra)[1], lambda s: s, state
        )
        return cond(False), cond(True), tx.update(grads, state, PARAMS, **extra)[1]

    skipped, taken, direct = run(state, grads_at(0), case.extra(0))
    assert_trees_close(skipped, state, rtol=0, atol=0)
    assert_trees_close(taken, direct, rtol=1e-6, atol=1e-7)


@parametrize
def test_donated_params_and_state(case):
    """``jax.jit(step, donate_argnums=(0, 1))``: no buffer is shared within the state."""
    tx = optax.chain(case.tx(), optax.adam(1e-2))

    def step(params, state, grads, extra):
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    donated = jax.jit(step, donate_argnums=(0, 1))
    reference = jax.jit(step)
    params = jax.tree.map(jnp.copy, PARAMS)
    state = tx.init(params)
    want_params, want_state = reference(PARAMS, tx.init(PARAMS), grads_at(0), case.extra(0))
    for t in range(2):
        params, state = donated(params, state, grads_at(t), case.extra(t))
        if t == 0:
            assert_trees_close(params, want_params, rtol=1e-6, atol=1e-7)
            assert_trees_close(state, want_state, rtol=1e-6, atol=1e-7)
    # Fresh states never alias each other (init may be called again after donating).
    again = tx.init(PARAMS)
    assert all(not x.is_deleted() for x in jax.tree.leaves(again))


def test_multi_steps_state_can_be_donated():
    tx = bj.multi_steps(optax.chain(bj.cggm(LABELS), optax.sgd(0.1)), 2, num_modalities=2)

    def step(params, state, grads, extra):
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    donated = jax.jit(step, donate_argnums=(0, 1))
    params, state = jax.tree.map(jnp.copy, PARAMS), tx.init(PARAMS)
    for t in range(3):
        params, state = donated(params, state, grads_at(t), {"modality_scores": SCORES[t]})
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


@parametrize
def test_map_params_touches_exactly_the_parameter_copies(case):
    """As for ``optax.adam``: only trees shaped like the params are mapped."""
    tx = optax.chain(case.tx(), optax.adam(1e-2))
    state = tx.init(PARAMS)
    marked = optax.tree.map_params(
        tx, lambda _: "param", state, transform_non_params=lambda _: "other"
    )
    own = marked[0]  # the library transform's state: no parameter copies
    assert set(jax.tree.leaves(own)) == {"other"}
    adam_mu = optax.tree.get(marked, "mu")
    assert jax.tree.leaves(adam_mu) == ["param"] * len(jax.tree.leaves(PARAMS))
    # The identity map keeps the state as it is (optax's own contract check).
    same = optax.tree.map_params(tx, lambda v: v, state)
    assert_trees_close(same, state, rtol=0, atol=0)
