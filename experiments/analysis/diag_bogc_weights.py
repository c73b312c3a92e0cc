"""Where does BOGC move the weight? Mean source weights on each encoder during training.

Trains `bogc` (or a variant) with the experiment suite's Trainer (same model, data, seed
handling as `python -m experiments.run`) and prints, after epochs, the BogcState
diagnostics averaged over each encoder's leaves: the weight of the fusion source and of
that modality's unimodal source, relative to the fixed-weight sum (1 = unchanged; the two
sum to 2 on every coordinate both touch).

usage: PYTHONPATH=. python experiments/analysis/diag_bogc_weights.py DATASET METHOD EPOCHS [optimizer] [seed]
"""
import sys
import jax, jax.numpy as jnp, numpy as np
from experiments import data as data_lib, run as run_lib, models

dataset_name, method, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
opt = sys.argv[4] if len(sys.argv) > 4 else "adam"
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
d = data_lib.load_dataset(dataset_name)
defaults = run_lib.DATASET_DEFAULTS[dataset_name]
cfg = run_lib.TrainConfig(epochs=epochs, batch_size=defaults["batch_size"], optimizer=opt,
                          lr=1e-3 if opt == "adam" else 1e-2,
                          hparams={"kappa": 1.0, "gamma": 1.0})
tr = run_lib.Trainer(d, method, cfg)
_, params = run_lib.make_model(d, cfg, seed)
opt_state = tr.parts.tx.init(params)
groups = models.param_groups(params)
n = len(d.y_train); bs = min(cfg.batch_size, n); nb = n // bs
rng = np.random.default_rng(seed + 1_000_003)
xs = tuple(jnp.asarray(x) for x in d.x_train); y = jnp.asarray(d.y_train)
M = d.num_modalities
print(f"{dataset_name} {method} {opt}: modalities {d.modalities}; per encoder m: "
      "[weight of fusion source, weight of unimodal source m] (mean over leaves, last step)")
for epoch in range(1, epochs + 1):
  perm = rng.permutation(n)[:nb * bs].reshape(nb, bs)
  params, opt_state, losses = tr.run_epoch(params, opt_state, xs, y, jnp.asarray(perm), seed,
                                           (epoch - 1) * nb)
  sw = opt_state[0].source_weights
  row = []
  for m in range(M):
    ws = [np.asarray(w) for w, g in zip(jax.tree.leaves(sw), jax.tree.leaves(groups))
          if g == f"encoder/{m}"]
    w = np.mean(ws, axis=0)
    row.append(f"{d.modalities[m]}: fusion {w[0]:.2f} uni {w[1 + m]:.2f}")
  ev = tr.evaluate(params, d.x_test, d.y_test)
  if epoch in (1, 2) or epoch % max(1, epochs // 8) == 0 or epoch == epochs:
    print(f"epoch {epoch:3d} | " + " | ".join(row) + f" | fused {ev['fused_acc']:.3f} "
          f"branch {[round(b, 3) for b in ev['branch_acc']]} losses {np.round(np.asarray(losses), 3).tolist()}")
