"""Moments of every parameter leaf: each leaf's rule looked up in one table.

The program is traced and planned once, the taps' cotangents come from one backward pass
per source, and the moments of the leaves of each rule come from ``RULES[plan.rule]``:
a rule takes the :class:`~bogc_jax._fast_stats.kernels.LeafJob` of each of its leaves and
a ``place(job, mean, m2)`` for the ``(mean, m2)`` of the sources that reach the leaf (the
others get exact zeros). Most rules serve their leaves one by one; the dense rule serves
them together, sharing one check for cancellation. Leaves no rule serves (plan
``"vmap"``) get the chunked ``vmap`` reference with ``method="auto"`` and an error naming
them with ``method="fast"``.

``fast_moments``/``auto_moments`` return ``m2``, which chunks and devices merge;
``one_batch_grad_stats`` (one batch on one device) returns the variance
``m2 / (n - 1)``, formed inside ``place`` so that it costs no pass of its own over the
``[S, ...]`` results (3-4% of the statistics on MLPs of 4M to 16M parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bogc_jax import _moments, _per_example, _source_reach
from bogc_jax._fast_stats import kernels
from bogc_jax._fast_stats import program as prog
from bogc_jax._fast_stats.cotangents import cotangents
from bogc_jax._fast_stats.dense import dense_leaves_moments, positions_moments
from bogc_jax._fast_stats.embedding import embedding_moments
from bogc_jax._fast_stats.per_leaf import per_leaf_moments
from bogc_jax._fast_stats.plan import Program, trace

PyTree = Any
LeafRule = Callable[[kernels.LeafJob], tuple[jax.Array, jax.Array]]
Place = Callable[[kernels.LeafJob, jax.Array, jax.Array], Any]
Rule = Callable[[list[kernels.LeafJob], Place], list]


def one_by_one(rule: LeafRule) -> Rule:
    """A rule that serves its leaves one at a time: ``rule(job) -> (mean, m2)``."""
    return lambda jobs, place: [place(job, *rule(job)) for job in jobs]


# plan.rule -> the rule computing (mean, m2) of the sources reaching its leaves. A "zero"
# leaf has no tap, so no source reaches it; "vmap" leaves go to the reference.
RULES: dict[str, Rule] = {
    "dense": dense_leaves_moments,
    "positions": one_by_one(positions_moments),
    "embedding": one_by_one(embedding_moments),
    "per-leaf": one_by_one(per_leaf_moments),
}

# The vmap fallback materialises per-example gradients of the unsupported leaves (with
# the rest of a per-example backward pass) in chunks of at most this many numbers.
VMAP_FALLBACK_BUDGET = 1 << 23


def _unsupported_message(names_reasons) -> str:
    lines = "\n".join(f"  params{name}: {reason}" for name, reason in names_reasons)
    return (
        "method='fast' cannot compute exact per-layer moments for these parameters:\n"
        f"{lines}\nUse method='auto' (these leaves then use vmap; the others stay fast), or "
        "method='vmap'. bj.fast_stats_plan(losses_fn, params, batch) shows the rule per "
        "leaf."
    )


def _tap_nodes(program: Program) -> list:
    """The taps of every leaf a rule serves, each once, in plan order."""
    taps: list = []
    for plan in program.plans:
        if plan.rule in RULES:
            taps.extend(node for node, _ in plan.uses if all(node is not t for t in taps))
    return taps


def _batch_free_env(program: Program, param_leaves) -> dict:
    """Values that do not depend on the batch (parameters, constants, views of them)."""
    env = dict(zip(program.param_vars, param_leaves))
    free = [
        node
        for node in program.nodes
        if all(v not in program.example_dependent for v in node.outvars)
    ]
    prog.run(free, env)
    return env


def _scatter_sources(values, sources, num_sources, shape, dtype):
    """``[len(sources), *shape]`` -> ``[num_sources, *shape]``, zeros for absent sources."""
    if len(sources) == num_sources:
        return values.astype(dtype)
    where = {s: j for j, s in enumerate(sources)}
    zero = jnp.zeros(shape, dtype)
    return jnp.stack(
        [values[where[s]].astype(dtype) if s in where else zero for s in range(num_sources)]
    )


def _leaves_moments(
    jobs: list[kernels.LeafJob], num_sources: int, shapes, second: Callable = lambda m2: m2
) -> list:
    """``(mean, second(m2))`` of each job's leaf for every source (zeros where none reaches
    it), the jobs of each rule served by that rule together.

    ``second`` (elementwise: zeros stay zeros) is applied where the rule places its
    results, inside the dense rule's branch: the variance then costs no pass of its own
    over the ``[S, ...]`` outputs.
    """

    def place(job, mean, m2):
        shape = shapes[job.k]
        return tuple(
            _scatter_sources(x, job.sources, num_sources, shape, job.dtype)
            for x in (mean, second(m2))
        )

    results: list = [None] * len(jobs)
    for rule in dict.fromkeys(job.plan.rule for job in jobs):
        mine = [i for i, job in enumerate(jobs) if job.plan.rule == rule]
        for i, moments in zip(mine, RULES[rule]([jobs[i] for i in mine], place)):
            results[i] = moments
    return results


def _vmap_leaves(losses_fn, treedef, param_leaves, ks, batch, n, num_sources):
    """The reference (chunked ``vmap``) for leaves ``ks`` only, the others held fixed."""

    def sub_losses(sub, b):
        leaves = list(param_leaves)
        for k, x in zip(ks, sub):
            leaves[k] = x
        return losses_fn(jax.tree.unflatten(treedef, leaves), b)

    sub = [param_leaves[k] for k in ks]
    size = num_sources * sum(math.prod(jnp.shape(x)) for x in sub)
    chunk = kernels.chunk_for(n, size, budget=VMAP_FALLBACK_BUDGET)
    moments = _per_example.chunked(_per_example.vmap_moments, chunk)(sub_losses, sub, batch)
    return moments.mean, moments.m2


def _moments_of(losses_fn, params, batch, *, fallback: bool, as_variance: bool):
    """``(count, mean, second)`` of every leaf: ``second`` is ``m2``, or with
    ``as_variance`` the ddof = 1 variance."""
    n = _per_example.batch_size_of(batch)
    num_sources = jax.eval_shape(losses_fn, params, batch).shape[0]
    program, treedef, param_leaves, example_leaves = trace(losses_fn, params, batch)
    plans = program.plans
    unsupported = [k for k, plan in enumerate(plans) if plan.rule == "vmap"]
    if unsupported and not fallback:
        paths = [
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        ]
        raise ValueError(_unsupported_message([(paths[k], plans[k].reason) for k in unsupported]))

    taps = _tap_nodes(program)
    deltas, inputs = {}, {}
    if taps:
        deltas, inputs = cotangents(program, param_leaves, example_leaves, num_sources, taps)
    base_env = _batch_free_env(program, param_leaves)

    means: list = [None] * len(plans)
    seconds: list = [None] * len(plans)
    jobs = []
    shapes = [tuple(jnp.shape(x)) for x in param_leaves]
    for k, plan in enumerate(plans):
        if plan.rule == "vmap":
            continue
        nodes_k = [node for node, _ in plan.uses]
        sources = [s for s in range(num_sources) if any((s, nd.index) in deltas for nd in nodes_k)]
        dtype = _moments.accumulation_dtype(jnp.result_type(param_leaves[k]))
        if sources:
            jobs.append(
                kernels.LeafJob(program, k, plan, base_env, inputs, deltas, sources, n, dtype)
            )
        else:  # no source reaches the leaf
            means[k] = _source_reach.mark(jnp.zeros((num_sources,) + shapes[k], dtype), ())
            seconds[k] = _source_reach.mark(jnp.zeros((num_sources,) + shapes[k], dtype), ())
    count = jnp.asarray(n, jnp.float32)
    second = (lambda m2: _moments.var_from_m2(m2, count)) if as_variance else (lambda m2: m2)
    for job, (mean, moment) in zip(jobs, _leaves_moments(jobs, num_sources, shapes, second)):
        # The slabs of the sources that do not reach the leaf are exact zeros.
        means[job.k] = _source_reach.mark(mean, job.sources)
        seconds[job.k] = _source_reach.mark(moment, job.sources)

    if unsupported:
        means_u, m2s_u = _vmap_leaves(
            losses_fn, treedef, param_leaves, unsupported, batch, n, num_sources
        )
        for k, mean, m2 in zip(unsupported, means_u, m2s_u):
            means[k], seconds[k] = mean, second(m2)

    return count, jax.tree.unflatten(treedef, means), jax.tree.unflatten(treedef, seconds)


def fast_moments(losses_fn, params: PyTree, batch: PyTree) -> _moments.Moments:
    """Exact per-source moments of per-example gradients, per layer (``method="fast"``).

    Raises ``ValueError`` naming every parameter leaf the fast path cannot serve; use
    :func:`auto_moments` to fall back to ``vmap`` for those.
    """
    return _moments.Moments(
        *_moments_of(losses_fn, params, batch, fallback=False, as_variance=False)
    )


def auto_moments(losses_fn, params: PyTree, batch: PyTree) -> _moments.Moments:
    """Like :func:`fast_moments`, with chunked ``vmap`` for the leaves it cannot serve."""
    return _moments.Moments(
        *_moments_of(losses_fn, params, batch, fallback=True, as_variance=False)
    )


def one_batch_grad_stats(
    losses_fn, params: PyTree, batch: PyTree, *, fallback: bool
) -> _moments.GradStats:
    """:func:`fast_moments` (``fallback=False``) or :func:`auto_moments` (``True``)
    finalised for one batch on one device: each leaf's variance is formed where its rule
    places the moments, with no pass of its own (merges over chunks or devices need
    ``m2``)."""
    return _moments.GradStats(
        *_moments_of(losses_fn, params, batch, fallback=fallback, as_variance=True)
    )
