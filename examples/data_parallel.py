"""Data-parallel training with bogc (or cggm) on 8 fake CPU devices, three ways.

A two-modality Flax NNX model (one encoder per modality, a fusion head and one unimodal
head per modality) learns a synthetic task in which modality 0 is informative and
modality 1 only weakly so. The batch is split over 8 devices in one of three ways:

- ``jit``: global arrays sharded with a ``NamedSharding`` on a mesh. The step is the
  single-device step; no ``axis_name``: XLA inserts the collectives.
- ``shard_map``: the step sees its device's examples; ``axis_name="data"`` makes
  ``bj.source_grad_stats`` and ``bj.metrics`` reduce over the devices.
- ``pmap``: the same per-device step, for code bases that still use ``jax.pmap``.

``--parallel all`` runs the three and a single-device run, and prints how far apart the
final parameters are (float rounding only). The script fakes 8 devices by setting
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts (unless
``XLA_FLAGS`` already sets a device count), so it runs on any CPU, in well under a minute
on two cores:

    python examples/data_parallel.py --parallel all
    python examples/data_parallel.py --method cggm --parallel shard_map
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

import bogc_jax as bj  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_CLASSES = 4
DIMS = (12, 10)


class TwoModalNet(nnx.Module):
  """One encoder per modality, a concat fusion head, one unimodal head per modality."""

  def __init__(self, dims, hidden, num_classes, *, rngs: nnx.Rngs):
    self.encoders = nnx.List([nnx.Linear(d, hidden, rngs=rngs) for d in dims])
    self.fusion_head = nnx.Linear(hidden * len(dims), num_classes, rngs=rngs)
    self.unimodal_heads = nnx.List(
        [nnx.Linear(hidden, num_classes, rngs=rngs) for _ in dims])

  def __call__(self, xs):
    feats = [nnx.relu(enc(x)) for enc, x in zip(self.encoders, xs)]
    fused = self.fusion_head(jnp.concatenate(feats, axis=-1))
    return fused, [head(h) for head, h in zip(self.unimodal_heads, feats)]


def make_data(n, seed):
  """Modality 0 carries the class clearly, modality 1 faintly."""
  task = np.random.default_rng(1234)  # the same class centres for every split
  centres = [task.normal(size=(NUM_CLASSES, d)).astype(np.float32) for d in DIMS]
  rng = np.random.default_rng(seed)
  y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
  xs = [c[y] * s + rng.normal(size=(n, d)).astype(np.float32)
        for c, s, d in zip(centres, (0.6, 0.35), DIMS)]
  return xs, y


def build(method, seed, stats_method="auto"):
  model = TwoModalNet(DIMS, 32, NUM_CLASSES, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)  # params: a pytree of arrays

  def apply(p, xs):
    return nnx.merge(graphdef, p)(xs)

  def losses_fn(p, batch):  # [3, B]: fusion loss, then one unimodal loss per modality
    xs, y = batch
    fused, unimodal = apply(p, xs)
    ce = optax.softmax_cross_entropy_with_integer_labels
    return jnp.stack([ce(fused, y)] + [ce(u, y) for u in unimodal])

  if method == "bogc":
    tx = optax.chain(bj.bogc(num_sources=3), optax.adam(3e-3))
  else:
    labels = bj.label_params(model, {"encoders": bj.labels.INDEX, "fusion_head": None,
                                     "unimodal_heads": None})
    tx = optax.chain(bj.cggm(labels, rho=1.3), optax.clip_by_global_norm(0.8),
                     optax.adam(3e-3))

  def step(p, opt_state, batch, parallel="single"):
    """One training step. Under shard_map and pmap ``batch`` is this device's share."""
    axis_name = "data" if parallel in ("shard_map", "pmap") else None
    if method == "bogc":
      stats = bj.source_grad_stats(losses_fn, p, batch, method=stats_method,
                                   axis_name=axis_name)
      grads, extra = stats.fixed_weight_grads(), {"grad_stats": stats}
    else:
      xs, y = batch
      _, unimodal = apply(p, xs)
      scores = jnp.stack([bj.metrics.accuracy(u, y, axis_name=axis_name)
                          for u in unimodal])
      local_loss = lambda q: jnp.sum(jnp.mean(losses_fn(q, batch), axis=1))
      if parallel == "pmap":
        # Each device differentiates its own loss; average the gradients.
        grads = jax.lax.pmean(jax.grad(local_loss)(p), axis_name)
      elif parallel == "shard_map":
        # Differentiate the global mean loss: for the replicated params JAX sums the
        # per-device contributions itself (averaging them again would count 8 times).
        grads = jax.grad(lambda q: jax.lax.pmean(local_loss(q), axis_name))(p)
      else:  # one device, or jit over global arrays: the batch is the whole batch
        grads = jax.grad(local_loss)(p)
      extra = {"modality_scores": scores}
    updates, opt_state = tx.update(grads, opt_state, p, **extra)
    return optax.apply_updates(p, updates), opt_state

  return params, tx, step, apply


