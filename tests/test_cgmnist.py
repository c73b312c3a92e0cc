"""Tests of the coloured-and-gray MNIST dataset (``experiments.cgmnist``).

The recipe's pieces are tested on drawn inputs; the loader on the real MNIST test set
under the data directory (``$BOGC_JAX_DATA`` or ``../shared/data``), skipped, saying why,
when it is absent.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import cgmnist
from experiments import data as data_lib

DATA_DIR = data_lib.resolve_data_dir()


def _need_mnist():
    path = DATA_DIR / "mnist" / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        pytest.skip(
            f"{path} is absent: the cgmnist loader test needs the MNIST test set under the "
            f"data directory ({DATA_DIR}; set {data_lib.DATA_ENV} or pass --data-dir)."
        )


@settings(max_examples=15, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=2, max_size=6),
    share=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
)
def test_stratified_split_is_exact_proportional_and_fixed(counts, share, seed):
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    num_test = min(len(labels) - 1, max(1, int(share * len(labels))))
    train, test = cgmnist.stratified_split(labels, num_test, seed=seed)
    assert len(test) == num_test and len(train) + len(test) == len(labels)
    assert not set(train) & set(test)
    for c, n in enumerate(counts):
        # Each class's share of the test split is its quota, rounded one way or the other.
        assert abs(np.sum(labels[test] == c) - n * num_test / len(labels)) < 1
    again = cgmnist.stratified_split(labels, num_test, seed=seed)
    assert np.array_equal(again[1], test)


@settings(max_examples=15, deadline=None)
@given(correlation=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_training_colours_match_the_class_for_exactly_the_chosen_share(correlation, seed):
    labels = np.random.default_rng(seed).integers(0, 10, 500)
    index = cgmnist.colour_indices_train(labels, correlation, np.random.default_rng(seed))
    assert np.sum(index == labels) == round(correlation * 500)
    assert index.min() >= 0 and index.max() < 10


def test_other_class_colours_are_uniform_over_the_nine_other_classes():
    labels = np.full(45_000, 3)
    index = cgmnist.colour_indices_train(labels, 0.0, np.random.default_rng(0))
    counts = np.bincount(index, minlength=10)
    assert counts[3] == 0
    np.testing.assert_allclose(np.delete(counts, 3) / 45_000, 1 / 9, atol=0.01)


def test_colourize_multiplies_the_foreground_by_a_jittered_class_colour():
    rng = np.random.default_rng(1)
    gray = rng.uniform(0, 1, (4000, 5, 5)).astype(np.float32)
    gray[:, 0, 0] = 0.0  # background stays black
    gray[:, 1, 1] = 1.0
    index = np.repeat(np.arange(10), 400)
    out = cgmnist.colourize(gray, index, 0.03, np.random.default_rng(2))
    assert out.shape == (4000, 3, 5, 5) and out.dtype == np.float32
    assert np.all(out[:, :, 0, 0] == 0)
    colours = out[:, :, 1, 1]  # a full-intensity pixel shows the colour itself
    np.testing.assert_allclose(out, gray[:, None] * colours[:, :, None, None], rtol=1e-6)
    assert colours.min() >= 0 and colours.max() <= 1
    # Unclipped channels scatter around the class mean with variance 0.03.
    means = cgmnist.CLASS_COLORS[index]
    inside = (means > 0.35) & (means < 0.65)
    residual = (colours - means)[inside]
    assert inside.sum() > 500
    assert abs(residual.mean()) < 0.02 and abs(residual.var() - 0.03) < 0.005
    # Without jitter the colour is the class mean.
    exact = cgmnist.colourize(gray, index, 0.0, rng)[:, :, 1, 1]
    np.testing.assert_allclose(exact, means, rtol=1e-6)


def _colour_slopes(ds_gray, ds_colour):
    """Per example and channel, the slope of the colour view on the gray view (both
    standardised affinely from ``x_gray01`` and ``x_gray01 * c``): ``c`` up to a fixed
    per-channel scale."""
    g = ds_gray.reshape(len(ds_gray), -1)
    g = g - g.mean(1, keepdims=True)
    c = ds_colour.reshape(len(ds_colour), 3, -1)
    c = c - c.mean(2, keepdims=True)
    return np.einsum("np,ncp->nc", g, c) / np.einsum("np,np->n", g, g)[:, None]


def test_cgmnist_loader_on_the_real_mnist_test_set():
    _need_mnist()
    d = data_lib.load_dataset("cgmnist", seed=0)
    assert d.modalities == ("gray", "color") and d.kinds == ("image", "image")
    assert d.input_shapes == ((28, 28), (3, 28, 28))
    assert len(d.y_train) == 8000 and len(d.y_test) == 2000
    _, labels = data_lib.load_mnist_test(DATA_DIR)
    np.testing.assert_allclose(
        np.bincount(d.y_test, minlength=10), np.bincount(labels, minlength=10) / 5, atol=1
    )
    assert abs(float(d.x_train[1].mean())) < 1e-3 and abs(float(d.x_train[0].std()) - 1) < 1e-3
    assert d.info["color_correlation"] == 1.0 and d.info["color_variance"] == 0.03

    # The colour predicts the class in training, not at test: nearest class centroid (of
    # the training split) of the recovered colours.
    def colour_accuracy(train, gray, colour, y):
        slopes = _colour_slopes(train.x_train[0], train.x_train[1])
        centroids = np.stack([slopes[train.y_train == c].mean(0) for c in range(10)])
        guess = np.argmin(((_colour_slopes(gray, colour)[:, None] - centroids) ** 2).sum(-1), 1)
        return float(np.mean(guess == y))

    # (The jitter, variance 0.03, makes near colours overlap: yellow/beige, lavender/beige.)
    on_train = colour_accuracy(d, *d.x_train, d.y_train)
    on_test = colour_accuracy(d, *d.x_test, d.y_test)
    as_test = colour_accuracy(d, *d.x_train_as_test, d.y_train)
    assert on_train > 0.8 and on_test < 0.2 and as_test < 0.2, (on_train, on_test, as_test)
    # The validation split holds out train digits with test-protocol colours.
    v = d.validation_split(0.1, seed=0)
    validation = colour_accuracy(d, *v.x_test, v.y_test)
    assert 795 <= len(v.y_test) <= 805 and validation < 0.2, validation
    # Deterministic from the seed; the split and the gray view do not depend on it.
    again = data_lib.load_dataset("cgmnist", seed=0)
    np.testing.assert_array_equal(again.x_train[1], d.x_train[1])
    other = data_lib.load_dataset("cgmnist", seed=1)
    np.testing.assert_array_equal(other.x_train[0], d.x_train[0])
    np.testing.assert_array_equal(other.y_test, d.y_test)
    assert not np.array_equal(other.x_train[1], d.x_train[1])
    # The dial: 70% of training digits in their class colour.
    dial = data_lib.load_dataset("cgmnist70", seed=0)
    assert dial.name == "cgmnist70" and dial.info["color_correlation"] == 0.7
    accuracy = colour_accuracy(dial, *dial.x_train, dial.y_train)
    assert 0.5 < accuracy < 0.75, accuracy
    assert data_lib.load_dataset("cgmnist35").info["color_correlation"] == 0.35
