"""Per-source mean gradients only: one backward pass per source over what it reaches.

``mean[s] = d/d params (1/n) sum_i loss[s, i]``, by reverse-mode autodiff of the batched
program of source ``s`` alone (:func:`~bogc_jax._fast_stats.program.source_targets` splits
a stacked output into its rows), so each source's backward pass skips the layers it does
not reach, and no squared product is formed. What MMPareto reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bogc_jax import _moments
from bogc_jax._fast_stats import program as prog
from bogc_jax._fast_stats.plan import trace


def fast_means(losses_fn, params, batch, num_sources: int) -> list:
    """``[S, *leaf]`` mean gradients per parameter leaf (in flat order), float32 or wider."""
    program, _, param_leaves, example_leaves = trace(losses_fn, params, batch)
    targets = prog.source_targets(program.outvar, num_sources, program.producer)
    per_source = []
    for var, idx in targets:
        needed = prog.needed(program.nodes, program.producer, [var])

        def mean_loss(p_leaves, needed=needed, var=var, idx=idx):
            def one(e_leaves):
                env = dict(zip(program.param_vars, p_leaves))
                env.update(zip(program.example_vars, e_leaves))
                prog.run(needed, env)
                out = prog.read(env, var)
                return out[idx] if idx else out

            losses = jax.vmap(one)(list(example_leaves))
            return jnp.mean(losses.astype(_moments.accumulation_dtype(losses.dtype)))

        per_source.append(jax.grad(mean_loss)(list(param_leaves)))
    return [
        jnp.stack([g[k] for g in per_source]).astype(
            _moments.accumulation_dtype(jnp.result_type(leaf))
        )
        for k, leaf in enumerate(param_leaves)
    ]
