"""bj.cggm, bj.cggm_coefficients and bj.cggm_direction_loss."""

import json
import os
import subprocess
import sys

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import bogc_jax as bj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RHO = 1.3

# A hand-computed score sequence for M = 3 (batch accuracies of a batch of 8, so every
# number is exact in binary). The first step compares against zeros (official code).
SCORES = [
    [0.5, 0.25, 0.25],
    [0.625, 0.25, 0.5],
    [0.75, 0.125, 0.5],  # d = (0.125, -0.125, 0): sum of improvements exactly 0
    [0.5, 0.375, 0.5],  # d = (-0.25, 0.25, 0): exactly 0 again
    [0.5, 0.5, 0.75],
]
G = 1e-8  # the official guard
EXPECTED_B = [
    [0.5, 0.75, 0.75],
    [(0.375 - 0.125) / 0.375, 1.0, (0.375 - 0.25) / 0.375],
    [(G - 0.125) / G, (G + 0.125) / G, 1.0],
    [(G + 0.25) / G, (G - 0.25) / G, 1.0],
    [1.0, (0.375 - 0.125) / 0.375, (0.375 - 0.25) / 0.375],
]


def official_coefficients(score_sequence, num_mod):
    """Independent transcription of the official code's arithmetic (Python floats).

    Per step: diff_i = acc2_i - acc1_i; diff_sum = sum(diff) + 1e-8;
    coeff_i = (diff_sum - diff_i) / diff_sum; acc1 = acc2; acc1 starts at zeros.
    """
    previous = [0] * num_mod
    out = []
    for current in score_sequence:
        diff = [float(current[i]) - previous[i] for i in range(num_mod)]
        diff_sum = sum(diff) + 1e-8
        out.append([(diff_sum - d) / diff_sum for d in diff])
        previous = [float(c) for c in current]
    return np.array(out)


def make_problem(num_modalities=3, seed=0, dtype=jnp.float32):
    """Params with one encoder per modality and a shared head; labels; random grads."""
    keys = jax.random.split(jax.random.key(seed), 2 * num_modalities + 2)
    params = {
        "encoders": [
            {
                "w": jax.random.normal(keys[2 * i], (3, 2), dtype),
                "b": jax.random.normal(keys[2 * i + 1], (2,), dtype),
            }
            for i in range(num_modalities)
        ],
        "head": {"w": jax.random.normal(keys[-2], (2 * num_modalities, 4), dtype)},
    }
    labels = bj.label_params(params, {"encoders": bj.labels.INDEX, "head": None})
    grads = jax.tree.map(lambda p: jax.random.normal(keys[-1], p.shape, p.dtype), params)
    return params, labels, grads


def run_sequence(tx, params, grads, scores):
    state = tx.init(params)
    update = jax.jit(tx.update)
    coefficients, all_updates = [], []
    for s in scores:
        updates, state = update(grads, state, params, modality_scores=jnp.asarray(s))
        coefficients.append(np.asarray(state.coefficients))
        all_updates.append(updates)
    return np.stack(coefficients), all_updates, state


# --- reference mode ------------------------------------------------------------------


def test_reference_mode_gives_the_hand_computed_b_sequence_and_scaled_grads():
    params, labels, grads = make_problem()
    b, updates, _ = run_sequence(bj.cggm(labels, rho=RHO, mode="reference"), params, grads, SCORES)
    np.testing.assert_allclose(b, np.array(EXPECTED_B), rtol=1e-6)
    assert abs(b[2, 0]) > 1e7 and abs(b[3, 1]) > 1e7  # the official explosion
    for t, u in enumerate(updates):
        for i in range(3):
            for name in ("w", "b"):
                np.testing.assert_allclose(
                    u["encoders"][i][name],
                    np.asarray(grads["encoders"][i][name]) * np.float32(RHO * EXPECTED_B[t][i]),
                    rtol=1e-6,
                )
        np.testing.assert_array_equal(u["head"]["w"], grads["head"]["w"])  # shared: untouched


def test_reference_mode_matches_float32_transcription_bit_for_bit():
    params, labels, grads = make_problem()
    b, _, _ = run_sequence(bj.cggm(labels, rho=RHO, mode="reference"), params, grads, SCORES)
    previous = np.zeros(3, np.float32)
    for t, s in enumerate(SCORES):
        d = np.asarray(s, np.float32) - previous
        total = np.float32(np.sum(d)) + np.float32(1e-8)
        np.testing.assert_array_equal(b[t], (total - d) / total)
        previous = np.asarray(s, np.float32)


