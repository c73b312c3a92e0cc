"""Faster formulations of the fast statistics, the bogc update and the mmpareto step.

Prototypes measured against the library (``profile_steps.py`` runs both side by side and
checks exactness against the vmap reference); not library code. Each function says which
library function it would replace.

- :func:`stacked_cotangents`: one forward pass and ONE backward pass whose cotangent
  carries a leading source axis (``vmap`` of the VJP over the ``S`` one-hot cotangents),
  instead of one forward + backward program per source.
- :func:`dense_moments`: the dense rule on a ``[n, S, F]`` cotangent without broadcasting
  the inputs over the sources: ``mean = a^T d / n`` and ``sum (a d)**2 = (a**2)^T (d**2)``
  as ONE batched matmul over ``[a, a**2] x [d, d**2]`` (or two plain ones).
- :func:`fast_moments`: the library's ``fast_stats._moments`` with the two above.
- :func:`bogc_calibrate_leaf`: the ``dempster``/``absolute`` bogc chain written per
  source (``S`` arrays, no ``[S, ...]`` reductions), the diagnostics as sums over the
  same expressions.
- :func:`mmpareto_update`: per-leaf inner products in one pass after one max pass; the
  combined direction's norm from the inner products (no pass over ``d``).
- :func:`source_means`: per-source mean gradients only (what mmpareto reads): one
  forward pass and one backward pass with an ``S``-wide cotangent.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bogc_jax import fast_stats as fs
from bogc_jax import stats as st

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------
# Statistics.


def stacked_cotangents(program, param_leaves, example_leaves, num_sources, tap_nodes):
    """Like ``fs._cotangents``, with one backward pass for all sources.

    Returns ``(deltas, inputs, reach)``: ``deltas[node_index]`` a list (per tap output) of
    ``[B, S, *out_shape]`` arrays (zeros for sources that do not reach the tap),
    ``reach[node_index]`` the sources that reach it.
    """
    nodes, producer = program.nodes, program.producer
    targets = fs._source_targets(program.outvar, num_sources, producer)
    needed_all = fs._needed(nodes, producer, [v for v, _ in targets])
    tap_index = {node.index for node in tap_nodes}
    taps = [n for n in needed_all if n.index in tap_index]
    reach = {n.index: [] for n in taps}
    for s, (var, _) in enumerate(targets):
        for n in fs._needed(nodes, producer, [var]):
            if n.index in reach:
                reach[n.index].append(s)
    input_vars = {}
    for node in taps:
        for v in node.invars:
            if isinstance(v, fs._Var) and v in program.example_dependent:
                input_vars[id(v)] = v

    def per_example(p_leaves, e_leaves):
        def losses(perturb):
            env = dict(zip(program.param_vars, p_leaves))
            env.update(zip(program.example_vars, e_leaves))
            fs._run(needed_all, env, perturb)
            values = []
            for var, idx in targets:
                out = env[var] if isinstance(var, fs._Var) else var.val
                values.append(out[idx] if idx else out)
            return jnp.stack(values), {i: env[v] for i, v in input_vars.items()}

        zeros = {
            n.index: [fs._zeros(v.aval) if fs._is_float(v.aval) else None for v in n.outvars]
            for n in taps
        }
        value, vjp, aux = jax.vjp(losses, zeros, has_aux=True)
        eye = jnp.eye(num_sources, dtype=value.dtype)
        (cts,) = jax.vmap(vjp)(eye)  # every leaf [S, *out_shape]
        return cts, aux

    cts, inputs = jax.vmap(per_example, in_axes=(None, 0))(list(param_leaves), list(example_leaves))
    return cts, inputs, reach


def _cotangent_matrix(canon, d, sources, num_sources, dtype):
    """``[n, g, k * f]`` from a stacked ``[n, S, *out]`` cotangent or a list of ``k``
    ``[n, *out]`` ones (``k = len(sources)``)."""
    k = len(sources)
    if isinstance(d, (list, tuple)):
        n = d[0].shape[0]
        parts = [canon.cotangent(x.astype(dtype)).reshape(n, canon.g, canon.f) for x in d]
        return parts[0] if k == 1 else jnp.concatenate(parts, axis=-1)
    n = d.shape[0]
    if k < num_sources:
        d = d[:, jnp.array(sources)]
    d = jax.vmap(lambda x: canon.cotangent(x.astype(dtype)))(d).reshape(n, k, canon.g, canon.f)
    return jnp.transpose(d, (0, 2, 1, 3)).reshape(n, canon.g, k * canon.f)


def dense_moments(plan, a, d, sources, num_sources, dtype, *, fused=False, check=True):
    """Closed-form moments of ``g_i = a_i (x) delta_i``, the inputs shared by the sources.

    ``d``: a stacked ``[n, S, *out]`` cotangent or a list over ``sources`` of ``[n, *out]``.
    ``mean = a^T d / n`` and ``sum_i (a_i d_i)**2 = (a**2)^T (d**2)``, each ONE matmul over
    all sources (``[n, c] x [n, k f]``; the library broadcasts ``a`` to ``[S, n, c]`` and
    runs ``S`` batched ones). ``m2 = sum - n mean**2`` with the library's cancellation
    check (``check``) and centred recomputation. ``fused``: both products as one batched
    matmul (slower on XLA:CPU).
    """
    canon = fs._canonical_dot(plan)
    n, g, c, f = a.shape[0], canon.g, canon.c, canon.f
    k = len(sources)
    a = canon.inputs(a.astype(dtype)).reshape(n, g, c)
    d = _cotangent_matrix(canon, d, sources, num_sources, dtype)
    if fused:
        both = jnp.einsum(
            "jngc,jngf->jgcf",
            jnp.stack([a, jnp.square(a)]),
            jnp.stack([d, jnp.square(d)]),
            precision=_HIGHEST,
        )
        sums, sq = both[0], both[1]
    else:
        sums = jnp.einsum("ngc,ngf->gcf", a, d, precision=_HIGHEST)
        sq = jnp.einsum("ngc,ngf->gcf", jnp.square(a), jnp.square(d), precision=_HIGHEST)

    def split(x):  # [g, c, k * f] -> [k, g, c, f]
        return jnp.moveaxis(x.reshape(g, c, k, f), 2, 0)

    mean = split(sums) / n
    m2_raw = split(sq) - n * jnp.square(mean)
    if check:

        def centred():
            a_bar = jnp.mean(a, 0)  # [g, c]
            dd = jnp.moveaxis(d.reshape(n, g, k, f), 2, 0)  # [k, n, g, f]
            d_c = dd - jnp.mean(dd, 1, keepdims=True)
            a_c = a - a_bar
            cov = jnp.einsum("ngc,kngf->kgcf", a_c, dd, precision=_HIGHEST) / n
            s2 = jnp.einsum("ngc,kngf->kgcf", jnp.square(a_c), jnp.square(dd), precision=_HIGHEST)
            s3 = jnp.einsum("ngc,kngf->kgcf", a_c, dd * d_c, precision=_HIGHEST)
            sq_d = jnp.sum(jnp.square(d_c), 1)[:, :, None, :]
            ab = a_bar[None, :, :, None]
            return jnp.square(ab) * sq_d + (s2 - n * jnp.square(cov)) + 2.0 * ab * s3

        risky = jnp.any(n * jnp.square(mean) > fs.CANCELLATION_LIMIT * m2_raw)
        m2 = jnp.maximum(jax.lax.cond(risky, centred, lambda: m2_raw), 0.0)
    else:
        m2 = jnp.maximum(m2_raw, 0.0)
    return canon.layout(mean), canon.layout(m2)


def dense_means(plan, a, d, sources, num_sources, dtype):
    """Mean gradients only of a dense tap: ``a^T d / n``, one matmul for all sources."""
    canon = fs._canonical_dot(plan)
    n, g, c, f = a.shape[0], canon.g, canon.c, canon.f
    k = len(sources)
    a = canon.inputs(a.astype(dtype)).reshape(n, g, c)
    d = _cotangent_matrix(canon, d, sources, num_sources, dtype)
    sums = jnp.einsum("ngc,ngf->gcf", a, d, precision=_HIGHEST)
    return canon.layout(jnp.moveaxis(sums.reshape(g, c, k, f), 2, 0) / n)


def positions_means(plan, a, deltas, dtype):
    """Mean gradients only when positions share the weight (shared-position dense, conv):
    ``sum_i sum_p a_ip (x) delta_ip / n``, one matmul over examples x positions (no
    per-example gradient)."""
    conv = plan.uses[0][0].name == "conv_general_dilated"
    canon = (fs._canonical_conv if conv else fs._canonical_dot)(plan)
    n, num = a.shape[0], len(deltas)
    x = canon.inputs(a.astype(dtype))  # [n, g, P, C]
    d = jnp.concatenate([canon.cotangent(t.astype(dtype)) for t in deltas], axis=-1)
    sums = jnp.einsum("ngpc,ngpf->gcf", x, d, precision=_HIGHEST) / n
    return canon.layout(jnp.moveaxis(sums.reshape(canon.g, canon.c, num, canon.f), 2, 0))


def _full(x, sources, num_sources, shape, dtype):
    if len(sources) == num_sources:
        return x.astype(dtype)
    where = {s: j for j, s in enumerate(sources)}
    zero = jnp.zeros(shape, dtype)
    return jnp.stack(
        [x[where[s]].astype(dtype) if s in where else zero for s in range(num_sources)]
    )


def fast_moments(
    losses_fn, params, batch, *, stacked=False, fused=False, check=True, means_only=False
):
    """``fs._moments(..., fallback=False)`` with the prototypes above (dense, positions,
    embedding and per-layer rules; the last three are the library's)."""
    n = st.batch_size_of(batch)
    num_sources = jax.eval_shape(losses_fn, params, batch).shape[0]
    program, treedef, param_leaves, _, example_leaves = fs._trace(losses_fn, params, batch)
    plans = program.plans
    if any(plan.rule == "vmap" for plan in plans):
        raise ValueError("prototype: every leaf must have a fast rule")
    dtypes = [st.accumulation_dtype(jnp.result_type(x)) for x in param_leaves]
    tap_nodes = []
    for plan in plans:
        if plan.rule in ("dense", "positions", "embedding", "per-layer"):
            for node, _ in plan.uses:
                if all(node is not t for t in tap_nodes):
                    tap_nodes.append(node)
    if stacked:
        cts, inputs, reach = stacked_cotangents(
            program, param_leaves, example_leaves, num_sources, tap_nodes
        )
        deltas = {
            (s, idx): [None if x is None else x[:, s] for x in cts[idx]]
            for idx, ss in reach.items()
            for s in ss
        }
    else:
        deltas, inputs = fs._cotangents(
            program, param_leaves, example_leaves, num_sources, tap_nodes
        )
        cts, reach = None, None
    base_env = dict(zip(program.param_vars, param_leaves))
    fs._run(
        [n_ for n_ in program.nodes if all(v not in program.example_dependent for v in n_.outvars)],
        base_env,
    )
    means, m2s = [], []
    for k, plan in enumerate(plans):
        shape = tuple(jnp.shape(param_leaves[k]))
        nodes_k = [node for node, _ in plan.uses]
        sources = [
            s for s in range(num_sources) if any((s, node.index) in deltas for node in nodes_k)
        ]
        if not sources:
            means.append(jnp.zeros((num_sources,) + shape, dtypes[k]))
            m2s.append(jnp.zeros((num_sources,) + shape, dtypes[k]))
            continue
        if plan.rule == "dense":
            node, pos = plan.uses[0]
            a = inputs[id(node.invars[1 - pos])]
            d = cts[node.index][0] if stacked else [deltas[(s, node.index)][0] for s in sources]
            if means_only:
                mean_s = dense_means(plan, a, d, sources, num_sources, dtypes[k])
                m2_s = None
            else:
                mean_s, m2_s = dense_moments(
                    plan, a, d, sources, num_sources, dtypes[k], fused=fused, check=check
                )
        elif plan.rule == "positions" and means_only:
            node, pos = plan.uses[0]
            a = inputs[id(node.invars[1 - pos])]
            mean_s = positions_means(
                plan, a, [deltas[(s, node.index)][0] for s in sources], dtypes[k]
            )
            m2_s = None
        elif plan.rule == "positions":
            node, pos = plan.uses[0]
            a = inputs[id(node.invars[1 - pos])]
            mean_s, m2_s = fs._positions_moments(
                plan, a, [deltas[(s, node.index)][0] for s in sources], dtypes[k]
            )
        elif plan.rule == "embedding":
            node, _ = plan.uses[0]
            mean_s, m2_s = fs._embedding_moments(
                plan,
                inputs[id(node.invars[1])],
                [deltas[(s, node.index)][0] for s in sources],
                dtypes[k],
            )
        else:
            mean_s, m2_s = fs._per_layer_moments(
                program, k, plan, base_env, inputs, deltas, sources, n, dtypes[k]
            )
        means.append(_full(mean_s, sources, num_sources, shape, dtypes[k]))
        if not means_only:
            m2s.append(_full(m2_s, sources, num_sources, shape, dtypes[k]))
    if means_only:
        return jax.tree.unflatten(treedef, means)
    return st.Moments(
        jnp.asarray(n, jnp.float32),
        jax.tree.unflatten(treedef, means),
        jax.tree.unflatten(treedef, m2s),
    )


def source_grad_stats(losses_fn, params, batch, **kwargs) -> st.GradStats:
    """``bj.source_grad_stats(..., method="fast")`` through :func:`fast_moments`."""
    return st.grad_stats_from_moments(fast_moments(losses_fn, params, batch, **kwargs))


def source_means(losses_fn, params, batch):
    """Per-source mean gradients ``[S, *leaf]`` with ``jax.jacrev`` (what the benchmarks and
    experiments feed mmpareto): one forward, one S-wide backward (zeros included)."""
    return jax.jacrev(lambda p: jnp.mean(losses_fn(p, batch), axis=1))(params)


def fast_source_means(losses_fn, params, batch):
    """Per-source mean gradients only, on the fast path: the library's per-source
    cotangents (each source's backward over the layers it reaches) and one matmul per
    layer for all sources; no squares, no variance."""
    return fast_moments(losses_fn, params, batch, means_only=True)


def sum_over_sources(tree):
    """The fixed-weight gradient ``sum_s mean[s]`` as ``S - 1`` additions per leaf."""

    def one(m):
        total = m[0]
        for s in range(1, m.shape[0]):
            total = total + m[s]
        return total

    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------------------
# The bogc update: dempster aggregation, absolute noise.


def _bogc_block(mean, var, count, kappa, gamma, prior_weight, eps):
    """The chain on ``[S, m]`` coordinates: the calibrated ``[m]`` and the diagnostics'
    partial sums ``(sum T w_s, sum touched_s, sum m_theta, count(T > 0))``."""
    num = mean.shape[0]
    mu = [mean[s] for s in range(num)]
    inv_n = 1.0 / jnp.asarray(count).astype(var.dtype)
    v = [var[s] * inv_n for s in range(num)]
    touched = [(m != 0) | (x != 0) for m, x in zip(mu, v)]
    t_count = sum(t.astype(mean.dtype) for t in touched)
    inv_t = 1.0 / jnp.maximum(t_count, 1.0)
    unit = None
    for m, x, t in zip(mu, v, touched):
        mag = jnp.where(t, jnp.maximum(jnp.abs(m), jnp.sqrt(x)), 0.0)
        unit = mag if unit is None else jnp.maximum(unit, mag)
    unit = jnp.where(unit > 0, unit, 1.0)
    inv_unit = 1.0 / unit
    floor = (
        eps * inv_t * sum(jnp.where(t, jnp.square(m * inv_unit), 0.0) for m, t in zip(mu, touched))
    )
    noise = [x * inv_unit * inv_unit + floor for x in v]
    mean_noise = inv_t * sum(jnp.where(t, z, 0.0) for z, t in zip(noise, touched))
    mean_noise = jnp.where(mean_noise > 0, mean_noise, 1.0)
    lam = [
        jnp.where(t, 1.0 / jnp.maximum(z / mean_noise, 1e-30), 0.0) for z, t in zip(noise, touched)
    ]
    mean_lam = inv_t * sum(lam)
    mean_lam = jnp.where(mean_lam > 0, mean_lam, 1.0)
    e = [jnp.where(t, kappa * jnp.power(x / mean_lam, gamma), 0.0) for x, t in zip(lam, touched)]
    inv_total = 1.0 / (prior_weight + sum(e))
    m_theta = prior_weight * inv_total
    share = m_theta * inv_t
    w = [jnp.where(t, x * inv_total + share, 0.0) for x, t in zip(e, touched)]
    calibrated = t_count * sum(x * m for x, m in zip(w, mu))
    any_touch = t_count > 0
    partial = (
        jnp.stack([jnp.sum(t_count * x) for x in w]),
        jnp.stack([jnp.sum(t.astype(mean.dtype)) for t in touched]),
        jnp.sum(jnp.where(any_touch, m_theta, 0.0)),
        jnp.sum(any_touch.astype(mean.dtype)),
    )
    return calibrated, partial


def _diagnostics(partial):
    num_w, num_t, sum_u, num_any = partial
    per_source = num_w / jnp.maximum(num_t, 1.0)
    return per_source.astype(jnp.float32), (sum_u / jnp.maximum(num_any, 1.0)).astype(jnp.float32)


def bogc_calibrate_leaf(mean, var, count, *, kappa=1.0, gamma=1.0, prior_weight=1.0, eps=1e-3):
    """``bogc._calibrate_leaf`` (dempster, absolute) with the sources unrolled.

    Same maths as ``coordinate_weights`` + ``_calibrate_leaf``, per coordinate ``d``,
    written on the ``S`` arrays ``mean[s]``/``var[s]``.
    """
    calibrated, partial = _bogc_block(
        mean.reshape(mean.shape[0], -1), var.reshape(var.shape[0], -1), count,
        kappa, gamma, prior_weight, eps,
    )  # fmt: skip
    return (calibrated.reshape(mean.shape[1:]), *_diagnostics(partial))


def bogc_calibrate_blocked(
    grads, mean, var, count, *, block=1 << 14, kappa=1.0, gamma=1.0, prior_weight=1.0, eps=1e-3
):
    """The same, in blocks of ``block`` coordinates (a ``fori_loop`` over in-place slices),
    so that the chain's intermediates stay in cache: one read of ``mean``, ``var`` and
    ``grads`` and one write of the output. Also returns whether the leaf's inputs were
    finite (read in the same pass)."""
    num, size = mean.shape[0], math.prod(mean.shape[1:])
    blk = fs._chunk_for(size, 1, block)
    mean2, var2 = mean.reshape(num, size), var.reshape(num, size)
    g2 = grads.reshape(size)
    hyper = (kappa, gamma, prior_weight, eps)
    if blk >= size or blk < 256:
        out, partial = _bogc_block(mean2, var2, count, *hyper)
        finite = jnp.all(jnp.isfinite(mean2)) & jnp.all(jnp.isfinite(var2))
        finite = finite & jnp.all(jnp.isfinite(g2))
        return out.reshape(mean.shape[1:]), _diagnostics(partial), finite
    nb = size // blk
    mean3, var3 = mean2.reshape(num, nb, blk), var2.reshape(num, nb, blk)
    g3 = g2.reshape(nb, blk)

    def body(i, carry):
        out, partial, finite = carry
        mu = jax.lax.dynamic_index_in_dim(mean3, i, 1, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(var3, i, 1, keepdims=False)
        g = jax.lax.dynamic_index_in_dim(g3, i, 0, keepdims=False)
        cal, part = _bogc_block(mu, v, count, *hyper)
        ok = jnp.all(jnp.isfinite(mu)) & jnp.all(jnp.isfinite(v)) & jnp.all(jnp.isfinite(g))
        out = jax.lax.dynamic_update_index_in_dim(out, cal.astype(out.dtype), i, 0)
        partial = jax.tree.map(jnp.add, partial, part)
        return out, partial, finite & ok

    zeros = (
        jnp.zeros(num, mean.dtype),
        jnp.zeros(num, mean.dtype),
        jnp.zeros((), mean.dtype),
        jnp.zeros((), mean.dtype),
    )
    out, partial, finite = jax.lax.fori_loop(
        0, nb, body, (jnp.zeros((nb, blk), grads.dtype), zeros, jnp.ones((), bool))
    )
    return out.reshape(mean.shape[1:]), _diagnostics(partial), finite


def bogc_update(grads, grad_stats, *, blocked=False, **hyper):
    """The bogc update (no state, no mask): the incoming grads where an input is not
    finite, as the library does. ``blocked``: :func:`bogc_calibrate_blocked`."""
    leaves, treedef = jax.tree.flatten(grads)
    means = treedef.flatten_up_to(grad_stats.mean)
    variances = treedef.flatten_up_to(grad_stats.var)
    count = grad_stats.count
    finite = jnp.isfinite(count) & (count > 0)
    outs = []
    for g, m, v in zip(leaves, means, variances):
        if blocked:
            cal, _, ok = bogc_calibrate_blocked(g, m, v, count, **hyper)
            finite = finite & ok
        else:
            cal, _, _ = bogc_calibrate_leaf(m, v, count, **hyper)
            finite = finite & jnp.all(jnp.isfinite(m)) & jnp.all(jnp.isfinite(v))
            finite = finite & jnp.all(jnp.isfinite(g))
        outs.append(cal)
    out = [jnp.where(finite, c.astype(g.dtype), g) for c, g in zip(outs, leaves)]
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------------------
# The mmpareto update (rescale="leaf"), two passes over the encoder's statistics.


def mmpareto_update(grads, means, leaf_labels, *, gamma=1.5, fusion=0, degenerate=1e-12):
    """``bj.mmpareto(...).update`` (leaf rescale; default source layout), restructured.

    Per leaf: one pass for ``max |g_f|, |g_u|, |g|``, one for ``<a, a>, <b, b>, <a, b>,
    <g, g>`` (scaled), and the output pass. ``|d|**2`` follows from the inner products:
    ``|d / scale|**2 = 4 (c**2 aa + 2 c (1 - c) ab + (1 - c)**2 bb)`` per leaf.
    """
    leaves, treedef = jax.tree.flatten(grads)
    mean_leaves = treedef.flatten_up_to(means)
    m = max(label for label in leaf_labels if label is not None) + 1
    out = list(leaves)
    for i in range(m):
        idx = [k for k, label in enumerate(leaf_labels) if label == i]
        src = i + (i >= fusion)
        g_f = [mean_leaves[k][fusion] for k in idx]
        g_u = [mean_leaves[k][src] for k in idx]
        g = [leaves[k] for k in idx]
        tops = [
            (jnp.max(jnp.abs(a)), jnp.max(jnp.abs(b)), jnp.max(jnp.abs(x)))
            for a, b, x in zip(g_f, g_u, g)
        ]
        top = jnp.max(jnp.stack([jnp.maximum(ta, tb) for ta, tb, _ in tops]))
        scale = jnp.where(top > 0, top, 1.0)
        inv = 1.0 / scale
        prods = []
        for a, b, x, (_, _, tx) in zip(g_f, g_u, g, tops):
            gs = jnp.where(tx > 0, tx, 1.0)
            an, bn, xn = a * inv, b * inv, x / gs
            prods.append(
                (jnp.sum(an * an), jnp.sum(bn * bn), jnp.sum(an * bn), jnp.sum(xn * xn), gs)
            )
        v11 = sum(p[0] for p in prods)
        v22 = sum(p[1] for p in prods)
        v12 = sum(p[2] for p in prods)
        ok = (v11 > 0) & (v22 > 0)
        cos = jnp.where(
            ok, v12 / (jnp.sqrt(jnp.where(ok, v11, 1.0)) * jnp.sqrt(jnp.where(ok, v22, 1.0))), 0.0
        )
        denom = v11 + v22 - 2.0 * v12
        interior = (v22 - v12) / jnp.where(denom > 0, denom, 1.0)
        c_min = jnp.where(v12 >= v11, 0.999, jnp.where(v12 >= v22, 0.001, interior))
        c = jnp.where(cos > 0, 0.5, c_min)

        def d_sq(aa, bb, ab, c=c):
            return 4.0 * (c * c * aa + 2.0 * c * (1.0 - c) * ab + (1.0 - c) ** 2 * bb)

        group = d_sq(v11, v22, v12)
        bad = group <= degenerate * 4.0 * jnp.maximum(v11, v22)
        for k, a, b, x, (aa, bb, ab, xx, gs) in zip(idx, g_f, g_u, g, prods):
            dd = d_sq(aa, bb, ab)
            use_d = (dd > 0) & ~bad
            ratio = jnp.sqrt(xx) / jnp.sqrt(jnp.where(use_d, dd, 1.0))
            factor = jnp.maximum(ratio * (gs / scale), 1.0)
            direction = 2.0 * (c * a + (1.0 - c) * b)
            out[k] = jnp.where(use_d, gamma * factor * direction, gamma * x)
    return jax.tree.unflatten(treedef, out)


def num_params(tree) -> int:
    return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree))
