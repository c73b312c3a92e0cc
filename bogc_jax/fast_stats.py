"""Exact per-example gradient moments per layer, without per-example gradients of the model.

For an example ``i`` and a source ``s``, a dense layer ``y = x @ W`` has the per-example
gradient ``g[s, i] = x_i delta[s, i]^T``, where ``delta[s, i] = d loss[s, i] / d y_i`` is
the output cotangent of that layer. Every ``delta`` of every layer comes from one backward
pass per source: perturb each layer's output ``y`` by a zero-valued ``p`` and differentiate
the source's summed loss with respect to ``p``; as example ``i``'s loss reads only row
``i`` of ``y``, row ``i`` of the result is ``delta[s, i]``. The moments over the ``n``
examples then follow from the layer's inputs and cotangents alone (outer products over
the input and output features implied):

    mean = (1/n) sum_i x_i delta_i
    m2   = sum_i x_i**2 delta_i**2 - n mean**2                       (two products)

The second form loses about ``n mean**2 / m2`` units in the last place. Where that ratio
exceeds ``CANCELLATION_LIMIT`` anywhere in the layer, the layer is recomputed from
centred inputs ``x' = x - mean(x)`` (``d' = delta - mean(delta)``, ``c = (1/n) sum x' delta``):

    m2   = mean(x)**2 sum_i d'_i**2 + (sum_i x'_i**2 delta_i**2 - n c**2)
           + 2 mean(x) sum_i x'_i delta_i d'_i                       (three products)

which is exact too and squares only centred terms. The ``[n, D, K]`` per-example
gradients are never formed.

The layers are found in the program of ``losses_fn`` itself, so models need no change:
the per-example losses are traced to a jaxpr (nested ``jit`` calls and ``checkpoint``
blocks are inlined), every equation where a parameter (through its own batch-free
computation: reshapes, casts, ``softplus``, ...) meets data of the batch is a *tap*, and
a rule is chosen per parameter leaf (:func:`fast_stats_plan` shows which):

- ``dense``: ``dot_general`` with one position per weight and example (``[B, D]`` inputs,
  also grouped/batched einsums): the closed form above.
- ``embedding``: a row ``gather`` (``jnp.take``, ``nnx.Embed``): rows repeated within an
  example are summed first (``g_i[r]`` sums its positions), then exact centred moments
  over the touched rows; memory of the order of the cotangents.
- ``dense (shared positions)`` (``[B, T, D]`` inputs) and ``conv`` (1-D/2-D/3-D, any
  layout, strides, padding, kernel dilation; im2col): the per-example gradient sums over
  positions, whose square is not the sum of squares, so the per-example gradients of
  *that leaf only* are formed, a chunk of examples at a time.
- ``scale``/``bias`` (``mul``/``add`` with a broadcast parameter, e.g. LayerNorm) and any
  other tap (tied weights, reparameterised or ``custom_jvp`` uses): per-example gradients
  of that leaf only, likewise.
- unsupported (a parameter used inside ``scan``, ``while``, ``cond``, or one that reaches
  the losses without meeting the batch): ``method="auto"`` computes those leaves with
  ``vmap`` (the reference, chunked to bounded memory), ``method="fast"`` raises an error
  that names them.

Per-example gradients of one leaf are streamed in chunks of at most
``MATERIALISE_BUDGET`` numbers: exact two-pass moments per chunk, merged with Chan's
formula. Moments are kept in float32 (float64 stays float64).

Cost: one forward pass, one backward pass per source (a source built separately, e.g. a
row of ``jnp.stack``, skips the layers it does not reach), and the per-layer products.
Memory: the activations, the per-source cotangents of the taps and the chunks; never
``B x P``. Examples must be independent (no batch statistics), as for ``vmap``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from bogc_jax import stats as _stats

PyTree = Any

# Per-example gradients of one leaf are streamed over the batch in chunks holding at most
# this many numbers (examples x sources x leaf size): 2 MiB in float32, so that a chunk
# stays in cache between forming the gradients and taking their moments.
MATERIALISE_BUDGET = 1 << 19

# The vmap fallback materialises per-example gradients of the unsupported leaves (with
# the rest of a per-example backward pass) in chunks of at most this many numbers.
VMAP_FALLBACK_BUDGET = 1 << 23

# The dense rule's uncentred second moment loses about n mean**2 / m2 units in the last
# place; above this ratio it is recomputed from centred inputs (three products, not two).
CANCELLATION_LIMIT = 64.0

_INLINED = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}
_VIEWS = frozenset(
    {
        "reshape",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "transpose",
        "convert_element_type",
        "copy",
        "copy_p",
        "reduce_precision",
    }
)
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------
# A flat program: the jaxpr of the per-example losses with nested calls inlined.


class _Var:
    """A value of the flattened program (identity-hashed)."""

    __slots__ = ("aval",)

    def __init__(self, aval):
        self.aval = aval


class _Lit:
    """A literal or a closed-over constant."""

    __slots__ = ("val", "aval")

    def __init__(self, val, aval):
        self.val = val
        self.aval = aval


class _Node:
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


def _flatten(closed) -> tuple[list[_Node], list[_Var], list]:
    """Inline nested ``jit``/``checkpoint`` calls; returns nodes, invars, outvars."""
    nodes: list[_Node] = []

    def go(jaxpr, consts, args):
        env = {}

        def read(v):
            if isinstance(v, jex_core.Literal):
                return _Lit(v.val, v.aval)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = _Lit(c, v.aval)
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
                outs = [_Var(v.aval) for v in eqn.outvars]
                nodes.append(_Node(len(nodes), eqn, ins, outs))
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]

    invars = [_Var(v.aval) for v in closed.jaxpr.invars]
    outvars = go(closed.jaxpr, closed.consts, invars)
    return nodes, invars, outvars


def _bind(node: _Node, invals) -> list:
    """Apply a node's primitive to values (as ``jax.core.eval_jaxpr`` does)."""
    params = node.eqn.primitive.get_bind_params(node.params)
    with node.eqn.ctx.manager:
        out = node.eqn.primitive.bind(*invals, **params)
    return list(out) if node.eqn.primitive.multiple_results else [out]


