"""The experiments' representation-space methods (BOGC at the representation, BayesAgg-MTL):
their training step against joint_uni's, on a tiny synthetic two-modality dataset."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import config as config_lib
from experiments import methods as methods_lib
from experiments import representation_methods as rep_lib
from experiments import train as train_lib
from tests._toy_dataset import toy_dataset

REP_METHODS = [spec.name for spec in rep_lib.SPECS]


def _config(**overrides) -> config_lib.TrainConfig:
    base = dict(epochs=1, batch_size=8, feature_dim=6, hidden=8, encoder="mlp")
    return config_lib.TrainConfig(**{**base, **overrides})


def _one_step(method: str, cfg: config_lib.TrainConfig, seed: int):
    """``(params before, params after, losses)`` of one jitted training step."""
    d = toy_dataset(num_test=16, seed=seed)
    trainer = train_lib.Trainer(d, method, cfg)
    _, params = train_lib.make_model(d, cfg, seed)
    state = trainer.init_state(params, seed)
    xs = tuple(jnp.asarray(x) for x in d.x_train)
    idx = jnp.asarray(np.random.default_rng(seed).permutation(len(d.y_train))[: cfg.batch_size])
    new, _, losses = trainer.step(params, state, xs, jnp.asarray(d.y_train), idx, seed, 0)
    return params, new, losses


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_every_representation_method_is_registered_and_available():
    for name in REP_METHODS:
        assert name in methods_lib.METHODS
        assert methods_lib.available(name) == (True, "")
        assert not methods_lib.METHODS[name].stop_gradient_heads  # paired with joint_uni
    from experiments import report  # pylint: disable=g-import-not-at-top

    assert {report.natural_baseline(n) for n in REP_METHODS} == {"joint_uni"}


@pytest.mark.parametrize(
    "method,overrides,fusion",
    [
        ("rep_bogc", {"kappa": 0.0}, "concat"),
        ("rep_bogc", {"kappa": 0.0}, "sum"),
        ("rep_bogc_precision", {"rep_power": 0.0}, "concat"),
    ],
)
def test_without_calibration_the_step_is_joint_uni_step(method, overrides, fusion):
    """kappa = 0 (no evidence) or p = 0 (equal precisions): the fixed-weight sum."""
    seed = int(np.random.default_rng().integers(0, 1000))
    cfg = _config(fusion=fusion, **overrides)
    start, ours, loss_ours = _one_step(method, cfg, seed)
    start_ref, ref, loss_ref = _one_step("joint_uni", cfg, seed)
    _assert_trees_close(start, start_ref, rtol=0, atol=0)
    np.testing.assert_allclose(loss_ours, loss_ref, rtol=1e-5)
    _assert_trees_close(ours, ref)


def test_calibration_changes_the_encoders_only():
    """The default moves the encoders' step away from joint_uni's; the heads take their
    plain gradients, so one step from the same start leaves them equal. (SGD: Adam's first
    update is ``lr * sign(g)``, blind to a calibration that keeps the signs.)"""
    seed = int(np.random.default_rng().integers(0, 1000))
    cfg = _config(optimizer="sgd")
    _, ours, loss_ours = _one_step("rep_bogc", cfg, seed)
    _, ref, loss_ref = _one_step("joint_uni", cfg, seed)
    np.testing.assert_allclose(loss_ours, loss_ref, rtol=1e-5)
    _assert_trees_close({k: v for k, v in ours.items() if k != "encoders"},
                        {k: v for k, v in ref.items() if k != "encoders"})  # fmt: skip
    moved = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(ours["encoders"]), jax.tree.leaves(ref["encoders"]))
    ]
    assert max(moved) > 1e-6


# BOGC's default and BayesAgg-MTL as published (full posterior, 1024 draws: cheap on a
# 3-class head over 12 features). tests/test_experiments.py trains every registered method.
@pytest.mark.parametrize("method", ["rep_bogc", "bayesagg_mtl"])
def test_one_epoch_gives_a_record(method):
    d = toy_dataset(num_test=16)
    record = train_lib.run_experiment(d, [method], [0], _config())[0]
    assert record["method"] == method and 0 <= record["fused_acc"] <= 1
    assert np.all(np.isfinite(record["curves"]["loss"])) and len(record["probe_acc"]) == 2
    assert record["config"]["rep_power"] is None  # the method's own p, recorded


def test_gated_fusion_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="fusion='gated'"):
        train_lib.Trainer(toy_dataset(num_test=16), "rep_bogc", _config(fusion="gated"))


def test_config_checks_the_representation_options():
    with pytest.raises(ValueError, match="rep_power"):
        config_lib.TrainConfig(rep_power=-1.0)
    with pytest.raises(ValueError, match="rep_prior_variance"):
        config_lib.TrainConfig(rep_prior_variance=0.0)
    old = config_lib.record_config(config_lib.TrainConfig(), data_seed=0, validation=None)
    del old["rep_power"], old["rep_prior_variance"]  # a record made before the fields
    new = config_lib.record_config(config_lib.TrainConfig(), data_seed=0, validation=None)
    assert config_lib.same_config(old, new)
