"""One table across datasets: each method against its natural baseline, on the same seeds.

Usage::

  python -m experiments.summary                      # results/*.json -> results/summary.md
  python -m experiments.summary --results results/sgd
  python -m experiments.summary --datasets cgmnist,cgmnist90,cgmnist70 \
      --correlation-plot results/cgmnist_correlation.png

For every dataset file ``RESULTS/<dataset>.json`` and every method, the paired difference
``method - baseline`` over the seeds both have (baseline: ``joint`` for methods whose
encoders see the fusion loss only, else ``joint_uni``, see
:func:`experiments.report.natural_baseline`; ``joint`` for ``joint_uni`` itself: what the
fixed-weight unimodal losses add) of the fused accuracy, and of the *weak*
modality's branch and probe accuracy. The weak modality of a dataset is the one whose
branch (its slice of the fusion head) is least accurate under ``joint`` training: the
modality the jointly trained model uses least, the one balancing should raise.

With ``--correlation-plot PATH``, the datasets with a colour-correlation dial (``cgmnist``,
``cgmnist90``, ...) also give a plot of the fused test accuracy against the correlation
strength for the main methods, and its table (``PATH`` with the suffix ``.md``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from experiments import methods as methods_lib
from experiments import report

DATASET_ORDER = ("ucimf2", "basicmotions", "utdmhad2", "utdmhad3", "avdigits", "cgmnist")


def weak_modality(records: list[dict]) -> int:
    """Index of the modality with the lowest mean branch accuracy under ``joint`` (or,
    without ``joint`` records, under every method together)."""
    pool = [r for r in records if r["method"] == "joint"] or records
    return int(np.argmin(np.mean([r["branch_acc"] for r in pool], axis=0)))


def summarize(by_dataset: dict[str, list[dict]]) -> str:
    """The markdown summary of ``{dataset: records}``."""
    datasets = sorted(
        by_dataset,
        key=lambda d: (DATASET_ORDER.index(d) if d in DATASET_ORDER else len(DATASET_ORDER), d),
    )
    weak = {d: weak_modality(by_dataset[d]) for d in datasets}
    present = {r["method"] for rs in by_dataset.values() for r in rs}
    methods = [m for m in methods_lib.METHODS if m in present and m != "joint"]
    methods += sorted(present - set(methods_lib.METHODS) - {"joint"})
    blocks = []
    for title, key in (
        ("Δ fused accuracy", None),
        ("Δ weak modality's branch accuracy", "branch_acc"),
        ("Δ weak modality's probe accuracy", "probe_acc"),
    ):
        header = ["method", "vs"] + [
            d if key is None else f"{d} ({by_dataset[d][0]['modalities'][weak[d]]})"
            for d in datasets
        ]
        lines = [
            f"**{title}** (method − baseline, mean ± std over paired seeds; "
            "k/n = seeds where the method is higher)\n",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for method in methods:
            baseline = "joint" if method == "joint_uni" else report.natural_baseline(method)
            row = [method, baseline]
            for d in datasets:
                records = by_dataset[d]
                pairs = report.pair_runs(
                    [r for r in records if r["method"] == method],
                    [r for r in records if r["method"] == baseline],
                )
                if not pairs:
                    row.append("—")
                    continue
                if key is None:
                    diffs = [a["fused_acc"] - b["fused_acc"] for a, b in pairs]
                else:
                    diffs = [a[key][weak[d]] - b[key][weak[d]] for a, b in pairs]
                row.append(f"{report.fmt_delta(diffs)} ({sum(x > 0 for x in diffs)}/{len(diffs)})")
            lines.append("| " + " | ".join(row) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def load(
    results: pathlib.Path,
    datasets: Sequence[str] | None = None,
    extra: Sequence[pathlib.Path] = (),
) -> dict[str, list]:
    """``{dataset: records}`` from ``results/<dataset>.json`` (all of them by default) and
    the record files ``extra``; a named dataset without a file is left out, with a note."""
    paths = (
        [results / f"{d}.json" for d in datasets] if datasets else sorted(results.glob("*.json"))
    )
    out = {}
    for path in [*paths, *map(pathlib.Path, extra)]:
        if not path.exists():
            print(f"[note] {path} does not exist; left out of the summary", file=sys.stderr)
            continue
        records = json.loads(path.read_text())
        if isinstance(records, list) and records and "fused_acc" in records[0]:
            out[records[0]["dataset"]] = records
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.summary", description=__doc__.splitlines()[0]
    )
    p.add_argument("--results", default="results", help="directory of <dataset>.json files")
    p.add_argument("--datasets", help="comma-separated (default: every results file)")
    p.add_argument(
        "--extra-results",
        help="comma-separated record files (<dataset>.json) from elsewhere to include",
    )
    p.add_argument("--out", help="markdown output (default: RESULTS/summary.md)")
    p.add_argument(
        "--correlation-plot",
        metavar="PATH",
        help="also plot fused test accuracy against the colour correlation (cgmnist*)",
    )
    p.add_argument(
        "--correlation-methods",
        default=",".join(report.MAIN_METHODS),
        help="methods on the correlation plot (default: %(default)s)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = pathlib.Path(args.results)
    by_dataset = load(
        results,
        args.datasets.split(",") if args.datasets else None,
        args.extra_results.split(",") if args.extra_results else (),
    )
    if not by_dataset:
        print(
            f"no result files in {results}; run `python -m experiments.run` first", file=sys.stderr
        )
        return 1
    table = summarize(by_dataset)
    pathlib.Path(args.out or results / "summary.md").write_text(table)
    print(table)
    if args.correlation_plot:
        curves = report.correlation_curves(by_dataset, args.correlation_methods.split(","))
        if not curves:
            print("no records with a colour correlation (cgmnist*) to plot", file=sys.stderr)
            return 1
        path = pathlib.Path(args.correlation_plot)
        report.plot_correlation(curves, path)
        corr_table = report.correlation_table(curves)
        path.with_suffix(".md").write_text(corr_table)
        print(corr_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
