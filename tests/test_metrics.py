"""bj.metrics: batch scores, their reference definitions, and split-batch exactness.

The split-batch checks here map the shards with ``jax.vmap(..., axis_name=...)`` (the
same collectives as ``shard_map``, in one process); tests/test_multidevice.py repeats
them on 8 fake devices.
"""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import bogc_jax as bj

M = bj.metrics


def numpy_dice_reference(logits_nchw, target, eps=1e-3):
    """Transcription of the CGGM code's train_eval_seg: argmax over dim 1, per-example
    Dice over (H, W) with eps, mean over the batch, then over ET, TC, WT."""
    out = np.argmax(logits_nchw, axis=1)

    def one(o, t):
        inter = np.sum(o * t, axis=(1, 2)) + eps
        union = np.sum(o, axis=(1, 2)) + np.sum(t, axis=(1, 2)) + eps * 2
        return np.mean(2 * inter / union)

    d1 = one((out == 3).astype(float), (target == 3).astype(float))
    d2 = one(((out == 1) | (out == 3)).astype(float), ((target == 1) | (target == 3)).astype(float))
    d3 = one((out != 0).astype(float), (target != 0).astype(float))
    return (d1 + d2 + d3) / 3


def test_accuracy_matches_numpy_and_accepts_predictions_and_masks():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 50)
    expected = np.mean(np.argmax(logits, -1) == labels)
    assert float(M.accuracy(logits, labels)) == pytest.approx(expected)
    assert float(M.accuracy(jnp.argmax(logits, -1), labels)) == pytest.approx(expected)
    mask = rng.random(50) < 0.5
    assert float(M.accuracy(logits, labels, where=mask)) == pytest.approx(
        np.mean((np.argmax(logits, -1) == labels)[mask])
    )
    assert float(M.accuracy(logits, labels, where=np.zeros(50, bool))) == 0.0  # no NaN


def test_sign_accuracy_counts_zero_as_non_positive():
    pred = np.array([0.0, 0.0, 1.0, -1.0, 2.0])
    target = np.array([0.0, 1.0, 0.0, -2.0, 3.0])
    # (pred > 0) == (target > 0): T, F, F, T, T
    assert float(M.sign_accuracy(pred, target)) == pytest.approx(3 / 5)
    # without the zero targets: entries 1, 3, 4 -> F, T, T
    assert float(M.sign_accuracy(pred, target, exclude_zero=True)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same shape"):
        M.sign_accuracy(pred, target[:3])


@pytest.mark.parametrize("class_axis", [1, -1])
def test_dice_matches_the_reference_segmentation_score(class_axis):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4, 9, 11)).astype(np.float32)  # [B, C, H, W]
    target = rng.integers(0, 4, size=(6, 9, 11))
    target[0] = 0  # an example with no tumour at all
    expected = numpy_dice_reference(logits, target)
    if class_axis == -1:
        logits = np.moveaxis(logits, 1, -1)
    got = float(M.dice(logits, target, class_axis=class_axis))
    assert got == pytest.approx(expected, rel=1e-6)


def test_dice_of_perfect_prediction_and_custom_groups():
    labels = jnp.asarray(np.random.default_rng(2).integers(0, 3, size=(4, 5, 5, 3)))
    assert float(M.dice(labels, labels, groups=[(1,), (2,), (1, 2)])) == pytest.approx(1.0)
    assert float(M.dice(jnp.zeros_like(labels), labels, groups=[(1, 2)])) < 0.01


def test_confidence_is_mean_true_class_probability():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(20, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 20)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert float(M.confidence(logits, labels)) == pytest.approx(
        probs[np.arange(20), labels].mean(), rel=1e-6
    )


def test_metrics_jit_and_shape_errors():
    logits, labels = jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32)
    assert float(jax.jit(M.accuracy)(logits, labels)) == 1.0
    with pytest.raises(ValueError, match="logits"):
        M.accuracy(jnp.zeros((4, 3, 2)), labels)
    with pytest.raises(ValueError, match="where"):
        M.accuracy(logits, labels, where=jnp.ones(3))


def _split(x, shards):
    return jnp.reshape(jnp.asarray(x), (shards, -1) + np.shape(x)[1:])


def _scores(logits, labels, pred, target, seg_logits, seg_labels, mask, axis_name=None):
    return jnp.stack(
        [
            M.accuracy(logits, labels, where=mask, axis_name=axis_name),
            M.sign_accuracy(pred, target, where=mask, axis_name=axis_name),
            M.sign_accuracy(pred, target, exclude_zero=True, axis_name=axis_name),
            M.dice(seg_logits, seg_labels, where=mask, axis_name=axis_name),
            M.confidence(logits, labels, where=mask, axis_name=axis_name),
        ]
    )


