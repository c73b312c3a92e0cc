"""What does bogc_laplace's posterior (encoder last layers, N = train size) hand to bogc?

For utdmhad2, seed 0, at initialisation and after 20 epochs of joint_uni, on one batch of
32: per chosen leaf and source, the Laplace mean's relative distance from the exact batch
gradient, the median ratio of the Laplace variance to the per-sample variance of the
batch mean (var / n), and bogc's mean source weights from each estimator.
usage: PYTHONPATH=. python experiments/analysis/diag_laplace_encoder.py [damping]
"""
import sys
import jax, jax.numpy as jnp, numpy as np
import bogc_jax as bj
from experiments import data as D, methods as M, run as R

damping = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
d = D.load_dataset("utdmhad2")
cfg = R.TrainConfig(epochs=20, batch_size=32)
tr = R.Trainer(d, "joint_uni", cfg)
_, params = R.make_model(d, cfg, 0)
mask = M.encoder_output_mask(params)
batch = (tuple(jnp.asarray(x[:32]) for x in d.x_train), jnp.asarray(d.y_train[:32]))
S = d.num_modalities + 1


def weights(stats, params):
  tx = bj.bogc(S)
  grads = stats.fixed_weight_grads() if all(m is not None for m in jax.tree.leaves(
      stats.mean, is_leaf=lambda x: x is None)) else None
  exact = bj.source_grad_stats(tr.fn.losses, params, batch, method="vmap")
  _, state = tx.update(exact.fixed_weight_grads(), tx.init(params), params, grad_stats=stats)
  return state.source_weights


def report(params, when):
  exact = bj.source_grad_stats(tr.fn.losses, params, batch, method="vmap")
  lap = bj.laplace_grad_stats(tr.fn.losses, params, batch, jax.random.key(0), mask=mask,
                              damping=damping, dataset_size=len(d.y_train), method="vmap")
  w_exact = weights(exact, params)
  w_lap = weights(lap, params)
  flat = jax.tree_util.tree_leaves_with_path(mask)
  for (path, on), me, ve, ml, vl, we, wl in zip(
      flat, jax.tree.leaves(exact.mean), jax.tree.leaves(exact.var),
      jax.tree.leaves(lap.mean, is_leaf=lambda x: x is None),
      jax.tree.leaves(lap.var, is_leaf=lambda x: x is None),
      jax.tree.leaves(w_exact), jax.tree.leaves(w_lap)):
    if not on:
      continue
    name = jax.tree_util.keystr(path)
    for s in range(S):
      if float(jnp.max(jnp.abs(me[s]))) == 0:
        continue
      rel = float(jnp.linalg.norm(ml[s] - me[s]) / jnp.linalg.norm(me[s]))
      ratio = float(jnp.median(vl[s] / jnp.maximum(ve[s] / exact.count, 1e-30)))
      print(f"{when:8s} {name:34s} source {s}: |mean_lap - g| / |g| = {rel:7.3f}  "
            f"median var_lap / (var / n) = {ratio:9.3g}  weight per-sample {float(we[s]):.2f}"
            f"  laplace {float(wl[s]):.2f}")


report(params, "init")
opt_state = tr.parts.tx.init(params)
rng = np.random.default_rng(1_000_003)
xs = tuple(jnp.asarray(x) for x in d.x_train); y = jnp.asarray(d.y_train)
n = len(y); nb = n // 32
for e in range(cfg.epochs):
  perm = rng.permutation(n)[:nb * 32].reshape(nb, 32)
  params, opt_state, _ = tr.run_epoch(params, opt_state, xs, y, jnp.asarray(perm), 0, e * nb)
report(params, "epoch 20")
