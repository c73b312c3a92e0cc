"""A small hyper-parameter search on a validation split, then a paired summary.

Each grid point is a set of methods and configuration overrides, trained per fold on a
validation split (``Dataset.validation_split(FRACTION, seed=FOLD)``: part of the training
split held out; the test split is never read) and written to
``OUT/<dataset>/<label>/fold<k>/``. On datasets whose test split holds out subjects or
speakers the folds hold out disjoint training groups. The summary pairs every point with
its natural baseline (``joint_uni``, the fixed-weight sum, or ``joint`` for methods whose
encoders see the fusion loss only) trained with the same optimizer on the same fold and
seed, pools the pairs over folds, and writes ``OUT/<dataset>.md`` and ``OUT/<dataset>.json``.

usage: python -m experiments.tune --dataset utdmhad2 --folds 4 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import report, train
from experiments import run as run_cli

# (label, methods, TrainConfig overrides). Every optimizer used here has its joint and
# joint_uni baselines.
GRID: tuple[tuple[str, str, Mapping[str, Any]], ...] = (
    ("adam", "joint,joint_uni,bogc,bogc_relative,cggm,cggm_reference", {}),
    ("adam_laplace", "bogc_laplace", {}),
    ("adam_laplace_draws", "bogc_laplace", {"laplace_center": "draws"}),
    ("adam_laplace_damping10", "bogc_laplace", {"laplace_damping": 10.0}),
    ("adam_kappa0.3", "bogc,bogc_relative", {"kappa": 0.3}),
    ("adam_kappa3", "bogc,bogc_relative", {"kappa": 3.0}),
    ("adam_gamma2", "bogc,bogc_relative", {"gamma": 2.0}),
    ("adam_on_updates", "cggm_on_updates", {}),
    # Representation-space BOGC: p (rep_power), the heads' prior variance, kappa, gamma;
    # BayesAgg-MTL (32 draws, diagonal posterior): p.
    ("adam_rep", "rep_bogc,rep_bogc_precision,bayesagg_mtl_diag_s32", {}),
    ("adam_rep_p0.3", "rep_bogc", {"rep_power": 0.3}),
    ("adam_rep_p3", "rep_bogc", {"rep_power": 3.0}),
    ("adam_rep_prior0.0005", "rep_bogc", {"rep_prior_variance": 0.0005}),
    ("adam_rep_prior0.05", "rep_bogc", {"rep_prior_variance": 0.05}),
    ("adam_rep_kappa0.3", "rep_bogc", {"kappa": 0.3}),
    ("adam_rep_kappa3", "rep_bogc", {"kappa": 3.0}),
    ("adam_rep_gamma2", "rep_bogc", {"gamma": 2.0}),
    ("adam_bayesagg_p1", "bayesagg_mtl_diag_s32", {"rep_power": 1.0}),
    ("adam_on_updates_rho2.6", "cggm_on_updates", {"rho": 2.6}),
    ("adam_rho2.6", "cggm", {"rho": 2.6}),
    ("adam_lambda0.5", "cggm", {"cggm_lambda": 0.5}),
    ("sgd", "joint,joint_uni,bogc,bogc_relative,cggm", {"optimizer": "sgd"}),
    ("sgd_rho2.6", "cggm", {"optimizer": "sgd", "rho": 2.6}),
    ("sgd_laplace", "bogc_laplace", {"optimizer": "sgd"}),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.tune", description=__doc__.splitlines()[0]
    )
    p.add_argument("--dataset", default="utdmhad2")
    p.add_argument("--seeds", type=run_cli.parse_seeds, default=run_cli.parse_seeds("3"))
    p.add_argument("--validation", type=run_cli.fraction, default=0.25)
    p.add_argument(
        "--folds", type=run_cli.positive_int, default=1, help="validation folds (data seeds 0..)"
    )
    p.add_argument("--epochs", type=run_cli.positive_int)
    p.add_argument("--only", help="comma-separated grid labels to run (default: all)")
    p.add_argument("--summary-only", action="store_true", help="only rebuild the summary")
    p.add_argument("--data-dir")
    p.add_argument("--out", default="results/tuning")
    return p


def tune(
    dataset: str,
    *,
    seeds: Sequence[int],
    folds: int = 1,
    validation: float = 0.25,
    out: pathlib.Path = pathlib.Path("results/tuning"),
    only: Sequence[str] | None = None,
    data_dir: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    grid: Sequence[tuple[str, str, Mapping[str, Any]]] | None = None,
) -> int:
    """Train every grid point on every fold; returns 0, or 1 when the data are missing.

    Args:
      dataset: a registered dataset name.
      seeds: training seeds per fold.
      folds: validation folds (data seeds ``0 .. folds - 1``).
      validation: the fraction of the training split held out.
      out: the output directory.
      only: grid labels to run (default: all).
      data_dir: the data directory.
      overrides: configuration overrides shared by every point (under each point's own).
      grid: the grid (default :data:`GRID`).
    """
    grid = GRID if grid is None else grid
    unknown = set(only or ()) - {label for label, _, _ in grid}
    if unknown:
        raise ValueError(
            f"tune: unknown grid label(s) {sorted(unknown)}; choose from "
            f"{[label for label, _, _ in grid]}."
        )
    points = [g for g in grid if only is None or g[0] in only]
    configs = {
        label: config_lib.dataset_config(dataset, **{**(overrides or {}), **extra})
        for label, _, extra in points
    }  # every configuration is checked before anything trains
    for fold in range(folds):
        try:
            data = data_lib.load_for_run(
                dataset, data_dir=data_dir, data_seed=fold, validation=validation
            )
        except data_lib.DataNotFoundError as err:
            print(f"[skip] {dataset}: {err}", file=sys.stderr)
            return 1
        for label, methods, extra in points:
            print(f"[tune] {label} fold {fold}: {methods} {dict(extra)}", file=sys.stderr)
            records = train.run_experiment(
                data,
                methods.split(","),
                seeds,
                configs[label],
                dataset_name=dataset,
                data_seed=fold,
                validation=validation,
            )
            report.write_results(out / dataset / label / f"fold{fold}", dataset, records, False)
    return 0


def summarize(out: pathlib.Path, dataset: str, grid=None) -> str:
    """Paired differences against the natural baseline of the same optimizer, every point."""
    grid = GRID if grid is None else grid
    records = []
    for label, _, _ in grid:
        for path in sorted((out / dataset / label).glob(f"fold*/{dataset}.json")):
            records += [dict(r, label=label) for r in json.loads(path.read_text())]
    if not records:
        return "(no records)\n"
    mods = records[0]["modalities"]

    def same_run(r):  # the same optimizer, fold and seed
        return r["config"]["optimizer"], r["config"]["data_seed"], r["seed"]

    header = ["setting", "method", "vs", "runs", "fused"] + report.paired_header(mods)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    unpaired = []
    for label, methods, _ in grid:
        for method in methods.split(","):
            baseline = report.natural_baseline(method)
            runs = [r for r in records if r["label"] == label and r["method"] == method]
            pairs = report.pair_runs(
                runs, [r for r in records if r["method"] == baseline], key=same_run
            )
            missing = sorted({same_run(r) for r in runs} - {same_run(a) for a, _ in pairs})
            if missing:
                where = ", ".join(f"fold {fold} seed {seed}" for _, fold, seed in missing)
                unpaired.append(
                    f"- `{label}` `{method}`: no `{baseline}` run with the same optimizer on "
                    f"{where}; add a grid point that trains it."
                )
            if not pairs:
                continue
            row = [
                label,
                method,
                baseline,
                str(len(pairs)),
                report.fmt_mean_std([a["fused_acc"] for a, _ in pairs]),
            ]
            lines.append("| " + " | ".join(row + report.paired_cells(pairs, len(mods))) + " |")
            rows.append(
                {
                    "setting": label,
                    "method": method,
                    "baseline": baseline,
                    "seeds": len(pairs),
                    "fused": float(np.mean([a["fused_acc"] for a, _ in pairs])),
                    "delta_fused": float(
                        np.mean([a["fused_acc"] - b["fused_acc"] for a, b in pairs])
                    ),
                    "delta_probe": [
                        float(np.mean([a["probe_acc"][i] - b["probe_acc"][i] for a, b in pairs]))
                        for i in range(len(mods))
                    ],
                }
            )
    cfg = records[0]["config"]
    folds = sorted({r["config"]["data_seed"] for r in records})
    splits = sorted({r["dataset_info"].get("split", "") for r in records})
    note = (
        f"\n{dataset}, validation folds {folds} (test split unused): "
        f"{' | '.join(splits)}; {cfg['epochs']} epochs. runs = folds x seeds; Δ = "
        f"method − baseline (vs) with the same optimizer on the same fold and seed; "
        f"'better' counts runs with a higher fused accuracy.\n"
    )
    (out / f"{dataset}.json").write_text(json.dumps(rows, indent=1))
    if unpaired:
        note += "\nNot paired (baseline not run):\n\n" + "\n".join(unpaired) + "\n"
    table = "\n".join(lines) + "\n" + note
    (out / f"{dataset}.md").write_text(table)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not data_lib.is_dataset(args.dataset):
        parser.error(f"argument --dataset: unknown dataset {args.dataset!r}")
    out = pathlib.Path(args.out)
    only = args.only.split(",") if args.only else None
    status = 0
    if not args.summary_only:
        try:
            status = tune(
                args.dataset,
                seeds=args.seeds,
                folds=args.folds,
                validation=args.validation,
                out=out,
                only=only,
                data_dir=args.data_dir,
                overrides={"epochs": args.epochs} if args.epochs else None,
            )
        except ValueError as err:
            parser.error(str(err))
    print(summarize(out, args.dataset))
    return status


if __name__ == "__main__":
    sys.exit(main())
