"""Train every method on the same splits and seeds; report test accuracies.

Usage::

  python -m experiments.run --dataset basicmotions --methods joint,joint_uni,bogc --seeds 5
  python -m experiments.run --list

For each (dataset, method, seed) the test split gives: fused accuracy; each modality's
branch accuracy (its own slice of the fusion head); the linear-probe accuracy of each
frozen encoder (closed-form ridge regression on train features, one-hot targets); the
fused accuracy with each modality missing (its input zeroed, i.e. set to the train mean);
and the auxiliary heads' accuracies. Records go to ``OUT/<dataset>.json`` (merged with
earlier records of other methods and seeds), a mean +- std table to ``OUT/<dataset>.md``
and per-epoch test curves per modality to ``OUT/<dataset>_curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import models

# Per-dataset defaults: small enough for a CPU, long enough to converge.
DATASET_DEFAULTS = {
    "avdigits": {"epochs": 8, "batch_size": 64},
    "avdigits_rep": {"epochs": 8, "batch_size": 64},
    "utdmhad2": {"epochs": 40, "batch_size": 32},
    "utdmhad3": {"epochs": 40, "batch_size": 32},
    "ucimf": {"epochs": 20, "batch_size": 32},
    "ucimf2": {"epochs": 20, "batch_size": 32},
    "basicmotions": {"epochs": 60, "batch_size": 8},
}
DEFAULT_METHODS = "joint,joint_uni,bogc"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run except the dataset, method and seed."""

    epochs: int = 8
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    encoder: str = "auto"
    fusion: str = "concat"
    feature_dim: int = 64
    hidden: int = 128
    channels: tuple[int, ...] = (16, 32)
    stats_method: str = "auto"
    stats_chunk: int | None = None
    probe_l2: float = 1e-2
    hparams: dict = dataclasses.field(default_factory=dict)

    def model_config(self) -> models.ModelConfig:
        return models.ModelConfig(
            encoder=self.encoder,
            fusion=self.fusion,
            feature_dim=self.feature_dim,
            hidden=self.hidden,
            channels=tuple(self.channels),
        )


