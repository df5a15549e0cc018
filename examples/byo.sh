#!/usr/bin/env bash
# Bring your own classifier, end to end (docs/BYO.md): a standard-trained classifier written in
# plain PyTorch (examples/train_classifier.py) -> ONNX -> served by MLServer (the upstream) ->
# `robustgate import` -> `robustgate fit` (MagNet, optionally a small diffusion purifier) on your
# data -> `robustgate serve` in front of MLServer -> `robustgate probe` -> `robustgate eval`.
#
#   examples/byo.sh WORK fashion-mnist               # Debian's /usr/share/datasets/fashion-mnist
#   examples/byo.sh WORK rgb32                       # RGB 32x32 ImageFolder built from it (CIFAR-10 stand-in)
#   examples/byo.sh WORK cifar10 ~/data              # torchvision's CIFAR-10 files under ~/data
#   examples/byo.sh WORK imagefolder DIR             # your own DIR/train/<class>/*, DIR/test/<class>/*
#
# Everything is written under WORK (the configs for MLServer and robustgate too). Sizes are small
# on purpose (a 2-core CPU runs each dataset in ~10-15 min); the environment overrides them:
#   EPOCHS=2 N_TRAIN_MODEL=10000 WIDTH=16 MAGNET_N=5000 MAGNET_EPOCHS=5 DIFFUSION=0 DIFFUSION_STEPS=300
#   EVAL_N=200 ATTACKS=fgsm,pgd,bpda,square EPS=0.03,0.1 PROBE_N=64
#   ROBUSTGATE="robustgate" PYTHON=python MLSERVER=mlserver GRPC_PORT=9500
set -euo pipefail

WORK=${1:?usage: examples/byo.sh WORK [fashion-mnist / rgb32 / cifar10 DIR / imagefolder DIR]}
KIND=${2:-fashion-mnist}
DATA_DIR=${3:-}
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
ROBUSTGATE=${ROBUSTGATE:-robustgate}
MLSERVER=${MLSERVER:-mlserver}
EPOCHS=${EPOCHS:-2}; N_TRAIN_MODEL=${N_TRAIN_MODEL:-10000}; WIDTH=${WIDTH:-16}
MAGNET_N=${MAGNET_N:-5000}; MAGNET_EPOCHS=${MAGNET_EPOCHS:-5}
DIFFUSION=${DIFFUSION:-0}; DIFFUSION_STEPS=${DIFFUSION_STEPS:-300}
EVAL_N=${EVAL_N:-200}; ATTACKS=${ATTACKS:-fgsm,pgd,bpda,square}; EPS=${EPS:-0.03,0.1}; PROBE_N=${PROBE_N:-64}
GRPC_PORT=${GRPC_PORT:-9500}          # MLServer gRPC; its REST port is +1, the proxy +2, its metrics +3
HTTP_PORT=$((GRPC_PORT + 1)); PROXY_PORT=$((GRPC_PORT + 2)); METRICS_PORT=$((GRPC_PORT + 3))
mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
rg() { echo "+ robustgate $*" >&2; $ROBUSTGATE "$@"; }

# ---- 0. the data: robustgate's --dataset/--data-dir, the same for every command ----------------
case "$KIND" in
  fashion-mnist) DATA=(--dataset fashion-mnist) ;;
  rgb32)
    DATA_DIR=${DATA_DIR:-$WORK/rgb32}
    [ -d "$DATA_DIR/test" ] || $PYTHON "$HERE/make_rgb_imagefolder.py" --out "$DATA_DIR" --train 20000 --test 2000
    KIND=imagefolder; DATA=(--dataset imagefolder --data-dir "$DATA_DIR") ;;
  cifar10|imagefolder) DATA=(--dataset "$KIND" --data-dir "${DATA_DIR:?$KIND needs a data dir}") ;;
  *) echo "unknown dataset kind $KIND" >&2; exit 2 ;;
esac

# ---- 1. your classifier: plain PyTorch, standard training, exported to ONNX ------------------
[ -f "$WORK/user/model.onnx" ] || $PYTHON "$HERE/train_classifier.py" "${DATA[@]}" --epochs "$EPOCHS" \
  --n-train "$N_TRAIN_MODEL" --width "$WIDTH" --out "$WORK/user/model.onnx"