def _run(nodes, env, perturb=None):
    """Evaluate ``nodes`` in order into ``env`` (adding ``perturb[index]`` to outputs)."""
    for node in nodes:
        ins = [env[v] if isinstance(v, _Var) else v.val for v in node.invars]
        outs = _bind(node, ins)
        if perturb is not None and node.index in perturb:
            outs = [o if p is None else o + p for o, p in zip(outs, perturb[node.index])]
        for v, o in zip(node.outvars, outs):
            env[v] = o


def _varying_axes(x) -> frozenset:
    aval = x if isinstance(x, jax.core.ShapedArray) else jax.typeof(x)
    mat = getattr(aval, "mat", None)
    axes = getattr(mat, "varying", None) if mat is not None else getattr(aval, "vma", None)
    return frozenset(axes or ())


def _zeros(aval):
    """Zeros of ``aval``'s shape, dtype and varying axes.

    A perturbation must vary over the axes its tap does: an invariant one would be summed
    over the devices in the backward pass.
    """
    z = jnp.zeros(aval.shape, aval.dtype)
    axes = tuple(_varying_axes(aval))
    return jax.lax.pcast(z, axes, to="varying") if axes else z


def _typed_like(x, ref):
    """``x`` marked varying over the mapped axes ``ref`` varies over (inside ``shard_map``)."""
    want, have = _varying_axes(ref), _varying_axes(x)
    missing = tuple(a for a in want if a not in have)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _is_float(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _has_subprograms(node: _Node) -> bool:
    return bool(list(jex_core.jaxprs_in_params(node.params)))


def _needed(nodes, producer, targets) -> list[_Node]:
    """The nodes ``targets`` depend on, in program order (dead-code elimination)."""
    keep = set()
    stack = [v for v in targets if isinstance(v, _Var)]
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
        stack.extend(u for u in node.invars if isinstance(u, _Var))
    return [n for n in nodes if n.index in keep]


def _source_targets(outvar, num_sources, producer):
    """``(var, index)`` per source: walks back through stacking so sources split apart.

    ``losses[s]`` is traced back through ``squeeze``/``reshape``/``stack``/``concatenate``/
    ``slice``/``broadcast_in_dim``/``transpose``/casts, so a source built separately (e.g.
    with ``jnp.stack``) depends only on its own part of the program.
    """
    targets = []
    for s in range(num_sources):
        var, idx = outvar, (s,)
        while isinstance(var, _Var) and var in producer:
            node = producer[var]
            name = node.name
            src = node.invars[0]
            if name in ("squeeze", "reshape", "expand_dims") or (
                name == "broadcast_in_dim"
                and math.prod(src.aval.shape) == math.prod(var.aval.shape)
            ):
                if name == "reshape" and node.params.get("dimensions") is not None:
                    break
                flat = int(np.ravel_multi_index(idx, var.aval.shape)) if idx else 0
                idx = tuple(int(i) for i in np.unravel_index(flat, src.aval.shape))
            elif name == "broadcast_in_dim":
                dims = node.params["broadcast_dimensions"]
                idx = tuple(0 if src.aval.shape[k] == 1 else idx[d] for k, d in enumerate(dims))
            elif name in ("convert_element_type", "copy", "copy_p"):
                pass
            elif name == "transpose":
                perm = node.params["permutation"]
                new = [0] * len(idx)
                for j, p in enumerate(perm):
                    new[p] = idx[j]
                idx = tuple(new)
            elif name == "slice":
                strides = node.params["strides"] or (1,) * len(idx)
                idx = tuple(
                    st + i * k for st, i, k in zip(node.params["start_indices"], idx, strides)
                )
            elif name == "stack":
                axis = node.params["axis"]
                src = node.invars[idx[axis]]
                idx = idx[:axis] + idx[axis + 1 :]
            elif name == "concatenate":
                axis = node.params["dimension"]
                pos = idx[axis]
                for operand in node.invars:
                    size = operand.aval.shape[axis]
                    if pos < size:
                        src = operand
                        break
                    pos -= size
                idx = idx[:axis] + (pos,) + idx[axis + 1 :]
            else:
                break
            var = src
        targets.append((var, idx))
    return targets


# ----------------------------------------------------------------------------------------
# Analysis: which equations are taps, and which rule serves each parameter leaf.


@dataclasses.dataclass
class _Plan:
    """How one parameter leaf's moments are computed."""

    rule: str  # "dense", "positions", "embedding", "per-layer", "zero" or "vmap"
    label: str  # what the user reads in fast_stats_plan
    uses: list = dataclasses.field(default_factory=list)  # [(node, operand position)]
    chain: list = dataclasses.field(default_factory=list)  # view nodes, leaf -> operand
    subgraph: list = dataclasses.field(default_factory=list)  # param-only nodes on the leaf
    reason: str = ""


@dataclasses.dataclass
class _Program:
    nodes: list
    param_vars: list
    example_vars: list
    outvar: Any
    producer: dict
    consumers: dict
    example_dependent: set
    deps: dict
    plans: list


def _trace(losses_fn, params, batch) -> tuple[_Program, Any, list, Any, list]:
    param_leaves, treedef = jax.tree.flatten(params)
    example_leaves, example_def = jax.tree.flatten(batch)
    one = _stats._per_example_loss_fn(losses_fn)  # pylint: disable=protected-access

    def flat_one(p_leaves, e_leaves):
        return one(jax.tree.unflatten(treedef, p_leaves), jax.tree.unflatten(example_def, e_leaves))

    # Inside shard_map, one example's values (not just shapes), so that their types vary
    # over the mapped axes as the batch does.
    first_example = [
        x[0] if _varying_axes(x) else jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x))
        for x in example_leaves
    ]
    closed = jax.make_jaxpr(flat_one)(list(param_leaves), first_example)
    nodes, invars, outvars = _flatten(closed)
    num_params = len(param_leaves)
    param_vars, example_vars = invars[:num_params], invars[num_params:]
    program = _analyse(nodes, param_vars, example_vars, outvars[0])
    return program, treedef, param_leaves, example_def, example_leaves


