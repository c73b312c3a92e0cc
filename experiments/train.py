"""Training and evaluation: one method on one dataset, for any number of seeds.

:class:`Trainer` builds the model and the method's transform once and jits the step,
reused across seeds. The default step, for every registered method that brings no step
of its own (``MethodParts.step``), is::

    out   = forward(params, batch)                     # losses [S, B], logits, features
    grads = grad of sum_s mean_b losses[s] (+ the method's extra loss)
            or, for methods whose statistics hold it (grads_from_stats),
            grad_stats.fixed_weight_grads()            # no second backward pass
    updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
    params = params + updates

Every method sees the same batches: epoch ``e`` visits the training set in the order drawn
from ``default_rng(seed + 1_000_003)``, and step ``t`` gets the PRNG key
``fold_in(key(seed), t)``. After training, the test split gives the fused accuracy, each
modality's branch accuracy (its slice of the fusion head), the linear-probe accuracy of
each frozen encoder (:func:`ridge_probe`), the fused accuracy with each modality's input
zeroed, and the auxiliary heads' accuracies; the train split gives the fused, branch, head and
missing-modality accuracies (set against the test split's, how much of what was learned
is a shortcut). :func:`run_experiment` turns that
into one record per (method, seed).
"""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import models
from experiments.config import TrainConfig, record_config


def base_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """``adam(lr)`` or ``sgd(lr, momentum)``; with ``cfg.lr_schedule == "cosine"`` the
    learning rate decays from ``lr`` to 0 over ``total_steps`` (a cosine)."""
    if cfg.lr_schedule == "cosine":
        lr: Any = optax.cosine_decay_schedule(cfg.lr, max(total_steps, 1))
    elif cfg.lr_schedule == "constant":
        lr = cfg.lr
    else:
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine'; got {cfg.lr_schedule!r}.")
    if cfg.optimizer == "adam":
        return optax.adam(lr)
    if cfg.optimizer == "sgd":
        return optax.sgd(lr, momentum=cfg.momentum or None)
    raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {cfg.optimizer!r}.")


def make_model(dataset: data_lib.Dataset, cfg: TrainConfig, seed: int):
    """``(Functional, params)`` of the dataset's model, initialised from ``seed``."""
    return models.build(
        dataset.input_shapes, dataset.kinds, dataset.num_classes, cfg.model_config(), seed
    )


