"""The dense rules: ``dot_general`` taps in closed form, shared positions and convolutions.

A tap's input, cotangent and weight are brought to a canonical ``[g, P, C]``, ``[g, P, F]``
and ``[g, C, F]`` (:class:`Canonical`; ``g`` weight-sharing groups, ``P`` positions per
example that share the weight, ``C`` input and ``F`` output features); a convolution's
kernel gradient is a dense gradient over its patches (im2col). With one position per
example the per-example gradient is ``g_i = a_i (x) delta_i`` and its moments have a closed
form (:func:`dense_leaves_moments`); with several, ``g_i = sum_p a_ip (x) delta_ip`` is formed a
chunk of examples at a time (:func:`positions_moments`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bogc_jax import _moments, _scale
from bogc_jax._fast_stats import kernels
from bogc_jax._fast_stats.plan import Plan, dot_dims

# The dense rule's uncentred second moment loses about n mean**2 / m2 units in the last
# place; above this ratio it is recomputed from centred inputs (three products, not two).
CANCELLATION_LIMIT = 64.0

# A leaf whose products have at most this many entries is checked for cancellation on the
# products themselves (a cheap pass there); larger ones by counting zeros of the operands.
SMALL_PRODUCT = 1 << 16


@dataclasses.dataclass
class Canonical:
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


def _layout_fn(plan: Plan, shape_in_order, order):
    """``[S, g, C, F]`` (dims ``order`` of the operand, flattened) -> ``[S, *leaf_shape]``."""
    to_operand = tuple(1 + int(i) for i in np.argsort(np.array(order)))

    def layout(x):
        x = jnp.transpose(x.reshape((x.shape[0],) + tuple(shape_in_order)), (0,) + to_operand)
        return kernels.pull_back(plan.chain, x, 1)

    return layout


def canonical_dot(plan: Plan) -> Canonical:
    """The canonical form of a ``dot_general`` tap (any dimension numbers)."""
    node, pos = plan.uses[0]
    v_shape = tuple(node.invars[pos].aval.shape)
    a_shape = tuple(node.invars[1 - pos].aval.shape)
    mine_b, mine_c, mine_f, other_b, other_c, other_f = dot_dims(node, pos)
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
    layout = _layout_fn(plan, tuple(v_shape[d] for d in order), order)
    return Canonical(g, positions, c, f, inputs, cotangent, layout)


def canonical_conv(plan: Plan) -> Canonical:
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
    layout = _layout_fn(plan, tuple(rhs_shape[d] for d in order), order)
    return Canonical(1, positions, chans * k, outs, inputs, cotangent, layout)


def _power_of_two_scale(x, axis: int):
    """Per column, ``(2**e, 2**-e)`` with ``max_i |x_i| / 2**e`` in ``[1, 2)``.

    Multiplying by ``2**-e`` is exact and brings every column to order one, so that
    squares neither underflow nor overflow; columns of zeros (or non-finite ones) get 1,
    subnormal peaks ``2**-126``. The exponent is read from the float's bits and both
    vectors are materialised: broadcast into the products' operands, a recomputed
    ``frexp``/``ldexp`` per entry would cost more than the products' inputs themselves.
    """
    peak = jnp.max(jnp.abs(x), axis=axis)
    top = 2 * (jnp.finfo(x.dtype).maxexp - 1)  # 254 (float32), 2046 (float64)
    biased = jnp.clip(_scale.biased_exponent(peak), 1, top)  # subnormal peaks: 2**-126
    scale = _scale.power_of_two(biased, x.dtype)
    scale = jnp.where(jnp.isfinite(peak) & (peak > 0), scale, jnp.ones_like(peak))
    return jax.lax.optimization_barrier((scale, 1.0 / scale))


def _centred_m2(a, d, n):
    """``m2`` from centred inputs: ``g_i - mean = a_bar d'_i + (a'_i d_i - cov)``.

    ``a``: ``[n, g, c]``; ``d``: ``[n, g, F]`` (every source's cotangent columns side by
    side). With ``x' = x - mean(x)``, ``d' = delta - mean(delta)`` and
    ``c = (1/n) sum x' delta``: ``m2 = mean(x)**2 sum_i d'_i**2 + (sum_i x'_i**2 delta_i**2
    - n c**2) + 2 mean(x) sum_i x'_i delta_i d'_i``; only centred terms are squared.
    """
    a_bar = _moments.sum_as_product(a, 0) / n  # [g, c]
    d_c = d - _moments.sum_as_product(d, 0) / n
    a_c = a - a_bar
    cov = kernels.contract("ngc,ngf->gcf", a_c, d) / n  # sum a'd / n
    s2 = kernels.contract("ngc,ngf->gcf", jnp.square(a_c), jnp.square(d))  # sum a'^2 d^2
    s3 = kernels.contract("ngc,ngf->gcf", a_c, d * d_c)  # sum a' d d'
    sq_d = _moments.sum_as_product(jnp.square(d_c), 0)[:, None, :]  # sum d'^2, [g, 1, F]
    ab = a_bar[:, :, None]  # [g, c, 1]
    return jnp.square(ab) * sq_d + (s2 - n * jnp.square(cov)) + 2.0 * ab * s3


def _dense_operands(job: kernels.LeafJob):
    """The tap's input ``[n, g, c]`` and its sources' cotangents side by side ``[n, g, S f]``."""
    canon = canonical_dot(job.plan)
    a, dtype = job.tap_input(), job.dtype
    n, g, c, f = a.shape[0], canon.g, canon.c, canon.f
    a = canon.inputs(a.astype(dtype)).reshape(n, g, c)
    parts = [canon.cotangent(x.astype(dtype)).reshape(n, g, f) for x in job.tap_deltas()]
    d = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)

    def layout(x):  # [g, c, S f] -> [S, g, c, f] -> [S, *leaf_shape]
        return canon.layout(jnp.moveaxis(x.reshape(g, c, len(parts), f), 2, 0))

    return a, d, layout


def _products(a, d):
    """``(sum_i a_i d_i, sum_i a_i**2 d_i**2)`` per group: ``[n, g, c], [n, g, F] -> [g, c, F]``.

    The operand with fewer entries is transposed once (examples last) and both products
    read it: a product contracting the leading axes would otherwise have XLA transpose its
    first operand, and its square, inside each product's input fusion. For a wide layer
    feeding a small head (``c`` much larger than ``F``) that is the cotangent, and the
    ``[g, F, c]`` results are transposed instead (``F c`` entries, not ``n c``).
    """
    if a.shape[2] <= d.shape[2]:
        left, right = jax.lax.optimization_barrier(
            (jnp.transpose(a, (1, 2, 0)), jnp.swapaxes(d, 0, 1))
        )
        spec = "gcn,gnf->gcf"
    else:
        left, right = jax.lax.optimization_barrier(
            (jnp.transpose(d, (1, 2, 0)), jnp.swapaxes(a, 0, 1))
        )
        spec = "gfn,gnc->gcf"
    return (
        kernels.contract(spec, left, right),
        kernels.contract(spec, jnp.square(left), jnp.square(right)),
    )


@dataclasses.dataclass
class _Scaled:
    """A dense leaf's operands with every column divided by a power of two (exact).

    ``a``: ``[n, g, c]`` inputs; ``d``: ``[n, g, S f]`` cotangents of the ``S`` sources side
    by side; ``scale_a`` (``[g, c]``) and ``scale_d`` (``[g, S f]``) undo the division;
    ``layout`` maps ``[g, c, S f]`` to ``[S, *leaf_shape]``.
    """

    a: jax.Array
    d: jax.Array
    scale_a: jax.Array
    scale_d: jax.Array
    layout: Callable

    @property
    def n(self) -> int:
        return self.a.shape[0]

    @property
    def product_size(self) -> int:
        """Entries of one product ``[g, c, S f]``."""
        return self.a.shape[1] * self.a.shape[2] * self.d.shape[2]


def _scaled(job: kernels.LeafJob) -> _Scaled:
    a, d, layout = _dense_operands(job)
    scale_a, inverse_a = _power_of_two_scale(a, 0)  # [g, c]
    scale_d, inverse_d = _power_of_two_scale(d, 0)  # [g, S f]
    return _Scaled(a * inverse_a, d * inverse_d, scale_a, scale_d, layout)


def _cannot_cancel(op: _Scaled):
    """True when no coordinate of the leaf can reach the cancellation limit ``L``.

    A per-example gradient ``u_i = a_i d_i`` that is zero for ``k`` of the ``n`` examples
    has ``n sum u**2 - (sum u)**2 >= (sum u)**2 k / (n - k)`` (Cauchy-Schwarz over its
    ``n - k`` other terms), so its ratio ``n mean**2 / m2`` is at most ``(n - k) / k``,
    which is at most ``L`` once ``k >= n / (1 + L)``. Coordinate ``(c, f)`` has at least
    as many zeros as input column ``c`` and as cotangent column ``f``; it is enough that,
    in every group, all input columns or all cotangent columns have that many (ReLU
    features and the cotangents behind a ReLU usually do). Counting is a pass over the
    ``[n, c]`` and ``[n, S f]`` operands, not over the ``[c, S f]`` products.
    """
    needed = math.ceil(op.n / (1.0 + CANCELLATION_LIMIT))

    def fewest_zeros(x):  # [n, g, k] -> [g]
        counts = _moments.sum_as_product((x == 0).astype(x.dtype), 0)
        return jnp.min(counts, axis=-1)

    return jnp.all((fewest_zeros(op.a) >= needed) | (fewest_zeros(op.d) >= needed))


def _finish(op: _Scaled, total, m2):
    """``(mean, m2)`` in the leaf's layout, the column scales undone."""
    factor = op.scale_a[:, :, None] * op.scale_d[:, None, :]  # [g, c, S f]
    mean = total * (factor / op.n)
    m2 = (jnp.maximum(m2, 0.0) * factor) * factor  # not factor**2, which may overflow
    return op.layout(mean), op.layout(m2)


