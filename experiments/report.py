"""Reporting: tables and plots of training records, and the results files.

A record is one (dataset, method, seed) run (see ``experiments.train.run_experiment``).
:func:`markdown_table` gives mean ± std over seeds per method, then (when the records
hold train-split accuracies) the train split's fused and branch accuracies, then
:func:`paired_table`: each method minus its natural baseline on the same seeds
(:func:`natural_baseline`), with a note naming every method whose baseline was not run.
:func:`plot_curves` draws the per-epoch test curves; :func:`plot_correlation` the fused
test accuracy against a dataset's colour-correlation strength (``cgmnist`` and its
dial variants). :func:`write_results` merges new records into ``OUT/<dataset>.json`` and
writes the table and the plot next to it.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments import methods as methods_lib
from experiments.config import same_config

BASELINES = ("joint", "joint_uni")


def method_order(records: list[dict]) -> list[str]:
    """The methods of ``records``: registry order first, then the others sorted."""
    present = {r["method"] for r in records}
    order = [m for m in methods_lib.METHODS if m in present]
    return order + sorted(present - set(order))


def fmt_mean_std(values: Sequence[float]) -> str:
    values = np.asarray(values, np.float64)
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def markdown_table(records: list[dict]) -> str:
    """Mean ± std over seeds per method (sample std, ddof = 1), then :func:`train_table`
    and :func:`paired_table`."""
    if not records:
        return "(no records)\n"
    mods = records[0]["modalities"]
    order = method_order(records)
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
    return (
        "\n".join(lines) + "\n" + note + train_table(records, order) + paired_table(records, order)
    )


def train_table(records: list[dict], order: Sequence[str]) -> str:
    """Fused, branch, auxiliary-head and missing-modality accuracy on the training split
    after training, mean ± std over seeds ("" when the records predate these keys). Set
    against the test columns it shows what a method learned that does not transfer (a
    shortcut)."""
    keys = [
        (key, label)
        for key, label in (
            ("train_branch_acc", "train branch"),
            ("train_head_acc", "train head"),
            ("train_missing_acc", "train fused w/o"),
        )
        if all(key in r for r in records)
    ]
    if not all("train_fused_acc" in r for r in records):
        return ""
    mods = records[0]["modalities"]
    header = ["method", "train fused"] + [f"{label} {m}" for _, label in keys for m in mods]
    lines = [
        "\nTraining split, after the last epoch:\n",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for method in order:
        rs = [r for r in records if r["method"] == method]
        row = [method, fmt_mean_std([r["train_fused_acc"] for r in rs])]
        for key, _ in keys:
            row += [fmt_mean_std([r[key][i] for r in rs]) for i in range(len(mods))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


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
    seeds on which the method's fused accuracy beats the baseline's. Runs whose baseline
    was not run on the same seed are left out of the differences; a note under the table
    names them and the command that fills the gap (:func:`missing_baseline_note`).
    """
    mods = records[0]["modalities"]
    header = ["method", "vs", "seeds"] + paired_header(mods)
    lines = [
        "\nPaired differences (method − baseline, same seeds; baseline `joint` for "
        "methods whose encoders see the fusion loss only, else `joint_uni`):\n",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    unpaired = []
    for method in order:
        if method in BASELINES:
            continue
        baseline = natural_baseline(method)
        runs = [r for r in records if r["method"] == method]
        pairs = pair_runs(runs, [r for r in records if r["method"] == baseline])
        if pairs:
            row = [method, baseline, str(len(pairs))] + paired_cells(pairs, len(mods))
            lines.append("| " + " | ".join(row) + " |")
        missing = sorted({r["seed"] for r in runs} - {a["seed"] for a, _ in pairs})
        if missing:
            unpaired.append((method, baseline, missing, len(pairs)))
    note = missing_baseline_note(unpaired)
    if len(lines) == 3:
        return note
    return "\n".join(lines) + "\n" + note


def missing_baseline_note(unpaired: Sequence[tuple[str, str, Sequence[Any], int]]) -> str:
    """One line per ``(method, baseline, seeds, paired)``: the runs of ``method`` on
    ``seeds`` have no ``baseline`` run to pair with (``paired`` other seeds do); ""
    when there is none."""
    if not unpaired:
        return ""
    lines = ["\nNot paired (baseline not run on the same seeds):\n"]
    for method, baseline, seeds, paired in unpaired:
        seed_list = ",".join(str(s) for s in seeds)
        done = f" (paired on {paired} other seeds)" if paired else ""
        lines.append(
            f"- `{method}`: no `{baseline}` run on seeds {seed_list}{done}; add "
            f"`--methods {baseline} --seeds {seed_list}` with the same --out to pair it."
        )
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
    order = method_order(records)
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
    """Earlier records in ``path`` with the new ones replacing same (method, seed); earlier
    records made with another configuration (:func:`experiments.config.same_config`) are
    dropped, with a note."""
    old = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = []
    keys = {(r["method"], r["seed"]) for r in new}
    config = json.loads(json.dumps(new[0]["config"])) if new else None  # tuples -> lists
    kept = [r for r in old if (r["method"], r["seed"]) not in keys]
    same = [r for r in kept if config is None or same_config(r.get("config", {}), config)]
    if len(same) < len(kept):
        print(
            f"[note] {path}: dropping {len(kept) - len(same)} earlier records made with a "
            "different configuration (use --out DIR to keep experiments apart)",
            file=sys.stderr,
        )
    return same + new


def write_results(out_dir: pathlib.Path, name: str, records: list[dict], plot: bool = True) -> str:
    """Merge ``records`` into ``OUT/<name>.json``; write ``OUT/<name>.md`` (the table of
    every merged record) and, with ``plot``, ``OUT/<name>_curves.png``. Returns the table."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    merged = merge_records(json_path, records)
    json_path.write_text(json.dumps(merged, indent=1))
    table = markdown_table(merged)
    (out_dir / f"{name}.md").write_text(table)
    if plot:
        plot_curves(merged, out_dir / f"{name}_curves.png")
    return table


# --------------------------------------------------------------------------- correlation dial

CORRELATION_KEY = "color_correlation"
MAIN_METHODS = ("joint", "joint_uni", "bogc", "cggm", "ogm_ge", "mmpareto")


def correlation_curves(
    by_dataset: dict[str, list[dict]], methods: Sequence[str] | None = None
) -> dict[str, list[tuple[float, float, float, int]]]:
    """Fused test accuracy against the colour-correlation strength of the training split.

    Args:
      by_dataset: ``{dataset: records}``; datasets whose ``dataset_info`` has no
        ``color_correlation`` are ignored.
      methods: the methods to keep (default: every method present).

    Returns:
      ``{method: [(correlation, mean, std, seeds), ...]}`` sorted by correlation; ``std``
      is the sample std over seeds (0 for one seed).
    """
    points: dict[str, dict[float, list[float]]] = {}
    for records in by_dataset.values():
        for r in records:
            corr = r.get("dataset_info", {}).get(CORRELATION_KEY)
            if corr is None or (methods is not None and r["method"] not in methods):
                continue
            points.setdefault(r["method"], {}).setdefault(float(corr), []).append(r["fused_acc"])
    order = [m for m in (methods or method_order([{"method": m} for m in points])) if m in points]
    return {
        m: [
            (c, float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
            for c, v in sorted(points[m].items())
        ]
        for m in order
    }


def correlation_table(curves: dict[str, list[tuple[float, float, float, int]]]) -> str:
    """The markdown table of :func:`correlation_curves` (one column per strength)."""
    strengths = sorted({c for pts in curves.values() for c, *_ in pts})
    if not strengths:
        return "(no records with a colour correlation)\n"
    header = ["method"] + [f"{c:.0%} correlated" for c in strengths]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, pts in curves.items():
        by_c = {c: (mean, std, n) for c, mean, std, n in pts}
        cells = [
            f"{by_c[c][0]:.3f} ± {by_c[c][1]:.3f} (n={by_c[c][2]})" if c in by_c else "—"
            for c in strengths
        ]
        lines.append("| " + " | ".join([method] + cells) + " |")
    return "\n".join(lines) + "\n"


def plot_correlation(
    curves: dict[str, list[tuple[float, float, float, int]]], path: pathlib.Path
) -> None:
    """Fused test accuracy (mean ± std over seeds) against the training split's colour
    correlation, one line per method (:func:`correlation_curves`)."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for method, pts in curves.items():
        c, mean, std, _ = (np.asarray(v, np.float64) for v in zip(*pts))
        ax.errorbar(100 * c, mean, yerr=std, marker="o", capsize=3, label=method)
    ax.set_xlabel("training examples coloured by their class (%)")
    ax.set_ylabel("fused test accuracy")
    ax.set_title("Colour shortcut strength vs fused test accuracy", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