def base_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """``adam(lr)`` or ``sgd(lr, momentum)``; with ``hparams["lr_schedule"] == "cosine"``
    the learning rate decays from ``lr`` to 0 over ``total_steps`` (a cosine)."""
    schedule = cfg.hparams.get("lr_schedule", "constant")
    if schedule == "cosine":
        lr = optax.cosine_decay_schedule(cfg.lr, max(total_steps, 1))
    elif schedule == "constant":
        lr = cfg.lr
    else:
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine'; got {schedule!r}.")
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
    """One method on one dataset: jitted epoch and evaluation, reused across seeds."""

    def __init__(self, dataset: data_lib.Dataset, method: str, cfg: TrainConfig):
        self.dataset, self.method, self.cfg = dataset, method, cfg
        self.spec = methods_lib.METHODS[method]
        self.fn, params = make_model(dataset, cfg, seed=0)
        ctx = methods_lib.Context(
            num_modalities=dataset.num_modalities,
            fn=self.fn,
            params=params,
            base=base_optimizer(cfg, cfg.epochs * self.steps_per_epoch()),
            hparams=dict(cfg.hparams),
            num_train=len(dataset.y_train),
            stats_method=cfg.stats_method,
            stats_chunk=cfg.stats_chunk,
        )
        self.parts = self.spec.make(ctx)
        self.step = jax.jit(self._indexed_step)
        self.eval_logits = jax.jit(self._eval_logits)
        self.features = jax.jit(self.fn.features)

    def _step(self, params, opt_state, batch, key):
        fn, parts, sg = self.fn, self.parts, self.spec.stop_gradient_heads

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
        return self._step(params, opt_state, batch, key)

    def run_epoch(self, params, opt_state, xs, y, perm, seed: int, first_step: int):
        """One pass over ``perm`` (``[num_batches, batch]`` indices), a jitted step per batch.

        A Python loop of jitted steps, not ``lax.scan``: XLA's CPU convolutions inside a
        loop body ran about 6x slower here than the same steps dispatched one by one. Step
        ``t`` gets the PRNG key ``fold_in(key(seed), t)``, made inside the compiled step.
        """
        losses = []
        for i in range(perm.shape[0]):
            params, opt_state, loss = self.step(
                params, opt_state, xs, y, perm[i], seed, first_step + i
            )
            losses.append(loss)
        return params, opt_state, jnp.mean(jnp.stack(losses), axis=0)

    def _eval_logits(self, params, xs):
        out = self.fn.apply(params, xs)
        return out["fused"], out["branch"], out["heads"]

    def evaluate(self, params, xs, y) -> dict:
        """Fused, branch and head accuracies on ``(xs, y)`` (numpy arrays)."""
        fused, branch, heads = self._batched(lambda x: self.eval_logits(params, x), xs)
        return {
            "fused_acc": float(np.mean(fused.argmax(-1) == y)),
            "branch_acc": [float(a) for a in np.mean(branch.argmax(-1) == y, axis=1)],
            "head_acc": [float(a) for a in np.mean(heads.argmax(-1) == y, axis=1)],
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

    def epochs(self, seed: int, num_epochs: int | None = None):
        """Train from seed ``seed``, yielding ``(epoch, params, opt_state, losses)`` after
        each epoch (``losses``: ``[S]`` numpy mean training losses; ``num_epochs`` defaults to
        the configuration's). Epoch ``e`` visits the training set in the order drawn from
        ``default_rng(seed + 1_000_003)``, so every method sees the same batches."""
        d, cfg = self.dataset, self.cfg
        _, params = make_model(d, cfg, seed)
        if self.parts.init is not None:
            opt_state = self.parts.init(params, seed)
        else:
            opt_state = self.parts.tx.init(params)
        n = len(d.y_train)
        bs = min(cfg.batch_size, n)
        num_batches = self.steps_per_epoch()
        rng = np.random.default_rng(seed + 1_000_003)
        xs_train = tuple(jnp.asarray(x) for x in d.x_train)
        y_train = jnp.asarray(d.y_train)
        for epoch in range(1, (num_epochs or cfg.epochs) + 1):
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
        """Train from seed ``seed``; return the record (without dataset-level keys)."""
        d = self.dataset
        curves = {"epoch": [], "fused_acc": [], "branch_acc": [], "head_acc": [], "loss": []}
        epoch_times = []
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
        return {
            "fused_acc": final["fused_acc"],
            "branch_acc": final["branch_acc"],
            "probe_acc": self.probe_accuracy(params),
            "missing_acc": self.missing_accuracy(params, d.x_test, d.y_test),
            "head_acc": final["head_acc"],
            "train_time_s": train_time,
            "epoch_time_s": float(
                np.median(epoch_times[1:] if len(epoch_times) > 1 else epoch_times)
            ),
            "first_epoch_time_s": epoch_times[0],
            "curves": curves,
        }


def ridge_probe(f_train, y_train, f_test, y_test, num_classes: int, l2: float) -> float:
    """Accuracy of a closed-form ridge classifier on standardised features.

    ``W = (Z^T Z + l2 * tr(Z^T Z) / D * I)^{-1} Z^T (Y - mean Y)`` with ``Z`` the
    standardised train features (a bias column added), ``Y`` one-hot labels.
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


# --------------------------------------------------------------------------- reporting


def fmt_mean_std(values: Sequence[float]) -> str:
    values = np.asarray(values, np.float64)
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def markdown_table(records: list[dict]) -> str:
    """Mean ± std over seeds per method (sample std, ddof = 1)."""
    if not records:
        return "(no records)\n"
    mods = records[0]["modalities"]
    order = [m for m in methods_lib.METHODS if any(r["method"] == m for r in records)]
    order += sorted({r["method"] for r in records} - set(order))
    short = "/".join(mods)
    header = (
        ["method", "seeds", "fused"]
        + [f"branch {m}" for m in mods]
        + [f"probe {m}" for m in mods]
        + [f"fused w/o {m}" for m in mods]
        + ["s/epoch"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in order:
        rs = [r for r in records if r["method"] == method]
        row = [method, str(len(rs)), fmt_mean_std([r["fused_acc"] for r in rs])]
        for key in ("branch_acc", "probe_acc", "missing_acc"):
            row += [fmt_mean_std([r[key][i] for r in rs]) for i in range(len(mods))]
        row.append(f"{np.mean([r['epoch_time_s'] for r in rs]):.2f}")
        lines.append("| " + " | ".join(row) + " |")
    r0 = records[0]
    cfg = r0["config"]
    split = "validation split" if cfg.get("validation") else "test split"
    note = (
        f"\n{r0['dataset']} ({short}), {split}; {cfg['epochs']} epochs, batch "
        f"{cfg['batch_size']}, {cfg['optimizer']} lr {cfg['lr']}, encoder "
        f"{cfg['encoder']}, fusion {cfg['fusion']}; mean ± std over seeds.\n"
    )
    return "\n".join(lines) + "\n" + note + paired_table(records, order)


def natural_baseline(method: str) -> str:
    """``joint`` for methods whose encoders see the fusion loss only (stop-gradient
    auxiliary heads: cggm*, ogm_ge), ``joint_uni`` (the fixed-weight sum) otherwise."""
    spec = methods_lib.METHODS.get(method)
    return "joint" if spec is not None and spec.stop_gradient_heads else "joint_uni"


def paired_table(records: list[dict], order: Sequence[str]) -> str:
    """Each method minus its natural baseline on the same seeds: mean ± std of the
    differences (see :func:`natural_baseline`).

    Seeds fix the initialisation and the batch order, so per-seed differences remove
    most of the seed-to-seed spread that the plain table carries. "better" counts the
    seeds on which the method's fused accuracy beats the baseline's.
    """
    mods = records[0]["modalities"]
    header = ["method", "vs", "seeds"] + paired_header(mods)
    lines = [
        "\nPaired differences (method − baseline, same seeds; baseline `joint` for "
        "methods whose encoders see the fusion loss only, else `joint_uni`):\n",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for method in order:
        if method in ("joint", "joint_uni"):
            continue
        baseline = natural_baseline(method)
        pairs = pair_runs(
            [r for r in records if r["method"] == method],
            [r for r in records if r["method"] == baseline],
        )
        if pairs:
            row = [method, baseline, str(len(pairs))] + paired_cells(pairs, len(mods))
            lines.append("| " + " | ".join(row) + " |")
    if len(lines) == 3:
        return ""
    return "\n".join(lines) + "\n"


def pair_runs(
    runs: list[dict], baselines: list[dict], key=lambda r: r["seed"]
) -> list[tuple[dict, dict]]:
    """``(run, baseline)`` for each run that has a baseline with the same ``key`` (by
    default the seed: the same initialisation and batch order), in key order."""
    by_key = {key(b): b for b in baselines}
    return [(r, by_key[key(r)]) for r in sorted(runs, key=key) if key(r) in by_key]


def paired_header(modalities: Sequence[str]) -> list[str]:
    """Column names of :func:`paired_cells`."""
    return (
        ["Δ fused", "better"]
        + [f"Δ branch {m}" for m in modalities]
        + [f"Δ probe {m}" for m in modalities]
    )


def paired_cells(pairs: list[tuple[dict, dict]], num_modalities: int) -> list[str]:
    """Mean ± std of the paired differences: fused, how many runs it is higher, then each
    modality's branch and probe accuracy."""
    fused = [a["fused_acc"] - b["fused_acc"] for a, b in pairs]
    cells = [fmt_delta(fused), f"{sum(d > 0 for d in fused)}/{len(pairs)}"]
    for key in ("branch_acc", "probe_acc"):
        cells += [
            fmt_delta([a[key][i] - b[key][i] for a, b in pairs]) for i in range(num_modalities)
        ]
    return cells


def fmt_delta(values: Sequence[float]) -> str:
    values = np.asarray(values, np.float64)
    if len(values) == 1:
        return f"{values[0]:+.3f}"
    return f"{values.mean():+.3f} ± {values.std(ddof=1):.3f}"


def plot_curves(records: list[dict], path: pathlib.Path) -> None:
    """Per-epoch test accuracy (mean over seeds): fused and each modality's branch/head."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    mods = records[0]["modalities"]
    order = [m for m in methods_lib.METHODS if any(r["method"] == m for r in records)]
    order += sorted({r["method"] for r in records} - set(order))
    cols = 1 + len(mods)
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 5.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, method in enumerate(order):
        rs = [r for r in records if r["method"] == method]
        epochs = min(len(r["curves"]["epoch"]) for r in rs)
        x = np.arange(1, epochs + 1)
        color = colors[k % len(colors)]
        style = ("-", "--", ":")[(k // len(colors)) % 3]  # more methods than colours
        fused = np.mean([r["curves"]["fused_acc"][:epochs] for r in rs], axis=0)
        loss = np.mean([np.asarray(r["curves"]["loss"][:epochs])[:, 0] for r in rs], axis=0)
        axes[0, 0].plot(x, fused, color=color, linestyle=style, label=method)
        axes[1, 0].plot(x, loss, color=color, linestyle=style, label=method)
        for i in range(len(mods)):
            branch = np.mean([np.asarray(r["curves"]["branch_acc"][:epochs])[:, i] for r in rs], 0)
            head = np.mean([np.asarray(r["curves"]["head_acc"][:epochs])[:, i] for r in rs], 0)
            axes[0, i + 1].plot(x, branch, color=color, linestyle=style, label=method)
            axes[1, i + 1].plot(x, head, color=color, linestyle=style, label=method)
    axes[0, 0].set_title("fused accuracy")
    axes[1, 0].set_title("fusion loss (train)")
    for i, m in enumerate(mods):
        axes[0, i + 1].set_title(f"{m}: branch accuracy")
        axes[1, i + 1].set_title(f"{m}: head accuracy")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{records[0]['dataset']}: test curves, mean over seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_records(path: pathlib.Path, new: list[dict]) -> list[dict]:
    """Earlier records in ``path`` with the new ones replacing same (method, seed)."""
    old = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = []
    keys = {(r["method"], r["seed"]) for r in new}
    config = json.loads(json.dumps(new[0]["config"])) if new else None  # tuples -> lists
    kept = [r for r in old if (r["method"], r["seed"]) not in keys]
    same = [r for r in kept if r.get("config") == config]
    if len(same) < len(kept):
        print(
            f"[note] {path}: dropping {len(kept) - len(same)} earlier records made with a "
            "different configuration (use --out DIR to keep experiments apart)",
            file=sys.stderr,
        )
    return same + new


# --------------------------------------------------------------------------- CLI


def source_commit(root: pathlib.Path | None = None) -> str | None:
    """The checkout's commit, or None outside a git checkout.

    ``+dirty`` is appended when tracked files other than those under ``results/`` (which the
    runs themselves rewrite) differ from it.
    """
    root = root or pathlib.Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":(exclude)results",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def parse_seeds(text: str) -> list[int]:
    """``"5"`` -> ``[0, 1, 2, 3, 4]``; ``"0,3,7"`` -> ``[0, 3, 7]``; ``"2-4"`` -> ``[2, 3, 4]``."""
    if "," in text:
        return [int(s) for s in text.split(",") if s]
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return list(range(int(text)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description="Train balancing methods on real multimodal data and report test "
        "accuracies (fused, per-modality branch, linear probe, missing modality).",
    )
    p.add_argument(
        "--dataset",
        default="basicmotions",
        help=f"comma-separated; one of {', '.join(data_lib.DATASETS)}",
    )
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated, or 'all'; registered: {', '.join(methods_lib.METHODS)}",
    )
    p.add_argument(
        "--seeds", default="3", help="a count N (seeds 0..N-1), a list 0,3,7 or a range 2-4"
    )
    p.add_argument("--epochs", type=int, help="default: per dataset")
    p.add_argument("--batch-size", type=int, help="default: per dataset")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, help="default 1e-3 (adam), 1e-2 (sgd)")
    p.add_argument("--momentum", type=float, default=0.9, help="for sgd")
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="cosine: decay the learning rate to 0 over the run",
    )
    p.add_argument("--encoder", choices=models.ENCODERS, default="auto")
    p.add_argument("--fusion", choices=models.FUSIONS, default="concat")
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--kappa", type=float, default=1.0, help="BOGC evidence strength")
    p.add_argument("--gamma", type=float, default=1.0, help="BOGC evidence sharpness")
    p.add_argument("--rho", type=float, default=1.3, help="CGGM magnitude scale")
    p.add_argument("--cggm-lambda", type=float, default=0.1, help="CGGM direction weight")
    p.add_argument("--alpha", type=float, default=0.1, help="OGM-GE modulation strength")
    p.add_argument(
        "--noise",
        choices=("absolute", "relative"),
        help="BOGC noise scale (default: the method's own)",
    )
    p.add_argument(
        "--laplace-damping", type=float, default=1.0, help="bogc_laplace prior precision"
    )
    p.add_argument(
        "--laplace-center",
        choices=("batch", "draws"),
        default="batch",
        help="bogc_laplace: the means are the batch gradients (batch) or the "
        "draws' average (draws, the paper's moment matching)",
    )
    p.add_argument(
        "--validation",
        type=float,
        metavar="FRACTION",
        help="tune: hold out FRACTION of the training split and report on it "
        "(the test split is not used)",
    )
    p.add_argument(
        "--stats-method",
        choices=("auto", "vmap", "fast"),
        default="auto",
        help="bj.source_grad_stats method for BOGC / MMPareto",
    )
    p.add_argument("--stats-chunk", type=int, help="bj.source_grad_stats chunk_size")
    p.add_argument("--data-dir", help=f"default: ${data_lib.DATA_ENV} or ../shared/data")
    p.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="pairing / split seed (fixed across training seeds)",
    )
    p.add_argument("--max-train", type=int, help="subsample the train split (smoke tests)")
    p.add_argument("--max-test", type=int, help="subsample the test split (smoke tests)")
    p.add_argument("--out", default="results", help="output directory")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="list datasets and methods, then exit")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="only re-render OUT/<dataset>.md and the plot from OUT/<dataset>.json",
    )
    return p


def list_registry() -> str:
    lines = ["datasets:"]
    for name, spec in data_lib.DATASETS.items():
        where = "needs the data directory" if spec.downloads else "no download (PyPI package)"
        lines.append(f"  {name:22s} {spec.description} [{where}]")
    lines.append("methods:")
    for name, spec in methods_lib.METHODS.items():
        ok, reason = methods_lib.available(name)
        lines.append(
            f"  {name:22s} {spec.description}" + ("" if ok else f"  [UNAVAILABLE: {reason}]")
        )
    return "\n".join(lines)


def config_from_args(args, dataset: str) -> TrainConfig:
    defaults = DATASET_DEFAULTS.get(dataset, {})
    lr = args.lr if args.lr is not None else (1e-3 if args.optimizer == "adam" else 1e-2)
    return TrainConfig(
        epochs=args.epochs or defaults.get("epochs", 10),
        batch_size=args.batch_size or defaults.get("batch_size", 64),
        optimizer=args.optimizer,
        lr=lr,
        momentum=args.momentum,
        encoder=args.encoder,
        fusion=args.fusion,
        feature_dim=args.feature_dim,
        hidden=args.hidden,
        stats_method=args.stats_method,
        stats_chunk=args.stats_chunk,
        hparams={
            "kappa": args.kappa,
            "gamma": args.gamma,
            "rho": args.rho,
            "cggm_lambda": args.cggm_lambda,
            "alpha": args.alpha,
            "laplace_damping": args.laplace_damping,
            "laplace_center": args.laplace_center,
            # Recorded only when set, so earlier records keep their configuration.
            **({"noise": args.noise} if args.noise else {}),
            **({"lr_schedule": args.lr_schedule} if args.lr_schedule != "constant" else {}),
        },
    )


def rebuild(args) -> int:
    """Re-render the tables (and plots) of ``--dataset`` from the records in ``--out``."""
    status = 0
    for dataset_name in [d.strip() for d in args.dataset.split(",") if d.strip()]:
        path = pathlib.Path(args.out) / f"{dataset_name}.json"
        if not path.exists():
            print(f"[skip] {path} does not exist; run the experiment first", file=sys.stderr)
            status = 1
            continue
        records = json.loads(path.read_text())
        table = markdown_table(records)
        path.with_suffix(".md").write_text(table)
        if not args.no_plot:
            plot_curves(records, path.parent / f"{dataset_name}_curves.png")
        print(table)
    return status


def run(args) -> int:
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if names == ["all"]:
        names = list(methods_lib.METHODS)
    runnable = []
    for name in names:
        ok, reason = methods_lib.available(name)
        if ok:
            runnable.append(name)
        else:
            print(f"[skip] {reason}", file=sys.stderr)
    if not runnable:
        print("no runnable method; see `python -m experiments.run --list`", file=sys.stderr)
        return 2
    seeds = parse_seeds(args.seeds)
    out_dir = pathlib.Path(args.out)
    environment = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commit": source_commit(),
    }
    status = 0
    for dataset_name in [d.strip() for d in args.dataset.split(",") if d.strip()]:
        try:
            dataset = data_lib.load_dataset(dataset_name, args.data_dir, seed=args.data_seed)
        except data_lib.DataNotFoundError as err:
            print(f"[skip] {dataset_name}: {err}", file=sys.stderr)
            status = 1
            continue
        if args.validation:
            dataset = dataset.validation_split(args.validation, seed=args.data_seed)
        if args.max_train or args.max_test:
            dataset = dataset.subset(args.max_train, args.max_test, seed=args.data_seed)
        cfg = config_from_args(args, dataset_name)
        print(dataset.summary(), file=sys.stderr)
        progress = None
        if not args.no_progress:
            from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

            progress = tqdm(
                total=len(runnable) * len(seeds) * cfg.epochs,
                desc=dataset_name,
                unit="epoch",
                file=sys.stderr,
                mininterval=0.2 if sys.stderr.isatty() else 10.0,
            )
        records = []
        for method in runnable:
            trainer = Trainer(dataset, method, cfg)
            for seed in seeds:
                result = trainer.train(seed, progress)
                record = {
                    "dataset": dataset_name,
                    "method": method,
                    "seed": seed,
                    **{
                        k: result[k]
                        for k in ("fused_acc", "branch_acc", "probe_acc", "missing_acc", "head_acc")
                    },
                    "modalities": list(dataset.modalities),
                    "num_train": len(dataset.y_train),
                    "num_test": len(dataset.y_test),
                    "config": {
                        **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "hparams"},
                        **cfg.hparams,
                        "data_seed": args.data_seed,
                        "validation": args.validation,
                    },
                    "train_time_s": result["train_time_s"],
                    "epoch_time_s": result["epoch_time_s"],
                    "first_epoch_time_s": result["first_epoch_time_s"],
                    "environment": environment,
                    "dataset_info": dataset.info,
                    "curves": result["curves"],
                }
                records.append(record)
        if progress is not None:
            progress.close()
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / f"{dataset_name}.json"
        merged = merge_records(json_path, records)
        json_path.write_text(json.dumps(merged, indent=1))
        table = markdown_table(merged)
        (out_dir / f"{dataset_name}.md").write_text(table)
        if not args.no_plot:
            plot_curves(merged, out_dir / f"{dataset_name}_curves.png")
        print(table)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print(list_registry())
        return 0
    if args.rebuild:
        return rebuild(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