def _analyse(nodes, param_vars, example_vars, outvar) -> _Program:
    producer, consumers = {}, {}
    for node in nodes:
        for v in node.outvars:
            producer[v] = node
        for pos, v in enumerate(node.invars):
            if isinstance(v, _Var):
                consumers.setdefault(v, []).append((node, pos))
    example_dependent = set(example_vars)
    deps = {v: frozenset((k,)) for k, v in enumerate(param_vars)}
    empty = frozenset()
    boundary = []
    for node in nodes:
        ins = [v for v in node.invars if isinstance(v, _Var)]
        is_ex = any(v in example_dependent for v in ins)
        dep = frozenset().union(*(deps.get(v, empty) for v in ins))
        if is_ex and any(deps.get(v) and v not in example_dependent for v in ins):
            boundary.append(node)
        for v in node.outvars:
            if is_ex:
                example_dependent.add(v)
            if dep:
                deps[v] = dep

    def param_only(v):
        return isinstance(v, _Var) and bool(deps.get(v)) and v not in example_dependent

    plans = []
    for k, pvar in enumerate(param_vars):
        uses = [
            (node, pos)
            for node in boundary
            for pos, v in enumerate(node.invars)
            if param_only(v) and k in deps[v]
        ]
        subgraph = [
            node
            for node in nodes
            if all(v not in example_dependent for v in node.outvars)
            and any(k in deps.get(v, empty) for v in node.outvars)
        ]
        reaches_output = param_only(outvar) and k in deps[outvar]
        plans.append(_plan_leaf(k, pvar, uses, subgraph, reaches_output, consumers))
    return _Program(
        nodes, param_vars, example_vars, outvar, producer, consumers, example_dependent, deps, plans
    )


def _view_chain(pvar, operand, consumers, *, bijective):
    """The view nodes from ``pvar`` to ``operand`` if it is a simple chain, else None."""
    chain, cur = [], pvar
    while cur is not operand:
        users = consumers.get(cur, [])
        if len(users) != 1:
            return None
        node, _ = users[0]
        if node.name not in _VIEWS or len(node.outvars) != 1:
            return None
        if sum(isinstance(v, _Var) for v in node.invars) != 1:
            return None
        out = node.outvars[0]
        if not _is_float(out.aval):
            return None
        if (
            bijective
            and node.name == "broadcast_in_dim"
            and (math.prod(out.aval.shape) != math.prod(node.invars[0].aval.shape))
        ):
            return None
        chain.append(node)
        cur = out
    if len(consumers.get(operand, [])) != 1:
        return None
    return chain


def _plan_leaf(k, pvar, uses, subgraph, reaches_output, consumers) -> _Plan:
    del k
    if reaches_output:
        return _Plan(
            "vmap",
            "vmap (reaches the losses without meeting the batch)",
            reason="reaches the losses without meeting the batch",
        )
    for node, _ in uses:
        if _has_subprograms(node) and not node.name.startswith("custom_"):
            return _Plan(
                "vmap",
                f"vmap (used inside `{node.name}`)",
                reason=f"is used inside a `{node.name}` equation, which the fast path "
                "does not look into",
            )
    if not uses:
        return _Plan("zero", "zero (does not affect the losses)")
    if len(uses) == 1:
        node, pos = uses[0]
        operand = node.invars[pos]
        chain = _view_chain(pvar, operand, consumers, bijective=True)
        if chain is not None:
            if node.name == "dot_general":
                if _dense_positions(node, pos) == 1:
                    return _Plan("dense", "dense", uses, chain, subgraph)
                return _Plan("positions", "dense (shared positions)", uses, chain, subgraph)
            if node.name == "conv_general_dilated" and pos == 1 and _is_plain_conv(node):
                return _Plan("positions", "conv", uses, chain, subgraph)
            if node.name == "gather" and pos == 0 and _is_row_gather(node):
                return _Plan("embedding", "embedding", uses, chain, subgraph)
        label = {
            "dot_general": "dense (shared positions)",
            "conv_general_dilated": "conv",
            "mul": "scale",
            "add": "bias",
            "sub": "bias",
            "gather": "gather",
        }.get(node.name, f"per-layer ({node.name})")
        return _Plan("per-layer", label, uses, [], subgraph)
    names = sorted({node.name for node, _ in uses})
    return _Plan(
        "per-layer", f"per-layer ({len(uses)} uses: {', '.join(names)})", uses, [], subgraph
    )


def _dot_dims(node: _Node, pos: int):
    """(operand's batch, contracting, free dims; other's batch, contracting, free dims)."""
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    mine_c, mine_b, other_c, other_b = (rc, rb, lc, lb) if pos == 1 else (lc, lb, rc, rb)
    mine_rank = len(node.invars[pos].aval.shape)
    other_rank = len(node.invars[1 - pos].aval.shape)
    mine_f = [d for d in range(mine_rank) if d not in mine_c and d not in mine_b]
    other_f = [d for d in range(other_rank) if d not in other_c and d not in other_b]
    return (
        tuple(mine_b),
        tuple(mine_c),
        tuple(mine_f),
        tuple(other_b),
        tuple(other_c),
        tuple(other_f),
    )


def _dense_positions(node: _Node, pos: int) -> int:
    """Positions per example that share the weight: the size of the input's free dims."""
    other_shape = node.invars[1 - pos].aval.shape
    other_f = _dot_dims(node, pos)[5]
    return math.prod(other_shape[d] for d in other_f)


def _is_plain_conv(node: _Node) -> bool:
    """An ungrouped convolution without input dilation (what the im2col rule handles)."""
    p = node.params
    return (
        p["feature_group_count"] == 1
        and p["batch_group_count"] == 1
        and all(d == 1 for d in (p["lhs_dilation"] or ()))
    )


