"""Per-example output cotangents of every tap: one backward pass per source.

Each tap's output ``y`` is perturbed by a zero-valued ``p`` and the source's loss of one
example is differentiated with respect to ``p``: the result is ``delta[s, i] = d loss[s, i]
/ d y_i``, the cotangent the rules combine with the tap's inputs. Vmapped over the
examples, a source runs only the part of the program its loss depends on, and skips the
taps it does not reach.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bogc_jax import _moments
from bogc_jax._fast_stats import program as prog
from bogc_jax._fast_stats.plan import Program


def cotangents(program: Program, param_leaves, example_leaves, num_sources, tap_nodes):
    """Per-source cotangents of the taps' outputs and the taps' example inputs, batched.

    Returns ``(deltas, inputs)``: ``deltas[(s, node_index)]`` is a list (one per output of
    the tap; None for non-float outputs) of ``[B, *out_shape]`` arrays for each source ``s``
    that reaches the tap; ``inputs[id(var)]`` holds the example-dependent inputs of the taps.
    """
    nodes, producer = program.nodes, program.producer
    targets = prog.source_targets(program.outvar, num_sources, producer)
    tap_index = {node.index for node in tap_nodes}
    input_vars = {}
    for node in tap_nodes:
        for v in node.invars:
            if isinstance(v, prog.Var) and v in program.example_dependent:
                input_vars[id(v)] = v
    per_source = []
    for var, idx in targets:
        needed = prog.needed(nodes, producer, [var])
        taps = [n for n in needed if n.index in tap_index]
        per_source.append((var, idx, needed, taps))

    def per_example(p_leaves, e_leaves):
        deltas, inputs = {}, {}
        for s, (var, idx, needed, taps) in enumerate(per_source):
            if not taps:
                continue
            wanted = {
                i: v
                for i, v in input_vars.items()
                if i not in inputs and any(v is u for n in taps for u in n.invars)
            }

            def loss_s(perturb, needed=needed, var=var, idx=idx, wanted=wanted):
                env = dict(zip(program.param_vars, p_leaves))
                env.update(zip(program.example_vars, e_leaves))
                prog.run(needed, env, perturb)
                out = prog.read(env, var)
                value = out[idx] if idx else out
                return value, {i: env[v] for i, v in wanted.items()}

            zeros = {
                n.index: [
                    _moments.varying_zeros(v.aval) if prog.is_float(v.aval) else None
                    for v in n.outvars
                ]
                for n in taps
            }
            value, vjp, aux = jax.vjp(loss_s, zeros, has_aux=True)
            (cts,) = vjp(jnp.ones_like(value))
            for n in taps:
                deltas[(s, n.index)] = cts[n.index]
            inputs.update(aux)
        return deltas, inputs

    return jax.vmap(per_example, in_axes=(None, 0))(list(param_leaves), list(example_leaves))
