"""What does bogc_laplace's posterior (encoder last layers) hand to bogc?

On utdmhad2, seed 0, at initialisation and after 20 epochs of joint_uni, for one batch of
32: per chosen leaf and source, the Laplace mean's relative distance from the exact batch
gradient, the median ratio of the Laplace variance to the per-sample variance of the
batch mean (var / n), and bogc's mean source weights from each estimator; per leaf, the
RMS weight and the median posterior standard deviation. Once with the batch's own Fisher
(``dataset_size=None``) and once with the training set's (``N`` = 431).

usage: PYTHONPATH=. python experiments/analysis/diag_laplace_encoder.py [damping]
"""

import sys

import jax
import jax.numpy as jnp

import bogc_jax as bj
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models, train

damping = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
dataset = data_lib.load_dataset("utdmhad2")
trainer = train.Trainer(dataset, "joint_uni", config_lib.TrainConfig(epochs=20, batch_size=32))
batch = (tuple(jnp.asarray(x[:32]) for x in dataset.x_train), jnp.asarray(dataset.y_train[:32]))
num_sources = dataset.num_modalities + 1
is_none = lambda x: x is None


def source_weights(stats, grads, params):
    tx = bj.bogc(num_sources=num_sources)
    _, state = tx.update(grads, tx.init(params), params, grad_stats=stats)
    return state.source_weights


def report(params, when):
    mask = models.encoder_output_mask(params)
    exact = bj.source_grad_stats(trainer.fn.losses, params, batch, method="vmap")
    grads = exact.fixed_weight_grads()
    w_exact = source_weights(exact, grads, params)
    for dataset_size in (None, len(dataset.y_train)):
        lap = bj.laplace_grad_stats(
            trainer.fn.losses,
            params,
            batch,
            jax.random.key(0),
            mask=mask,
            damping=damping,
            dataset_size=dataset_size,
            method="vmap",
        )
        w_lap = source_weights(lap, grads, params)
        scale = (dataset_size or exact.count) / exact.count
        print(f"--- {when}, Fisher of N = {dataset_size or 'the batch'}, damping {damping}")
        leaves = zip(
            jax.tree_util.tree_leaves_with_path(mask),
            jax.tree.leaves(params),
            jax.tree.leaves(exact.mean),
            jax.tree.leaves(exact.var),
            jax.tree.leaves(lap.mean, is_leaf=is_none),
            jax.tree.leaves(lap.var, is_leaf=is_none),
            jax.tree.leaves(w_exact),
            jax.tree.leaves(w_lap),
        )
        for (path, on), weight, me, ve, ml, vl, we, wl in leaves:
            if not on:
                continue
            name = jax.tree_util.keystr(path)
            n = exact.count
            fisher = scale * ((n - 1) * ve + n * me**2)
            posterior_std = 1 / jnp.sqrt(jnp.max(fisher, axis=0) + damping)
            print(
                f"{name:34s} rms weight {float(jnp.sqrt(jnp.mean(weight**2))):.3f}, median "
                f"posterior std {float(jnp.median(posterior_std)):.3f}"
            )
            for s in range(num_sources):
                if float(jnp.max(jnp.abs(me[s]))) == 0:
                    continue
                rel = float(jnp.linalg.norm(ml[s] - me[s]) / jnp.linalg.norm(me[s]))
                ratio = float(jnp.median(vl[s] / jnp.maximum(ve[s] / n, 1e-30)))
                print(
                    f"  source {s}: |mean_lap - g| / |g| = {rel:7.3f}, median var_lap / (var / n) "
                    f"= {ratio:9.3g}, bogc weight: per-sample {float(we[s]):.2f}, "
                    f"laplace {float(wl[s]):.2f}"
                )


_, initial = train.make_model(dataset, trainer.cfg, 0)
report(initial, "init")
*_, (last_epoch, trained, _, _) = trainer.epochs(seed=0)
report(trained, f"epoch {last_epoch}")