# ---- 2. MLServer serves it (the upstream robustgate will sit in front of) --------------------
mkdir -p "$WORK/mlserver/models/classifier"
cat > "$WORK/mlserver/settings.json" <<EOF
{"host": "127.0.0.1", "grpc_port": $GRPC_PORT, "http_port": $HTTP_PORT, "metrics_endpoint": null,
 "parallel_workers": 0, "grpc_max_message_length": 67108864, "load_models_at_startup": true,
 "model_repository_root": "$WORK/mlserver/models"}
EOF
cat > "$WORK/mlserver/models/classifier/model-settings.json" <<EOF
{"name": "classifier", "implementation": "mlserver_onnx.OnnxModel", "max_batch_size": 0,
 "parameters": {"uri": "$WORK/user/model.onnx"}}
EOF
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
(cd "$WORK/mlserver" && PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" exec $MLSERVER start .) \
  > "$WORK/mlserver.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$HTTP_PORT/v2/models/classifier/ready" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$HTTP_PORT/v2/models/classifier/ready" >/dev/null || { tail "$WORK/mlserver.log"; exit 1; }
echo "MLServer serves 'classifier' on 127.0.0.1:$GRPC_PORT"

# ---- 3. import: from the ONNX file (with the torch twin fit/eval need) ... ------------------
rg import --onnx "$WORK/user/model.onnx" --classes "$WORK/user/classes.txt" --name classifier \
  "${DATA[@]}" --out "$WORK/bundle" --force
#      ... or, without the file, from the running server's metadata (no twin: serve-only)
rg import --upstream "127.0.0.1:$GRPC_PORT" --model classifier --classes "$WORK/user/classes.txt" \
  --out "$WORK/bundle-from-upstream" --force

# ---- 4. fit defenses on your data -----------------------------------------------------------
rg fit --bundle "$WORK/bundle" --defense magnet "${DATA[@]}" --n-train "$MAGNET_N" --n-val 1000 --n-test 1000 \
  --params epochs="$MAGNET_EPOCHS" --no-progress
if [ "$DIFFUSION" = 1 ]; then
  rg fit --bundle "$WORK/bundle" --defense diffusion "${DATA[@]}" --n-train "$MAGNET_N" --n-val 200 --n-test 200 \
    --params train_steps="$DIFFUSION_STEPS" "block_out_channels=[16,32]" --no-progress
fi

# ---- 5. serve robustgate in front of MLServer -----------------------------------------------
cat > "$WORK/proxy.yaml" <<EOF
bundle: $WORK/bundle
server: {host: 127.0.0.1, port: $PROXY_PORT, metrics_port: $METRICS_PORT}
backend:
  kind: upstream
  upstream: {url: "127.0.0.1:$GRPC_PORT", model_name: classifier}
pipeline:
  stages:
    - {name: magnet, kind: magnet, action: reject}
EOF
$ROBUSTGATE serve --config "$WORK/proxy.yaml" > "$WORK/proxy.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 120); do grep -q "serving" "$WORK/proxy.log" 2>/dev/null && break; sleep 1; done
sleep 1

# ---- 6. probe the live proxy: clean and PGD-attacked test images -----------------------------
rg probe --url "127.0.0.1:$PROXY_PORT" --bundle "$WORK/bundle" --n "$PROBE_N" "${DATA[@]}" | tee "$WORK/probe.txt"

# ---- 7. evaluate: the red team against the served pipeline (and the bare model) -------------
cat > "$WORK/pipeline.yaml" <<EOF
configs:
  magnet:
    stages: [{name: magnet, kind: magnet, action: reject}]
EOF
[ "$DIFFUSION" = 1 ] && cat >> "$WORK/pipeline.yaml" <<EOF
  diffusion:
    stages: [{name: diffusion, kind: diffusion}]
EOF
rg eval --bundle "$WORK/bundle" --pipeline "$WORK/pipeline.yaml" "${DATA[@]}" --attacks "$ATTACKS" --eps "$EPS" \
  --n "$EVAL_N" --no-progress --out "$WORK/eval"
cat "$WORK/eval/"*.md | head -60