@settings(max_examples=20, deadline=None)
@given(
    num_mod=st.integers(2, 4),
    batch_log2=st.integers(2, 6),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_mode_matches_official_arithmetic(num_mod, batch_log2, steps, seed):
    """Random accuracy sequences (multiples of 1/batch) against the float64 transcription."""
    rng = np.random.default_rng(seed)
    batch = 2**batch_log2
    scores = rng.integers(0, batch + 1, size=(steps, num_mod)) / batch
    b = np.stack([np.asarray(x) for x in _reference_b(scores, num_mod)])
    np.testing.assert_allclose(b, official_coefficients(scores, num_mod), rtol=2e-6, atol=1e-6)


_REFERENCE_TX = {}


def _reference_b(scores, num_mod):
    """B of the reference transform on a score sequence (one compiled update per M)."""
    if num_mod not in _REFERENCE_TX:
        params, labels, grads = make_problem(num_mod)
        tx = bj.cggm(labels, mode="reference")
        _REFERENCE_TX[num_mod] = (tx, params, grads, jax.jit(tx.update))
    tx, params, grads, update = _REFERENCE_TX[num_mod]
    state = tx.init(params)
    out = []
    for s in scores.astype(np.float32):
        _, state = update(grads, state, params, modality_scores=jnp.asarray(s))
        out.append(np.asarray(state.coefficients))
    return out


def test_reference_mode_matches_torch_scaling_and_direction_gradient():
    torch = pytest.importorskip("torch")
    num_mod = 3
    params, labels, grads = make_problem(num_mod)
    b, updates, _ = run_sequence(bj.cggm(labels, rho=RHO, mode="reference"), params, grads, SCORES)
    official = official_coefficients(SCORES, num_mod)
    for t in range(len(SCORES)):
        for i in range(num_mod):
            g = torch.tensor(np.asarray(grads["encoders"][i]["w"]))
            g *= official[t][i] * RHO  # params.grad *= (coeff[i] * hyp_params.rou)
            np.testing.assert_allclose(updates[t]["encoders"][i]["w"], g.numpy(), rtol=1e-6)

    rng = np.random.default_rng(1)
    fusion = rng.normal(size=(4, 6)).astype(np.float32)
    classifiers = [rng.normal(size=(4, 6)).astype(np.float32) for _ in range(num_mod)]
    for coeff in official[:3]:
        w = torch.tensor(fusion, requires_grad=True)
        fgn = w.clone().view(-1)
        cos = [
            torch.nn.functional.cosine_similarity(torch.tensor(c).view(-1), fgn, dim=0)
            for c in classifiers
        ]
        l_gm = np.sum(np.abs(coeff)) - sum(coeff[i] * cos[i] for i in range(num_mod))
        (l_gm / num_mod).backward()
        ours = jax.grad(bj.cggm_direction_loss, argnums=1)(
            jnp.asarray(coeff, jnp.float32), jnp.asarray(fusion), classifiers, "weights"
        )
        scale = max(1.0, float(np.max(np.abs(w.grad.numpy()))))
        np.testing.assert_allclose(ours, w.grad.numpy(), rtol=1e-5, atol=1e-6 * scale)


# --- stable mode ---------------------------------------------------------------------


def test_stable_mode_on_the_same_sequence_is_finite_bounded_and_sign_preserving():
    params, labels, grads = make_problem()
    b, updates, _ = run_sequence(bj.cggm(labels, rho=RHO), params, grads, SCORES)
    assert np.all(np.isfinite(b))
    assert np.all((b > 0) & (b < 1))
    np.testing.assert_allclose(b.sum(axis=1), 2.0, rtol=1e-6)  # sum B = M - 1
    np.testing.assert_allclose(b[0], 2.0 / 3.0, rtol=1e-6)  # first step: no previous score
    for u in updates:
        for g_new, g in zip(jax.tree.leaves(u), jax.tree.leaves(grads)):
            assert np.all(np.sign(g_new) == np.sign(g))
            assert np.all(np.abs(g_new) <= RHO * np.abs(g) + 1e-7)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=2, max_size=6),
    st.floats(1e-4, 1.0),
)
def test_stable_coefficients_are_bounded_shares(d, smoothing):
    b = np.asarray(bj.cggm_coefficients(jnp.asarray(d), mode="stable", smoothing=smoothing))
    assert np.all(np.isfinite(b)) and np.all(b > 0) and np.all(b < 1)
    np.testing.assert_allclose(b.sum(), len(d) - 1, rtol=1e-5)
    # A modality that improved more never gets a larger coefficient.
    order = np.argsort(d, kind="stable")
    assert np.all(np.diff(b[order]) <= 1e-6)


