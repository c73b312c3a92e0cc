"""representation_bogc and bayesagg_mtl: the training-step API on small multimodal models."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import bogc_jax as bj

CLASSES, WIDTH, BATCH = 3, 4, 8
IN_DIMS = (5, 4, 3)


def make_model(num_modalities, fusion, seed=0):
    """Encoders tanh(x W_m), a fusion head (concat or sum) and one head per modality."""
    k = jax.random.split(jax.random.key(seed), 4 + 2 * num_modalities)
    fused_in = WIDTH * num_modalities if fusion == "concat" else WIDTH
    params = {
        "enc": [jax.random.normal(k[m], (IN_DIMS[m], WIDTH)) for m in range(num_modalities)],
        "fusion": (0.5 * jax.random.normal(k[3], (fused_in, CLASSES)), 0.1 * jnp.ones(CLASSES)),
        "uni": [
            (0.5 * jax.random.normal(k[4 + m], (WIDTH, CLASSES)), jnp.zeros(CLASSES))
            for m in range(num_modalities)
        ],
    }
    encode = lambda p, b: [jnp.tanh(x @ w) for x, w in zip(b["x"], p["enc"])]
    head_params = lambda p: [p["fusion"], *p["uni"]]
    heads = [bj.LinearHead(tuple(range(num_modalities)), fusion=fusion)]
    heads += [bj.LinearHead((m,)) for m in range(num_modalities)]

    def joint_loss(p, b):
        reps = encode(p, b)
        fused = jnp.concatenate(reps, -1) if fusion == "concat" else sum(reps)
        total = optax.softmax_cross_entropy_with_integer_labels(
            fused @ p["fusion"][0] + p["fusion"][1], b["y"]
        ).mean()
        for h, (kernel, bias) in zip(reps, p["uni"]):
            total += optax.softmax_cross_entropy_with_integer_labels(
                h @ kernel + bias, b["y"]
            ).mean()
        return total

    return params, encode, head_params, heads, joint_loss


def make_batch(num_modalities, seed=1, batch=BATCH):
    k = jax.random.split(jax.random.key(seed), num_modalities + 1)
    xs = [jax.random.normal(k[m], (batch, IN_DIMS[m])) for m in range(num_modalities)]
    return {"x": xs, "y": jax.random.randint(k[-1], (batch,), 0, CLASSES)}


def _close(a, b, rtol=2e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize(
    "num_modalities, fusion, options",
    [
        (2, "concat", dict(kappa=0.0)),
        (3, "sum", dict(power=0.0)),
        (3, "concat", dict(aggregation="precision", power=0.0)),
        (2, "sum", dict(posterior="full", moments="monte_carlo", num_samples=16, power=0.0)),
    ],
)
def test_no_calibration_gives_the_joint_gradient(num_modalities, fusion, options):
    """p = 0 or kappa = 0, scale 'sum', centre 'current': exactly joint_uni's gradient."""
    params, encode, head_params, heads, joint_loss = make_model(num_modalities, fusion)
    batch = make_batch(num_modalities)
    method = bj.representation_bogc(
        encode, head_params, heads, targets_fn=lambda b: b["y"], **options
    )
    grads, state, info = jax.jit(method.grads)(
        params, method.init(params), batch, key=jax.random.key(0)
    )
    _close(grads, jax.grad(joint_loss)(params, batch))
    assert bool(state.finite) and int(state.step) == 1
    for w in info.weights:
        np.testing.assert_allclose(w, 1.0, rtol=1e-5)


def test_heads_get_plain_gradients_and_calibration_moves_the_encoders():
    params, encode, head_params, heads, joint_loss = make_model(2, "concat")
    batch = make_batch(2)
    method = bj.representation_bogc(
        encode, head_params, heads, targets_fn=lambda b: b["y"], gamma=3.0
    )
    grads, _, info = jax.jit(method.grads)(params, method.init(params), batch)
    joint = jax.grad(joint_loss)(params, batch)
    _close({k: grads[k] for k in ("fusion", "uni")}, {k: joint[k] for k in ("fusion", "uni")})
    assert not np.allclose(grads["enc"][0], joint["enc"][0], rtol=1e-3)
    assert all(bool(jnp.all(jnp.isfinite(w))) for w in info.weights)


