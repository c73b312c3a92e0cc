"""Worked example: CGGM's direction term in a training step, on both schedules.

A two-modality Flax NNX classifier (one encoder per modality, a fusion layer, an output
layer ``out_layer``) trains with CGGM on synthetic data where modality 0 is much more
informative than modality 1. One auxiliary classifier per modality (its own output layer
``out_layer``, same shape as the fusion one) trains on the stop-gradient encoder outputs
with its own optimizer; its batch accuracy is the modality's score.

Two ways to use ``bj.cggm_direction_loss`` (``lam`` is the paper's lambda):

1. Reference schedule, ``direction="weights"`` (what the official code does): the term is
   built at step ``t - 1`` from that step's ``B``, fusion output-layer weight and
   classifier output-layer weights, and its gradient, taken at those (by now stale)
   weights, is added to the fusion output-layer gradient at step ``t``::

       g_gm = jax.grad(bj.cggm_direction_loss, argnums=1)(b_prev, w_prev, cls_prev,
                                                         "weights")
       grads["out_layer"]["kernel"] += lam * g_gm

   ``b_prev`` is ``CggmState.coefficients`` after the previous update (zeros before the
   first, so the first step has no direction term, as in the official code).

2. Same-step schedule, ``direction="gradients"`` (the paper's formulation): the classifier
   scores of this batch give this step's ``B`` first (``bj.cggm_coefficients``, with the
   transform's own convention for the first step), and the loss differentiated is
   ``L + lam * L_gm`` where ``L_gm`` compares each classifier's output-layer gradient with
   the fusion output-layer gradient, itself computed with ``jax.grad`` inside the loss
   (a gradient of a gradient).

In both, ``bj.cggm`` then scales the encoder gradients by ``rho * B`` (magnitude part).

Run: ``python -m experiments.cggm_direction_example`` (a few seconds on a CPU).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bogc_jax as bj

NUM_CLASSES = 4
HIDDEN = 16
IN_DIMS = (8, 8)
SEPARATION = (2.0, 0.4)  # modality 0 is informative, modality 1 barely


def make_data(num_examples: int, seed: int = 0):
    """Gaussian class clusters per modality; cluster spread sets each modality's strength."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, num_examples)
    xs = []
    for dim, sep in zip(IN_DIMS, SEPARATION):
        centres = rng.normal(size=(NUM_CLASSES, dim)) * sep
        xs.append((centres[y] + rng.normal(size=(num_examples, dim))).astype(np.float32))
    return [jnp.asarray(x) for x in xs], jnp.asarray(y, jnp.int32)


class Net(nnx.Module):
    """Encoders -> concat -> fusion layer -> output layer."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.encoders = nnx.List([nnx.Linear(d, HIDDEN, rngs=rngs) for d in IN_DIMS])
        self.fusion = nnx.Linear(HIDDEN * len(IN_DIMS), HIDDEN, rngs=rngs)
        self.out_layer = nnx.Linear(HIDDEN, NUM_CLASSES, rngs=rngs)

    def encode(self, xs):
        return [nnx.relu(enc(x)) for enc, x in zip(self.encoders, xs)]

    def fuse(self, hs):
        return nnx.relu(self.fusion(jnp.concatenate(hs, axis=-1)))

    def __call__(self, xs):
        hs = self.encode(xs)
        return self.out_layer(self.fuse(hs)), hs


class Classifiers(nnx.Module):
    """One auxiliary classifier per modality; each ends in an ``out_layer`` like the model."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.proj = nnx.List([nnx.Linear(HIDDEN, HIDDEN, rngs=rngs) for _ in IN_DIMS])
        self.out_layer = nnx.List([nnx.Linear(HIDDEN, NUM_CLASSES, rngs=rngs) for _ in IN_DIMS])

    def __call__(self, hs):
        return [out(nnx.relu(proj(h))) for proj, out, h in zip(self.proj, self.out_layer, hs)]


def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def classifier_step(classifiers, cls_opt, hs, y):
    """Train the classifiers on stop-gradient features; their accuracies and gradients."""
    hs = [jax.lax.stop_gradient(h) for h in hs]

    def loss_fn(classifiers):
        outs = classifiers(hs)
        return sum(cross_entropy(o, y) for o in outs), outs

    (_, outs), grads = nnx.value_and_grad(loss_fn, has_aux=True)(classifiers)
    scores = jnp.stack([bj.metrics.accuracy(o, y) for o in outs])
    out_grads = [grads.out_layer[i].kernel[...] for i in range(len(IN_DIMS))]
    out_weights = [layer.kernel[...] for layer in classifiers.out_layer]
    cls_opt.update(classifiers, grads)
    return scores, out_grads, out_weights


def make_optimizers(model, classifiers, mode: str, rho: float):
    labels = bj.label_params(
        model, {"encoders": bj.labels.INDEX, "fusion": None, "out_layer": None}
    )
    tx = optax.chain(
        bj.cggm(labels, rho=rho, mode=mode), optax.clip_by_global_norm(0.8), optax.adam(1e-3)
    )
    return (
        nnx.Optimizer(model, tx, wrt=nnx.Param),
        nnx.Optimizer(classifiers, optax.adam(5e-4), wrt=nnx.Param),
    )


