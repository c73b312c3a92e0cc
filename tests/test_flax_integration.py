"""Flax Linen's TrainState with the library's transforms, through the pattern of docs/flax.md.

``TrainState.apply_gradients`` hands its extra keywords to ``replace`` instead of
``tx.update``; the documented subclass passes them on. Its code is read from the page
itself, so that the page and this test cannot drift apart.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bogc_jax as bj

nn = pytest.importorskip("flax.linen")
train_state = pytest.importorskip("flax.training.train_state")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def documented_train_state():
    """The ``TrainState`` subclass defined in docs/flax.md."""
    with open(os.path.join(ROOT, "docs", "flax.md")) as f:
        blocks = re.findall(r"^```python\n(.*?)^```$", f.read(), re.S | re.M)
    (code,) = [b for b in blocks if "class TrainState(train_state.TrainState)" in b]
    namespace = {"optax": optax}  # the page imports optax in its first block
    exec(code, namespace)
    return namespace["TrainState"]


class Net(nn.Module):
    """Two encoders, a fusion head and one head per modality, with a conv encoder."""

    @nn.compact
    def __call__(self, xs, detach_heads=False):
        image, vector = xs
        h0 = nn.relu(nn.Conv(4, (3, 3), name="encoder_0")(image)).mean(axis=(1, 2))
        h1 = nn.relu(nn.Dense(6, name="encoder_1")(vector))
        fused = nn.Dense(3, name="fusion")(jnp.concatenate([h0, h1], axis=-1))
        if detach_heads:
            h0, h1 = jax.lax.stop_gradient(h0), jax.lax.stop_gradient(h1)
        return fused, [nn.Dense(3, name="head_0")(h0), nn.Dense(3, name="head_1")(h1)]


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def problem(seed):
    k_image, k_vector, k_y, k_init = jax.random.split(jax.random.key(seed), 4)
    y = jax.random.randint(k_y, (12,), 0, 3)
    xs = [jax.random.normal(k_image, (12, 6, 6, 2)), jax.random.normal(k_vector, (12, 5))]
    net = Net()
    params = net.init(k_init, xs)["params"]

    def losses_fn(params, batch):
        xs, y = batch
        fused, unimodal = net.apply({"params": params}, xs)
        return jnp.stack([ce(fused, y)] + [ce(u, y) for u in unimodal])

    return net, params, (xs, y), losses_fn


def bogc_inputs(net, losses_fn):
    """``(grads, extra)`` of a BOGC step."""

    def inputs(params, batch):
        stats = bj.source_grad_stats(losses_fn, params, batch)
        return stats.fixed_weight_grads(), {"grad_stats": stats}

    return inputs


def cggm_inputs(net, losses_fn):
    """``(grads, extra)`` of a CGGM step: heads on stop-gradient features score modalities."""

    def inputs(params, batch):
        xs, y = batch

        def loss(p):
            fused, unimodal = net.apply({"params": p}, xs, detach_heads=True)
            return ce(fused, y).mean() + sum(ce(u, y).mean() for u in unimodal), unimodal

        (_, unimodal), grads = jax.value_and_grad(loss, has_aux=True)(params)
        scores = jnp.stack([bj.metrics.accuracy(u, y) for u in unimodal])
        return grads, {"modality_scores": scores}

    return inputs


def make_tx(method, params):
    if method == "bogc":
        return optax.chain(bj.bogc(num_sources=3), optax.adam(1e-2))
    labels = bj.label_params(params, {"encoder_0": 0, "encoder_1": 1}, default=None)
    return optax.chain(bj.cggm(labels), optax.clip_by_global_norm(0.8), optax.adam(1e-2))


INPUTS = {"bogc": bogc_inputs, "cggm": cggm_inputs}


@pytest.mark.parametrize("method", ["bogc", "cggm"])
def test_documented_train_state_equals_the_plain_optax_loop(method):
    TrainState = documented_train_state()
    net, params, batch, losses_fn = problem(seed={"bogc": 0, "cggm": 1}[method])
    tx = make_tx(method, params)
    inputs = INPUTS[method](net, losses_fn)

    @jax.jit
    def both_steps(state, params, opt_state, batch):
        # One set of inputs for both ways: they see the same params as long as they agree,
        # which the asserts below check.
        grads, extra = inputs(state.params, batch)
        state = state.apply_gradients(grads=grads, **extra)
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return state, optax.apply_updates(params, updates), opt_state

    state = TrainState.create(apply_fn=net.apply, params=params, tx=tx)
    plain_params, plain_opt_state = params, tx.init(params)
    for _ in range(3):
        state, plain_params, plain_opt_state = both_steps(
            state, plain_params, plain_opt_state, batch
        )

    assert int(state.step) == 3
    assert_trees_equal = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
    assert_trees_equal(state.params, plain_params)
    assert_trees_equal(state.opt_state, plain_opt_state)
    # The transform did act: its extra argument reached it.
    if method == "bogc":
        weights = optax.tree.get(state.opt_state, "source_weights")
        assert not np.allclose(np.asarray(weights["encoder_0"]["kernel"]), [1.0, 1.0, 0.0])
    else:
        assert int(optax.tree.get(state.opt_state, "nonfinite_count")) == 0
        assert np.asarray(optax.tree.get(state.opt_state, "coefficients")).shape == (2,)
    assert not jax.tree.all(jax.tree.map(jnp.array_equal, state.params, params))


def test_stock_train_state_does_not_pass_extra_arguments_on():
    """Why the subclass exists: the stock method leaves grad_stats out of tx.update."""
    net, params, batch, losses_fn = problem(seed=2)
    state = train_state.TrainState.create(
        apply_fn=net.apply, params=params, tx=make_tx("bogc", params)
    )
    zeros = jax.tree.map(lambda x: jnp.zeros((3, *x.shape)), params)  # S = 3 sources
    stats = bj.GradStats(count=jnp.float32(12), mean=zeros, var=zeros)
    with pytest.raises((TypeError, ValueError)) as info:
        state.apply_gradients(grads=stats.fixed_weight_grads(), grad_stats=stats)
    assert "grad_stats" in str(info.value)
