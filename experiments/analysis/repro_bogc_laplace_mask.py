"""Minimal reproduction: `bogc_laplace` in experiments/methods.py calibrates nothing.

`_bogc_laplace` passes `mask=head_mask(params)` (the fusion head and the auxiliary heads)
to `bj.laplace_grad_stats`. Each of those output layers is touched by exactly ONE source
(fusion head: the fusion loss; head m: modality m's unimodal loss), and bogc passes a
coordinate touched by one source through unchanged (its statistics' mean). The encoders,
the only parameters two sources share, get no statistics, so bogc leaves them alone:
the method is joint_uni with Monte Carlo head gradients. Masking the last layer of each
encoder instead (shared by the fusion and the unimodal loss) does calibrate.

Run: python experiments/analysis/repro_bogc_laplace_mask.py   (a few seconds on CPU)
"""
import jax
import jax.numpy as jnp
import optax
import bogc_jax as bj

k = jax.random.split(jax.random.key(0), 6)
params = {"enc": {"w": jax.random.normal(k[0], (5, 4))},   # shared by both sources
          "fusion_head": {"w": jax.random.normal(k[1], (4, 3))},
          "head": {"w": jax.random.normal(k[2], (4, 3))}}
x = jax.random.normal(k[3], (16, 5))
y = jax.random.randint(k[4], (16,), 0, 3)

def losses_fn(p, batch):
  x, y = batch
  h = jnp.tanh(x @ p["enc"]["w"])
  ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y)
  return jnp.stack([ce(h @ p["fusion_head"]["w"]), ce(h @ p["head"]["w"])])  # [S=2, B]

grads = jax.grad(lambda p: jnp.sum(jnp.mean(losses_fn(p, (x, y)), axis=1)))(params)
tx = bj.bogc(2)
for name, mask in [("heads (as in methods._bogc_laplace)",
                    {"enc": {"w": False}, "fusion_head": {"w": True}, "head": {"w": True}}),
                   ("shared encoder layer", {"enc": {"w": True}, "fusion_head": {"w": False},
                                             "head": {"w": False}})]:
  stats = bj.laplace_grad_stats(losses_fn, params, (x, y), k[5], mask=mask, method="vmap")
  upd, st = tx.update(grads, tx.init(params), params, grad_stats=stats)
  print(f"mask = {name}")
  for leaf in ("enc", "fusion_head", "head"):
    changed = float(jnp.max(jnp.abs(upd[leaf]["w"] - grads[leaf]["w"])))
    print(f"  {leaf:12s} source_weights {[round(float(v), 3) for v in st.source_weights[leaf]['w']]}"
          f"  max|update - grad| {changed:.3g}")
