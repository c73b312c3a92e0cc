"""Misuse of every public entry point raises a clear error at trace time.

One case per misuse: the error type and a pattern that names the offending argument (and,
where it helps, the expected and the actual value). Every case runs eagerly; a few also
run under ``jax.jit`` to show the error comes at trace time, not from XLA.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bogc_jax as bj
from bogc_jax import evidence as ev

S = 3  # sources: fusion + two unimodal losses
PARAMS = {"enc0": jnp.ones((2, 3)), "enc1": jnp.ones((4,)), "head": jnp.ones((3,))}
LABELS = {"enc0": 0, "enc1": 1, "head": None}
GRADS = jax.tree.map(lambda p: 0.5 * p, PARAMS)
SCORES = jnp.array([0.5, 0.25])


def stats_for(params=PARAMS, num_sources=S, count=8.0):
    rng = np.random.default_rng(0)
    mean = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=(num_sources,) + p.shape), jnp.float32), params
    )
    var = jax.tree.map(lambda m: jnp.abs(m) + 0.1, mean)
    return bj.GradStats(jnp.float32(count), mean, var)


STATS = stats_for()


def replace_leaf(tree, key, value):
    return {**tree, key: value}


def bogc_update(grads=GRADS, grad_stats=STATS, params=PARAMS, **kwargs):
    tx = bj.bogc(S, **kwargs)
    return tx.update(grads, tx.init(params), params, grad_stats=grad_stats)


def modality_update(factory, grads=GRADS, labels=LABELS, params=PARAMS, **extra):
    tx = factory(labels)
    return tx.update(grads, tx.init(params), params, **extra)


def losses_fn(p, x):
    h = jnp.tanh(x @ p["enc0"])
    return jnp.stack([h @ p["head"], h[:, 0] ** 2, jnp.sum(x, 1) * p["enc1"][0]])


BATCH = jnp.ones((4, 2))


def head_laplace(batch=BATCH, **kwargs):
    """laplace_grad_stats on the head only."""
    mask = {"enc0": False, "enc1": False, "head": True}
    return bj.laplace_grad_stats(losses_fn, PARAMS, batch, jax.random.key(0), mask=mask, **kwargs)


class Case(NamedTuple):
    name: str
    call: Callable[[], Any]
    error: type
    match: str


CASES = [
    # --- grad_stats: missing, wrong container, structure, shape, number of sources
    Case(
        "bogc_grad_stats_missing",
        lambda: bogc_update(grad_stats=None),
        ValueError,
        r"bogc: missing the keyword extra argument grad_stats",
    ),
    Case(
        "bogc_grad_stats_not_gradstats",
        lambda: bogc_update(grad_stats=(STATS.count, STATS.mean, STATS.var)),
        TypeError,
        r"grad_stats must be a bogc_jax.GradStats; got tuple",
    ),
    Case(
        "bogc_grad_stats_structure",
        lambda: bogc_update(grad_stats=STATS._replace(mean={"enc0": STATS.mean["enc0"]})),
        ValueError,
        r"grad_stats.mean/var must have the same pytree structure",
    ),
    Case(
        "bogc_grad_stats_leaf_shape",
        lambda: bogc_update(
            grad_stats=STATS._replace(var=replace_leaf(STATS.var, "enc1", jnp.ones((S, 5))))
        ),
        ValueError,
        r"grad_stats.var\['enc1'\] has shape \(3, 5\); expected \(3, 4\)",
    ),
    Case(
        "bogc_num_sources_mismatch",
        lambda: bogc_update(grad_stats=stats_for(num_sources=2)),
        ValueError,
        r"grad_stats.mean\['enc0'\] has shape \(2, 2, 3\); expected \(3, 2, 3\) "
        r"\(num_sources=3",
    ),
    Case(
        "bogc_count_not_scalar",
        lambda: bogc_update(grad_stats=STATS._replace(count=jnp.ones(2))),
        ValueError,
        r"grad_stats.count must be a numeric scalar",
    ),
    Case(
        "bogc_grad_stats_integer",
        lambda: bogc_update(
            grad_stats=STATS._replace(mean=jax.tree.map(lambda m: m.astype(jnp.int32), STATS.mean))
        ),
        TypeError,
        r"grad_stats.mean\['enc0'\] has dtype int32; expected a floating",
    ),
    Case(
        "bogc_stats_none_on_calibrated_leaf",
        lambda: bogc_update(
            grad_stats=STATS._replace(var=replace_leaf(STATS.var, "head", None)),
            mask=lambda g: jax.tree.map(lambda _: True, g),
        ),
        ValueError,
        r"grad_stats.var\['head'\] is None but the leaf is calibrated",
    ),
    Case(
        "bogc_integer_grads",
        lambda: bogc_update(grads=replace_leaf(GRADS, "head", jnp.ones(3, jnp.int32))),
        TypeError,
        r"bogc: grads\['head'\] has dtype int32; expected a floating dtype",
    ),
    Case(
        "mmpareto_grad_stats_missing",
        lambda: modality_update(bj.mmpareto),
        ValueError,
        r"mmpareto: missing the keyword extra argument grad_stats",
    ),
    Case(
        "mmpareto_num_sources_mismatch",
        lambda: modality_update(bj.mmpareto, grad_stats=stats_for(num_sources=4)),
        ValueError,
        r"mmpareto: grad_stats has 4 sources but param_labels use 2 "
        r"modalities",
    ),
    Case(
        "mmpareto_leaf_shape",
        lambda: modality_update(
            bj.mmpareto,
            grad_stats=STATS._replace(mean=replace_leaf(STATS.mean, "enc1", jnp.ones((S, 1)))),
        ),
        ValueError,
        r"grad_stats.mean\['enc1'\] has shape \(3, 1\); expected \(3, 4\)",
    ),
    Case(
        "mmpareto_sources_disagree",
        lambda: modality_update(
            bj.mmpareto,
            grad_stats=STATS._replace(mean=replace_leaf(STATS.mean, "enc1", jnp.ones((2, 4)))),
        ),
        ValueError,
        r"grad_stats.mean\['enc1'\] has shape \(2, 4\); expected \(3, 4\) "
        r"\(3 sources, as in the other leaves",
    ),
    Case(
        "mmpareto_stats_none_on_encoder",
        lambda: modality_update(
            bj.mmpareto, grad_stats=STATS._replace(mean=replace_leaf(STATS.mean, "enc0", None))
        ),
        ValueError,
        r"grad_stats.mean\['enc0'\] is None but that parameter is labelled",
    ),
    Case(
        "mmpareto_wrong_type",
        lambda: modality_update(bj.mmpareto, grad_stats={"mean": STATS.mean}),
        TypeError,
        r"mmpareto: grad_stats must be a bogc_jax.GradStats; got dict",
    ),
    # --- modality_scores: missing, shape, number of modalities, dtype
    Case(
        "cggm_scores_missing",
        lambda: modality_update(bj.cggm),
        ValueError,
        r"cggm: this transform needs the extra argument modality_scores=",
    ),
    Case(
        "cggm_scores_shape",
        lambda: modality_update(bj.cggm, modality_scores=jnp.ones((2, 1))),
        ValueError,
        r"modality_scores must have shape \[2\].*got shape \(2, 1\)",
    ),
    Case(
        "cggm_scores_more_modalities",
        lambda: modality_update(bj.cggm, modality_scores=jnp.ones(3)),
        ValueError,
        r"modality_scores must have shape \[2\] .*modalities 0..1\); got shape \(3,\)",
    ),
    Case(
        "cggm_scores_integer",
        lambda: modality_update(bj.cggm, modality_scores=jnp.array([3, 2])),
        TypeError,
        r"cggm: modality_scores must hold floating scores .*got dtype int32",
    ),
    Case(
        "ogm_ge_scores_missing",
        lambda: modality_update(bj.ogm_ge),
        ValueError,
        r"ogm_ge: this transform needs the extra argument modality_scores=",
    ),
    Case(
        "ogm_ge_scores_shape",
        lambda: modality_update(bj.ogm_ge, modality_scores=jnp.ones(4)),
        ValueError,
        r"ogm_ge: modality_scores must have shape \[2\]",
    ),
    Case(
        "ogm_ge_scores_bool",
        lambda: modality_update(bj.ogm_ge, modality_scores=jnp.array([True, False])),
        TypeError,
        r"modality_scores must hold floating scores .*got dtype bool",
    ),
    Case(
        "cggm_integer_encoder_grads",
        lambda: modality_update(
            bj.cggm,
            grads=replace_leaf(GRADS, "enc1", jnp.ones(4, jnp.int32)),
            modality_scores=SCORES,
        ),
        TypeError,
        r"cggm: grads\['enc1'\] has dtype int32",
    ),
    Case(
        "ogm_ge_integer_encoder_grads",
        lambda: modality_update(
            bj.ogm_ge,
            grads=replace_leaf(GRADS, "enc0", jnp.ones((2, 3), jnp.int8)),
            modality_scores=SCORES,
        ),
        TypeError,
        r"ogm_ge: grads\['enc0'\] has dtype int8",
    ),
    # --- param_labels
    Case(
        "labels_missing_a_parameter",
        lambda: bj.cggm({"enc0": 0, "enc1": 1}).init(
            {"enc0": jnp.ones(2), "enc1": jnp.ones(2), "head": {"w": jnp.ones(1)}}
        ),
        ValueError,
        r"param_labels does not fit the parameter tree: 1 parameter\(s\) have "
        r"no label: head/w",
    ),
    Case(
        "label_params_rule_misses_parameters",
        lambda: bj.label_params(PARAMS, {"enc0": 0, "enc1": 1}),
        ValueError,
        r"label_params: 1 parameter\(s\) match no rule: head",
    ),
    Case(
        "labels_name_a_modality_without_parameters",
        lambda: bj.ogm_ge({"enc0": 0, "enc1": 2, "head": None}).init(PARAMS),
        ValueError,
        r"param_labels label the parameters with modalities \[0, 2\], so M = 3, but no "
        r"parameter has modality \[1\]",
    ),
    Case(
        "labels_negative",
        lambda: bj.mmpareto({"enc0": 0, "enc1": -1, "head": None}).init(PARAMS),
        ValueError,
        r"param_labels\['enc1'\] is -1; modality indices start at 0",
    ),
    Case(
        "labels_one_modality",
        lambda: bj.cggm({"enc0": 0, "enc1": 0, "head": None}).init(PARAMS),
        ValueError,
        r"param_labels label the parameters with modalities \[0\]; at least 2",
    ),
    Case(
        "labels_changed_between_init_and_update",
        lambda: _labels_changed(),
        ValueError,
        r"cggm: param_labels has modalities \[2\], but the state was built for 2",
    ),
    # --- a batch of one example where a variance is needed
    Case(
        "source_grad_stats_batch_of_one",
        lambda: bj.source_grad_stats(losses_fn, PARAMS, BATCH[:1], method="vmap"),
        ValueError,
        r"source_grad_stats: batch has 1 example\(s\); the per-example "
        r"variance \(ddof = 1\) needs at least 2",
    ),
    Case(
        "laplace_batch_of_one",
        lambda: head_laplace(batch=BATCH[:1]),
        ValueError,
        r"laplace_grad_stats: batch has 1 example",
    ),
    Case(
        "laplace_num_samples_one",
        lambda: head_laplace(num_samples=1),
        ValueError,
        r"laplace_grad_stats: num_samples must be an int >= 2; got 1",
    ),
    # --- non-floating inputs
    Case(
        "source_grad_stats_integer_params",
        lambda: bj.source_grad_stats(
            losses_fn, replace_leaf(PARAMS, "step", jnp.int32(3)), BATCH, method="vmap"
        ),
        TypeError,
        r"source_grad_stats: params\['step'\] has dtype int32",
    ),
    Case(
        "source_grad_stats_integer_losses",
        lambda: bj.source_grad_stats(
            lambda p, x: jnp.zeros((S, 4), jnp.int32), PARAMS, BATCH, method="vmap"
        ),
        TypeError,
        r"losses_fn must return floating losses",
    ),
    # --- hyper-parameters out of range
    Case(
        "bogc_negative_kappa",
        lambda: bj.bogc(S, kappa=-0.5),
        ValueError,
        r"bogc: kappa must be >= 0; got -0.5",
    ),
    Case(
        "bogc_negative_gamma",
        lambda: bj.bogc(S, gamma=-1),
        ValueError,
        r"bogc: gamma must be >= 0; got -1",
    ),
    Case(
        "bogc_zero_prior_weight",
        lambda: bj.bogc(S, prior_weight=0.0),
        ValueError,
        r"bogc: prior_weight must be > 0; got 0.0",
    ),
    Case(
        "bogc_negative_eps",
        lambda: bj.bogc(S, eps=-1e-3),
        ValueError,
        r"bogc: eps must be > 0; got -0.001",
    ),
    Case(
        "bogc_nan_kappa",
        lambda: bj.bogc(S, kappa=float("nan")),
        ValueError,
        r"bogc: kappa must be >= 0; got nan",
    ),
    Case(
        "bogc_negative_kappa_array",
        lambda: bj.bogc(S, kappa=jnp.float32(-2)),
        ValueError,
        r"bogc: kappa must be >= 0",
    ),
    Case(
        "bogc_string_kappa",
        lambda: bj.bogc(S, kappa="1"),
        TypeError,
        r"bogc: kappa must be a real number >= 0",
    ),
    Case(
        "bogc_num_sources_zero",
        lambda: bj.bogc(0),
        ValueError,
        r"bogc: num_sources must be an int >= 1; got 0",
    ),
    Case(
        "bogc_num_sources_float",
        lambda: bj.bogc(3.0),
        ValueError,
        r"bogc: num_sources must be an int >= 1; got 3.0",
    ),
    Case(
        "bogc_aggregation",
        lambda: bj.bogc(S, aggregation="mean"),
        ValueError,
        r"bogc: aggregation must be one of",
    ),
    Case(
        "cggm_negative_rho",
        lambda: bj.cggm(LABELS, rho=-1.3),
        ValueError,
        r"cggm: rho must be > 0; got -1.3",
    ),
    Case(
        "cggm_zero_smoothing",
        lambda: bj.cggm(LABELS, smoothing=0.0),
        ValueError,
        r"cggm: smoothing must be > 0; got 0.0",
    ),
    Case(
        "cggm_mode",
        lambda: bj.cggm(LABELS, mode="paper"),
        ValueError,
        r"cggm: mode must be one of \('stable', 'reference'\); got 'paper'",
    ),
    Case(
        "cggm_coefficients_smoothing",
        lambda: bj.cggm_coefficients(jnp.zeros(2), smoothing=-1.0),
        ValueError,
        r"cggm_coefficients: smoothing must be > 0",
    ),
    Case(
        "ogm_ge_negative_alpha",
        lambda: bj.ogm_ge(LABELS, alpha=-0.1),
        ValueError,
        r"ogm_ge: alpha must be >= 0; got -0.1",
    ),
    Case(
        "ogm_ge_noise_not_bool",
        lambda: bj.ogm_ge(LABELS, noise=0.5),
        TypeError,
        r"ogm_ge: noise must be a Python bool",
    ),
    Case(
        "ogm_ge_coefficients_alpha",
        lambda: bj.ogm_ge_coefficients(SCORES, alpha=-1.0),
        ValueError,
        r"ogm_ge_coefficients: alpha must be >= 0",
    ),
    Case(
        "ogm_ge_coefficients_one_modality",
        lambda: bj.ogm_ge_coefficients(jnp.ones(1)),
        ValueError,
        r"ogm_ge_coefficients: scores must have shape \[M\] with M >= 2",
    ),
    Case(
        "mmpareto_zero_gamma",
        lambda: bj.mmpareto(LABELS, gamma=0.0),
        ValueError,
        r"mmpareto: gamma must be > 0; got 0.0",
    ),
    Case(
        "mmpareto_negative_fusion_source",
        lambda: bj.mmpareto(LABELS, fusion_source=-1),
        ValueError,
        r"mmpareto: fusion_source must be an int >= 0; got -1",
    ),
    Case(
        "mmpareto_modality_source_is_fusion",
        lambda: bj.mmpareto(LABELS, modality_sources=(0, 1)),
        ValueError,
        r"mmpareto: modality_sources\[0\] = 0 is the fusion_source",
    ),
    Case(
        "mmpareto_modality_sources_length",
        lambda: modality_update(
            lambda labels: bj.mmpareto(labels, modality_sources=(1, 2, 3)), grad_stats=STATS
        ),
        ValueError,
        r"mmpareto: modality_sources has 3 entries but param_labels use 2",
    ),
    Case(
        "mmpareto_source_out_of_range",
        lambda: modality_update(
            lambda labels: bj.mmpareto(labels, modality_sources=(1, 5)), grad_stats=STATS
        ),
        ValueError,
        r"mmpareto: source index 5 .* out of range for the 3 sources",
    ),
    Case(
        "mmpareto_rescale",
        lambda: bj.mmpareto(LABELS, rescale="global"),
        ValueError,
        r"mmpareto: rescale must be one of",
    ),
    Case(
        "laplace_zero_damping",
        lambda: head_laplace(damping=0.0),
        ValueError,
        r"laplace_grad_stats: damping must be > 0; got 0.0",
    ),
    Case(
        "source_grad_stats_chunk_does_not_divide",
        lambda: bj.source_grad_stats(losses_fn, PARAMS, BATCH, method="vmap", chunk_size=3),
        ValueError,
        r"chunk_size=3 does not divide the batch size 4",
    ),
    Case(
        "source_grad_stats_chunk_zero",
        lambda: bj.source_grad_stats(losses_fn, PARAMS, BATCH, method="vmap", chunk_size=0),
        ValueError,
        r"chunk_size must be a positive int or None; got 0",
    ),
    Case(
        "source_grad_stats_method",
        lambda: bj.source_grad_stats(losses_fn, PARAMS, BATCH, method="loop"),
        ValueError,
        r"method must be one of",
    ),
    Case(
        "multi_steps_num_sources",
        lambda: bj.multi_steps(bj.bogc(S), 2, num_sources=0),
        ValueError,
        r"multi_steps: num_sources must be a positive int or None; got 0",
    ),
    Case(
        "precision_eps",
        lambda: ev.precision(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 3), bool), eps=0.0),
        ValueError,
        r"precision: eps must be > 0",
    ),
    Case(
        "evidence_kappa",
        lambda: ev.evidence(jnp.ones((2, 3)), jnp.ones((2, 3), bool), kappa=-1.0),
        ValueError,
        r"evidence: kappa must be >= 0",
    ),
    Case(
        "fuse_prior_weight",
        lambda: ev.fuse_simple_supports(jnp.ones((2, 3)), 0.0),
        ValueError,
        r"fuse_simple_supports: prior_weight must be > 0",
    ),
    Case(
        "dice_eps",
        lambda: bj.metrics.dice(
            jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 2, 2), jnp.int32), eps=0.0
        ),
        ValueError,
        r"dice: eps must be > 0",
    ),
]


def _labels_changed():
    """A labels callable whose answer changes between init and update (a third modality)."""
    calls = []

    def labels(tree):
        calls.append(1)
        return LABELS if len(calls) == 1 else {"enc0": 0, "enc1": 2, "head": None}

    tx = bj.cggm(labels)
    return tx.update(GRADS, tx.init(PARAMS), PARAMS, modality_scores=SCORES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_misuse_raises_a_clear_error(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


def test_unlabelled_parameter_through_label_params_default():
    """Without a rule or ``default=`` a parameter is never silently treated as shared."""
    params = {"enc": [jnp.ones(2), jnp.ones(2)], "fusion": jnp.ones(1)}
    with pytest.raises(
        ValueError,
        match=r"label_params: 1 parameter\(s\) match no rule: "
        r"fusion",
    ):
        bj.label_params(params, {"enc": bj.labels.INDEX})
    assert bj.label_params(params, {"enc": bj.labels.INDEX}, default=None)["fusion"] is None


@pytest.mark.parametrize(
    "name, call, match",
    [
        (
            "bogc",
            lambda g, st: bogc_update(grads=g, grad_stats=st),
            r"grad_stats.mean\['enc0'\] has shape \(2, 2, 3\)",
        ),
        (
            "mmpareto",
            lambda g, st: modality_update(bj.mmpareto, grads=g, grad_stats=st),
            r"grad_stats has 2 sources but param_labels use 2 modalities",
        ),
    ],
)
def test_errors_come_at_trace_time_under_jit(name, call, match):
    del name
    bad = stats_for(num_sources=2)
    with pytest.raises(ValueError, match=match):
        jax.jit(call)(GRADS, bad)


def test_traced_hyperparameters_are_not_checked_but_concrete_ones_are():
    """Under optax.inject_hyperparams the factory sees arrays: concrete ones are checked
    at init, traced ones (inside jit) are skipped rather than crashing."""
    injected = optax.inject_hyperparams(bj.bogc, static_args=("num_sources",))
    with pytest.raises(ValueError, match=r"bogc: kappa must be >= 0"):
        injected(num_sources=S, kappa=-1.0).init(PARAMS)
    tx = injected(num_sources=S, kappa=0.5)
    state = tx.init(PARAMS)
    updates, _ = jax.jit(lambda s, st: tx.update(GRADS, s, PARAMS, grad_stats=st))(state, STATS)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_batch_of_one_per_device_is_fine_when_the_whole_batch_has_two():
    """With ``axis_name`` the check counts the examples of every device."""
    from bogc_jax import validation  # pylint: disable=g-import-not-at-top

    jax.vmap(lambda x: validation.check_num_examples("f", 1, "d") or x, axis_name="d")(jnp.ones(2))
    with pytest.raises(ValueError, match=r"f: batch has 1 example\(s\)"):
        jax.vmap(lambda x: validation.check_num_examples("f", 1, "d") or x, axis_name="d")(
            jnp.ones(1)
        )


# --- Gaps closed later: each misuse below used to pass silently or fail without a hint.


def _coordinate_weights(aggregation):
    mean = STATS.mean["enc0"]
    return bj.coordinate_weights(mean, STATS.var["enc0"], 8, aggregation=aggregation)


MORE_CASES = [
    Case(
        "coordinate_weights_typo",
        lambda: _coordinate_weights("dempsterr"),
        ValueError,
        r"coordinate_weights: aggregation must be one of",
    ),
    Case(
        "bogc_mask_string_leaf",
        lambda: bogc_update(mask={"enc0": "False", "enc1": True, "head": True}),
        TypeError,
        r"bogc: mask\['enc0'\] is 'False' of type str; every leaf of mask must be a Python bool",
    ),
    Case(
        "mmpareto_repeated_modality_sources",
        lambda: bj.mmpareto(LABELS, modality_sources=(1, 1)),
        ValueError,
        r"mmpareto: modality_sources\[1\] = 1 repeats modality_sources\[0\]",
    ),
    Case(
        "mmpareto_numpy_fusion_source_out_of_range",
        lambda: modality_update(
            lambda labels: bj.mmpareto(labels, fusion_source=np.int64(7)), grad_stats=STATS
        ),
        ValueError,
        r"mmpareto: source index 7 .* out of range for the 3 sources",
    ),
    Case(
        "label_params_overlapping_rules",
        lambda: bj.label_params(PARAMS, {"enc0": 0, "enc1": 1, "head": None, "enc0/": 1}),
        ValueError,
        r"label_params: rules 'enc0' and 'enc0/' name the same path 'enc0' with different labels",
    ),
    Case(
        "label_params_dotted_key",
        lambda: bj.label_params({"layer.0": jnp.ones(2), "b": jnp.ones(1)}, {"layer.0": 0, "b": 1}),
        ValueError,
        r"give the rule as a tuple of keys, e.g. \('layer.0',\)",
    ),
    Case(
        "param_labels_int_array_leaf",
        lambda: bj.cggm({"enc0": jnp.array([0, 1]), "enc1": 1, "head": None}).init(PARAMS),
        TypeError,
        r"param_labels\['enc0'\] is an array of shape \(2,\); every leaf of param_labels must "
        r"be one modality index",
    ),
    Case(
        "dice_channels_first_without_class_axis",
        lambda: bj.metrics.dice(jnp.zeros((2, 4, 5, 6)), jnp.zeros((2, 5, 6), jnp.int32)),
        ValueError,
        r"dice: .* pass class_axis=1",
    ),
    Case(
        "ogm_ge_key_string",
        lambda: bj.ogm_ge(LABELS, key="seed"),
        TypeError,
        r"ogm_ge: key must be a PRNG seed or key; got str 'seed'",
    ),
    Case(
        "ogm_ge_key_wrong_shape",
        lambda: bj.ogm_ge(LABELS, key=jnp.zeros(3, jnp.uint32)),
        TypeError,
        r"ogm_ge: key must be one PRNG seed or key; got an array of dtype uint32 and shape \(3,\)",
    ),
    Case(
        "inject_hyperparams_num_sources",
        lambda: optax.inject_hyperparams(bj.bogc)(num_sources=3).init(PARAMS),
        ValueError,
        r'static_args=\("num_sources",\)',
    ),
    Case(
        "inject_hyperparams_callable_labels",
        lambda: optax.inject_hyperparams(bj.cggm)(
            param_labels=lambda p: bj.label_params(p, {"enc0": 0, "enc1": 1, "head": None})
        ).init(PARAMS),
        TypeError,
        r'static_args=\("param_labels",\)',
    ),
    Case(
        "grad_stats_missing_mentions_flax_linen",
        lambda: bogc_update(grad_stats=None),
        ValueError,
        r"Flax Linen's TrainState.apply_gradients drops extra arguments.*docs/flax.md",
    ),
]


@pytest.mark.parametrize("case", MORE_CASES, ids=[c.name for c in MORE_CASES])
def test_more_misuse_raises_a_clear_error(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


def test_numpy_integers_are_accepted_where_ints_are():
    tx = bj.mmpareto(LABELS, fusion_source=np.int64(0), modality_sources=(np.int64(1), np.int32(2)))
    ref = bj.mmpareto(LABELS)
    a, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS, grad_stats=STATS)
    b, _ = ref.update(GRADS, ref.init(PARAMS), PARAMS, grad_stats=STATS)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert bj.bogc(np.int64(3)) is not None
    assert bj.ogm_ge(LABELS, key=np.int64(5)).init(PARAMS).key.shape == (2,)
    labels = bj.label_params(PARAMS, {"enc0": np.int64(0), "enc1": np.int32(1), "head": None})
    assert labels == LABELS


def test_coordinate_weights_sum_is_the_uniform_weighting():
    mean, var = STATS.mean["enc0"], STATS.var["enc0"]
    w, touched, u = bj.coordinate_weights(mean, var, 8, aggregation="sum")
    np.testing.assert_allclose(w, np.asarray(touched) / np.sum(touched, axis=0), rtol=1e-6)
    assert float(u) == 0.0
    w_dempster, _, _ = bj.coordinate_weights(mean, var, 8)
    assert not np.allclose(w, w_dempster)


def test_inject_hyperparams_works_with_the_suggested_static_args():
    tx = optax.inject_hyperparams(bj.bogc, static_args=("num_sources",))(num_sources=3)
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS, grad_stats=STATS)
    assert jax.tree.structure(updates) == jax.tree.structure(GRADS)
    labeller = lambda p: bj.label_params(p, {"enc0": 0, "enc1": 1, "head": None})
    tx = optax.inject_hyperparams(bj.cggm, static_args=("param_labels",))(param_labels=labeller)
    tx.update(GRADS, tx.init(PARAMS), PARAMS, modality_scores=SCORES)
