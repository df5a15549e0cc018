#!/usr/bin/env bash
# bench/redteam/pooled_bundles.sh -- the two bundles that measure what the k-NN stateful stage's pooling front
# (`max_side`, defenses/stateful/knn.py) does to detection: the same classifier and data at 1x56x56, one
# stage fitted with `max_side=28` (its encoder sees each query average-pooled by 2, as it sees a 224x224 one
# by 4 at the default 64) and one with the default (56 <= 64: no pooling). Fitting an unpooled encoder at
# 224x224 takes hours on a CPU, so the comparison runs where both are cheap, with the same mechanism.
#
# The classifier: bench/redteam/endpoint_bundle.sh's standard-trained CNN (examples/train_classifier.py at
# its defaults, 28x28) behind an AveragePool(2) that takes 1x56x56 inputs; the data: Fashion-MNIST conformed
# to 1x56x56 (antialiased bilinear upscaling, robustgate.models.data.conform). Both stages at `robustgate
# fit`'s defaults otherwise. No MagNet: the defended arm is the stateful stage alone (--drop-stage).
#
#   bash bench/redteam/pooled_bundles.sh WORK        # -> WORK/pool56/bundle, WORK/nopool56/bundle
#   for v in pool56 nopool56; do python bench/redteam/endpoint.py --bundle WORK/$v/bundle \
#       --drop-stage magnet_l1 --arms defended --budgets 5000 \
#       --attacks square,square-sybil,hopskipjump,square-transform \
#       --add-stage '{name: stateful, kind: stateful, action: block, block_after: 5, cooldown_s: 300,
#                     store: {kind: memory, max_entries: 1000000, ttl_s: 3600}}' \
#       --out bench/results/redteam.endpoint.$v; done
#
# Environment: PYTHON, ROBUSTGATE (default: the repository's .venv).
set -euo pipefail
WORK=${1:?usage: bench/redteam/pooled_bundles.sh WORK}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
ROBUSTGATE=${ROBUSTGATE:-$REPO/.venv/bin/robustgate}
mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
rg() { echo "+ robustgate $*" >&2; "$ROBUSTGATE" "$@"; }
[ -f "$WORK/user/model.onnx" ] || "$PYTHON" "$REPO/examples/train_classifier.py" --dataset fashion-mnist \
  --out "$WORK/user/model.onnx"
"$PYTHON" - "$WORK/user/model.onnx" "$WORK/user/model56.onnx" <<'EOF'
import sys

import onnx
from onnx import TensorProto, helper

model = onnx.load(sys.argv[1])
graph = model.graph
old = graph.input[0]
batch = old.type.tensor_type.shape.dim[0]
new = helper.make_tensor_value_info(old.name + "_56", TensorProto.FLOAT,
                                    [batch.dim_param or batch.dim_value, 1, 56, 56])
nodes = [helper.make_node("AveragePool", [new.name], [old.name], kernel_shape=[2, 2], strides=[2, 2]), *graph.node]
del graph.node[:]
graph.node.extend(nodes)
graph.input.remove(old)
graph.input.insert(0, new)
onnx.checker.check_model(model)
onnx.save(model, sys.argv[2])
EOF
for variant in pool56 nopool56; do
  rg import --onnx "$WORK/user/model56.onnx" --classes "$WORK/user/classes.txt" --name classifier \
    --dataset fashion-mnist --out "$WORK/$variant/bundle" --force
done
rg fit --bundle "$WORK/pool56/bundle" --defense stateful --name stateful --dataset fashion-mnist \
  --params method=knn k=4 max_side=28 --no-progress
rg fit --bundle "$WORK/nopool56/bundle" --defense stateful --name stateful --dataset fashion-mnist \
  --params method=knn k=4 --no-progress
echo "bundles: $WORK/pool56/bundle $WORK/nopool56/bundle"