class Trainer:
    """One method on one dataset: jitted step and evaluation, reused across seeds."""

    def __init__(self, dataset: data_lib.Dataset, method: str, cfg: TrainConfig):
        self.dataset, self.method, self.cfg = dataset, method, cfg
        self.spec = methods_lib.METHODS[method]
        self.fn, params = make_model(dataset, cfg, seed=0)
        ctx = methods_lib.Context(
            num_modalities=dataset.num_modalities,
            fn=self.fn,
            params=params,
            base=base_optimizer(cfg, cfg.epochs * self.steps_per_epoch()),
            config=cfg,
            num_train=len(dataset.y_train),
        )
        self.parts = self.spec.make(ctx)
        self._method_step = self.parts.step or self._default_step
        self.step = jax.jit(self._indexed_step)
        self.eval_logits = jax.jit(self._eval_logits)
        self.features = jax.jit(self.fn.features)

    def _default_step(self, params, opt_state, batch, key):
        fn, parts, sg = self.fn, self.parts, self.spec.stop_gradient_heads
        if parts.grads_from_stats:
            out = jax.lax.stop_gradient(fn.forward(params, batch, sg))
            extra = parts.extra_args(params, batch, out, opt_state, key)
            grads = extra["grad_stats"].fixed_weight_grads()
        else:

            def loss_fn(p):
                out = fn.forward(p, batch, sg)
                loss = jnp.sum(jnp.mean(out["losses"], axis=1))
                if parts.extra_loss is not None:
                    loss = loss + parts.extra_loss(p, batch, out, opt_state)
                return loss, out

            (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            out = jax.lax.stop_gradient(out)
            extra = parts.extra_args(params, batch, out, opt_state, key)
        updates, opt_state = parts.tx.update(grads, opt_state, params, **extra)
        params = optax.apply_updates(params, updates)
        return params, opt_state, jnp.mean(out["losses"], axis=1)

    def _indexed_step(self, params, opt_state, xs, y, idx, seed, step):
        batch = (tuple(x[idx] for x in xs), y[idx])
        key = jax.random.fold_in(jax.random.key(seed), step)
        return self._method_step(params, opt_state, batch, key)

    def run_epoch(self, params, opt_state, xs, y, perm, seed: int, first_step: int):
        """One pass over ``perm`` (``[num_batches, batch]`` indices), a jitted step per batch.

        A Python loop of jitted steps, not ``lax.scan``: XLA's CPU convolutions inside a
        loop body ran about 6x slower here than the same steps dispatched one by one.
        """
        losses = []
        for i in range(perm.shape[0]):
            params, opt_state, loss = self.step(
                params, opt_state, xs, y, perm[i], seed, first_step + i
            )
            losses.append(loss)
        return params, opt_state, jnp.mean(jnp.stack(losses), axis=0)

    def _eval_logits(self, params, xs):
        """``fused [B, C]``, ``branch [B, M, C]``, ``heads [B, M, C]``: batch first, so
        that chunks concatenate along the first axis."""
        out = self.fn.apply(params, xs)
        return out["fused"], jnp.swapaxes(out["branch"], 0, 1), jnp.swapaxes(out["heads"], 0, 1)

    def evaluate(self, params, xs, y) -> dict:
        """Fused, branch and head accuracies on ``(xs, y)`` (numpy arrays)."""
        fused, branch, heads = self._batched(lambda x: self.eval_logits(params, x), xs)
        y = np.asarray(y)
        return {
            "fused_acc": float(np.mean(fused.argmax(-1) == y)),
            "branch_acc": [float(a) for a in np.mean(branch.argmax(-1) == y[:, None], axis=0)],
            "head_acc": [float(a) for a in np.mean(heads.argmax(-1) == y[:, None], axis=0)],
        }

    def missing_accuracy(self, params, xs, y) -> list[float]:
        """Fused accuracy with each modality's input zeroed in turn."""
        accs = []
        for m in range(len(xs)):
            zeroed = [np.zeros_like(x) if i == m else x for i, x in enumerate(xs)]
            fused, _, _ = self._batched(lambda x: self.eval_logits(params, x), zeroed)
            accs.append(float(np.mean(fused.argmax(-1) == y)))
        return accs

    def probe_accuracy(self, params) -> list[float]:
        """Ridge-regression linear probe of each frozen encoder: train -> test accuracy."""
        d = self.dataset
        f_train = self._batched(lambda x: tuple(self.features(params, x)), d.x_train)
        f_test = self._batched(lambda x: tuple(self.features(params, x)), d.x_test)
        return [
            ridge_probe(a, d.y_train, b, d.y_test, d.num_classes, self.cfg.probe_l2)
            for a, b in zip(f_train, f_test)
        ]

    @staticmethod
    def _batched(f, xs, chunk: int = 2048):
        n = len(xs[0])
        outs = [f(tuple(jnp.asarray(x[i : i + chunk]) for x in xs)) for i in range(0, n, chunk)]
        return tuple(np.concatenate([np.asarray(o[k]) for o in outs]) for k in range(len(outs[0])))

    def steps_per_epoch(self) -> int:
        """Full batches per epoch (the last partial batch is dropped)."""
        n = len(self.dataset.y_train)
        return n // min(self.cfg.batch_size, n)

    def init_state(self, params, seed: int):
        """The method's initial optimizer state for ``params`` and ``seed``."""
        if self.parts.init is not None:
            return self.parts.init(params, seed)
        return self.parts.tx.init(params)

    def epochs(self, seed: int, num_epochs: int | None = None):
        """Train from seed ``seed``, yielding ``(epoch, params, opt_state, losses)`` after
        each epoch (``losses``: ``[S]`` numpy mean training losses; ``num_epochs`` defaults to
        the configuration's)."""
        d, cfg = self.dataset, self.cfg
        num_epochs = cfg.epochs if num_epochs is None else num_epochs
        if num_epochs < 1:
            raise ValueError(f"Trainer.epochs: num_epochs must be >= 1; got {num_epochs}.")
        _, params = make_model(d, cfg, seed)
        opt_state = self.init_state(params, seed)
        n = len(d.y_train)
        bs = min(cfg.batch_size, n)
        num_batches = self.steps_per_epoch()
        rng = np.random.default_rng(seed + 1_000_003)
        xs_train = tuple(jnp.asarray(x) for x in d.x_train)
        y_train = jnp.asarray(d.y_train)
        for epoch in range(1, num_epochs + 1):
            perm = rng.permutation(n)[: num_batches * bs].reshape(num_batches, bs)
            params, opt_state, losses = self.run_epoch(
                params,
                opt_state,
                xs_train,
                y_train,
                jnp.asarray(perm),
                seed,
                (epoch - 1) * num_batches,
            )
            losses = np.asarray(losses)
            if not np.all(np.isfinite(losses)):
                raise FloatingPointError(
                    f"{self.method} seed {seed}: non-finite training loss {losses.tolist()} at "
                    f"epoch {epoch}; lower --lr or check the method's hyper-parameters."
                )
            yield epoch, params, opt_state, losses

    def train(self, seed: int, progress=None) -> dict:
        """Train from seed ``seed``; return the results (without dataset-level keys)."""
        d = self.dataset
        curves: dict[str, list] = {
            "epoch": [],
            "fused_acc": [],
            "branch_acc": [],
            "head_acc": [],
            "loss": [],
        }
        epoch_times = []
        params = None
        start = t0 = time.perf_counter()
        for epoch, params, _, losses in self.epochs(seed):
            epoch_times.append(time.perf_counter() - t0)
            ev = self.evaluate(params, d.x_test, d.y_test)
            curves["epoch"].append(epoch)
            curves["fused_acc"].append(ev["fused_acc"])
            curves["branch_acc"].append(ev["branch_acc"])
            curves["head_acc"].append(ev["head_acc"])
            curves["loss"].append([float(v) for v in losses])
            if progress is not None:
                progress.set_postfix_str(
                    f"{self.method} s{seed} ep{epoch} fused {ev['fused_acc']:.3f}", refresh=False
                )
                progress.update(1)
            t0 = time.perf_counter()
        train_time = time.perf_counter() - start
        final = self.evaluate(params, d.x_test, d.y_test)
        on_train = self.evaluate(params, d.x_train, d.y_train)
        return {
            "fused_acc": final["fused_acc"],
            "branch_acc": final["branch_acc"],
            "probe_acc": self.probe_accuracy(params),
            "missing_acc": self.missing_accuracy(params, d.x_test, d.y_test),
            "head_acc": final["head_acc"],
            "train_fused_acc": on_train["fused_acc"],
            "train_branch_acc": on_train["branch_acc"],
            "train_head_acc": on_train["head_acc"],
            "train_missing_acc": self.missing_accuracy(params, d.x_train, d.y_train),
            "train_time_s": train_time,
            "epoch_time_s": float(
                np.median(epoch_times[1:] if len(epoch_times) > 1 else epoch_times)
            ),
            "first_epoch_time_s": epoch_times[0],
            "curves": curves,
        }


def ridge_probe(f_train, y_train, f_test, y_test, num_classes: int, l2: float) -> float:
    """Test accuracy of a closed-form ridge classifier on standardised frozen features.

    With ``Z = [(F - mu) / sigma, 1]`` the train features standardised by their own mean
    and standard deviation (a feature with ``sigma <= 1e-8`` is only centred) and a bias
    column appended, ``Y`` the one-hot train labels and ``D + 1`` the width of ``Z``::

        R = l2 * tr(Z^T Z) / (D + 1) * I,   R[bias, bias] = 0   (the bias is not penalised)
        W = (Z^T Z + R)^{-1} Z^T Y
        prediction = argmax_c (Z_test W)[:, c]

    with ``Z_test`` the test features standardised by the train ``mu``, ``sigma``.
    """
    f_train = np.asarray(f_train, np.float64)
    f_test = np.asarray(f_test, np.float64)
    mean, std = f_train.mean(0), f_train.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    z = np.concatenate([(f_train - mean) / std, np.ones((len(f_train), 1))], axis=1)
    zt = np.concatenate([(f_test - mean) / std, np.ones((len(f_test), 1))], axis=1)
    targets = np.eye(num_classes)[y_train]
    gram = z.T @ z
    reg = l2 * np.trace(gram) / gram.shape[0] * np.eye(gram.shape[0])
    reg[-1, -1] = 0.0  # no penalty on the bias
    w = np.linalg.solve(gram + reg, z.T @ targets)
    return float(np.mean((zt @ w).argmax(-1) == y_test))


# --------------------------------------------------------------------------- records

RESULT_KEYS = (
    "fused_acc",
    "branch_acc",
    "probe_acc",
    "missing_acc",
    "head_acc",
    "train_fused_acc",
    "train_branch_acc",
    "train_head_acc",
    "train_missing_acc",
)


def source_commit(root: pathlib.Path | None = None) -> str | None:
    """The checkout's commit, or None outside a git checkout.

    ``+dirty`` is appended when tracked files other than those under ``results/`` (which the
    runs themselves rewrite) differ from it.
    """
    root = root or pathlib.Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def environment() -> dict:
    """Where the records were made: versions, backend, CPU count, commit."""
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commit": source_commit(),
    }


