"""optax's contract suite for contributed optimizers, applied to every transform here.

optax ships the checks every ``optax.contrib`` optimizer must pass in
``optax/contrib/_common_test.py``. That module builds its cases from names looked up in
``optax.contrib`` and cannot take transforms that need extra arguments, so its checks are
reproduced here one for one, for ``bj.bogc``, ``bj.cggm``, ``bj.ogm_ge`` and ``bj.mmpareto``
(each chained with adam, as the suite chains ``reduce_on_plateau`` with sgd), each fed its
extra argument at every update:

- ``test_optimizers_accept_extra_args``: unknown extra arguments are ignored, and the
  second jitted update does not recompile;
- ``test_optimizers``: ``optax.tree.map_params`` with the identity keeps the state, and
  30,000 scanned steps reach the minimum of the suite's four targets (parabola,
  Rosenbrock, matrix parabola, mixed 1-D and 2-D) within 3e-2;
- ``test_optimizers_can_be_wrapped_in_inject_hyperparams``: the same updates and states
  with ``optax.inject_hyperparams`` (shape-setting arguments in ``static_args``);
- ``test_preserve_dtype``: updates keep the params' dtype (bfloat16, float32);
- ``test_gradient_accumulation``: under ``optax.MultiSteps(every_k_schedule=4)`` the first
  update is zero;
- ``test_state_shape_dtype_shard_stability``: states keep their shapes and dtypes through
  ``lax.cond`` for float16, bfloat16, float32 and float64 params.

The suite's learning-rate-schedule check does not apply: no transform here takes a
learning rate. The modality transforms need at least two labelled parameters, so every
target's parameters are given as two leaves (the same objective), labelled 0 and 1.
Statistics: three sources per leaf (the objective's gradient, and that gradient on each
leaf alone), with different variances, so bogc does reweigh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import test_utils
from optax._src import utils as optax_utils

import bogc_jax as bj

LABELS = (0, 1)
TRANSFORMS = {
    "bogc": (bj.bogc, {"num_sources": 3}, ("num_sources",), "grad_stats"),
    "cggm": (bj.cggm, {"param_labels": LABELS, "rho": 1.3}, (), "modality_scores"),
    "ogm_ge": (bj.ogm_ge, {"param_labels": LABELS, "alpha": 0.5, "key": 0}, (), "modality_scores"),
    "mmpareto": (bj.mmpareto, {"param_labels": LABELS}, (), "grad_stats"),
}
parametrize = pytest.mark.parametrize("name", sorted(TRANSFORMS))


def make(name, learning_rate=1e-2):
    factory, kwargs, _, _ = TRANSFORMS[name]
    return optax.chain(factory(**kwargs), optax.adam(learning_rate))


def extra_args(name, params, grads):
    """The transform's extra argument for ``grads`` (the objective's gradient)."""
    if TRANSFORMS[name][3] == "modality_scores":
        return {
            "modality_scores": jnp.stack(
                [jnp.exp(-jnp.sum(jnp.square(g.astype(jnp.float32)))) for g in grads]
            )
        }
    mean = tuple(
        jnp.stack([g, g * (i == 0), g * (i == 1)]).astype(jnp.float32) for i, g in enumerate(grads)
    )
    var = tuple(
        jnp.square(m) * jnp.array([0.1, 1.0, 3.0]).reshape((3,) + (1,) * (m.ndim - 1)) for m in mean
    )
    return {"grad_stats": bj.GradStats(jnp.float32(8), mean, var)}


def fixed_weight(name, grads):
    """The incoming gradient: the sources' fixed-weight sum where statistics are read."""
    if TRANSFORMS[name][3] == "grad_stats":
        return jax.tree.map(lambda g: 2 * g, grads)
    return grads


# The suite's targets, each with its parameters as two leaves.


def parabola(dtype):
    final = (jnp.array([1.0, -1.0], dtype), jnp.array([1.0], dtype))
    obj = lambda p: sum(jnp.sum(jnp.square(x - f)) for x, f in zip(p, final))
    return (jnp.array([-1.0, 10.0], dtype), jnp.array([1.0], dtype)), final, obj


def rosenbrock(dtype):
    final = (jnp.array(1.0, dtype), jnp.array(1.0, dtype))
    obj = lambda p: jnp.square(1.0 - p[0]) + 100.0 * jnp.square(p[1] - p[0] ** 2)
    return (jnp.array(0.0, dtype), jnp.array(0.0, dtype)), final, obj