def _is_row_gather(node: _Node) -> bool:
    """``table[idx]`` with whole rows: the gather of ``jnp.take(table, idx, axis=0)``."""
    dn = node.params["dimension_numbers"]
    table, indices = node.invars[0].aval, node.invars[1].aval
    out_rank = len(node.outvars[0].aval.shape)
    rest = len(table.shape) - 1
    return (
        tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(getattr(dn, "operand_batching_dims", ()))
        and tuple(dn.offset_dims) == tuple(range(out_rank - rest, out_rank))
        and tuple(node.params["slice_sizes"]) == (1,) + tuple(table.shape[1:])
        and indices.shape
        and indices.shape[-1] == 1
        and jnp.issubdtype(indices.dtype, jnp.integer)
    )


def fast_stats_plan(losses_fn, params: PyTree, batch: PyTree) -> PyTree:
    """How ``method="fast"``/``"auto"`` computes each leaf's moments (a pytree of strings).

    Each leaf of the result names the rule used for that parameter: ``"dense"``,
    ``"embedding"`` (closed forms), ``"dense (shared positions)"``, ``"conv"``, ``"scale"``,
    ``"bias"`` or ``"per-layer (...)"`` (per-example gradients of that leaf only, streamed in
    chunks), ``"zero"`` (the losses do not depend on it) or ``"vmap (...)"`` (unsupported:
    ``method="auto"`` falls back to ``vmap`` for that leaf, ``method="fast"`` raises).

    Args:
      losses_fn: ``(params, batch) -> [S, B]`` per-source, per-example losses.
      params: any pytree of floating arrays.
      batch: pytree of arrays with a leading batch axis.

    Returns:
      A pytree shaped like ``params`` whose leaves are strings.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> def losses_fn(p, x):
      ...   y = x @ p["w"] + p["b"]
      ...   return jnp.stack([y[:, 0], y[:, 1] ** 2])
      >>> bj.fast_stats_plan(losses_fn, params, jnp.ones((4, 3)))
      {'b': 'bias', 'w': 'dense'}
    """
    program, treedef, _, _, _ = _trace(losses_fn, params, batch)
    return jax.tree.unflatten(treedef, [plan.label for plan in program.plans])


# ----------------------------------------------------------------------------------------
# Per-example output cotangents of every tap, one backward pass per source.


def _cotangents(program: _Program, param_leaves, example_leaves, num_sources, tap_nodes):
    """Per-source cotangents of the taps' outputs and the taps' example inputs, batched.

    Returns ``(deltas, inputs)``: ``deltas[(s, node_index)]`` is a list (one per output of
    the tap; None for non-float outputs) of ``[B, *out_shape]`` arrays for each source ``s``
    that reaches the tap; ``inputs[id]`` holds the example-dependent inputs of the taps.
    """
    nodes, producer = program.nodes, program.producer
    targets = _source_targets(program.outvar, num_sources, producer)
    tap_index = {node.index for node in tap_nodes}
    input_vars = {}
    for node in tap_nodes:
        for v in node.invars:
            if isinstance(v, _Var) and v in program.example_dependent:
                input_vars[id(v)] = v
    per_source = []
    for var, idx in targets:
        needed = _needed(nodes, producer, [var])
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
                _run(needed, env, perturb)
                out = env[var] if isinstance(var, _Var) else var.val
                value = out[idx] if idx else out
                return value, {i: env[v] for i, v in wanted.items()}

            zeros = {
                n.index: [_zeros(v.aval) if _is_float(v.aval) else None for v in n.outvars]
                for n in taps
            }
            value, vjp, aux = jax.vjp(loss_s, zeros, has_aux=True)
            (cts,) = vjp(jnp.ones_like(value))
            for n in taps:
                deltas[(s, n.index)] = cts[n.index]
            inputs.update(aux)
        return deltas, inputs

    return jax.vmap(per_example, in_axes=(None, 0))(list(param_leaves), list(example_leaves))


# ----------------------------------------------------------------------------------------
# Rules.


def _replicated_if_sharded(*xs):
    """``P()`` when an operand is sharded explicitly (a contraction over the examples then
    needs its output sharding spelled out), else None."""
    for x in xs:
        spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
        if spec and any(s is not None for s in spec):
            return jax.sharding.PartitionSpec()
    return None


def _contract(subscripts, x, y):
    """``einsum`` at full precision whose output may sum over sharded examples."""
    return jnp.einsum(
        subscripts, x, y, precision=_HIGHEST, out_sharding=_replicated_if_sharded(x, y)
    )


def _sum_examples(x, axis: int):
    """Sum over ``axis`` as a product with ones.

    XLA:CPU reduces a leading axis of a wide array an order of magnitude slower than it
    multiplies by a vector of ones; the result is the same.
    """
    ones = jnp.ones((x.shape[axis],), x.dtype)
    return jnp.tensordot(
        ones, x, axes=((0,), (axis,)), precision=_HIGHEST, out_sharding=_replicated_if_sharded(x)
    )


def _pull_back(chain, x, lead: int):
    """Map an array laid out like the view ``chain[-1]``'s output back to the leaf's layout.

    ``x`` has ``lead`` leading axes (sources); the chain is bijective (reshapes, transposes,
    casts), so moments map through it unchanged.
    """
    for node in reversed(chain):
        in_shape = tuple(node.invars[0].aval.shape)
        if node.name == "transpose":
            inverse = np.argsort(node.params["permutation"])
            x = jnp.transpose(x, tuple(range(lead)) + tuple(lead + int(i) for i in inverse))
        else:
            x = jnp.reshape(x, x.shape[:lead] + in_shape)
    return x


@dataclasses.dataclass
class _Canonical:
    """How a tap's input, cotangent and weight map to ``[g, P, C]``, ``[g, P, F]``, ``[g, C, F]``.

    ``g``: weight-sharing groups (``dot_general`` batch dims); ``P``: positions per example
    that share the weight; ``C``: input features; ``F``: output features.
    """

    g: int
    positions: int
    c: int
    f: int
    inputs: Callable  # [n, *input_shape] -> [n, g, P, C]
    cotangent: Callable  # [n, *out_shape] -> [n, g, P, F]
    layout: Callable  # [S, g, C, F] -> [S, *leaf_shape]