def run_experiment(
    dataset: data_lib.Dataset,
    methods: Sequence[str],
    seeds: Sequence[int],
    cfg: TrainConfig,
    *,
    dataset_name: str | None = None,
    data_seed: int = 0,
    validation: float | None = None,
    progress=None,
) -> list[dict]:
    """Train every method on every seed; one record per (method, seed).

    Args:
      dataset: the data (already split for validation, if so).
      methods: registered method names (see ``experiments.methods.available``).
      seeds: training seeds (initialisation, batch order, PRNG keys).
      cfg: the configuration shared by all runs.
      dataset_name: the name the records carry (default ``dataset.name``).
      data_seed: the seed the dataset was built with (recorded).
      validation: the validation fraction the dataset was split with (recorded).
      progress: an optional tqdm-like bar advanced once per epoch.

    Returns:
      Records: the results of :meth:`Trainer.train` plus the dataset, method, seed,
      modalities, split sizes, configuration, environment and dataset provenance.
    """
    env = environment()
    config = record_config(cfg, data_seed=data_seed, validation=validation)
    records = []
    for method in methods:
        trainer = Trainer(dataset, method, cfg)
        for seed in seeds:
            result = trainer.train(seed, progress)
            records.append(
                {
                    "dataset": dataset_name or dataset.name,
                    "method": method,
                    "seed": seed,
                    **{k: result[k] for k in RESULT_KEYS},
                    "modalities": list(dataset.modalities),
                    "num_train": len(dataset.y_train),
                    "num_test": len(dataset.y_test),
                    "config": config,
                    "train_time_s": result["train_time_s"],
                    "epoch_time_s": result["epoch_time_s"],
                    "first_epoch_time_s": result["first_epoch_time_s"],
                    "environment": env,
                    "dataset_info": dataset.info,
                    "curves": result["curves"],
                }
            )
    return records