def test_permuting_heads_changes_nothing():
    params, encode, head_params, heads, _ = make_model(3, "concat")
    batch = make_batch(3)
    order = [2, 0, 3, 1]
    run = lambda hp_fn, hs: bj.representation_bogc(
        encode, hp_fn, hs, targets_fn=lambda b: b["y"], gamma=2.0
    )
    a = run(head_params, heads)
    b = run(lambda p: [head_params(p)[i] for i in order], [heads[i] for i in order])
    ga, _, _ = jax.jit(a.grads)(params, a.init(params), batch)
    gb, _, _ = jax.jit(b.grads)(params, b.init(params), batch)
    _close(ga, gb, rtol=1e-4, atol=1e-6)


def test_a_representation_read_by_one_head_passes_through():
    """Modality 1 is read by the fusion head only: its encoder gets the plain gradient."""
    params, encode, head_params, heads, joint_loss = make_model(2, "concat")
    batch = make_batch(2)
    params["uni"] = params["uni"][:1]
    method = bj.representation_bogc(
        encode, head_params, heads[:2], targets_fn=lambda b: b["y"], gamma=3.0
    )
    grads, _, info = jax.jit(method.grads)(params, method.init(params), batch)
    joint = jax.grad(joint_loss)(params, batch)
    _close(grads["enc"][1], joint["enc"][1])
    assert info.weights[1].shape == (1,)


def test_state_is_stable_under_jit_and_cond_and_accumulates_epochs():
    params, encode, head_params, heads, _ = make_model(2, "concat")
    method = bj.representation_bogc(
        encode, head_params, heads, targets_fn=lambda b: b["y"], full_data="epoch", refresh_every=2
    )
    state0 = method.init(params)
    batches = [make_batch(2, seed=s) for s in (1, 2, 3)]

    @jax.jit
    def step(state, batch, go):
        new = method.grads(params, state, batch)[1]
        return jax.lax.cond(go, lambda: new, lambda: state)

    state = state0
    for batch in batches:
        state = step(state, batch, jnp.asarray(True))
        assert jax.tree.structure(state) == jax.tree.structure(state0)
        jax.tree.map(
            lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail("changed"),
            state,
            state0,
        )
    assert int(state.step) == 3
    skipped = step(state, batches[0], jnp.asarray(False))
    _close(skipped, state, rtol=0, atol=0)
    # At step 2 the first two batches' sums became the prior: the same as refreshing from
    # their stored features at the (unchanged) heads.
    reps = [jnp.concatenate([encode(params, b)[m] for b in batches[:2]]) for m in range(2)]
    ys = jnp.concatenate([b["y"] for b in batches[:2]])
    stored = method.refresh(params, state0, reps, ys)
    for t in range(3):
        _close(state.heads[t].prior_mean, stored.heads[t].prior_mean, rtol=1e-4, atol=1e-5)
        _close(
            state.heads[t].prior_precision, stored.heads[t].prior_precision, rtol=1e-4, atol=1e-3
        )


def test_state_round_trips_through_orbax(tmp_path):
    params, encode, head_params, heads, _ = make_model(2, "concat")
    method = bj.representation_bogc(encode, head_params, heads, targets_fn=lambda b: b["y"])
    _, state, _ = method.grads(params, method.init(params), make_batch(2))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
    with ocp.StandardCheckpointer() as checkpointer:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, method.init(params))
        restored = checkpointer.restore(tmp_path / "state", abstract)
    assert type(restored) is type(state)
    _close(restored, state, rtol=0, atol=0)


