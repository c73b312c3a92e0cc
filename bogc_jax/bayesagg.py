"""BayesAgg-MTL (Achituve et al., ICML 2024) with its published settings.

The method of which representation-space BOGC is a variant: inverse-variance weights of
each task's (or head's) gradient w.r.t. the shared representation, per example and
dimension, averaged (``scale="mean"``) at the posterior-mean gradient, from a two-stage
Bayesian posterior over each head's last layer. Its shipped trainers use ``S = 1024``
Monte Carlo draws, the prior ``N(0, 0.005 I)`` and powers ``p = 0.1`` for classification,
``0.3`` for regression (overridden per data set: e.g. ``gamma = p = 0.0005`` on
CIFAR-MTL).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bogc_jax import representation as rep
from bogc_jax import representation_heads as rh

DEFAULT_POWER = {"softmax": 0.1, "sigmoid": 0.1, "mse": 0.3}


def bayesagg_mtl(
    encode_fn: Callable[[Any, Any], Any],
    head_params_fn: Callable[[Any], Sequence[tuple[Any, Any]]],
    heads: Sequence[rh.LinearHead],
    *,
    targets_fn: Callable[[Any], Any] | None = None,
    prior_variance: float = 0.005,
    power: float | Mapping[str, float] = DEFAULT_POWER,
    num_samples: int = 1024,
    chunk_size: int = 64,
    posterior: str = "full",
    full_data: str | None = None,
    refresh_every: int | None = None,
    ema_decay: float = 0.99,
    axis_name: Any = None,
) -> rep.RepresentationCalibration:
    r"""BayesAgg-MTL: ``c_{n,j} = sum_t (mu_t / V_t) / sum_t (1 / V_t) / B``.

    ``mu_t`` is the posterior-mean gradient of task slot ``t`` w.r.t. the shared
    representation and ``V_t = max(var_t, 1e-8) ** p`` (Monte Carlo for the classifiers,
    exact for regression); the posterior is one Newton step on the batch with the
    full-data posterior as prior. This is :func:`bogc_jax.representation_bogc` with
    ``aggregation="precision"``, ``scale="mean"``, ``centre="posterior"``,
    ``moments="monte_carlo"``. Multi-task: one representation (``encode_fn`` returns one
    array) and one :class:`~bogc_jax.LinearHead` per task reading it; multimodal: the same
    heads as BOGC's.

    The official code forms the full-data posterior at each epoch's first batch from the
    previous epoch's stored features; call the result's ``refresh(params, state, reps,
    targets)`` there (``full_data=None``, the default), or set ``full_data="epoch"`` /
    ``"ema"`` to accumulate it in the state instead. Before any refresh the prior is
    ``N(0, prior_variance I)``. ``posterior="full"`` is exact and costs a
    ``K (d + 1)``-square Cholesky per softmax head; use ``"diag"`` for wide heads.

    Args:
      encode_fn, head_params_fn, heads, targets_fn: as in
        :func:`bogc_jax.representation_bogc`.
      prior_variance: ``gamma``.
      power: ``p`` per loss (``{"softmax": .1, "sigmoid": .1, "mse": .3}``) or one number.
      num_samples, chunk_size: Monte Carlo draws, draws per chunk.
      posterior, full_data, refresh_every, ema_decay, axis_name: as in
        :func:`bogc_jax.representation_bogc`.

    Returns:
      A :class:`bogc_jax.RepresentationCalibration`.

    Example:
      Multi-task: two tasks on one shared representation.

      >>> import jax, jax.numpy as jnp, bogc_jax as bj
      >>> params = {"enc": jnp.ones((4, 3)) / 4, "t0": (jnp.zeros((3, 2)), jnp.zeros(2)),
      ...           "t1": (jnp.zeros((3, 1)), jnp.zeros(1))}
      >>> method = bj.bayesagg_mtl(
      ...     lambda p, b: jnp.tanh(b["x"] @ p["enc"]), lambda p: [p["t0"], p["t1"]],
      ...     [bj.LinearHead((0,), "softmax"), bj.LinearHead((0,), "mse")], num_samples=64)
      >>> batch = {"x": jnp.ones((8, 4)), "y": jnp.arange(8) % 2, "z": jnp.ones((8, 1))}
      >>> state = method.init(params)
      >>> grads, state, info = method.grads(params, state, batch, key=jax.random.key(0),
      ...                                   targets=[batch["y"], batch["z"]])
      >>> grads["enc"].shape
      (4, 3)

    References:
      Achituve, Diamant, Netzer, Chechik, Fetaya. Bayesian Uncertainty for Gradient
      Aggregation in Multi-Task Learning. ICML 2024, arXiv 2402.04005.
    """
    return rep.representation_bogc(
        encode_fn,
        head_params_fn,
        heads,
        targets_fn=targets_fn,
        aggregation="precision",
        posterior=posterior,
        moments="monte_carlo",
        num_samples=num_samples,
        chunk_size=chunk_size,
        scale="mean",
        centre="posterior",
        power=power,
        prior_variance=prior_variance,
        full_data=full_data,
        refresh_every=refresh_every,
        ema_decay=ema_decay,
        axis_name=axis_name,
    )
