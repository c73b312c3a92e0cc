"""PROTOTYPE (not in the library): BOGC with per-source scale-free precisions.

Diagnosis: bj.bogc's precision 1/var(batch-mean gradient) depends on each source's own
gradient scale, so a source whose loss is nearly converged (small gradients, small
variance: the fusion loss on the training set) gets the largest weight and the
unimodal losses, still learning, are down-weighted to ~1/3 (see
repro_bogc_prefers_small_gradients.py and diag_bogc_weights.py).

This prototype registers a method `bogc_snr`: identical to `bogc` except that the
variances handed to bj.bogc are divided, per source and per leaf, by that source's mean
squared batch-mean gradient on the leaf (its signal power), so the weights compare
noise-to-signal ratios instead of raw variances. The means (what gets combined) are
unchanged. Then it runs the committed CLI's main() with the remaining arguments.

usage: PYTHONPATH=. python experiments/analysis/proto_bogc_snr.py --dataset utdmhad2 --methods bogc_snr ...
"""
import sys
import jax, jax.numpy as jnp, optax
import bogc_jax as bj
from experiments import methods as M, run as R


def _make(ctx):
  h = ctx.hparams
  tx = optax.chain(bj.bogc(ctx.num_modalities + 1, kappa=h.get("kappa", 1.0),
                           gamma=h.get("gamma", 1.0)), ctx.base)

  def extra_args(params, batch, out, opt_state, key):
    del out, opt_state, key
    st = bj.source_grad_stats(ctx.fn.losses, params, batch, method=ctx.stats_method,
                              chunk_size=ctx.stats_chunk)

    def rel(mean, var):
      axes = tuple(range(1, mean.ndim))
      power = jnp.mean(jnp.square(mean), axis=axes, keepdims=True)
      return var / jnp.where(power > 0, power, 1.0)

    return {"grad_stats": bj.GradStats(st.count, st.mean, jax.tree.map(rel, st.mean, st.var))}

  return M.MethodParts(tx=tx, extra_args=extra_args)


M.register(M.MethodSpec("bogc_snr", "PROTOTYPE: BOGC with noise-to-signal (per-source "
                        "scale-free) precisions", False, ("bogc", "source_grad_stats"), _make))
sys.exit(R.main(sys.argv[1:]))
