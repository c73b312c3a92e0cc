"""Shared test data: a tiny synthetic two-modality dataset for the experiment suite."""

import numpy as np

from experiments import data as data_lib


def toy_dataset(num_train=24, num_test=24, seed=0) -> data_lib.Dataset:
    """A series and a vector modality whose class means differ; 3 classes."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 3, n).astype(np.int32)
        series = rng.normal(size=(n, 12, 2)).astype(np.float32) + y[:, None, None]
        vector = rng.normal(size=(n, 5)).astype(np.float32) + 0.3 * y[:, None]
        return (series, vector), y

    x_tr, y_tr = make(num_train)
    x_te, y_te = make(num_test)
    return data_lib.Dataset(
        "toy", ("a", "b"), ("series", "vector"), x_tr, y_tr, x_te, y_te, num_classes=3
    )