_whole_scores = jax.jit(_scores)
_split_scores = jax.jit(jax.vmap(lambda *a: _scores(*a, axis_name="d"), axis_name="d"))


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.integers(0, 2**31 - 1))
def test_split_batch_scores_equal_whole_batch(shards, seed):
    """psum of counts: a batch split over devices (uneven masks) scores like the whole."""
    rng = np.random.default_rng(seed)
    n = 8 * shards
    logits = rng.normal(size=(n, 5)).astype(np.float32)
    labels = rng.integers(0, 5, n)
    pred = rng.normal(size=n).astype(np.float32)
    target = np.round(rng.normal(size=n)).astype(np.float32)
    seg_logits = rng.normal(size=(n, 6, 6, 4)).astype(np.float32)
    seg_labels = rng.integers(0, 4, size=(n, 6, 6))
    mask = rng.random(n) < 0.6  # unequal counts per shard

    args = (logits, labels, pred, target, seg_logits, seg_labels, mask)
    whole = _whole_scores(*args)
    split = _split_scores(*[_split(a, shards) for a in args])
    np.testing.assert_allclose(split, np.broadcast_to(whole, split.shape), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nonfinite_logits_give_nonfinite_scores_and_masked_rows_are_ignored(seed):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, 6))
    bad_row = int(rng.integers(0, 6))
    value = [jnp.nan, jnp.inf, -jnp.inf][seed]
    bad = logits.at[bad_row, int(rng.integers(0, 4))].set(value)
    keep = jnp.arange(6) != bad_row
    seg = jnp.asarray(rng.normal(size=(6, 3, 3, 4)), jnp.float32)
    seg_bad = seg.at[bad_row, 0, 0, 0].set(value)
    seg_labels = jnp.asarray(rng.integers(0, 4, (6, 3, 3)))
    pred = jnp.asarray(rng.normal(size=6), jnp.float32)
    scores = {
        "accuracy": lambda x, **kw: bj.metrics.accuracy(x, labels, **kw),
        "confidence": lambda x, **kw: bj.metrics.confidence(x, labels, **kw),
        "sign_accuracy": lambda x, **kw: bj.metrics.sign_accuracy(x.sum(axis=1), pred, **kw),
    }
    for name, score in scores.items():
        assert np.isnan(score(bad)), name
        masked = score(bad, where=keep)
        assert np.isfinite(masked) and masked == score(logits, where=keep), name
    assert np.isnan(bj.metrics.dice(seg_bad, seg_labels))
    assert bj.metrics.dice(seg_bad, seg_labels, where=keep) == bj.metrics.dice(
        seg, seg_labels, where=keep
    )
    all_nan = jnp.full((4, 2), jnp.nan)
    assert np.isnan(bj.metrics.accuracy(all_nan, jnp.array([0, 1, 0, 1])))
    assert np.isnan(bj.metrics.sign_accuracy(all_nan[:, 0], jnp.ones(4)))


@pytest.mark.parametrize("padding_label", [4, -100, -1])
def test_confidence_ignores_padding_rows_and_flags_counted_out_of_range_labels(padding_label):
    logits = jax.random.normal(jax.random.key(3), (5, 4))
    labels = jnp.array([0, 3, 1, 2, 0])
    padded = labels.at[4].set(padding_label)
    keep = jnp.array([True, True, True, True, False])
    expected = bj.metrics.confidence(logits[:4], labels[:4])
    np.testing.assert_allclose(bj.metrics.confidence(logits, padded, where=keep), expected)
    # Counted, a label outside [0, C) is no class at all (-1 is not the last class).
    assert np.isnan(bj.metrics.confidence(logits, padded))
    assert np.isnan(bj.metrics.accuracy(logits, padded))
    np.testing.assert_allclose(
        bj.metrics.accuracy(logits, padded, where=keep), bj.metrics.accuracy(logits[:4], labels[:4])
    )


def test_dice_channels_first_logits_need_class_axis():
    logits = jax.random.normal(jax.random.key(0), (2, 4, 5, 6))  # [B, C, H, W]
    labels = jnp.argmax(logits, axis=1)
    with pytest.raises(ValueError, match="class_axis=1"):
        bj.metrics.dice(logits, labels)
    assert float(bj.metrics.dice(logits, labels, class_axis=1)) == pytest.approx(1.0)