@nnx.jit
def reference_step(model, classifiers, opt, cls_opt, carry, xs, y, lam):
    """Official schedule: last step's weight-cosine term lands on this step's gradient."""
    b_prev, w_prev, cls_prev = carry

    def task_loss(model):
        logits, hs = model(xs)
        return cross_entropy(logits, y), hs

    (loss, hs), grads = nnx.value_and_grad(task_loss, has_aux=True)(model)
    # Gradient of the previous step's L_gm, taken at the previous step's weights.
    l_gm_prev, g_gm = jax.value_and_grad(bj.cggm_direction_loss, argnums=1)(
        b_prev, w_prev, cls_prev, "weights"
    )
    grads.out_layer.kernel[...] = grads.out_layer.kernel[...] + lam * g_gm

    w_now = model.out_layer.kernel[...]  # before the update, as in the official code
    scores, _, cls_weights = classifier_step(classifiers, cls_opt, hs, y)
    opt.update(model, grads, modality_scores=scores)
    b_now = optax.tree.get(nnx.as_pure(opt.opt_state), "coefficients")
    return loss + lam * l_gm_prev, scores, b_now, (b_now, w_now, cls_weights)


@nnx.jit
def same_step(model, classifiers, opt, cls_opt, xs, y, lam):
    """Paper's formulation on one step: this step's B, gradient cosine, second order."""
    hs = model.encode(xs)
    scores, cls_grads, _ = classifier_step(classifiers, cls_opt, hs, y)
    state = nnx.as_pure(opt.opt_state)
    previous = optax.tree.get(state, "scores")
    step = optax.tree.get(state, "step")
    improvements = jnp.where(step > 0, scores - previous, 0.0)  # "stable": d = 0 first
    b = bj.cggm_coefficients(improvements, mode="stable")

    def total_loss(model):
        z = model.fuse(model.encode(xs))
        kernel, bias = model.out_layer.kernel[...], model.out_layer.bias[...]
        task = lambda k: cross_entropy(z @ k + bias, y)
        fusion_grad = jax.grad(task)(kernel)  # depends on the model: differentiated through
        l_gm = bj.cggm_direction_loss(b, fusion_grad, cls_grads, direction="gradients")
        return task(kernel) + lam * l_gm, l_gm

    (loss, l_gm), grads = nnx.value_and_grad(total_loss, has_aux=True)(model)
    opt.update(model, grads, modality_scores=scores)
    return loss, l_gm, scores, b


def run(
    steps: int = 30, batch: int = 32, lam: float = 0.2, rho: float = 1.3, seed: int = 0
) -> dict:
    """Train both schedules for ``steps`` steps; per-step histories."""
    xs_all, y_all = make_data(steps * batch, seed)
    batches = [
        ([x[i * batch : (i + 1) * batch] for x in xs_all], y_all[i * batch : (i + 1) * batch])
        for i in range(steps)
    ]
    history = {}

    model, classifiers = Net(rngs=nnx.Rngs(seed)), Classifiers(rngs=nnx.Rngs(seed + 1))
    opt, cls_opt = make_optimizers(model, classifiers, "reference", rho)
    carry = (
        jnp.zeros(len(IN_DIMS)),
        model.out_layer.kernel[...],
        [layer.kernel[...] for layer in classifiers.out_layer],
    )
    rows = []
    for xs, y in batches:
        loss, scores, b, carry = reference_step(model, classifiers, opt, cls_opt, carry, xs, y, lam)
        rows.append(
            {
                "loss": float(loss),
                "scores": np.asarray(scores).tolist(),
                "B": np.asarray(b).tolist(),
            }
        )
    history["reference_weights"] = rows

    model, classifiers = Net(rngs=nnx.Rngs(seed)), Classifiers(rngs=nnx.Rngs(seed + 1))
    opt, cls_opt = make_optimizers(model, classifiers, "stable", rho)
    rows = []
    for xs, y in batches:
        loss, l_gm, scores, b = same_step(model, classifiers, opt, cls_opt, xs, y, lam)
        b_state = optax.tree.get(nnx.as_pure(opt.opt_state), "coefficients")
        rows.append(
            {
                "loss": float(loss),
                "l_gm": float(l_gm),
                "scores": np.asarray(scores).tolist(),
                "B": np.asarray(b).tolist(),
                "B_transform": np.asarray(b_state).tolist(),
            }
        )
    history["same_step_gradients"] = rows
    return history


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lam", type=float, default=0.2)
    parser.add_argument("--rho", type=float, default=1.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, help="write the histories here")
    args = parser.parse_args(argv)
    history = run(args.steps, args.batch, args.lam, args.rho, args.seed)
    for name, rows in history.items():
        print(f"{name}:")
        print(
            f"  {'step':>4}  {'loss':>8}  {'score 0':>7}  {'score 1':>7}  {'B 0':>12}  {'B 1':>12}"
        )
        for t, row in enumerate(rows):
            print(
                f"  {t:>4}  {row['loss']:8.4f}  {row['scores'][0]:7.3f}  "
                f"{row['scores'][1]:7.3f}  {row['B'][0]:12.4g}  {row['B'][1]:12.4g}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(history, f, indent=1)
    return history


if __name__ == "__main__":
    main()
