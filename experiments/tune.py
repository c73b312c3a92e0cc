"""A small hyper-parameter search on a validation split, then a paired summary.

Each grid point is one ``experiments.run`` invocation per fold with ``--validation
FRACTION --data-seed FOLD`` (part of the training split held out; the test split is
never read), written to ``OUT/<dataset>/<label>/fold<k>/``. On datasets whose test split
holds out subjects or speakers the folds hold out disjoint training groups (see
``Dataset.validation_split``). The summary pairs every point with its natural baseline
(``joint_uni``, the fixed-weight sum, or ``joint`` for methods whose encoders see the
fusion loss only) trained with the same optimizer on the same fold and seed, pools the
pairs over folds, and writes ``OUT/<dataset>.md`` and ``OUT/<dataset>.json``.

usage: python -m experiments.tune --dataset utdmhad2 --folds 4 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from experiments import run as run_lib

# (label, methods, extra CLI arguments). Every optimizer used here has its joint and
# joint_uni baselines.
GRID: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("adam", "joint,joint_uni,bogc,bogc_relative,cggm,cggm_reference", ()),
    ("adam_laplace", "bogc_laplace", ()),
    ("adam_laplace_draws", "bogc_laplace", ("--laplace-center", "draws")),
    ("adam_laplace_damping10", "bogc_laplace", ("--laplace-damping", "10")),
    ("adam_kappa0.3", "bogc,bogc_relative", ("--kappa", "0.3")),
    ("adam_kappa3", "bogc,bogc_relative", ("--kappa", "3")),
    ("adam_gamma2", "bogc,bogc_relative", ("--gamma", "2")),
    ("adam_on_updates", "cggm_on_updates", ()),
    ("adam_on_updates_rho2.6", "cggm_on_updates", ("--rho", "2.6")),
    ("adam_rho2.6", "cggm", ("--rho", "2.6")),
    ("adam_lambda0.5", "cggm", ("--cggm-lambda", "0.5")),
    ("sgd", "joint,joint_uni,bogc,bogc_relative,cggm", ("--optimizer", "sgd")),
    ("sgd_rho2.6", "cggm", ("--optimizer", "sgd", "--rho", "2.6")),
    ("sgd_laplace", "bogc_laplace", ("--optimizer", "sgd")),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="utdmhad2")
    p.add_argument("--seeds", default="3")
    p.add_argument("--validation", type=float, default=0.25)
    p.add_argument("--folds", type=int, default=1, help="validation folds (data seeds 0..)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--only", help="comma-separated grid labels to run (default: all)")
    p.add_argument("--summary-only", action="store_true", help="only rebuild the summary")
    p.add_argument("--data-dir")
    p.add_argument("--out", default="results/tuning")
    return p


def summarize(out: pathlib.Path, dataset: str) -> str:
    """Paired differences against the natural baseline of the same optimizer, every point."""
    records = []
    for label, _, _ in GRID:
        for path in sorted((out / dataset / label).glob(f"fold*/{dataset}.json")):
            records += [dict(r, label=label) for r in json.loads(path.read_text())]
    if not records:
        return "(no records)\n"
    mods = records[0]["modalities"]

    def same_run(r):  # the same optimizer, fold and seed
        return r["config"]["optimizer"], r["config"]["data_seed"], r["seed"]

    header = ["setting", "method", "vs", "runs", "fused"] + run_lib.paired_header(mods)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for label, methods, _ in GRID:
        for method in methods.split(","):
            baseline = run_lib.natural_baseline(method)
            pairs = run_lib.pair_runs(
                [r for r in records if r["label"] == label and r["method"] == method],
                [r for r in records if r["method"] == baseline],
                key=same_run,
            )
            if not pairs:
                continue
            row = [
                label,
                method,
                baseline,
                str(len(pairs)),
                run_lib.fmt_mean_std([a["fused_acc"] for a, _ in pairs]),
            ]
            lines.append("| " + " | ".join(row + run_lib.paired_cells(pairs, len(mods))) + " |")
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
    table = "\n".join(lines) + "\n" + note
    (out / f"{dataset}.md").write_text(table)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = pathlib.Path(args.out)
    only = set(args.only.split(",")) if args.only else None
    status = 0
    if not args.summary_only:
        for label, methods, extra in GRID:
            if only is not None and label not in only:
                continue
            for fold in range(args.folds):
                cli = [
                    "--dataset",
                    args.dataset,
                    "--methods",
                    methods,
                    "--seeds",
                    args.seeds,
                    "--validation",
                    str(args.validation),
                    "--data-seed",
                    str(fold),
                    "--out",
                    str(out / args.dataset / label / f"fold{fold}"),
                    "--no-plot",
                    "--no-progress",
                    *extra,
                ]
                if args.epochs:
                    cli += ["--epochs", str(args.epochs)]
                if args.data_dir:
                    cli += ["--data-dir", args.data_dir]
                print(f"[tune] {label} fold {fold}: {' '.join(cli)}", file=sys.stderr, flush=True)
                status = max(status, run_lib.main(cli))
    print(summarize(out, args.dataset))
    return status


if __name__ == "__main__":
    sys.exit(main())
