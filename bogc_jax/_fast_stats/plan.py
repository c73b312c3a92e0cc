"""Which equations are taps, and which rule serves each parameter leaf.

A *tap* is an equation where a parameter (through its own batch-free computation:
reshapes, casts, ``softplus``, ...) meets data of the batch. Each parameter leaf gets a
:class:`Plan`: the rule that computes its moments (a key of the dispatch table), the taps
it feeds and the views between the leaf and its one tap. :func:`fast_stats_plan` shows the
plan to the user.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from bogc_jax import _per_example
from bogc_jax._fast_stats import program as prog

PyTree = Any

# Equations that only re-lay out or cast one value: moments map through them unchanged.
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

# The gather modes whose transpose the embedding rule reproduces: CLIP credits the clamped
# row; FILL_OR_DROP and PROMISE_IN_BOUNDS drop out-of-range ids (XLA's scatter skips them).
_EMBEDDING_MODES = frozenset(
    {
        jax.lax.GatherScatterMode.CLIP,
        jax.lax.GatherScatterMode.FILL_OR_DROP,
        jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    }
)


@dataclasses.dataclass
class Plan:
    """How one parameter leaf's moments are computed.

    Attributes:
      rule: the key of the rule in the dispatch table: ``"dense"``, ``"positions"``,
        ``"embedding"``, ``"per-leaf"``, ``"zero"`` or ``"vmap"``.
      label: what the user reads in :func:`fast_stats_plan`.
      uses: ``[(node, operand position)]``: the taps the leaf feeds.
      chain: the view nodes from the leaf to its one tap's operand (closed-form rules).
      subgraph: the batch-free nodes computing the taps' operands from the leaf.
      reason: why the leaf falls back to ``vmap``.
    """

    rule: str
    label: str
    uses: list = dataclasses.field(default_factory=list)
    chain: list = dataclasses.field(default_factory=list)
    subgraph: list = dataclasses.field(default_factory=list)
    reason: str = ""


@dataclasses.dataclass
class Program:
    """The flat program of one example's losses, with its plan per parameter leaf."""

    nodes: list
    param_vars: list
    example_vars: list
    outvar: Any
    producer: dict
    example_dependent: set
    plans: list


def trace(losses_fn, params, batch) -> tuple[Program, Any, list, list]:
    """The program of ``losses_fn`` on one example; also the params' treedef and leaves
    and the batch's leaves."""
    param_leaves, treedef = jax.tree.flatten(params)
    example_leaves, example_def = jax.tree.flatten(batch)
    one = _per_example.per_example_loss_fn(losses_fn)

    def flat_one(p_leaves, e_leaves):
        return one(jax.tree.unflatten(treedef, p_leaves), jax.tree.unflatten(example_def, e_leaves))

    first_example = _per_example.first_examples(list(example_leaves))
    closed = jax.make_jaxpr(flat_one)(list(param_leaves), first_example)
    nodes, invars, outvars = prog.flatten(closed)
    num_params = len(param_leaves)
    program = _analyse(nodes, invars[:num_params], invars[num_params:], outvars[0])
    return program, treedef, param_leaves, example_leaves


def _analyse(nodes, param_vars, example_vars, outvar) -> Program:
    producer: dict = {}
    consumers: dict = {}
    for node in nodes:
        for v in node.outvars:
            producer[v] = node
        for pos, v in enumerate(node.invars):
            if isinstance(v, prog.Var):
                consumers.setdefault(v, []).append((node, pos))
    example_dependent = set(example_vars)
    deps = {v: frozenset((k,)) for k, v in enumerate(param_vars)}
    empty: frozenset = frozenset()
    boundary = []
    for node in nodes:
        ins = [v for v in node.invars if isinstance(v, prog.Var)]
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
        return isinstance(v, prog.Var) and bool(deps.get(v)) and v not in example_dependent

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
        plans.append(_plan_leaf(pvar, uses, subgraph, reaches_output, consumers))
    return Program(nodes, param_vars, example_vars, outvar, producer, example_dependent, plans)


