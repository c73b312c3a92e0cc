"""Coloured-and-gray MNIST (``cgmnist``): two views of one digit, one with a colour shortcut.

The balancing literature's controlled benchmark for a shortcut-driven modality imbalance
(the CG-MNIST of PMR, CVPR 2023, and MMPareto, ICML 2024): every example is an MNIST digit
seen twice, once in gray and once coloured by the colored-MNIST protocol of Kim et al.,
"Learning Not to Learn", CVPR 2019. In training the colour predicts the class; at test it
is random. A model that leans on the colour (the fast, spurious cue) fails at test; the
shape, which both views carry, is what transfers.

Recipe (:func:`load_cgmnist`), from MNIST's 10,000 test images (the training images are not
needed):

1. **Split**, fixed (independent of ``seed``): stratified by class, 8,000 train / 2,000
   test. Each class's indices are shuffled with ``default_rng(SPLIT_SEED)``; class ``c``
   sends ``n_c * 2000 / 10000`` of its images to test, rounded by largest remainder so
   the test split has exactly 2,000.
2. **Gray view** ``[28, 28]``: the image scaled to ``[0, 1]``, then standardised with the
   train split's mean and standard deviation.
3. **Colour view** ``[3, 28, 28]`` (channels first): ``x_rgb = x_gray01 * c``, the digit's
   foreground multiplied by one RGB colour ``c`` per image, background black, with
   ``c = clip(mu_k + e, 0, 1)``, ``e ~ N(0, variance * I_3)`` (variance 0.03 per channel:
   standard deviation 0.173 on the ``[0, 1]`` colour scale), ``mu_k`` one of the ten
   :data:`CLASS_COLORS`. Train: ``k`` is the example's class for exactly
   ``round(correlation * 8000)`` examples chosen at random, and for the others a class
   drawn uniformly from the nine other classes. Test: ``k`` uniform over the ten classes,
   independent of the label. Then each channel is standardised with the train split's
   statistics.
4. ``seed`` (the CLI's ``--data-seed``) draws every colour choice and jitter, with
   ``default_rng(seed)``: the train colours, then the test colours, then the train
   examples recoloured by the test protocol (``Dataset.x_train_as_test``, the inputs a
   validation split holds out, so validation measures what the test split measures).

The ten class colours (RGB / 255, class 0 to 9) are the first ten of Sasha Trubetskoy's
"distinct colours" palette: green (60, 180, 75), yellow (255, 225, 25), blue (0, 130,
200), orange (245, 130, 48), cyan (70, 240, 240), magenta (240, 50, 230), red (230, 25,
75), navy (0, 0, 128), lavender (220, 190, 255), beige (255, 250, 200).

``correlation`` is the dial of the imbalance: ``cgmnist`` is 1.0 (every training example
coloured by its class, as in the published protocol), ``cgmnist90`` 0.9, ``cgmnist70``
0.7, and any ``cgmnistNN`` gives ``NN / 100``.
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments import data as data_lib

SPLIT_SEED = 20240601
NUM_CLASSES = 10
CLASS_COLORS = (
    np.asarray(
        [
            (60, 180, 75),  # 0 green
            (255, 225, 25),  # 1 yellow
            (0, 130, 200),  # 2 blue
            (245, 130, 48),  # 3 orange
            (70, 240, 240),  # 4 cyan
            (240, 50, 230),  # 5 magenta
            (230, 25, 75),  # 6 red
            (0, 0, 128),  # 7 navy
            (220, 190, 255),  # 8 lavender
            (255, 250, 200),  # 9 beige
        ],
        np.float64,
    )
    / 255.0
)


def stratified_split(
    labels: np.ndarray, num_test: int, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` sorted index arrays: each class gives ``n_c * num_test / N`` of its
    examples to test (largest-remainder rounding, so exactly ``num_test`` in all), chosen
    by shuffling the class's indices with ``default_rng(seed)``."""
    labels = np.asarray(labels)
    if not 0 < num_test < len(labels):
        raise ValueError(
            f"stratified_split: num_test must be in (0, {len(labels)}); got {num_test}."
        )
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * num_test / len(labels)
    take = np.floor(quota).astype(int)
    remainder = num_test - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:remainder]] += 1
    rng = np.random.default_rng(seed)
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    )
    test = np.sort(test)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def colour_indices_train(
    labels: np.ndarray, correlation: float, rng: np.random.Generator
) -> np.ndarray:
    """Class colour for exactly ``round(correlation * N)`` random examples, a uniformly drawn
    other class's colour for the rest."""
    n = len(labels)
    own = np.zeros(n, bool)
    own[rng.permutation(n)[: int(round(correlation * n))]] = True
    other = (labels + rng.integers(1, NUM_CLASSES, n)) % NUM_CLASSES
    return np.where(own, labels, other)