def _canonical_dot(plan: _Plan) -> _Canonical:
    node, pos = plan.uses[0]
    v_shape = tuple(node.invars[pos].aval.shape)
    a_shape = tuple(node.invars[1 - pos].aval.shape)
    mine_b, mine_c, mine_f, other_b, other_c, other_f = _dot_dims(node, pos)
    g = math.prod(v_shape[d] for d in mine_b)
    c = math.prod(v_shape[d] for d in mine_c)
    f = math.prod(v_shape[d] for d in mine_f)
    positions = math.prod(a_shape[d] for d in other_f)
    a_order = (0,) + tuple(1 + d for d in other_b + other_f + other_c)

    def inputs(a):
        n = a.shape[0]
        return jnp.transpose(a, a_order).reshape(n, g, positions, c)

    def cotangent(d):  # out dims: batch, lhs free, rhs free
        n = d.shape[0]
        if pos == 1:
            return d.reshape(n, g, positions, f)
        return jnp.swapaxes(d.reshape(n, g, f, positions), 2, 3)

    order = mine_b + mine_c + mine_f
    return _Canonical(
        g,
        positions,
        c,
        f,
        inputs,
        cotangent,
        _layout_fn(plan, tuple(v_shape[d] for d in order), order),
    )


def _layout_fn(plan: _Plan, shape_in_order, order):
    """``[S, g, C, F]`` (dims ``order`` of the operand, flattened) -> ``[S, *leaf_shape]``."""
    to_operand = tuple(1 + int(i) for i in np.argsort(np.array(order)))

    def layout(x):
        x = jnp.transpose(x.reshape((x.shape[0],) + tuple(shape_in_order)), (0,) + to_operand)
        return _pull_back(plan.chain, x, 1)

    return layout


def _canonical_conv(plan: _Plan) -> _Canonical:
    """im2col: the kernel gradient of a convolution is a dense gradient over patches."""
    node, _ = plan.uses[0]
    p = node.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    lhs_shape = tuple(node.invars[0].aval.shape)
    rhs_shape = tuple(node.invars[1].aval.shape)
    out_shape = tuple(node.outvars[0].aval.shape)
    window = tuple(rhs_shape[d] for d in rhs_spec[2:])
    out_sp = tuple(out_shape[d] for d in out_spec[2:])
    strides = tuple(p["window_strides"])
    dilation = tuple(p["rhs_dilation"] or (1,) * len(window))
    padding = tuple(tuple(pad) for pad in p["padding"])
    batch, chans, outs = lhs_shape[lhs_spec[0]], lhs_shape[lhs_spec[1]], rhs_shape[rhs_spec[0]]
    k = math.prod(window)
    positions = batch * math.prod(out_sp)

    def inputs(a):  # [n, *lhs] -> [n, 1, P, K * C]
        n = a.shape[0]
        # Channels last, so the patches need no transpose: [n, N, *spatial, C].
        x = jnp.transpose(
            a, (0, 1 + lhs_spec[0]) + tuple(1 + d for d in lhs_spec[2:]) + (1 + lhs_spec[1],)
        )
        x = jax.lax.pad(
            x,
            jnp.zeros((), x.dtype),
            [(0, 0, 0)] * 2 + [(lo, hi, 0) for lo, hi in padding] + [(0, 0, 0)],
        )
        patches = []
        for offset in itertools.product(*(range(w) for w in window)):
            start = [0, 0] + [o * dl for o, dl in zip(offset, dilation)] + [0]
            limit = (
                [n, batch]
                + [s + (m - 1) * st + 1 for s, m, st in zip(start[2:], out_sp, strides)]
                + [chans]
            )
            patches.append(jax.lax.slice(x, start, limit, (1, 1) + strides + (1,)))
        x = jnp.stack(patches, axis=-2)  # [n, N, *out, K, C]
        return x.reshape(n, 1, positions, k * chans)

    def cotangent(d):  # [n, *out] -> [n, 1, P, O]
        n = d.shape[0]
        d = jnp.transpose(
            d, (0, 1 + out_spec[0]) + tuple(1 + x for x in out_spec[2:]) + (1 + out_spec[1],)
        )
        return d.reshape(n, 1, positions, outs)

    order = tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0])
    return _Canonical(
        1,
        positions,
        chans * k,
        outs,
        inputs,
        cotangent,
        _layout_fn(plan, tuple(rhs_shape[d] for d in order), order),
    )


def _dense_moments(plan: _Plan, a, deltas, dtype):
    """Closed-form moments of ``g_i = a_i (x) delta_i`` (one position per example).

    ``a``: ``[n, *input_shape]``; ``deltas``: list over sources of ``[n, *out_shape]``.
    Returns ``(mean, m2)`` of shape ``[len(deltas), *leaf_shape]``.
    """
    canon = _canonical_dot(plan)
    n, g, c, f = a.shape[0], canon.g, canon.c, canon.f
    a = canon.inputs(a.astype(dtype)).reshape(n, g, c)
    d = jnp.stack([canon.cotangent(x.astype(dtype)).reshape(n, g, f) for x in deltas])
    a_s = jnp.broadcast_to(a, d.shape[:1] + a.shape)  # [S, n, g, c]

    def products(x, y):  # sum over the examples: [S, n, g, c] x [S, n, g, f] -> [S, g, c, f]
        return _contract("sngc,sngf->sgcf", x, y)

    # Uncentred: two products per source; m2 = sum (a d)**2 - n mean**2.
    mean = products(a_s, d) / n
    m2_raw = products(jnp.square(a_s), jnp.square(d)) - n * jnp.square(mean)

    def centred():
        # g_i - mean = a_bar d'_i + (a'_i d_i - cov): only centred terms are squared.
        a_bar = _sum_examples(a_s, 1)[:, None] / n  # [S, 1, g, c]
        d_c = d - _sum_examples(d, 1)[:, None] / n
        a_c = a_s - a_bar
        cov = products(a_c, d) / n  # sum a'd / n
        s2 = products(jnp.square(a_c), jnp.square(d))  # sum a'^2 d^2
        s3 = products(a_c, d * d_c)  # sum a' d d'
        sq_d = _sum_examples(jnp.square(d_c), 1)[:, :, None, :]  # sum d'^2
        ab = jnp.moveaxis(a_bar, 1, -1)  # [S, g, c, 1]
        return jnp.square(ab) * sq_d + (s2 - n * jnp.square(cov)) + 2.0 * ab * s3

    # The uncentred m2 loses about n mean**2 / m2 units in the last place: above
    # CANCELLATION_LIMIT, recompute it centred (rare for noisy per-example gradients).
    risky = jnp.any(n * jnp.square(mean) > CANCELLATION_LIMIT * m2_raw)
    m2 = jnp.maximum(jax.lax.cond(risky, centred, lambda: m2_raw), 0.0)
    return canon.layout(mean), canon.layout(m2)


