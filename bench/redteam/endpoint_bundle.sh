#!/usr/bin/env bash
# bench/redteam/endpoint_bundle.sh -- builds the bundle bench/redteam/endpoint.py attacks, by script, so
# that its record says exactly what was attacked: the bring-your-own example classifier (a
# standard-trained CNN in plain PyTorch, examples/train_classifier.py: the usual customer's model),
# imported, with deploy/default.yaml's MagNet stage (`magnet_l1`) and the k-NN stateful stage
# (`stateful`) fitted for it on Fashion-MNIST. endpoint.py's report lists each stage's fit from
# bundle.yaml; the settings here are examples/byo.sh's (MagNet on 5,000 images, 5 epochs).
#
#   bash bench/redteam/endpoint_bundle.sh WORK            # -> WORK/bundle (undefended arm: the same bundle)
#   python bench/redteam/endpoint.py --bundle WORK/bundle --budgets 1000,5000,10000 \
#       --attacks square,hopskipjump,square-sybil,hopskipjump-sybil,transfer --surrogate bundles/default \
#       --add-stage '{name: stateful, kind: stateful, action: block, block_after: 5, cooldown_s: 300,
#                     store: {kind: memory, max_entries: 1000000, ttl_s: 3600}}' --out bench/results/redteam.endpoint
#
# Environment: PYTHON, ROBUSTGATE (default: the repository's .venv), MAGNET_N, MAGNET_EPOCHS,
# KNN_PARAMS (extra `robustgate fit --params` for the stateful stage, e.g. "width=16").
set -euo pipefail
WORK=${1:?usage: bench/redteam/endpoint_bundle.sh WORK}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
ROBUSTGATE=${ROBUSTGATE:-$REPO/.venv/bin/robustgate}
MAGNET_N=${MAGNET_N:-5000}; MAGNET_EPOCHS=${MAGNET_EPOCHS:-5}; KNN_PARAMS=${KNN_PARAMS:-}
mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
rg() { echo "+ robustgate $*" >&2; "$ROBUSTGATE" "$@"; }
[ -f "$WORK/user/model.onnx" ] || "$PYTHON" "$REPO/examples/train_classifier.py" --dataset fashion-mnist \
  --epochs 2 --n-train 10000 --width 16 --out "$WORK/user/model.onnx"
rg import --onnx "$WORK/user/model.onnx" --classes "$WORK/user/classes.txt" --name classifier \
  --dataset fashion-mnist --out "$WORK/bundle" --force
rg fit --bundle "$WORK/bundle" --defense magnet --name magnet_l1 --dataset fashion-mnist --n-train "$MAGNET_N" \
  --n-val 1000 --n-test 1000 --params epochs="$MAGNET_EPOCHS" --no-progress
# shellcheck disable=SC2086  # KNN_PARAMS: several key=value words
rg fit --bundle "$WORK/bundle" --defense stateful --name stateful --params method=knn k=4 $KNN_PARAMS --no-progress
echo "bundle: $WORK/bundle"
