"""What every rule shares: the job of one leaf, products over the examples, and streaming.

A rule receives a :class:`LeafJob` (the leaf's plan, the taps' per-example inputs and
per-source cotangents, the batch-free values of the program) and returns the ``(mean,
m2)`` of the leaf for the sources that reach it. Rules that form per-example gradients of
their leaf stream them in chunks of at most :func:`materialise_budget` numbers
(:func:`streamed_moments`): exact two-pass moments per chunk, merged with Chan's formula.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bogc_jax import _moments
from bogc_jax._fast_stats.plan import Plan, Program

# Per-example gradients of one leaf are streamed over the batch in chunks holding at most
# this many numbers (examples x sources x leaf size): 2 MiB in float32, so that a chunk
# stays in cache between forming the gradients and taking their moments.
MATERIALISE_BUDGET = 1 << 19

# The same budget on a GPU or TPU: 256 MiB in float32. A chunk must keep the accelerator
# busy; the CPU's budget gives chunks of one example for a 512 x 2048 layer of a sequence
# model, so a scan of B small steps per leaf (the 20M-parameter transformer's statistics
# took 12x a gradient on an H200 that way).
ACCELERATOR_MATERIALISE_BUDGET = 1 << 26

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass
class LeafJob:
    """Everything a rule may read to compute one parameter leaf's moments.

    Attributes:
      program: the flat program and its plans.
      k: the leaf's index among the parameter leaves.
      plan: ``program.plans[k]``.
      base_env: values of the batch-free part of the program (params, constants).
      inputs: ``{id(var): [n, ...]}``, the example-dependent inputs of the taps.
      deltas: ``{(source, node index): [[n, *out_shape] per output]}``, the cotangents.
      sources: the sources that reach the leaf's taps, in order.
      n: the number of examples.
      dtype: the accumulation dtype of the leaf.
    """

    program: Program
    k: int
    plan: Plan
    base_env: dict
    inputs: dict
    deltas: dict
    sources: list
    n: int
    dtype: Any

    def tap_input(self):
        """The example-dependent operand of the leaf's one tap (dense, conv, embedding)."""
        node, pos = self.plan.uses[0]
        return self.inputs[id(node.invars[1 - pos])]

    def tap_deltas(self) -> list:
        """Per source, the cotangent of the leaf's one tap's (first) output."""
        node, _ = self.plan.uses[0]
        return [self.deltas[(s, node.index)][0] for s in self.sources]


def contract(subscripts, x, y):
    """``einsum`` at full precision whose output may sum over sharded examples."""
    return jnp.einsum(
        subscripts, x, y, precision=HIGHEST, out_sharding=_moments.replicated_if_sharded(x, y)
    )


def pull_back(chain, x, lead: int):
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


def materialise_budget() -> int:
    """The chunk budget of the platform that runs the program: :data:`MATERIALISE_BUDGET`
    on a CPU, :data:`ACCELERATOR_MATERIALISE_BUDGET` on a GPU or TPU.

    The platform is that of ``jax.config.jax_default_device`` where one is set, else
    ``jax.default_backend()``. Either budget gives the same moments; only speed and the
    size of the temporaries depend on it.
    """
    device = getattr(jax.config, "jax_default_device", None)
    platform = getattr(device, "platform", device) or jax.default_backend()
    if platform == "cpu":
        return MATERIALISE_BUDGET
    return ACCELERATOR_MATERIALISE_BUDGET


def chunk_for(n: int, per_example_numbers: int, budget: int | None = None) -> int:
    """The largest divisor of ``n`` whose chunk holds at most ``budget`` numbers
    (default :func:`materialise_budget`)."""
    budget = materialise_budget() if budget is None else budget
    cap = max(1, budget // max(1, per_example_numbers))
    if cap >= n:
        return n
    return max(d for d in range(1, cap + 1) if n % d == 0)


def streamed_moments(grads_fn, xs, n: int, chunk: int):
    """``(mean, m2)`` over the examples (axis 0) of ``grads_fn(chunk of xs)``, by chunks.

    Two-pass within a chunk (``mean``, then ``sum (g - mean)**2``); chunks are merged with
    Chan's formula, so the result does not depend on the chunking.
    """

    def moments_of(chunk_xs):
        g = grads_fn(chunk_xs)
        mean = _moments.sum_as_product(g, 0) / g.shape[0]
        m2 = _moments.sum_as_product(jnp.square(g - mean), 0)
        return _moments.Moments(jnp.asarray(g.shape[0], jnp.float32), mean, m2)

    moments = moments_of(xs) if chunk >= n else _moments.scan_chunks(moments_of, xs, chunk)
    return moments.mean, moments.m2
