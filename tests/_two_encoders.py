"""Shared test fixture: parameters with one encoder per modality and a shared head."""

import jax.numpy as jnp
import numpy as np

import bogc_jax as bj


def encoders_and_head(num_modalities, shapes=((5, 3), (4,)), seed=0):
    """Params with ``num_modalities`` encoders (leaves of ``shapes``) and a shared head."""
    rng = np.random.default_rng(seed)
    params = {
        "enc": [
            {f"p{k}": jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in enumerate(shapes)}
            for _ in range(num_modalities)
        ],
        "head": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
    }
    labels = bj.label_params(params, {"enc": bj.labels.INDEX, "head": None})
    return params, labels