def _view_chain(pvar, operand, consumers):
    """The bijective view nodes from ``pvar`` to ``operand`` if a simple chain, else None."""
    chain, cur = [], pvar
    while cur is not operand:
        users = consumers.get(cur, [])
        if len(users) != 1:
            return None
        node, _ = users[0]
        if node.name not in _VIEWS or len(node.outvars) != 1:
            return None
        if sum(isinstance(v, prog.Var) for v in node.invars) != 1:
            return None
        out = node.outvars[0]
        if not prog.is_float(out.aval):
            return None
        if node.name == "broadcast_in_dim" and (
            math.prod(out.aval.shape) != math.prod(node.invars[0].aval.shape)
        ):
            return None
        chain.append(node)
        cur = out
    if len(consumers.get(operand, [])) != 1:
        return None
    return chain


def _closed_form_plan(node, pos, chain, uses, subgraph) -> Plan | None:
    """The closed-form (or im2col) rule for a leaf whose one tap is ``node``, if any."""
    if node.name == "dot_general":
        if dense_positions(node, pos) == 1:
            return Plan("dense", "dense", uses, chain, subgraph)
        return Plan("positions", "dense (shared positions)", uses, chain, subgraph)
    if node.name == "conv_general_dilated" and pos == 1 and _is_plain_conv(node):
        return Plan("positions", "conv", uses, chain, subgraph)
    if node.name == "gather" and pos == 0 and _is_row_gather(node):
        return Plan("embedding", "embedding", uses, chain, subgraph)
    return None


_PER_LEAF_LABELS = {
    "dot_general": "dense (shared positions)",
    "conv_general_dilated": "conv",
    "mul": "scale",
    "add": "bias",
    "sub": "bias",
    "gather": "gather",
}


def _plan_leaf(pvar, uses, subgraph, reaches_output, consumers) -> Plan:
    if reaches_output:
        reason = "reaches the losses without meeting the batch"
        return Plan("vmap", f"vmap ({reason})", reason=reason)
    for node, _ in uses:
        if prog.has_subprograms(node) and not node.name.startswith("custom_"):
            return Plan(
                "vmap",
                f"vmap (used inside `{node.name}`)",
                reason=f"is used inside a `{node.name}` equation, which the fast path "
                "does not look into",
            )
    if not uses:
        return Plan("zero", "zero (does not affect the losses)")
    if len(uses) == 1:
        node, pos = uses[0]
        chain = _view_chain(pvar, node.invars[pos], consumers)
        plan = None if chain is None else _closed_form_plan(node, pos, chain, uses, subgraph)
        if plan is not None:
            return plan
        label = _PER_LEAF_LABELS.get(node.name, f"per-layer ({node.name})")
        return Plan("per-leaf", label, uses, [], subgraph)
    names = sorted({node.name for node, _ in uses})
    return Plan("per-leaf", f"per-layer ({len(uses)} uses: {', '.join(names)})", uses, [], subgraph)


def dot_dims(node: prog.Node, pos: int):
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


def dense_positions(node: prog.Node, pos: int) -> int:
    """Positions per example that share the weight: the size of the input's free dims."""
    other_shape = node.invars[1 - pos].aval.shape
    other_f = dot_dims(node, pos)[5]
    return math.prod(other_shape[d] for d in other_f)


def _is_plain_conv(node: prog.Node) -> bool:
    """An ungrouped convolution without input dilation (what the im2col rule handles)."""
    p = node.params
    return (
        p["feature_group_count"] == 1
        and p["batch_group_count"] == 1
        and all(d == 1 for d in (p["lhs_dilation"] or ()))
    )


def _is_row_gather(node: prog.Node) -> bool:
    """``table[idx]`` with whole rows: the gather of ``jnp.take(table, idx, axis=0)``, in a
    mode whose out-of-range ids the embedding rule treats as autodiff does."""
    dn = node.params["dimension_numbers"]
    table, indices = node.invars[0].aval, node.invars[1].aval
    out_rank = len(node.outvars[0].aval.shape)
    rest = len(table.shape) - 1
    return bool(
        tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(getattr(dn, "operand_batching_dims", ()))
        and tuple(dn.offset_dims) == tuple(range(out_rank - rest, out_rank))
        and tuple(node.params["slice_sizes"]) == (1,) + tuple(table.shape[1:])
        and indices.shape
        and indices.shape[-1] == 1
        and jnp.issubdtype(indices.dtype, jnp.integer)
        and node.params.get("mode") in _EMBEDDING_MODES
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
    program, treedef, _, _ = trace(losses_fn, params, batch)
    return jax.tree.unflatten(treedef, [plan.label for plan in program.plans])