def train(method, parallel, *, steps, batch_size, seed=0, log_every=0,
          stats_method="auto"):
  params, tx, step, apply = build(method, seed, stats_method)
  opt_state = tx.init(params)
  xs, y = make_data(steps * batch_size, seed + 1)
  n = jax.device_count()
  # Auto axes: XLA's partitioner places the collectives (jax.make_mesh's default in
  # recent JAX is Explicit axes, sharding in types).
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  if parallel == "single":
    run = jax.jit(step)
  elif parallel == "jit":
    params, opt_state = jax.device_put((params, opt_state), replicated)
    run = jax.jit(step)
  elif parallel == "shard_map":
    params, opt_state = jax.device_put((params, opt_state), replicated)
    run = jax.jit(jax.shard_map(lambda p, s, b: step(p, s, b, "shard_map"), mesh=mesh,
                                in_specs=(P(), P(), P("data")), out_specs=(P(), P())))
  else:  # pmap: params and state replicated (in_axes=None), the batch split on axis 0
    mapped = jax.pmap(lambda p, s, b: step(p, s, b, "pmap"), axis_name="data",
                      in_axes=(None, None, 0))

    def run(p, s, b):
      b = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), b)
      p, s = mapped(jax.tree.map(np.asarray, p), jax.tree.map(np.asarray, s), b)
      return jax.tree.map(lambda x: np.asarray(x)[0], (p, s))

  for i in range(steps):
    sl = slice(i * batch_size, (i + 1) * batch_size)
    batch = ([x[sl] for x in xs], y[sl])
    if parallel in ("jit", "shard_map"):
      batch = jax.device_put(batch, split)
    params, opt_state = run(params, opt_state, batch)
    if log_every and (i + 1) % log_every == 0:
      test_xs, test_y = make_data(512, seed + 2)
      fused, unimodal = apply(jax.device_get(params), test_xs)
      acc = lambda logits, y=test_y: float(np.mean(np.argmax(np.asarray(logits), -1) == y))
      print(f"  step {i + 1:4d}: test accuracy fused {acc(fused):.3f}, "
            f"modality 0 head {acc(unimodal[0]):.3f}, modality 1 head "
            f"{acc(unimodal[1]):.3f}")
  return jax.device_get(params)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", choices=("bogc", "cggm"), default="bogc")
  parser.add_argument("--parallel", choices=("jit", "shard_map", "pmap", "all"),
                      default="jit")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--stats-method", choices=("auto", "fast", "vmap"), default="auto",
                      help="how bogc's per-example statistics are computed")
  args = parser.parse_args(argv)
  if args.batch_size % jax.device_count():
    parser.error(f"--batch-size must be a multiple of the {jax.device_count()} devices")
  print(f"{jax.device_count()} devices ({jax.devices()[0].platform}); method "
        f"{args.method}; batch {args.batch_size} = {jax.device_count()} x "
        f"{args.batch_size // jax.device_count()}")
  ways = ("jit", "shard_map", "pmap") if args.parallel == "all" else (args.parallel,)
  finals = {}
  for way in ways:
    start = time.perf_counter()
    print(f"{way}:")
    finals[way] = train(args.method, way, steps=args.steps, batch_size=args.batch_size,
                        log_every=args.steps // 3, stats_method=args.stats_method)
    print(f"  {time.perf_counter() - start:.1f} s")
  if args.parallel == "all":
    finals["single"] = train(args.method, "single", steps=args.steps,
                             batch_size=args.batch_size, stats_method=args.stats_method)
    for way in ways:
      diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree.leaves(finals[way]),
                                 jax.tree.leaves(finals["single"])))
      print(f"max |params({way}) - params(one device)| after {args.steps} steps: "
            f"{diff:.2e}")
  return finals


if __name__ == "__main__":
  main()
