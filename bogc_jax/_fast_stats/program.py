"""The program of the per-example losses as a flat list of equations, and how to run it.

``losses_fn`` is traced to a jaxpr for one example; nested ``jit`` calls and ``checkpoint``
blocks are inlined (:func:`flatten`), so every equation is one primitive application
(:class:`Node`) on values (:class:`Var`) or constants (:class:`Lit`). A node list can be
evaluated on any values (:func:`run`), with a perturbation added to chosen outputs, and cut
down to what some targets depend on (:func:`needed`); :func:`source_targets` finds where
each source's loss is computed, so that a source only runs its own part of the program.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

# Call-like primitives whose body is inlined, and the parameter holding the body.
_INLINED = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}


class Var:
    """A value of the flattened program (identity-hashed)."""

    __slots__ = ("aval",)

    def __init__(self, aval):
        self.aval = aval


class Lit:
    """A literal or a closed-over constant."""

    __slots__ = ("val", "aval")

    def __init__(self, val, aval):
        self.val = val
        self.aval = aval


class Node:
    """One primitive application: the original equation with renamed operands."""

    __slots__ = ("index", "eqn", "invars", "outvars")

    def __init__(self, index, eqn, invars, outvars):
        self.index = index
        self.eqn = eqn
        self.invars = invars
        self.outvars = outvars

    @property
    def name(self) -> str:
        return self.eqn.primitive.name

    @property
    def params(self):
        return self.eqn.params


def flatten(closed) -> tuple[list[Node], list[Var], list]:
    """Inline nested ``jit``/``checkpoint`` calls; returns nodes, invars, outvars."""
    nodes: list[Node] = []

    def go(jaxpr, consts, args):
        env = {}

        def read(v):
            if isinstance(v, jex_core.Literal):
                return Lit(v.val, v.aval)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = Lit(c, v.aval)
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            key = _INLINED.get(eqn.primitive.name)
            sub = eqn.params.get(key) if key else None
            if isinstance(sub, jex_core.ClosedJaxpr):
                outs = go(sub.jaxpr, sub.consts, ins)
            elif isinstance(sub, jex_core.Jaxpr) and not sub.constvars:
                outs = go(sub, [], ins)
            else:
                outs = [Var(v.aval) for v in eqn.outvars]
                nodes.append(Node(len(nodes), eqn, ins, outs))
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]

    invars = [Var(v.aval) for v in closed.jaxpr.invars]
    outvars = go(closed.jaxpr, closed.consts, invars)
    return nodes, invars, outvars


def bind(node: Node, invals) -> list:
    """Apply a node's primitive to values (as ``jax.core.eval_jaxpr`` does)."""
    params = node.eqn.primitive.get_bind_params(node.params)
    with node.eqn.ctx.manager:
        out = node.eqn.primitive.bind(*invals, **params)
    return list(out) if node.eqn.primitive.multiple_results else [out]


def read(env, v):
    """The value of ``v`` in ``env`` (a constant's own value)."""
    return env[v] if isinstance(v, Var) else v.val


def run(nodes, env, perturb=None) -> None:
    """Evaluate ``nodes`` in order into ``env`` (adding ``perturb[index]`` to outputs)."""
    for node in nodes:
        outs = bind(node, [read(env, v) for v in node.invars])
        if perturb is not None and node.index in perturb:
            outs = [o if p is None else o + p for o, p in zip(outs, perturb[node.index])]
        for v, o in zip(node.outvars, outs):
            env[v] = o


def is_float(aval) -> bool:
    """Whether ``aval`` has an inexact dtype (it can carry a cotangent)."""
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def has_subprograms(node: Node) -> bool:
    """Whether ``node`` holds jaxprs of its own (``scan``, ``while``, ``cond``, ...)."""
    return bool(list(jex_core.jaxprs_in_params(node.params)))


def needed(nodes, producer, targets) -> list[Node]:
    """The nodes ``targets`` depend on, in program order (dead-code elimination)."""
    keep = set()
    stack = [v for v in targets if isinstance(v, Var)]
    seen = set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        node = producer.get(v)
        if node is None or node.index in keep:
            continue
        keep.add(node.index)
        stack.extend(u for u in node.invars if isinstance(u, Var))
    return [n for n in nodes if n.index in keep]


def _step_back(node: Node, var, idx):
    """One step from ``var[idx]`` back to the operand entry it copies, or None."""
    name = node.name
    src = node.invars[0]
    if name in ("squeeze", "reshape", "expand_dims") or (
        name == "broadcast_in_dim" and math.prod(src.aval.shape) == math.prod(var.aval.shape)
    ):
        if name == "reshape" and node.params.get("dimensions") is not None:
            return None
        flat = int(np.ravel_multi_index(idx, var.aval.shape)) if idx else 0
        return src, tuple(int(i) for i in np.unravel_index(flat, src.aval.shape))
    if name == "broadcast_in_dim":
        dims = node.params["broadcast_dimensions"]
        return src, tuple(0 if src.aval.shape[k] == 1 else idx[d] for k, d in enumerate(dims))
    if name in ("convert_element_type", "copy", "copy_p"):
        return src, idx
    if name == "transpose":
        new = [0] * len(idx)
        for j, p in enumerate(node.params["permutation"]):
            new[p] = idx[j]
        return src, tuple(new)
    if name == "slice":
        strides = node.params["strides"] or (1,) * len(idx)
        return src, tuple(
            st + i * k for st, i, k in zip(node.params["start_indices"], idx, strides)
        )
    if name == "stack":
        axis = node.params["axis"]
        return node.invars[idx[axis]], idx[:axis] + idx[axis + 1 :]
    if name == "concatenate":
        axis = node.params["dimension"]
        pos = idx[axis]
        for operand in node.invars:
            size = operand.aval.shape[axis]
            if pos < size:
                return operand, idx[:axis] + (pos,) + idx[axis + 1 :]
            pos -= size
    return None


def source_targets(outvar, num_sources, producer) -> list[tuple]:
    """``(var, index)`` per source: walks back through stacking so sources split apart.

    ``losses[s]`` is traced back through ``squeeze``/``reshape``/``stack``/``concatenate``/
    ``slice``/``broadcast_in_dim``/``transpose``/casts, so a source built separately (e.g.
    with ``jnp.stack``) depends only on its own part of the program.
    """
    targets = []
    for s in range(num_sources):
        var, idx = outvar, (s,)
        while isinstance(var, Var) and var in producer:
            step = _step_back(producer[var], var, idx)
            if step is None:
                break
            var, idx = step
        targets.append((var, idx))
    return targets