def _positions_moments(plan: _Plan, a, deltas, dtype):
    """Exact moments when positions share the weight: ``g_i = sum_p a_ip (x) delta_ip``.

    Dense layers on ``[B, T, D]`` inputs and convolutions (over im2col patches). The
    per-example gradients of this leaf are formed chunk by chunk (two-pass moments per
    chunk, merged with Chan's formula).
    """
    canon = (_canonical_conv if plan.uses[0][0].name == "conv_general_dilated" else _canonical_dot)(
        plan
    )
    n = a.shape[0]

    num = len(deltas)

    def grads(xs):  # a chunk of c examples -> [c, g, C, S * F]
        a_chunk, d_chunks = xs
        a_chunk = canon.inputs(a_chunk.astype(dtype))  # [c, g, P, C]
        d = jnp.concatenate([canon.cotangent(x.astype(dtype)) for x in d_chunks], axis=-1)
        return jnp.einsum("ngpc,ngpf->ngcf", a_chunk, d, precision=_HIGHEST)

    per_example = canon.g * canon.c * (num * canon.f + canon.positions)
    mean, m2 = _streamed_moments(grads, (a, tuple(deltas)), n, _chunk_for(n, per_example))

    def layout(x):  # [g, C, S * F] -> [S, g, C, F] -> [S, *leaf_shape]
        x = jnp.moveaxis(x.reshape(canon.g, canon.c, num, canon.f), 2, 0)
        return canon.layout(x)

    return layout(mean), layout(m2)


def _embedding_moments(plan: _Plan, indices, deltas, dtype):
    """Exact centred moments of row-gather gradients (rows repeated in an example summed).

    ``indices``: ``[n, ..., 1]``; ``deltas``: list over sources of ``[n, ..., *row_shape]``.
    Per example ``i`` and row ``r``: ``g_i[r] = sum_{t: idx_it = r} delta_it``; with
    ``k[r]`` the number of examples touching ``r``:
    ``m2[r] = sum_{i touching r} (g_i[r] - mean[r])**2 + (n - k[r]) mean[r]**2``.
    """
    node, _ = plan.uses[0]
    table_shape = tuple(node.invars[0].aval.shape)
    rows, row_shape = table_shape[0], table_shape[1:]
    width = math.prod(row_shape)
    n = indices.shape[0]
    idx = indices.reshape(n, -1).astype(jnp.int32)
    t = idx.shape[1]
    num = len(deltas)
    d = jnp.concatenate([x.reshape(n, t, width).astype(dtype) for x in deltas], axis=-1)
    if node.params.get("mode") == jax.lax.GatherScatterMode.FILL_OR_DROP:
        valid = (idx >= 0) & (idx < rows)
        d = jnp.where(valid[..., None], d, 0.0)
    idx = jnp.clip(idx, 0, rows - 1)

    order = jnp.argsort(idx, axis=1, stable=True)
    idx_sorted = jnp.take_along_axis(idx, order, axis=1)
    d_sorted = jnp.take_along_axis(d, order[..., None], axis=1)
    new_row = jnp.concatenate(
        [jnp.ones((n, 1), bool), idx_sorted[:, 1:] != idx_sorted[:, :-1]], axis=1
    )
    segment = (jnp.arange(n)[:, None] * t + jnp.cumsum(new_row, axis=1) - 1).reshape(-1)
    per_row = jax.ops.segment_sum(d_sorted.reshape(n * t, -1), segment, n * t)  # g_i[r]
    row_of = jnp.zeros(n * t, jnp.int32).at[segment].set(idx_sorted.reshape(-1))
    used = jnp.zeros(n * t, bool).at[segment].set(True)
    mean = jax.ops.segment_sum(per_row, row_of, rows) / n  # [rows, W]
    touched = jax.ops.segment_sum(used.astype(dtype), row_of, rows)  # k[r]
    dev = jnp.where(used[:, None], per_row - mean[row_of], 0.0)
    m2 = jax.ops.segment_sum(jnp.square(dev), row_of, rows) + (
        (n - touched)[:, None] * jnp.square(mean)
    )

    def layout(x):  # [rows, num * W] -> [num, *table_shape] -> [num, *leaf_shape]
        x = jnp.moveaxis(x.reshape(rows, num, width), 1, 0).reshape((num,) + table_shape)
        return _pull_back(plan.chain, x, 1)

    return layout(mean), layout(m2)