def colourize(
    gray01: np.ndarray, colour_index: np.ndarray, variance: float, rng: np.random.Generator
) -> np.ndarray:
    """``[N, 3, H, W]``: each ``[H, W]`` image in ``[0, 1]`` times its colour
    ``clip(CLASS_COLORS[k] + N(0, variance I), 0, 1)``."""
    jitter = rng.normal(0.0, np.sqrt(variance), (len(colour_index), 3))
    colours = np.clip(CLASS_COLORS[colour_index] + jitter, 0.0, 1.0).astype(np.float32)
    return gray01[:, None, :, :] * colours[:, :, None, None]


def load_cgmnist(
    data_dir: pathlib.Path,
    seed: int = 0,
    use_cache: bool = True,
    correlation: float = 1.0,
    variance: float = 0.03,
    num_test: int = 2000,
    name: str = "cgmnist",
) -> data_lib.Dataset:
    """Coloured-and-gray MNIST by the recipe of this module's docstring.

    Args:
      data_dir: holds ``mnist/t10k-images-idx3-ubyte.gz`` and the labels file.
      seed: draws the colours and their jitter (the split is fixed).
      use_cache: unused (building the views takes about a second).
      correlation: the fraction of training examples coloured by their own class.
      variance: the per-channel variance of the colour jitter.
      num_test: test images (stratified); the rest of the 10,000 train.
      name: the dataset's name in the records.

    Returns:
      A :class:`experiments.data.Dataset` with modalities ``("gray", "color")``, kinds
      ``("image", "image")``, shapes ``(28, 28)`` and ``(3, 28, 28)``, and
      ``x_train_as_test`` (the train digits with test-protocol colours).
    """
    del use_cache
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"load_cgmnist: correlation must be in [0, 1]; got {correlation}.")
    if not variance >= 0.0:
        raise ValueError(f"load_cgmnist: variance must be >= 0; got {variance}.")
    images, labels = data_lib.load_mnist_test(data_dir)
    train, test = stratified_split(labels, num_test)
    gray01 = images.astype(np.float32) / 255.0
    y_train, y_test = labels[train], labels[test]
    rng = np.random.default_rng(seed)
    colour_train = colourize(
        gray01[train], colour_indices_train(y_train, correlation, rng), variance, rng
    )
    colour_test = colourize(gray01[test], rng.integers(0, NUM_CLASSES, len(test)), variance, rng)
    colour_as_test = colourize(
        gray01[train], rng.integers(0, NUM_CLASSES, len(train)), variance, rng
    )
    gray_train, gray_test = data_lib.standardize(gray01[train], gray01[test], (0, 1, 2))
    mean = colour_train.mean(axis=(0, 2, 3), keepdims=True)
    std = np.maximum(colour_train.std(axis=(0, 2, 3), keepdims=True), 1e-6)

    def norm(x):
        return ((x - mean) / std).astype(np.float32)

    return data_lib.Dataset(
        name=name,
        modalities=("gray", "color"),
        kinds=("image", "image"),
        x_train=(gray_train, norm(colour_train)),
        y_train=y_train.astype(np.int32),
        x_test=(gray_test, norm(colour_test)),
        y_test=y_test.astype(np.int32),
        num_classes=NUM_CLASSES,
        class_names=tuple(str(d) for d in range(NUM_CLASSES)),
        x_train_as_test=(gray_train, norm(colour_as_test)),
        info={
            "split": f"MNIST test set, stratified {len(train)}/{len(test)} "
            f"(fixed, seed {SPLIT_SEED})",
            "color_seed": seed,
            "color_correlation": float(correlation),
            "color_variance": float(variance),
            "protocol": "Kim et al. CVPR 2019 colored MNIST on one view; test colours "
            "uniform, independent of the label",
        },
    )