def _may_cancel(n: int, total, squares):
    """True where ``squares - total**2 / n`` would lose more than ``L`` units in the last
    place somewhere: ``(1 + L) total**2 > L n squares``, ``L`` the cancellation limit."""
    limit = CANCELLATION_LIMIT
    return jnp.any((1.0 + limit) * jnp.square(total) > (limit * n) * squares)


def _checked(op: _Scaled, products=None):
    """The two-product form, recomputed from centred inputs where it would cancel.

    ``products``: ``(sum_i a_i d_i, sum_i a_i**2 d_i**2)`` when already formed.
    """
    n = op.n
    total, squares = _products(op.a, op.d) if products is None else products
    # The check is the only pass over the products before the fusions that write the
    # leaf's statistics: otherwise the branch hands back the products' buffer unchanged
    # (only the branch's output is read afterwards, so that it may reuse that buffer).
    risky = _may_cancel(n, total, squares)
    out = jax.lax.cond(risky, lambda: _centred_m2(op.a, op.d, n), lambda: squares)
    return _finish(op, total, jnp.where(risky, out, out - jnp.square(total) / n))


def dense_leaves_moments(jobs: list[kernels.LeafJob], place: Callable) -> list:
    """Closed-form moments of ``g_i = a_i (x) delta_i`` (one position per example), for
    several leaves at once: ``place(job, mean, m2)`` for each job.

    ``mean = (1/n) sum_i a_i delta_i`` and ``m2 = sum_i a_i**2 delta_i**2 - n mean**2``: two
    matmuls ``[n, c]^T [n, S f]`` over all sources at once (their cotangents side by side),
    recomputed from centred inputs (:func:`_centred_m2`) where the second form would cancel
    (``n mean**2 > CANCELLATION_LIMIT m2``). Each input column and each cotangent column is
    first divided by a power of two that brings it to order one (exact), so that ``a**2``
    and ``delta**2`` cannot underflow or overflow where the per-example gradient
    ``a delta`` itself is in range; the moments are scaled back at the end. ``mean`` and
    ``m2`` have the shape ``[len(job.sources), *leaf_shape]``; ``place`` puts them where the
    caller wants them (every source's slot) inside the branch below, so that the outputs
    are written once.

    One branch serves all the leaves: when none of them can cancel, each takes the
    two-product form with no branch of its own; otherwise each is checked on its own
    (:func:`_checked`). A leaf whose products have at most :data:`SMALL_PRODUCT` entries is
    checked on its products, formed before the branch; a larger one by the zero count of
    :func:`_cannot_cancel`, with no pass over its products. One branch for the program
    costs nothing measurable on XLA:CPU, where one per leaf is a synchronisation point
    costing about a tenth of the statistics' time.
    """
    if not jobs:
        return []
    ops = [_scaled(job) for job in jobs]
    small = {
        i: _products(op.a, op.d) for i, op in enumerate(ops) if op.product_size <= SMALL_PRODUCT
    }
    large = [i for i in range(len(ops)) if i not in small]
    safe = [~_may_cancel(ops[i].n, *small[i]) for i in small]
    safe += [_cannot_cancel(ops[i]) for i in large]

    def unchecked():
        # The large products are formed here, from operands behind a barrier: both
        # branches form them from the same operands, and XLA would otherwise hoist them
        # out of the branch, leaving it the output passes alone, with nothing to overlap.
        held = dict(zip(large, jax.lax.optimization_barrier([(ops[i].a, ops[i].d) for i in large])))
        out = []
        for i, (job, op) in enumerate(zip(jobs, ops)):
            total, squares = small[i] if i in small else _products(*held[i])
            out.append(place(job, *_finish(op, total, squares - jnp.square(total) / op.n)))
        return out

    def checked():
        return [
            place(job, *_checked(op, small.get(i))) for i, (job, op) in enumerate(zip(jobs, ops))
        ]

    return jax.lax.cond(jnp.all(jnp.stack(safe)), unchecked, checked)