def _chunk_for(n: int, per_example_numbers: int, budget: int | None = None) -> int:
    """The largest divisor of ``n`` whose chunk holds at most ``budget`` numbers
    (default ``MATERIALISE_BUDGET``)."""
    budget = MATERIALISE_BUDGET if budget is None else budget
    cap = max(1, budget // max(1, per_example_numbers))
    if cap >= n:
        return n
    return max(d for d in range(1, cap + 1) if n % d == 0)


def _streamed_moments(grads_fn, xs, n: int, chunk: int):
    """Moments over the examples (axis 0) of ``grads_fn(chunk of xs)``, chunk by chunk.

    Two-pass within a chunk (``mean``, then ``sum (g - mean)**2``); chunks are merged with
    Chan's formula, so the result does not depend on the chunking.
    """

    def moments(chunk_xs):
        g = grads_fn(chunk_xs)
        mean = _sum_examples(g, 0) / g.shape[0]
        m2 = _sum_examples(jnp.square(g - mean), 0)
        return mean, m2

    if chunk >= n:
        return moments(xs)
    num_chunks = n // chunk
    # Chunk j holds examples j, j + num_chunks, ...: a batch sharded in contiguous blocks
    # keeps every chunk spread over all its devices.
    chunks = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape((chunk, num_chunks) + x.shape[1:]), 0, 1), xs
    )
    first = moments(jax.tree.map(lambda x: x[0], chunks))

    def body(carry, chunk_xs):
        (mean_a, m2_a), count = carry
        mean_b, m2_b = moments(chunk_xs)
        total = count + chunk
        delta = mean_b - mean_a
        mean = mean_a + delta * (chunk / total)
        m2 = m2_a + m2_b + jnp.square(delta) * (count * chunk / total)
        return ((mean, m2), total), None

    init = (first, jnp.asarray(chunk, first[0].dtype))
    ((mean, m2), _), _ = jax.lax.scan(body, init, jax.tree.map(lambda x: x[1:], chunks))
    return mean, m2


def _per_layer_moments(
    program: _Program, k: int, plan: _Plan, base_env, inputs, deltas, sources, n: int, dtype
):
    """Exact moments from per-example gradients of leaf ``k`` only, streamed in chunks.

    Two steps per example ``i`` and source ``s``: the cotangent of each tap's parameter
    operand ``v`` (``h = vjp(v -> tap output)(delta[s, i])``; for ``add``/``sub``/``mul``
    with a broadcast operand, a sum of ``delta`` or ``x * delta`` over the broadcast axes),
    then ``g[s, i] = vjp(p -> all v)(h)`` through the parameter's own (batch-free) program.
    """
    pvar = program.param_vars[k]
    uses = []  # [(node, [operand positions])]
    for node, pos in plan.uses:
        for u in uses:
            if u[0] is node:
                u[1].append(pos)
                break
        else:
            uses.append((node, [pos]))

    def value(v, chunk_inputs):
        if not isinstance(v, _Var):
            return v.val
        if v in program.example_dependent:
            return chunk_inputs[id(v)]
        return base_env[v]

    def operand_cotangents(node, positions, chunk_inputs, delta):
        """Per example: the cotangents of ``node``'s operands at ``positions``."""
        out_aval = node.outvars[0].aval
        if (
            node.name in ("add", "sub", "mul")
            and len(positions) == 1
            and len(node.invars[positions[0]].aval.shape) == len(out_aval.shape)
        ):
            pos = positions[0]
            v_shape = tuple(node.invars[pos].aval.shape)
            h = delta[0].astype(dtype)
            if node.name == "sub" and pos == 1:
                h = -h
            elif node.name == "mul":
                other = value(node.invars[1 - pos], chunk_inputs)
                batched = isinstance(node.invars[1 - pos], _Var) and (
                    node.invars[1 - pos] in program.example_dependent
                )
                h = h * (other if batched else jnp.asarray(other)[None]).astype(dtype)
            axes = tuple(
                1 + d for d, (a, b) in enumerate(zip(v_shape, out_aval.shape)) if a == 1 and b != 1
            )
            return [jnp.sum(h, axis=axes, keepdims=True) if axes else h]

        ex = [isinstance(v, _Var) and v in program.example_dependent for v in node.invars]
        floats = [i for i, v in enumerate(node.outvars) if _is_float(v.aval)]

        def one(ex_values, cts):
            ins = list(ex_values)

            def apply(*ops):
                full = list(ins)
                for p, o in zip(positions, ops):
                    full[p] = o
                res = _bind(node, full)
                return [res[i] for i in floats]

            outs, vjp = jax.vjp(apply, *[ins[p] for p in positions])
            return [x.astype(dtype) for x in vjp([_typed_like(c, o) for c, o in zip(cts, outs)])]

        vals = [value(v, chunk_inputs) for v in node.invars]
        in_axes = (
            [0 if e else None for e in ex],
            [0 if delta[i] is not None else None for i in floats],
        )
        cts = [
            delta[i]
            if delta[i] is not None
            else jnp.zeros(node.outvars[i].aval.shape, node.outvars[i].aval.dtype)
            for i in floats
        ]
        return jax.vmap(one, in_axes=in_axes)(vals, cts)

    operand_vars = [node.invars[p] for node, positions in uses for p in positions]

    def operands_of(p_value):  # the leaf's own program: p -> every tap operand
        env = dict(base_env)
        env[pvar] = p_value
        _run(plan.subgraph, env)
        return [env[v] if isinstance(v, _Var) else v.val for v in operand_vars]

    def pull_back(hs):  # per example: cotangents of the operands -> gradient of the leaf
        outs, vjp = jax.vjp(operands_of, base_env[pvar])
        hs = [_typed_like(h.astype(o.dtype), o) for h, o in zip(hs, outs)]
        return vjp(hs)[0].astype(dtype)

    ex_ids = sorted(
        {
            id(v)
            for node, _ in uses
            for v in node.invars
            if isinstance(v, _Var) and v in program.example_dependent
        }
    )
    cts = {}
    for s in sources:
        for node, _ in uses:
            got = deltas.get((s, node.index))
            if got is not None:
                cts[(s, node.index)] = got

    def grads_fn(xs):  # a chunk of c examples -> [c, S, *leaf_shape]
        chunk_inputs, chunk_cts = xs
        per_source = []
        for s in sources:
            hs = []
            for node, positions in uses:
                delta = chunk_cts.get((s, node.index))
                if delta is None:
                    c = jax.tree.leaves(chunk_cts)[0].shape[0]
                    hs.extend(
                        jnp.zeros((c,) + tuple(node.invars[p].aval.shape), dtype) for p in positions
                    )
                else:
                    hs.extend(operand_cotangents(node, positions, chunk_inputs, delta))
            per_source.append(jax.vmap(pull_back)(hs))
        return jnp.stack(per_source, axis=1)

    chunk = _chunk_for(n, len(sources) * math.prod(pvar.aval.shape))
    xs = ({i: inputs[i] for i in ex_ids}, cts)
    return _streamed_moments(grads_fn, xs, n, chunk)