def test_stable_equals_the_paper_formula_for_clear_non_negative_progress():
    d = jnp.array([0.3, 0.1, 0.0, 0.2])
    b = bj.cggm_coefficients(d, mode="stable", smoothing=1e-7)
    np.testing.assert_allclose(b, (d.sum() - d) / d.sum(), rtol=1e-5)
    # No progress at all: every modality gets (M - 1) / M.
    np.testing.assert_allclose(bj.cggm_coefficients(jnp.zeros(4)), 0.75, rtol=1e-6)


def test_state_keeps_scores_improvements_and_coefficients_for_logging():
    params, labels, grads = make_problem()
    tx = optax.chain(bj.cggm(labels, mode="reference"), optax.adam(1e-3))
    state = tx.init(params)
    for s in SCORES[:2]:
        _, state = tx.update(grads, state, params, modality_scores=jnp.asarray(s))
    np.testing.assert_array_equal(optax.tree.get(state, "scores"), SCORES[1])
    np.testing.assert_array_equal(optax.tree.get(state, "previous_scores"), SCORES[0])
    np.testing.assert_allclose(
        optax.tree.get(state, "improvements"), np.subtract(SCORES[1], SCORES[0])
    )
    np.testing.assert_allclose(optax.tree.get(state, "coefficients"), EXPECTED_B[1], rtol=1e-6)
    assert int(optax.tree.get(state, "step")) == 2


def test_two_modalities_and_callable_labels():
    params = {"a": jnp.ones(3), "v": jnp.ones(2), "fusion": jnp.ones(4)}
    labels = lambda tree: {"a": 0, "v": 1, "fusion": None}
    tx = bj.cggm(labels, rho=1.0, mode="reference")
    updates, state = tx.update(params, tx.init(params), modality_scores=jnp.array([0.75, 0.25]))
    np.testing.assert_allclose(state.coefficients, [0.25, 0.75])
    np.testing.assert_allclose(updates["a"], 0.25)
    np.testing.assert_allclose(updates["v"], 0.75)
    np.testing.assert_array_equal(updates["fusion"], 1.0)


def test_errors_name_the_problem():
    params, labels, grads = make_problem()
    tx = bj.cggm(labels)
    state = tx.init(params)
    with pytest.raises(ValueError, match="modality_scores"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        tx.update(grads, state, params, modality_scores=jnp.ones(2))
    with pytest.raises(ValueError, match="mode"):
        bj.cggm(labels, mode="paper")
    with pytest.raises(ValueError, match="rho"):
        bj.cggm(labels, rho=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        bj.cggm({"a": 0, "b": None}).init({"a": jnp.ones(1), "b": jnp.ones(1)})
    with pytest.raises(TypeError, match="modality index"):
        bj.cggm({"a": "audio", "b": 1}).init({"a": jnp.ones(1), "b": jnp.ones(1)})


# --- direction loss ------------------------------------------------------------------


def test_weights_direction_gradient_reaches_only_the_fusion_output_weight():
    rng = np.random.default_rng(0)
    tree = {
        "model": {
            "encoder": jnp.asarray(rng.normal(size=(3, 5))),
            "fusion_hidden": jnp.asarray(rng.normal(size=(5, 5))),
            "out_layer": jnp.asarray(rng.normal(size=(5, 4))),
        },
        "classifiers": [jnp.asarray(rng.normal(size=(5, 4))) for _ in range(3)],
        "coefficients": jnp.array([0.7, -0.4, 1.2]),
    }

    def loss(tree):
        return bj.cggm_direction_loss(
            tree["coefficients"],
            tree["model"]["out_layer"],
            tree["classifiers"],
            direction="weights",
        )

    grads = jax.grad(loss)(tree)
    assert np.all(np.abs(grads["model"]["out_layer"]) > 0)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        if "out_layer" not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(g, 0.0, err_msg=jax.tree_util.keystr(path))


def test_direction_gradient_matches_the_analytic_formula():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(6, 3))
    cs = [rng.normal(size=(6, 3)) for _ in range(2)]
    b = np.array([0.8, -0.3])
    ours = jax.grad(bj.cggm_direction_loss, argnums=1)(
        jnp.asarray(b), jnp.asarray(f, jnp.float32), cs, "weights"
    )
    nf = np.linalg.norm(f)
    expected = np.zeros_like(f)
    for bi, c in zip(b, cs):
        cos = np.sum(c * f) / (np.linalg.norm(c) * nf)
        expected -= bi * (c / (np.linalg.norm(c) * nf) - cos * f / nf**2) / len(b)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-7)


