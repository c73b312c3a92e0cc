"""PROTOTYPE (not committed to experiments/): `bogc_laplace` with the Laplace posterior on
each encoder's LAST layer (the parameters the fusion and the unimodal loss share) instead
of on the output heads. experiments/methods.py's `_bogc_laplace` masks the heads, each of
which only one source touches, so bogc calibrates nothing there (see
repro_bogc_laplace_mask.py); this is the reading the library's docstring describes ("the
last layer before each modality's output"). Then it runs the committed CLI's main().

usage: PYTHONPATH=. python experiments/analysis/proto_bogc_laplace_encoder.py --dataset utdmhad2 --methods bogc_laplace_enc ...
"""
import sys
import jax, optax
import bogc_jax as bj
from experiments import methods as M, run as R


def last_encoder_layer_mask(params):
  def flag(path, _):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if not keys or keys[0] != "encoders":
      return False
    enc = params["encoders"][keys[1]]
    if "out" in enc:
      return keys[2] == "out"
    if "layers" in enc:  # MLP encoder: its last Linear
      return keys[2] == "layers" and keys[3] == len(enc["layers"]) - 1
    return False
  return jax.tree_util.tree_map_with_path(flag, params)


def _make(ctx):
  h = ctx.hparams
  mask = last_encoder_layer_mask(ctx.params)
  tx = optax.chain(bj.bogc(ctx.num_modalities + 1, kappa=h.get("kappa", 1.0),
                           gamma=h.get("gamma", 1.0)), ctx.base)

  def extra_args(params, batch, out, opt_state, key):
    del out, opt_state
    return {"grad_stats": bj.laplace_grad_stats(ctx.fn.losses, params, batch, key, mask=mask,
                                                num_samples=8, method=ctx.stats_method,
                                                chunk_size=ctx.stats_chunk)}

  return M.MethodParts(tx=tx, extra_args=extra_args)


M.register(M.MethodSpec("bogc_laplace_enc", "PROTOTYPE: BOGC, Laplace posterior on each "
                        "encoder's last layer (8 draws)", False, ("bogc", "laplace_grad_stats"),
                        _make))
sys.exit(R.main(sys.argv[1:]))
