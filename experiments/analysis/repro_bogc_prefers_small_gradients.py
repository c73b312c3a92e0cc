"""Minimal reproduction: BOGC's precision weights favour the source with the SMALLER gradients.

Two sources touch the same coordinates. Their per-example gradients have the same
signal-to-noise ratio, but source 0 is scaled by c (a nearly converged loss, e.g. the
fusion loss late in training, has small gradients and hence small variance). The
precision lam = 1 / var(batch-mean gradient) is not invariant to a per-source scale, so
bogc gives source 0 (small, uninformative) the larger weight and down-weights source 1
(the loss still learning, e.g. the weak modality's unimodal loss): with the defaults the
relative weights approach 5/3 and 1/3. With noise="relative" (each source's noise in
units of its own signal) the two sources are equally precise at every scale: the plain
sum. Output: relative source weights (1 = plain sum).

Run: PYTHONPATH=. python experiments/analysis/repro_bogc_prefers_small_gradients.py
"""

import jax
import jax.numpy as jnp

import bogc_jax as bj

n, d = 32, 100
g = 1.0 + jax.random.normal(jax.random.key(0), (2, n, d))  # per-example gradients, SNR 1
for c in (1.0, 0.3, 0.1, 0.01):
    per_example = g * jnp.array([c, 1.0])[:, None, None]
    stats = bj.GradStats(
        jnp.asarray(n, jnp.float32), {"w": per_example.mean(1)}, {"w": per_example.var(1, ddof=1)}
    )
    for agg, noise in (
        ("dempster", "absolute"),
        ("precision", "absolute"),
        ("dempster", "relative"),
    ):
        tx = bj.bogc(num_sources=2, aggregation=agg, noise=noise)
        upd, st = tx.update(
            stats.fixed_weight_grads(), tx.init({"w": jnp.zeros(d)}), grad_stats=stats
        )
        w = [round(float(x), 3) for x in st.source_weights["w"]]
        share1 = float(jnp.mean(upd["w"]) / jnp.mean(stats.mean["w"][1]))
        print(
            f"scale of source 0 c={c:<5} {agg:9s} {noise:8s}: relative weights [src0, src1] = {w}; "
            f"update / mean grad of src1 = {share1:.3f} (plain sum: {1 + c:.3f})"
        )