def positions_moments(job: kernels.LeafJob):
    """Exact moments when positions share the weight: ``g_i = sum_p a_ip (x) delta_ip``.

    Dense layers on ``[B, T, D]`` inputs and convolutions (over im2col patches). The
    per-example gradients of this leaf are formed chunk by chunk (two-pass moments per
    chunk, merged with Chan's formula).
    """
    is_conv = job.plan.uses[0][0].name == "conv_general_dilated"
    canon = (canonical_conv if is_conv else canonical_dot)(job.plan)
    a, deltas, dtype = job.tap_input(), job.tap_deltas(), job.dtype
    n, num = a.shape[0], len(deltas)

    def grads(xs):  # a chunk of c examples -> [c, g, C, S * F]
        a_chunk, d_chunks = xs
        a_chunk = canon.inputs(a_chunk.astype(dtype))  # [c, g, P, C]
        d = jnp.concatenate([canon.cotangent(x.astype(dtype)) for x in d_chunks], axis=-1)
        return jnp.einsum("ngpc,ngpf->ngcf", a_chunk, d, precision=kernels.HIGHEST)

    per_example = canon.g * canon.c * (num * canon.f + canon.positions)
    chunk = kernels.chunk_for(n, per_example)
    mean, m2 = kernels.streamed_moments(grads, (a, tuple(deltas)), n, chunk)

    def layout(x):  # [g, C, S * F] -> [S, g, C, F] -> [S, *leaf_shape]
        x = jnp.moveaxis(x.reshape(canon.g, canon.c, num, canon.f), 2, 0)
        return canon.layout(x)

    return layout(mean), layout(m2)
