"""The per-leaf rule: per-example gradients of one leaf only, for any tap.

Scales and biases (``mul``/``add`` with a broadcast parameter, e.g. LayerNorm), tied
weights, reparameterised or ``custom_jvp`` uses: for each example ``i`` and source ``s``,

1. the cotangent of each tap's parameter operand ``v``:
   ``h = vjp(v -> tap output)(delta[s, i])`` (:func:`operand_cotangents`; for
   ``add``/``sub``/``mul`` with a broadcast operand, a sum of ``delta`` or ``x delta`` over
   the broadcast axes);
2. the leaf's gradient ``g[s, i] = vjp(p -> all v)(h)`` through the parameter's own
   (batch-free) program (:func:`leaf_pullback`).

The gradients are streamed a chunk of examples at a time, so memory stays bounded.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bogc_jax import _moments
from bogc_jax._fast_stats import kernels
from bogc_jax._fast_stats import program as prog


def group_uses(uses) -> list[tuple]:
    """``[(node, pos)]`` -> ``[(node, [positions])]``, one entry per tap, in order."""
    grouped: list[tuple] = []
    for node, pos in uses:
        for entry in grouped:
            if entry[0] is node:
                entry[1].append(pos)
                break
        else:
            grouped.append((node, [pos]))
    return grouped


def _is_example_dependent(job: kernels.LeafJob, v) -> bool:
    return isinstance(v, prog.Var) and v in job.program.example_dependent


def _value(job: kernels.LeafJob, v, chunk_inputs):
    """``v``'s value: a chunk of per-example values, or a batch-free one."""
    if _is_example_dependent(job, v):
        return chunk_inputs[id(v)]
    return prog.read(job.base_env, v)


def _is_broadcast_elementwise(node, positions) -> bool:
    """``add``/``sub``/``mul`` with the one parameter operand of the output's rank."""
    return (
        node.name in ("add", "sub", "mul")
        and len(positions) == 1
        and len(node.invars[positions[0]].aval.shape) == len(node.outvars[0].aval.shape)
    )


def _broadcast_cotangent(job: kernels.LeafJob, node, pos, chunk_inputs, delta):
    """Per example: the operand's cotangent, ``delta`` (times the other factor for ``mul``)
    summed over the axes the operand is broadcast along."""
    out_shape = node.outvars[0].aval.shape
    v_shape = tuple(node.invars[pos].aval.shape)
    h = delta[0].astype(job.dtype)
    if node.name == "sub" and pos == 1:
        h = -h
    elif node.name == "mul":
        other_var = node.invars[1 - pos]
        other = _value(job, other_var, chunk_inputs)
        if not _is_example_dependent(job, other_var):
            other = jnp.asarray(other)[None]
        h = h * other.astype(job.dtype)
    axes = tuple(1 + d for d, (a, b) in enumerate(zip(v_shape, out_shape)) if a == 1 and b != 1)
    return [jnp.sum(h, axis=axes, keepdims=True) if axes else h]


def _vjp_cotangents(job: kernels.LeafJob, node, positions, chunk_inputs, delta):
    """Per example: the cotangents of ``node``'s operands at ``positions``, by ``vjp``."""
    ex = [_is_example_dependent(job, v) for v in node.invars]
    floats = [i for i, v in enumerate(node.outvars) if prog.is_float(v.aval)]

    def one(ins, cts):
        def apply(*ops):
            full = list(ins)
            for p, o in zip(positions, ops):
                full[p] = o
            res = prog.bind(node, full)
            return [res[i] for i in floats]

        outs, vjp = jax.vjp(apply, *[ins[p] for p in positions])
        typed = [_moments.typed_like(c, o) for c, o in zip(cts, outs)]
        return [x.astype(job.dtype) for x in vjp(typed)]

    vals = [_value(job, v, chunk_inputs) for v in node.invars]
    cts = [
        delta[i]
        if delta[i] is not None
        else jnp.zeros(node.outvars[i].aval.shape, node.outvars[i].aval.dtype)
        for i in floats
    ]
    in_axes = (
        [0 if e else None for e in ex],
        [0 if delta[i] is not None else None for i in floats],
    )
    return jax.vmap(one, in_axes=in_axes)(vals, cts)


def operand_cotangents(job: kernels.LeafJob, node, positions, chunk_inputs, delta):
    """Per example: the cotangents of the tap ``node``'s parameter operands ``positions``."""
    if _is_broadcast_elementwise(node, positions):
        return _broadcast_cotangent(job, node, positions[0], chunk_inputs, delta)
    return _vjp_cotangents(job, node, positions, chunk_inputs, delta)


def leaf_pullback(job: kernels.LeafJob, operand_vars):
    """``hs -> g``: cotangents of the taps' operands -> the leaf's gradient (one example)."""
    pvar = job.program.param_vars[job.k]

    def operands_of(p_value):  # the leaf's own program: p -> every tap operand
        env = dict(job.base_env)
        env[pvar] = p_value
        prog.run(job.plan.subgraph, env)
        return [prog.read(env, v) for v in operand_vars]

    def pull_back(hs):
        outs, vjp = jax.vjp(operands_of, job.base_env[pvar])
        hs = [_moments.typed_like(h.astype(o.dtype), o) for h, o in zip(hs, outs)]
        return vjp(hs)[0].astype(job.dtype)

    return pull_back


def _leaf_grads_fn(job: kernels.LeafJob, uses):
    """A chunk of ``(inputs, cotangents)`` of ``c`` examples -> ``[c, S, *leaf_shape]``."""
    operand_vars = [node.invars[p] for node, positions in uses for p in positions]
    pull_back = leaf_pullback(job, operand_vars)

    def grads_fn(xs):
        chunk_inputs, chunk_cts = xs
        c = jax.tree.leaves(chunk_cts)[0].shape[0]
        per_source = []
        for s in job.sources:
            hs = []
            for node, positions in uses:
                delta = chunk_cts.get((s, node.index))
                if delta is None:
                    shapes = [tuple(node.invars[p].aval.shape) for p in positions]
                    hs.extend(jnp.zeros((c,) + shape, job.dtype) for shape in shapes)
                else:
                    hs.extend(operand_cotangents(job, node, positions, chunk_inputs, delta))
            per_source.append(jax.vmap(pull_back)(hs))
        return jnp.stack(per_source, axis=1)

    return grads_fn


def per_leaf_moments(job: kernels.LeafJob):
    """Exact moments from per-example gradients of leaf ``job.k`` only, streamed in chunks."""
    uses = group_uses(job.plan.uses)
    example_ids = sorted(
        {id(v) for node, _ in uses for v in node.invars if _is_example_dependent(job, v)}
    )
    cts = {
        (s, node.index): job.deltas[(s, node.index)]
        for s in job.sources
        for node, _ in uses
        if (s, node.index) in job.deltas
    }
    leaf_size = math.prod(job.program.param_vars[job.k].aval.shape)
    chunk = kernels.chunk_for(job.n, len(job.sources) * leaf_size)
    xs = ({i: job.inputs[i] for i in example_ids}, cts)
    return kernels.streamed_moments(_leaf_grads_fn(job, uses), xs, job.n, chunk)
