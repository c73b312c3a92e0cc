#!/usr/bin/env bash
# Re-create every results table in README.md, in order, one command at a time.
#
#   bash experiments/reproduce.sh            # everything (about 2 hours on 2 CPU cores)
#   bash experiments/reproduce.sh main sgd   # only the named parts: main, sgd, long, tune, cgmnist,
#                                            # representation
#   DRY_RUN=1 bash experiments/reproduce.sh  # print the commands, run nothing
#
# Each command writes results/<dataset>.{json,md} (results/sgd/ for the SGD grid,
# results/tuning/ for the validation search, results/cgmnist_dial/ for the colour-correlation
# dial; summary.md: the paired differences of every dataset in one table); records carry
# the commit that made them.
# The log of what ran, when, for how long and with which exit status is appended to
# results/experiment_log.md.
set -uo pipefail
cd "$(dirname "$0")/.."
parts=("${@:-main sgd long tune cgmnist representation}")
parts=(${parts[*]})
log=results/experiment_log.md
if [ -z "${DRY_RUN:-}" ] && [ ! -f "$log" ]; then
  mkdir -p results
  printf '# Experiment log\n\nAppended by experiments/reproduce.sh: one entry per command.\n\n' >"$log"
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
status=0

step() {
  local start end rc
  if [ -n "${DRY_RUN:-}" ]; then
    echo "$*"
    return
  fi
  start=$(date +%s)
  echo "+ $*" >&2
  "$@"
  rc=$?
  end=$(date +%s)
  printf -- '- `%s`\n  - commit %s, started %s UTC, wall %d s, exit %d\n' "$*" "$commit" \
    "$(date -u -d "@$start" +%H:%M:%S)" $((end - start)) "$rc" >>"$log"
  [ "$rc" -eq 0 ] || status=$rc
}

run() { step python -m experiments.run --no-progress "$@"; }

has() { [[ " ${parts[*]} " == *" $1 "* ]]; }

ABLATION_METHODS=joint,joint_uni,bogc,bogc_relative,bogc_laplace,cggm,cggm_on_updates
# Every parameter-space method ("all" would add the representation-space ones, whose own
# part below runs them with a CPU budget: BayesAgg-MTL's full posterior with 1024 draws
# takes minutes per epoch on the larger heads).
PARAM_METHODS=joint,joint_uni,bogc,bogc_relative,bogc_precision,bogc_dimension_frame,bogc_laplace
PARAM_METHODS+=,cggm,cggm_on_updates,cggm_reference,ogm_ge,mmpareto
REP_METHODS=rep_bogc,rep_bogc_precision,rep_bogc_mc,rep_bogc_posterior,bayesagg_mtl_diag_s32
MAIN_METHODS=joint,joint_uni,bogc,cggm,ogm_ge,mmpareto
SUMMARY_DATASETS=ucimf2,basicmotions,utdmhad2,utdmhad3,avdigits,cgmnist

if has main; then  # Adam 1e-3 (the CLI's defaults), every method, 5 seeds, test split
  run --dataset utdmhad2 --methods "$PARAM_METHODS" --seeds 5
  run --dataset ucimf2 --methods "$PARAM_METHODS" --seeds 5
  run --dataset basicmotions --methods "$PARAM_METHODS" --seeds 5
  run --dataset utdmhad3 --methods "$PARAM_METHODS" --seeds 5
  run --dataset avdigits --methods joint,joint_uni,bogc,bogc_relative --seeds 5
  run --dataset avdigits --methods bogc_precision,bogc_dimension_frame,bogc_laplace --seeds 5
  run --dataset avdigits --methods cggm,cggm_on_updates,cggm_reference,ogm_ge,mmpareto --seeds 5
  step python -m experiments.summary --datasets "$SUMMARY_DATASETS"
fi
if has sgd; then  # SGD 1e-2, momentum 0.9 on the three imbalanced datasets
  for dataset in utdmhad2 utdmhad3 avdigits; do
    run --dataset "$dataset" --methods "$ABLATION_METHODS" --seeds 5 --optimizer sgd --out results/sgd
  done
  step python -m experiments.summary --results results/sgd
fi
if has long; then  # 3x longer training on utdmhad2: Adam, and SGD with a cosine schedule
  run --dataset utdmhad2 --methods "$ABLATION_METHODS" --seeds 5 --epochs 120 --out results/long
  run --dataset utdmhad2 --methods "$ABLATION_METHODS" --seeds 5 --epochs 120 --optimizer sgd \
    --lr-schedule cosine --out results/long_sgd_cosine
fi
if has tune; then  # the validation-split search (the test split is never read)
  step python -m experiments.tune --dataset utdmhad2 --folds 4 --seeds 2
fi
if has cgmnist; then  # coloured-and-gray MNIST: every method, then the colour-correlation dial
  run --dataset cgmnist --methods "$PARAM_METHODS" --seeds 5
  step python -m experiments.summary --datasets "$SUMMARY_DATASETS"
  for dataset in cgmnist90 cgmnist80 cgmnist70; do
    run --dataset "$dataset" --methods "$MAIN_METHODS" --seeds 5 --out results/cgmnist_dial
  done
  step python -m experiments.summary --results results/cgmnist_dial \
    --datasets cgmnist90,cgmnist80,cgmnist70 --extra-results results/cgmnist.json \
    --out results/cgmnist_dial/summary.md --correlation-plot results/cgmnist_correlation.png
fi
if has representation; then  # BOGC at the representation and BayesAgg-MTL against joint_uni
  for dataset in ucimf2 basicmotions utdmhad2 utdmhad3 avdigits; do
    run --dataset "$dataset" --methods "$REP_METHODS" --seeds 5
  done
  run --dataset cgmnist --methods "joint_uni,$REP_METHODS" --seeds 5
  # BayesAgg-MTL with its 1024 draws: the diagonal posterior on utdmhad2, the published
  # full posterior on basicmotions (4 classes; about 11 s per epoch on 2 busy cores).
  run --dataset utdmhad2 --methods bayesagg_mtl_diag --seeds 5
  run --dataset basicmotions --methods bayesagg_mtl --seeds 5
  # Time per epoch beside joint_uni, measured in one run (3 epochs, one seed).
  for dataset in utdmhad2 avdigits; do
    run --dataset "$dataset" --methods joint_uni,rep_bogc,rep_bogc_mc,bayesagg_mtl_diag_s32,bayesagg_mtl_diag \
      --seeds 1 --epochs 3 --out results/representation_timing
  done
  run --dataset basicmotions --methods joint_uni,rep_bogc,bayesagg_mtl --seeds 1 --epochs 3 \
    --out results/representation_timing
  # The validation search (utdmhad2, 4 folds x 2 seeds), then the chosen setting on the test split.
  step python -m experiments.tune --dataset utdmhad2 --folds 4 --seeds 2 --only \
    adam_rep,adam_rep_p0.3,adam_rep_p3,adam_rep_prior0.0005,adam_rep_prior0.05,adam_rep_kappa0.3,adam_rep_kappa3,adam_rep_gamma2,adam_bayesagg_p1
  # The search's best rep_bogc setting (prior variance 0.0005) on the test split, paired.
  run --dataset utdmhad2 --methods joint_uni,rep_bogc --rep-prior-variance 0.0005 --seeds 5 \
    --out results/representation_tuned
  step python -m experiments.summary --datasets "$SUMMARY_DATASETS"
fi
exit "$status"
