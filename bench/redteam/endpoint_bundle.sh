#!/usr/bin/env bash
# bench/redteam/endpoint_bundle.sh -- builds the bundle bench/redteam/endpoint.py attacks, by script, so
# that its record says exactly what was attacked: the bring-your-own example classifier (a
# standard-trained CNN in plain PyTorch, examples/train_classifier.py: the usual customer's model,
# trained with that script's defaults), imported, with deploy/default.yaml's two stages, MagNet (`magnet_l1`)
# and the k-NN stateful stage (`stateful_knn`), fitted for it on Fashion-MNIST with `robustgate fit`'s
# defaults (the whole training split, calibrated on the whole validation split; MagNet 5 epochs). Every
# step runs with its defaults, as a user who runs the commands without options gets them (examples/byo.sh
# shortens them to keep the walk-through quick). endpoint.py's report lists each stage's fit from
# bundle.yaml.
#
#   bash bench/redteam/endpoint_bundle.sh WORK            # -> WORK/bundle (undefended arm: the same bundle)
#   python bench/redteam/endpoint.py --bundle WORK/bundle --budgets 1000,5000,10000 \
#       --attacks square,hopskipjump,square-sybil,hopskipjump-sybil,transfer --surrogate bundles/default \
#       --out bench/results/redteam.endpoint
#
# Environment: PYTHON, ROBUSTGATE (default: the repository's .venv), CLASSIFIER_ARGS (extra
# examples/train_classifier.py arguments, e.g. "--n-train 10000 --width 16", examples/byo.sh's quick model),
# MAGNET_ARGS and KNN_ARGS (extra `robustgate fit` arguments for each stage, e.g. MAGNET_ARGS="--n-train
# 5000", examples/byo.sh's quicker fit, or KNN_ARGS="--params method=knn k=4 width=32", the encoder before 2026-12-06).
set -euo pipefail
WORK=${1:?usage: bench/redteam/endpoint_bundle.sh WORK}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
ROBUSTGATE=${ROBUSTGATE:-$REPO/.venv/bin/robustgate}
CLASSIFIER_ARGS=${CLASSIFIER_ARGS:-}; MAGNET_ARGS=${MAGNET_ARGS:-}; KNN_ARGS=${KNN_ARGS:---params method=knn k=4}
mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
rg() { echo "+ robustgate $*" >&2; "$ROBUSTGATE" "$@"; }
# shellcheck disable=SC2086  # CLASSIFIER_ARGS, MAGNET_ARGS, KNN_ARGS: several words
[ -f "$WORK/user/model.onnx" ] || "$PYTHON" "$REPO/examples/train_classifier.py" --dataset fashion-mnist \
  $CLASSIFIER_ARGS --out "$WORK/user/model.onnx"
rg import --onnx "$WORK/user/model.onnx" --classes "$WORK/user/classes.txt" --name classifier \
  --dataset fashion-mnist --out "$WORK/bundle" --force
# shellcheck disable=SC2086
rg fit --bundle "$WORK/bundle" --defense magnet --name magnet_l1 --dataset fashion-mnist $MAGNET_ARGS --no-progress
# shellcheck disable=SC2086
rg fit --bundle "$WORK/bundle" --defense stateful --name stateful_knn --dataset fashion-mnist $KNN_ARGS --no-progress
echo "bundle: $WORK/bundle"