def test_flax_nnx_heads_and_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.enc = nnx.List([nnx.Linear(IN_DIMS[m], WIDTH, rngs=rngs) for m in range(2)])
            self.fusion = nnx.Linear(2 * WIDTH, CLASSES, rngs=rngs)
            self.heads = nnx.List([nnx.Linear(WIDTH, CLASSES, rngs=rngs) for _ in range(2)])

    model = Model(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    encode = lambda p, b: [jnp.tanh(e(x)) for e, x in zip(nnx.merge(graphdef, p).enc, b["x"])]

    def head_params(p):
        m = nnx.merge(graphdef, p)
        return [(lin.kernel[...], lin.bias[...]) for lin in (m.fusion, *m.heads)]

    heads = [bj.LinearHead((0, 1)), bj.LinearHead((0,)), bj.LinearHead((1,))]
    method = bj.representation_bogc(
        encode, head_params, heads, targets_fn=lambda b: b["y"], kappa=0.0
    )
    batch = make_batch(2)
    grads, _, _ = method.grads(params, method.init(params), batch)

    def joint(p):
        m = nnx.merge(graphdef, p)
        reps = [jnp.tanh(e(x)) for e, x in zip(m.enc, batch["x"])]
        ce = optax.softmax_cross_entropy_with_integer_labels
        total = ce(m.fusion(jnp.concatenate(reps, -1)), batch["y"]).mean()
        return total + sum(ce(h(r), batch["y"]).mean() for h, r in zip(m.heads, reps))

    _close(grads, jax.grad(joint)(params))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    before = model.fusion.kernel[...].copy()
    optimizer.update(model, grads)
    assert not np.allclose(model.fusion.kernel[...], before)


def test_bayesagg_mtl_multitask_runs_with_all_head_kinds():
    k = jax.random.split(jax.random.key(0), 5)
    params = {
        "enc": jax.random.normal(k[0], (6, 5)),
        "cls": (0.3 * jax.random.normal(k[1], (5, 3)), jnp.zeros(3)),
        "bin": (0.3 * jax.random.normal(k[2], (5, 2)), jnp.zeros(2)),
        "reg": (0.3 * jax.random.normal(k[3], (5, 2)), jnp.zeros(2)),
    }
    heads = [
        bj.LinearHead((0,), "softmax"),
        bj.LinearHead((0,), "sigmoid"),
        bj.LinearHead((0,), "mse"),
    ]
    method = bj.bayesagg_mtl(
        lambda p, b: jnp.tanh(b["x"] @ p["enc"]),
        lambda p: [p["cls"], p["bin"], p["reg"]],
        heads,
        targets_fn=lambda b: [b["c"], b["b"], b["r"]],
        num_samples=64,
    )
    kb = jax.random.split(k[4], 4)
    batch = {
        "x": jax.random.normal(kb[0], (BATCH, 6)),
        "c": jax.random.randint(kb[1], (BATCH,), 0, 3),
        "b": jax.random.bernoulli(kb[2], 0.5, (BATCH, 2)).astype(jnp.float32),
        "r": jax.random.normal(kb[3], (BATCH, 2)),
    }
    state = method.refresh(
        params,
        method.init(params),
        jnp.tanh(batch["x"] @ params["enc"]),
        [batch["c"], batch["b"], batch["r"]],
    )
    grads, state, info = jax.jit(method.grads)(params, state, batch, key=jax.random.key(1))
    assert info.weights[0].shape == (1 + 2 + 2,)
    assert bool(state.finite)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def _largest_intermediate(jaxpr) -> int:
    largest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(v.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_intermediate(inner))
    return largest


def test_monte_carlo_never_holds_all_draws_at_once():
    params, encode, head_params, heads, _ = make_model(2, "concat")
    batch = make_batch(2)
    samples, chunk = 256, 8
    method = bj.representation_bogc(
        encode, head_params, heads, targets_fn=lambda b: b["y"], moments="monte_carlo",
        num_samples=samples, chunk_size=chunk,
    )  # fmt: skip
    jaxpr = jax.make_jaxpr(method.grads)(params, method.init(params), batch, key=jax.random.key(0))
    largest = _largest_intermediate(jaxpr.jaxpr)
    assert largest < samples * BATCH * 2 * WIDTH, largest  # the [S, B, d] array of one source


def test_clear_errors():
    params, encode, head_params, heads, _ = make_model(2, "concat")
    batch = make_batch(2)
    with pytest.raises(ValueError, match="reads representation 5"):
        m = bj.representation_bogc(
            encode, head_params, [bj.LinearHead((0, 5)), *heads[1:]], targets_fn=lambda b: b["y"]
        )
        m.grads(params, m.init(params), batch)
    with pytest.raises(ValueError, match=r"kernel must be \[d_in, K\]"):
        m = bj.representation_bogc(
            encode, head_params, [bj.LinearHead((0,)), *heads[1:]], targets_fn=lambda b: b["y"]
        )
        m.grads(params, m.init(params), batch)
    with pytest.raises(ValueError, match="needs key="):
        m = bj.representation_bogc(
            encode, head_params, heads, targets_fn=lambda b: b["y"], moments="monte_carlo"
        )
        m.grads(params, m.init(params), batch)
    with pytest.raises(ValueError, match="posterior='diag'"):
        bj.representation_bogc(encode, head_params, heads, posterior="full")
    with pytest.raises(ValueError, match="refresh_every"):
        bj.representation_bogc(encode, head_params, heads, full_data="epoch")
    with pytest.raises(ValueError, match="loss must be one of"):
        bj.LinearHead((0,), loss="hinge")


def test_one_device_equals_eight_devices():
    worker = pathlib.Path(__file__).with_name("workers") / "representation_worker.py"
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["PYTHONPATH"] = (
        str(pathlib.Path(__file__).parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    )
    proc = subprocess.run(
        [sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "same" in proc.stdout
