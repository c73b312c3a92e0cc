"""How wide are bogc_laplace's posterior draws compared with the weights they perturb?

laplace_grad_stats draws theta + eps / sqrt(F + damping), F = sum over the BATCH of squared
per-example gradients, damping = 1. Prints, per leaf, the RMS weight and the median posterior
std, at initialisation and after 40 epochs of joint_uni (utdmhad2, seed 0).
usage: PYTHONPATH=. python experiments/analysis/check_laplace_width.py
"""
import jax, jax.numpy as jnp, numpy as np
import bogc_jax as bj
from experiments import data as D, run as R

d = D.load_dataset("utdmhad2")
cfg = R.TrainConfig(epochs=40, batch_size=32)
tr = R.Trainer(d, "joint_uni", cfg)
_, params = R.make_model(d, cfg, 0)
batch = (tuple(jnp.asarray(x[:32]) for x in d.x_train), jnp.asarray(d.y_train[:32]))

def report(params, when):
  st = bj.source_grad_stats(tr.fn.losses, params, batch, method="vmap")
  n = st.count
  for (path, w), m, v in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(st.mean),
                             jax.tree.leaves(st.var)):
    name = jax.tree_util.keystr(path)
    if not ("out" in name or "head" in name) or "bias" in name:
      continue
    fisher = (n - 1) * v + n * m ** 2          # [S, ...]
    std = 1 / jnp.sqrt(jnp.max(fisher, axis=0) + 1.0)   # narrowest over sources
    print(f"{when:8s} {name:32s} rms weight {float(jnp.sqrt(jnp.mean(w ** 2))):.3f}  "
          f"median posterior std {float(jnp.median(std)):.3f}")

report(params, "init")
opt_state = tr.parts.tx.init(params)
rng = np.random.default_rng(1_000_003)
xs = tuple(jnp.asarray(x) for x in d.x_train); y = jnp.asarray(d.y_train)
n = len(y); nb = n // 32
for e in range(40):
  perm = rng.permutation(n)[:nb * 32].reshape(nb, 32)
  params, opt_state, _ = tr.run_epoch(params, opt_state, xs, y, jnp.asarray(perm), 0, e * nb)
report(params, "epoch 40")
