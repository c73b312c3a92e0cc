"""Where does BOGC move the weight? Mean source weights on each encoder during training.

Trains `bogc` (or a variant) with the experiment suite's Trainer (same model, data and
batch order as `python -m experiments.run`) and prints, after some epochs, the BogcState
diagnostics averaged over each encoder's leaves: the weight of the fusion source and of
that modality's unimodal source, relative to the fixed-weight sum (1 = unchanged; the two
sum to 2 on every coordinate both touch).

usage: PYTHONPATH=. python experiments/analysis/diag_bogc_weights.py DATASET METHOD EPOCHS [optimizer] [seed]
"""

import sys

import jax
import numpy as np

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models, train

dataset_name, method, num_epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
optimizer = sys.argv[4] if len(sys.argv) > 4 else "adam"
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
dataset = data_lib.load_dataset(dataset_name)
cfg = config_lib.dataset_config(dataset_name, epochs=num_epochs, optimizer=optimizer)
trainer = train.Trainer(dataset, method, cfg)
_, initial = train.make_model(dataset, cfg, seed)
groups = jax.tree.leaves(models.param_groups(initial))
print(
    f"{dataset_name} {method} {optimizer}: modalities {dataset.modalities}; per encoder m: "
    "[weight of fusion source, weight of unimodal source m] (mean over leaves, last step)"
)
for epoch, params, opt_state, losses in trainer.epochs(seed):
    if not (epoch in (1, 2) or epoch % max(1, num_epochs // 8) == 0 or epoch == num_epochs):
        continue
    weights = jax.tree.leaves(opt_state[0].source_weights)
    row = []
    for m, name in enumerate(dataset.modalities):
        w = np.mean([np.asarray(w) for w, g in zip(weights, groups) if g == f"encoder/{m}"], axis=0)
        row.append(f"{name}: fusion {w[0]:.2f} uni {w[1 + m]:.2f}")
    ev = trainer.evaluate(params, dataset.x_test, dataset.y_test)
    print(
        f"epoch {epoch:3d} | " + " | ".join(row) + f" | fused {ev['fused_acc']:.3f} branch "
        f"{[round(b, 3) for b in ev['branch_acc']]} losses {[round(float(x), 3) for x in losses]}"
    )