def matrix_parabola(dtype):
    final = (jnp.array([[3.0, -2.0]], dtype), jnp.array([[1.0, 4.0]], dtype))
    obj = lambda p: sum(jnp.sum(jnp.square(x - f)) for x, f in zip(p, final))
    return (jnp.zeros((1, 2), dtype), jnp.zeros((1, 2), dtype)), final, obj


def mixed_tensor_target(dtype):
    final = (jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))
    obj = lambda p: sum(jnp.sum(jnp.square(x - f)) for x, f in zip(p, final))
    return (jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype)), final, obj


def stepper(name, opt, obj, **unexpected):
    def step(params, state):
        grads = jax.grad(obj)(params)
        extra = {**extra_args(name, params, grads), **unexpected}
        updates, state = opt.update(fixed_weight(name, grads), state, params, **extra)
        return optax.apply_updates(params, updates), state

    return step


@parametrize
def test_optimizers_accept_extra_args(name):
    opt = make(name)
    initial, _, obj = rosenbrock(jnp.float32)
    step = jax.jit(stepper(name, opt, obj, unexpected_extra_args_your_optimizer_doesnt_expect=1))
    params, state = initial, opt.init(initial)
    for _ in range(2):
        params, state = step(params, state)
    params, state = step(initial, opt.init(initial))
    with test_utils.log_compilations() as logs:
        step(params, state)
    assert not logs, "the update recompiles on its second call"


@parametrize
@pytest.mark.parametrize(
    "target", [parabola, rosenbrock, matrix_parabola, mixed_tensor_target], ids=lambda t: t.__name__
)
def test_optimizers(name, target):
    opt = make(name)
    initial, final, obj = target(jnp.float32)
    state = opt.init(initial)
    same = optax.tree.map_params(opt, lambda v: v, state)
    assert jax.tree.structure(same) == jax.tree.structure(state)
    step = stepper(name, opt, obj)
    (params, state), _ = jax.lax.scan(
        lambda carry, _: (step(*carry), None), (initial, same), length=30_000
    )
    test_utils.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


@parametrize
def test_optimizers_can_be_wrapped_in_inject_hyperparams(name):
    factory, kwargs, static_args, _ = TRANSFORMS[name]
    opt = factory(**kwargs)
    injected = optax.inject_hyperparams(factory, static_args=static_args)(**kwargs)
    params = (jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2)))
    grads = (jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2))))
    extra = extra_args(name, params, grads)
    updates, new_state = jax.jit(opt.update)(
        fixed_weight(name, grads), jax.jit(opt.init)(params), params, **extra
    )
    updates_inj, new_state_inj = jax.jit(injected.update)(
        fixed_weight(name, grads), jax.jit(injected.init)(params), params, **extra
    )
    test_utils.assert_trees_all_close(updates_inj, updates, rtol=1e-5)
    test_utils.assert_trees_all_close(new_state_inj.inner_state, new_state, rtol=1e-5, atol=1e-5)


def quadratic(dtype):
    params = (jnp.array([1.0], dtype), jnp.array([2.0], dtype))
    grads = jax.grad(lambda p: sum(jnp.sum(x**2) for x in p))(params)
    return params, grads


@parametrize
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_preserve_dtype(name, dtype):
    params, grads = quadratic(jnp.dtype(dtype))
    opt = make(name, learning_rate=1.0)
    updates, _ = jax.jit(opt.update)(
        fixed_weight(name, grads),
        jax.jit(opt.init)(params),
        params,
        **extra_args(name, params, grads),
    )
    assert all(u.dtype == p.dtype for u, p in zip(updates, params))


@parametrize
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gradient_accumulation(name, dtype):
    params, grads = quadratic(jnp.dtype(dtype))
    opt = optax.MultiSteps(make(name, learning_rate=1.0), every_k_schedule=4)
    updates, _ = jax.jit(opt.update)(
        fixed_weight(name, grads),
        jax.jit(opt.init)(params),
        params,
        **extra_args(name, params, grads),
    )
    test_utils.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))


@parametrize
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_state_shape_dtype_shard_stability(name, dtype):
    with optax_utils.x64_precision(dtype == jnp.float64):
        opt = make(name, learning_rate=1e-3)
        initial, _, obj = parabola(dtype)
        inner = stepper(name, opt, obj)

        @jax.jit
        def step(params, state):
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            return jax.lax.cond(cond, lambda: inner(params, state), lambda: (params, state))

        params, state = initial, opt.init(initial)
        for _ in range(2):
            params, new_state = step(params, state)
            assert jax.tree.leaves(params)[0].dtype == dtype
            assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == jax.tree.map(
                lambda x: (x.shape, x.dtype), state
            )
            state = new_state
    assert np.all(np.isfinite(np.asarray(jax.tree.leaves(params)[0], np.float32)))
