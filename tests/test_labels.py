"""bj.label_params and the param_labels validation shared by cggm and the baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bogc_jax as bj
from bogc_jax import labels as L


class TwoEncoders(nnx.Module):
    def __init__(self, rngs):
        self.encoders = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(2, 4, rngs=rngs)])
        self.fusion = nnx.Linear(8, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, xs):
        h = jnp.concatenate([enc(x) for enc, x in zip(self.encoders, xs)], -1)
        return self.head(nnx.relu(self.fusion(h)))


def test_label_params_by_index_explicit_and_longest_prefix():
    params = {
        "encoders": [{"w": jnp.ones(2), "b": jnp.ones(1)}, {"w": jnp.ones(3)}],
        "fusion": {"w": jnp.ones(2), "gate": jnp.ones(1)},
    }
    labels = bj.label_params(params, {"encoders": L.INDEX, "fusion": None, "fusion/gate": 1})
    assert labels == {"encoders": [{"w": 0, "b": 0}, {"w": 1}], "fusion": {"w": None, "gate": 1}}
    # Same labels from dotted and tuple prefixes.
    assert (
        bj.label_params(
            params, {"encoders.0": 0, ("encoders", "1"): 1, "fusion": None, "fusion.gate": 1}
        )
        == labels
    )
    assert bj.label_params(params, {"encoders": L.INDEX}, default=None)["fusion"] == {
        "w": None,
        "gate": None,
    }


def test_label_params_errors_name_the_leaves():
    params = {"encoders": [{"w": jnp.ones(2)}], "head": {"w": jnp.ones(1), "b": jnp.ones(1)}}
    with pytest.raises(ValueError, match=r"2 parameter\(s\) match no rule: head/b, head/w"):
        bj.label_params(params, {"encoders": L.INDEX})
    with pytest.raises(ValueError, match=r"\['haed'\] match no parameter"):
        bj.label_params(params, {"encoders": L.INDEX, "head": None, "haed": None})
    with pytest.raises(ValueError, match="integer"):
        bj.label_params(params, {"head": L.INDEX, "encoders": 0})
    with pytest.raises(TypeError, match="modality index"):
        bj.label_params(params, {"head": "audio", "encoders": 0})
    with pytest.raises(ValueError, match="start at 0"):
        bj.label_params(params, {"head": -1, "encoders": 0})


def test_label_params_of_an_nnx_module_drive_nnx_optimizer():
    model = TwoEncoders(nnx.Rngs(0))
    labels = bj.label_params(model, {"encoders": L.INDEX, "fusion": None, "head": None})
    flat = dict(
        (jax.tree_util.keystr(p), label)
        for p, label in jax.tree_util.tree_flatten_with_path(labels, is_leaf=lambda x: x is None)[0]
    )
    assert flat["['encoders'][1]['kernel']"] == 1 and flat["['head']['bias']"] is None
    with pytest.raises(ValueError, match="fusion/bias, fusion/kernel"):
        bj.label_params(model, {"encoders": L.INDEX, "head": None})

    # nnx.Optimizer initialises with Variable-boxed state and updates with bare arrays.
    opt = nnx.Optimizer(model, bj.cggm(labels, rho=1.0, mode="reference"), wrt=nnx.Param)
    xs = [jnp.ones((5, 3)), jnp.ones((5, 2))]
    grads = nnx.grad(lambda m: jnp.sum(m(xs) ** 2))(model)
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    updates = opt.update(model, grads, modality_scores=jnp.array([0.75, 0.25]))
    g = nnx.as_pure(grads)
    np.testing.assert_allclose(
        updates["encoders"][0]["kernel"], 0.25 * g["encoders"][0]["kernel"], rtol=1e-6
    )
    np.testing.assert_allclose(updates["head"]["kernel"], g["head"]["kernel"])
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(
        after["head"]["kernel"], before["head"]["kernel"] + g["head"]["kernel"], rtol=1e-6
    )


def test_leaf_labels_accept_prefixes_callables_and_other_containers():
    params = {
        "a": {"w": jnp.ones(2), "b": jnp.ones(1)},
        "v": [jnp.ones(1), jnp.ones(3)],
        "head": jnp.ones(4),
    }
    expected = [0, 0, None, 1, 1]  # leaves in order: a/b, a/w, head, v/0, v/1
    prefix = {"a": 0, "v": 1, "head": None}
    assert L.leaf_labels(prefix, params) == expected
    assert L.leaf_labels(lambda tree: prefix, params) == expected
    state = nnx.State(
        {
            "a": {"w": nnx.Param(jnp.ones(2)), "b": nnx.Param(jnp.ones(1))},
            "v": {0: nnx.Param(jnp.ones(1)), 1: nnx.Param(jnp.ones(3))},
            "head": nnx.Param(jnp.ones(4)),
        }
    )
    # A plain dict of labels for an nnx.State with Variable boxes: matched by key path.
    assert L.leaf_labels({"a": 0, "v": {0: 1, 1: 1}, "head": None}, state) == expected
    assert L.num_modalities(expected) == 2


def test_leaf_labels_errors_name_the_offending_leaf():
    params = {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(1)}
    with pytest.raises(TypeError, match=r"param_labels\['b'\] is 1.5"):
        L.leaf_labels({"a": 0, "b": 1.5, "c": None}, params)
    with pytest.raises(TypeError, match=r"param_labels\['b'\] is True"):
        L.leaf_labels({"a": 0, "b": True, "c": None}, params)
    with pytest.raises(ValueError, match=r"1 parameter\(s\) have no label: c"):
        L.leaf_labels({"a": 0, "b": 1}, params)
    with pytest.raises(ValueError, match="at least 2"):
        L.num_modalities([None, 0, 0])


@pytest.mark.parametrize(
    "make",
    [
        lambda labels: bj.cggm(labels),
        lambda labels: bj.ogm_ge(labels),
        lambda labels: bj.mmpareto(labels),
    ],
)
def test_every_transform_validates_labels_at_init(make):
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    with pytest.raises(TypeError, match=r"param_labels\['a'\]"):
        make({"a": "audio", "b": 1}).init(params)
    with pytest.raises(ValueError, match="at least 2"):
        make({"a": 0, "b": None}).init(params)
    with pytest.raises(ValueError, match="no label"):
        make({"a": 0}).init(params)
    tx = optax.chain(make({"a": 0, "b": 1}), optax.sgd(0.1))
    assert tx.init(params) is not None
