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
gradients are never formed. Checking the ratio is a pass over the products; it is skipped
where a count of zeros rules cancellation out (a per-example gradient that is zero for
``k`` of the ``n`` examples has a ratio of at most ``(n - k) / k``: ReLU features and the
cotangents behind a ReLU), one decision for all the wide layers of the program.

The layers are found in the program of ``losses_fn`` itself, so models need no change:
the per-example losses are traced to a jaxpr (nested ``jit`` calls and ``checkpoint``
blocks are inlined), every equation where a parameter (through its own batch-free
computation: reshapes, casts, ``softplus``, ...) meets data of the batch is a *tap*, and
a rule is chosen per parameter leaf (:func:`fast_stats_plan` shows which) and looked up
in one table of rules (``dispatch.RULES``):

- ``dense``: ``dot_general`` with one position per weight and example (``[B, D]`` inputs,
  also grouped/batched einsums): the closed form above. Each input and cotangent column
  is first divided by a power of two that brings it to order one (exact), so that the
  squares neither underflow nor overflow wherever the per-example gradient is in range.
- ``embedding``: a row ``gather`` (``jnp.take``, ``nnx.Embed``): rows repeated within an
  example are summed first (``g_i[r]`` sums its positions), then exact centred moments
  over the touched rows; memory of the order of the cotangents. Out-of-range ids are
  credited as autodiff does in the gather's mode: clamped (``"clip"``) or dropped (fill,
  drop and the default ``promise_in_bounds``, whose transpose skips them).
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
``MATERIALISE_BUDGET`` numbers on a CPU (2 MiB in float32, to stay in cache) and
``ACCELERATOR_MATERIALISE_BUDGET`` on a GPU or TPU (256 MiB, to keep it busy): exact
two-pass moments per chunk, merged with Chan's formula. Moments are kept in float32
(float64 stays float64).

Cost: one forward pass, one backward pass per source (a source built separately, e.g. a
row of ``jnp.stack``, skips the layers it does not reach), and the per-layer products.
Memory: the activations, the per-source cotangents of the taps and the chunks; never
``B x P``. Examples must be independent (no batch statistics), as for ``vmap``.

Layout of this package (one idea per module):

- ``program``: the flat program (nested calls inlined), running it, cutting it down.
- ``plan``: which equations are taps and which rule serves each leaf; ``fast_stats_plan``.
- ``cotangents``: the taps' per-example output cotangents, one backward pass per source.
- ``kernels``: what the rules share (the job of one leaf, products, streaming in chunks).
- ``dense``, ``embedding``, ``per_leaf``: the rules.
- ``dispatch``: the table of rules, the ``vmap`` fallback, ``fast_moments``/``auto_moments``
  and, for one batch on one device, ``one_batch_grad_stats``.
"""

from bogc_jax._fast_stats.dispatch import auto_moments, fast_moments, one_batch_grad_stats
from bogc_jax._fast_stats.plan import fast_stats_plan

__all__ = ["auto_moments", "fast_moments", "fast_stats_plan", "one_batch_grad_stats"]
