"""Parity with BayesAgg-MTL's official code: the fixture command, and the code itself on
fresh random inputs where PyTorch is installed (float64, relative 1e-8)."""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bogc_jax as bj
from bogc_jax import head_posterior as hp
from bogc_jax import representation_moments as rm
from bogc_jax import representation_weights as rw

ROOT = pathlib.Path(__file__).parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "bayesagg"
FIXTURE = REFERENCE / "fixtures_seed0.npz"
OFFICIAL = REFERENCE / "BayesAggMTL.py"


def _run_command(path, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "tests.parity.bayesagg", str(path), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.fixture
def fixture_path():
    if not FIXTURE.exists():
        pytest.skip(f"no reference fixture at {FIXTURE}")
    return FIXTURE


def test_fixture_parity_command_passes(fixture_path):
    proc = _run_command(fixture_path, "--own-draws", "2048")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "23/23 within tolerance" in proc.stdout


def test_fixture_parity_command_fails_above_tolerance(fixture_path, tmp_path):
    data = dict(np.load(fixture_path))
    data["agg_dL_dh"] = data["agg_dL_dh"] * (1 + 1e-6)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **data)
    proc = _run_command(bad, "--own-draws", "0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "agg_dL_dh" in proc.stdout and "FAIL" in proc.stdout


@pytest.fixture
def official(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("tqdm")
    if not OFFICIAL.exists():
        pytest.skip(f"no official file at {OFFICIAL}")
    copy = tmp_path / "bayesagg_official.py"
    shutil.copy(OFFICIAL, copy)
    spec = importlib.util.spec_from_file_location("bayesagg_official", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.set_default_dtype(torch.float64)
    yield torch, module
    torch.set_default_dtype(torch.float32)


def _rel(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def test_official_classifiers_on_fresh_inputs(official):
    """Posteriors, moments (with the official draws) and aggregation of both classifiers."""
    torch, ba = official
    rng = np.random.default_rng(7)
    d, batch, n_full, classes, outputs, p = 4, 10, 30, 3, 2, 0.2
    h, h_full = rng.normal(size=(batch, d)), rng.normal(size=(n_full, d))
    draws = []
    original = torch.distributions.MultivariateNormal.rsample

    def capture(self, sample_shape=torch.Size()):  # noqa: B008
        x = original(self, sample_shape)
        draws.append(x.detach().numpy().copy())
        return x

    torch.distributions.MultivariateNormal.rsample = capture
    try:
        cases = {}
        for loss, setting, y, y_full, k in (
            ("softmax", "multiclass", rng.integers(0, classes, batch), rng.integers(0, classes, n_full), classes),
            ("sigmoid", "binary_tasks", rng.integers(0, 2, (batch, outputs)).astype(float),
             rng.integers(0, 2, (n_full, outputs)).astype(float), outputs),
        ):  # fmt: skip
            theta = 0.5 * rng.normal(size=(k, d + 1))
            post_module = ba.LastLayerPosteriorTaylorApprox(gamma=0.3, setting=setting)
            as_t = (lambda a: torch.tensor(a)) if loss == "sigmoid" else (lambda a: torch.tensor(a))
            post = post_module.compute_posterior(
                torch.tensor(theta), torch.tensor(h), as_t(y), full_train_features=torch.tensor(h_full),
                full_train_labels=as_t(y_full),
            )  # fmt: skip
            moments = (
                ba.ApproxMomentsMultiClass(num_classes=k, sqrt_power=p, num_mc_samples=300)
                if loss == "softmax"
                else ba.ApproxMomentsBinaryTasks(num_outputs=k, sqrt_power=p, num_mc_samples=300)
            )
            draws.clear()
            e_g, v_g, _ = moments.compute_moments(torch.tensor(h), as_t(y), post)
            cases[loss] = (
                theta,
                y,
                y_full,
                post_module.full_data_posterior,
                post,
                draws[0],
                e_g,
                v_g,
            )
    finally:
        torch.distributions.MultivariateNormal.rsample = original

    with jax.enable_x64(True):
        mine = {}
        for loss, (theta, y, y_full, full_ref, post_ref, drawn, e_g, v_g) in cases.items():
            full = hp.full_data_posterior(
                loss,
                jnp.asarray(theta),
                jnp.asarray(h_full),
                jnp.asarray(y_full),
                prior_variance=0.3,
                form="full",
            )
            post = hp.head_posterior(
                loss, jnp.asarray(theta), jnp.asarray(h), jnp.asarray(y), full, form="full"
            )
            for ours, ref in ((full, full_ref), (post, post_ref)):
                assert _rel(ours.mean.reshape(-1), ref.mean.numpy()) < 1e-8
                assert _rel(hp.covariance(loss, "full", ours), ref.covariance_matrix.numpy()) < 1e-8
            m = rm.monte_carlo_moments(
                loss,
                jnp.asarray(h),
                jnp.asarray(y),
                draws=jnp.asarray(drawn).reshape((-1,) + theta.shape),
                chunk_size=64,
            )
            v = jnp.power(jnp.maximum(m.var, rw.VARIANCE_CLAMP), p)
            assert _rel(m.mean, e_g.numpy()) < 1e-8 and _rel(v, v_g.numpy()) < 1e-8
            mine[loss] = (m.mean, v)
        mean = jnp.moveaxis(jnp.concatenate([mine["softmax"][0], mine["sigmoid"][0]], 1), 1, 0)
        var = jnp.moveaxis(jnp.concatenate([mine["softmax"][1], mine["sigmoid"][1]], 1), 1, 0)
        agg, _, _ = rw.calibrate(mean, var, scale="mean", aggregation="precision")
        agg = np.asarray(agg / batch)
    ref_mean = torch.cat([cases["softmax"][6], cases["sigmoid"][6]], 1)
    ref_var = torch.cat([cases["softmax"][7], cases["sigmoid"][7]], 1)
    ref = ba.GaussianAgg(num_tasks=1 + outputs).aggregate(ref_mean, ref_var).numpy()
    assert _rel(agg, ref) < 1e-8


def test_official_regression_end_to_end_through_the_api(official):
    """bayesagg_mtl's encoder gradient = the official backward's representation.grad."""
    torch, ba = official
    rng = np.random.default_rng(3)
    d, batch, n_full, outputs, gamma, p = 5, 12, 40, 3, 0.4, 0.3
    h, h_full = rng.normal(size=(batch, d)), rng.normal(size=(n_full, d))
    y, y_full = rng.normal(size=(batch, outputs)), rng.normal(size=(n_full, outputs))
    w = 0.3 * rng.normal(size=(outputs, d))

    method_ref = ba.BayesAggMTL(
        num_tasks=outputs, n_outputs_per_task_group=[outputs], task_types=["regression"],
        reg_hps={"gamma": gamma, "sqrt_power": p},
    )  # fmt: skip
    rep = torch.tensor(h, requires_grad=True)
    weight = torch.tensor(w, requires_grad=True)
    bias = torch.zeros(outputs, requires_grad=True)
    losses = ((rep @ weight.T + bias - torch.tensor(y)) ** 2).mean(0)
    method_ref.backward(
        losses=losses, last_layer_params=[weight, bias], representation=rep, labels=[torch.tensor(y)],
        full_train_features=torch.tensor(h_full), full_train_labels=[torch.tensor(y_full)],
    )  # fmt: skip

    with jax.enable_x64(True):
        params = {"h": jnp.asarray(h), "head": (jnp.asarray(w.T), jnp.zeros(outputs))}
        method = bj.bayesagg_mtl(
            lambda prm, b: prm["h"], lambda prm: [prm["head"]], [bj.LinearHead((0,), "mse")],
            prior_variance=gamma, power={"mse": p},
        )  # fmt: skip
        state = method.refresh(
            params, method.init(params), jnp.asarray(h_full), jnp.asarray(y_full)
        )
        grads, _, _ = method.grads(params, state, None, targets=jnp.asarray(y))
        assert _rel(grads["h"], rep.grad.numpy()) < 1e-8
        # The head gets its plain gradient.
        assert _rel(grads["head"][0], weight.grad.numpy().T) < 1e-8