def test_gradients_direction_matches_finite_differences():
    """d/dtheta L_gm(B, dL/dW(theta), classifier grads): a gradient of a gradient."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.normal(size=(16, 5)))
        y = jnp.asarray(rng.integers(0, 4, 16))
        theta = {
            "encoder": jnp.asarray(rng.normal(size=(5, 6))),
            "out": jnp.asarray(rng.normal(size=(6, 4))),
        }
        cls_grads = [jnp.asarray(rng.normal(size=(6, 4))) for _ in range(2)]
        b = jnp.array([0.9, -0.6])

        def task(out, theta):
            logits = jnp.tanh(x @ theta["encoder"]) @ out
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        def l_gm(theta):
            fusion_grad = jax.grad(task)(theta["out"], theta)
            return bj.cggm_direction_loss(b, fusion_grad, cls_grads, direction="gradients")

        grad = jax.grad(l_gm)(theta)
        l_gm = jax.jit(l_gm)
        assert float(jnp.abs(grad["encoder"]).max()) > 0  # reaches the encoder (2nd order)
        for _ in range(4):
            v = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), theta)
            eps = 1e-5
            plus = l_gm(jax.tree.map(lambda p, d, eps=eps: p + eps * d, theta, v))
            minus = l_gm(jax.tree.map(lambda p, d, eps=eps: p - eps * d, theta, v))
            fd = (plus - minus) / (2 * eps)
            analytic = sum(
                jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(v))
            )
            np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-9)


def test_gradients_direction_is_zero_safe():
    b = jnp.array([1.0, 1.0])
    zero = jnp.zeros((3, 2))
    value, grad = jax.value_and_grad(bj.cggm_direction_loss, argnums=1)(
        b, zero, [jnp.ones((3, 2)), zero], "gradients"
    )
    assert float(value) == 1.0  # cos = 0 for a zero gradient
    np.testing.assert_array_equal(grad, 0.0)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_direction_loss_is_non_negative_and_zero_when_aligned(m, seed):
    rng = np.random.default_rng(seed)
    b = jnp.asarray(rng.normal(size=m) * 3, jnp.float32)
    f = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    cs = jnp.asarray(rng.normal(size=(m, 4, 3)), jnp.float32)
    for direction in ("gradients", "weights"):
        assert float(bj.cggm_direction_loss(b, f, cs, direction)) >= -1e-6
        aligned = jnp.stack([f * (i + 1) for i in range(m)])
        assert abs(float(bj.cggm_direction_loss(jnp.abs(b), f, aligned, direction))) < 1e-5


def test_direction_loss_errors():
    f = jnp.ones((3, 2))
    with pytest.raises(ValueError, match="entries"):
        bj.cggm_direction_loss(jnp.ones(2), f, [f])
    with pytest.raises(ValueError, match="shape"):
        bj.cggm_direction_loss(jnp.ones(2), f, [f, jnp.ones((2, 3))])
    with pytest.raises(ValueError, match="direction"):
        bj.cggm_direction_loss(jnp.ones(2), f, [f, f], direction="cosine")


# --- the worked example --------------------------------------------------------------


def test_worked_example_runs_both_schedules(tmp_path):
    out = tmp_path / "history.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.cggm_direction_example",
            "--steps",
            "6",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads(out.read_text())
    reference = history["reference_weights"]
    scores = np.array([row["scores"] for row in reference])
    # The reference run's B is the official formula applied to its own score sequence.
    np.testing.assert_allclose(
        [row["B"] for row in reference], official_coefficients(scores, 2), rtol=1e-5, atol=1e-5
    )
    same = history["same_step_gradients"]
    for row in same:
        np.testing.assert_allclose(row["B"], row["B_transform"], rtol=1e-6)
        assert np.isfinite(row["loss"]) and row["l_gm"] >= 0
