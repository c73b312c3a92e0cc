"""What the benchmark scripts share: interleaved timing and one training step per method.

``bench.py``, ``prototypes/before_after.py`` and ``prototypes/profile_steps.py`` time the
same steps the same way; they take them from here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

STEP_METHODS = ("joint", "joint_uni", "bogc", "bogc_repr", "cggm", "ogm_ge", "mmpareto")


def time_interleaved(
    fns: dict, repeats: int, budget_s: float = 5.0, clock: str = "wall", warmup: bool = False
) -> dict:
    """Median seconds per call of each ``name -> (fn, args)``, calls interleaved.

    With ``warmup`` every function runs once before the clock starts; then ``repeats``
    rounds call each function in turn; a function stops repeating once it has used
    ``budget_s``. ``clock="wall"``: elapsed time; ``"cpu"``: CPU time of this process
    (all its threads), which on a shared CPU counts the work done rather than the time
    spent waiting for a core.
    """
    import jax  # pylint: disable=g-import-not-at-top

    now = time.perf_counter if clock == "wall" else time.process_time
    for fn, args in fns.values() if warmup else ():
        jax.block_until_ready(fn(*args))
    times: dict = {k: [] for k in fns}
    spent = {k: 0.0 for k in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            if times[name] and spent[name] > budget_s:
                continue
            start = now()
            jax.block_until_ready(fn(*args))
            elapsed = now() - start
            times[name].append(elapsed)
            spent[name] += elapsed
    return {k: sorted(v)[len(v) // 2] for k, v in times.items() if v}


def in_fresh_process(script: str, args: list, timeout_s: float | None = None):
    """``python script *args --result-file PATH`` in a new process, its output passed
    through: the JSON the script wrote to ``PATH``, or None if it ran past ``timeout_s``
    seconds (it is then stopped; a failure raises ``CalledProcessError``).

    One process per measurement: a process that has run a large model measures the next
    one on a fragmented heap (the CNN's statistics at 3.2x a gradient instead of 1.8x
    after the 1024-wide MLP; a 10M-parameter bogc step at 11x a joint step instead of 5x).
    """
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.json")
        cmd = [sys.executable, script, *map(str, args), "--result-file", path]
        try:
            subprocess.run(cmd, check=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        with open(path) as f:
            return json.load(f)


def training_step(
    bj, name: str, losses_fn, forward, params, labels, n: int, means: str = "fast", parts=None
):
    """``(step, state)``: one training step of ``name`` (+ Adam, lr 1e-3), not jitted.

    ``step(params, state, batch) -> (params, state)``. ``bj`` is the library module (a
    benchmark may pass another revision's). Methods:

    - ``joint``: the fusion loss, the auxiliary heads on stop-gradient features (the unit
      of the step ratios); ``joint_uni``: the fixed-weight sum of the three losses;
    - ``bogc``: ``bj.source_grad_stats(method="fast")`` -> ``bj.bogc(3)``;
    - ``cggm``, ``ogm_ge``: the summed losses' gradient and the auxiliary heads' batch
      accuracies -> ``bj.cggm(labels, rho=1.3)`` / ``bj.ogm_ge(labels, alpha=0.1)``;
    - ``bogc_repr``: ``bj.representation_bogc`` (its defaults: diagonal posteriors,
      linearised moments) with ``parts = (encode, head_params)`` of the network, the
      fusion head reading both features and each auxiliary head one; its ``grads``
      replace the gradient;
    - ``mmpareto``: per-source mean gradients -> ``bj.mmpareto(labels, gamma=1.5)``, the
      means by ``bj.source_grad_means`` (``means="fast"``) or ``jax.jacrev`` of the
      ``[S]`` mean losses (``means="jacrev"``, or where the library has no
      ``source_grad_means``).
    """
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top

    def total(p, b):
        return jnp.sum(jnp.mean(losses_fn(p, b), axis=1))

    def fusion_only(p, b):
        losses, _ = forward(p, b, stop_heads=True)
        return jnp.sum(jnp.mean(losses, axis=1))

    def with_scores(p, b):
        losses, logits = forward(p, b)
        scores = jnp.stack([jnp.mean(jnp.argmax(z, -1) == b[2]) for z in logits[1:]])
        return jnp.sum(jnp.mean(losses, axis=1)), scores

    transforms = {
        "bogc": lambda: bj.bogc(3, kappa=1.0, gamma=1.0),
        "cggm": lambda: bj.cggm(labels, rho=1.3),
        "ogm_ge": lambda: bj.ogm_ge(labels, alpha=0.1),
        "mmpareto": lambda: bj.mmpareto(labels, gamma=1.5),
    }
    tx = optax.chain(transforms.get(name, optax.identity)(), optax.adam(1e-3))
    use_jacrev = means == "jacrev" or not hasattr(bj, "source_grad_means")
    if name == "bogc_repr":
        if parts is None:
            raise ValueError("training_step('bogc_repr') needs parts=(encode, head_params)")
        encode, head_params = parts
        heads = [bj.LinearHead((0, 1)), bj.LinearHead((0,)), bj.LinearHead((1,))]
        method = bj.representation_bogc(encode, head_params, heads, targets_fn=lambda b: b[2])

        def repr_step(p, s, b):
            grads, method_state, _ = method.grads(p, s[0], b)
            updates, adam_state = tx.update(grads, s[1], p)
            return optax.apply_updates(p, updates), (method_state, adam_state)

        return repr_step, (method.init(params), tx.init(params))

    def step(p, s, b):
        extra = {}
        if name == "joint":
            grads = jax.grad(fusion_only)(p, b)
        elif name == "joint_uni":
            grads = jax.grad(total)(p, b)
        elif name == "bogc":
            stats = bj.source_grad_stats(losses_fn, p, b, method="fast")
            grads, extra = stats.fixed_weight_grads(), {"grad_stats": stats}
        elif name == "mmpareto":
            if use_jacrev:
                mean = jax.jacrev(lambda q: jnp.mean(losses_fn(q, b), axis=1))(p)
                stats = bj.GradStats(jnp.float32(n), mean, jax.tree.map(jnp.zeros_like, mean))
            else:
                stats = bj.source_grad_means(losses_fn, p, b)
            grads, extra = stats.fixed_weight_grads(), {"grad_stats": stats}
        else:
            grads, scores = jax.grad(with_scores, has_aux=True)(p, b)
            extra = {"modality_scores": scores}
        updates, s = tx.update(grads, s, p, **extra)
        return optax.apply_updates(p, updates), s

    return step, tx.init(params)