# ----------------------------------------------------------------------------------------
# Entry points.


def _unsupported_message(names_reasons) -> str:
    lines = "\n".join(f"  params{name}: {reason}" for name, reason in names_reasons)
    return (
        "method='fast' cannot compute exact per-layer moments for these parameters:\n"
        f"{lines}\nUse method='auto' (these leaves then use vmap; the others stay fast), or "
        "method='vmap'. bj.fast_stats_plan(losses_fn, params, batch) shows the rule per "
        "leaf."
    )


def _moments(losses_fn, params, batch, *, fallback: bool) -> _stats.Moments:
    n = _stats.batch_size_of(batch)
    num_sources = jax.eval_shape(losses_fn, params, batch).shape[0]
    program, treedef, param_leaves, _, example_leaves = _trace(losses_fn, params, batch)
    plans = program.plans
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    unsupported = [k for k, plan in enumerate(plans) if plan.rule == "vmap"]
    if unsupported and not fallback:
        raise ValueError(_unsupported_message([(paths[k], plans[k].reason) for k in unsupported]))

    dtypes = [_stats.accumulation_dtype(jnp.result_type(x)) for x in param_leaves]
    means, m2s = [None] * len(plans), [None] * len(plans)

    tap_nodes = []
    for plan in plans:
        if plan.rule in ("dense", "positions", "embedding", "per-layer"):
            for node, _ in plan.uses:
                if all(node is not t for t in tap_nodes):
                    tap_nodes.append(node)
    deltas, inputs = {}, {}
    if tap_nodes:
        deltas, inputs = _cotangents(program, param_leaves, example_leaves, num_sources, tap_nodes)

    # Values that do not depend on the batch (parameters, constants, views of them).
    base_env = dict(zip(program.param_vars, param_leaves))
    _run(
        [
            node
            for node in program.nodes
            if all(v not in program.example_dependent for v in node.outvars)
        ],
        base_env,
    )

    for k, plan in enumerate(plans):
        shape = tuple(jnp.shape(param_leaves[k]))
        if plan.rule in ("vmap",):
            continue
        nodes_k = [node for node, _ in plan.uses]
        sources = [
            s for s in range(num_sources) if any((s, node.index) in deltas for node in nodes_k)
        ]
        mean = m2 = jnp.zeros((num_sources,) + shape, dtypes[k])
        if sources:
            if plan.rule == "dense":
                node, pos = plan.uses[0]
                a = inputs[id(node.invars[1 - pos])]
                mean_s, m2_s = _dense_moments(
                    plan, a, [deltas[(s, node.index)][0] for s in sources], dtypes[k]
                )
            elif plan.rule == "positions":
                node, pos = plan.uses[0]
                a = inputs[id(node.invars[1 - pos])]
                mean_s, m2_s = _positions_moments(
                    plan, a, [deltas[(s, node.index)][0] for s in sources], dtypes[k]
                )
            elif plan.rule == "embedding":
                node, _ = plan.uses[0]
                indices = inputs[id(node.invars[1])]
                mean_s, m2_s = _embedding_moments(
                    plan, indices, [deltas[(s, node.index)][0] for s in sources], dtypes[k]
                )
            else:
                mean_s, m2_s = _per_layer_moments(
                    program, k, plan, base_env, inputs, deltas, sources, n, dtypes[k]
                )
            if len(sources) == num_sources:
                mean, m2 = mean_s.astype(dtypes[k]), m2_s.astype(dtypes[k])
            else:
                where = {s: j for j, s in enumerate(sources)}
                zero = jnp.zeros(shape, dtypes[k])
                mean = jnp.stack(
                    [
                        mean_s[where[s]].astype(dtypes[k]) if s in where else zero
                        for s in range(num_sources)
                    ]
                )
                m2 = jnp.stack(
                    [
                        m2_s[where[s]].astype(dtypes[k]) if s in where else zero
                        for s in range(num_sources)
                    ]
                )
        means[k], m2s[k] = mean, m2

    if unsupported:
        means_u, m2s_u = _vmap_leaves(
            losses_fn, treedef, param_leaves, unsupported, batch, n, num_sources
        )
        for k, mean, m2 in zip(unsupported, means_u, m2s_u):
            means[k], m2s[k] = mean, m2

    return _stats.Moments(
        jnp.asarray(n, jnp.float32),
        jax.tree.unflatten(treedef, means),
        jax.tree.unflatten(treedef, m2s),
    )


def _vmap_leaves(losses_fn, treedef, param_leaves, ks, batch, n, num_sources):
    """The reference (chunked ``vmap``) for leaves ``ks`` only, the others held fixed."""

    def sub_losses(sub, b):
        leaves = list(param_leaves)
        for k, x in zip(ks, sub):
            leaves[k] = x
        return losses_fn(jax.tree.unflatten(treedef, leaves), b)

    sub = [param_leaves[k] for k in ks]
    size = num_sources * sum(math.prod(jnp.shape(x)) for x in sub)
    chunk = _chunk_for(n, size, budget=VMAP_FALLBACK_BUDGET)
    vmap_moments = _stats._vmap_moments  # pylint: disable=protected-access
    if chunk >= n:
        moments = vmap_moments(sub_losses, sub, batch)
    else:
        moments = _stats._chunked_moments(vmap_moments, sub_losses, sub, batch, chunk)  # pylint: disable=protected-access
    return moments.mean, moments.m2


def fast_moments(losses_fn, params: PyTree, batch: PyTree) -> _stats.Moments:
    """Exact per-source moments of per-example gradients, per layer (``method="fast"``).

    Raises ``ValueError`` naming every parameter leaf the fast path cannot serve (see the
    module docstring); use :func:`auto_moments` to fall back to ``vmap`` for those.
    """
    return _moments(losses_fn, params, batch, fallback=False)


def auto_moments(losses_fn, params: PyTree, batch: PyTree) -> _stats.Moments:
    """Like :func:`fast_moments`, with chunked ``vmap`` for the leaves it cannot serve."""
    return _moments(losses_fn, params, batch, fallback=True)
