#!/usr/bin/env bash
# bench/gpu/check.sh -- issue 24 on a GPU machine, end to end, in one call (docs/OPERATIONS.md, "On a GPU").
#
#   bash bench/gpu/check.sh                          # on the GPU machine, from the repository root
#   CHECK_DEVICE=cpu CHECK_SMALL=1 bash bench/gpu/check.sh   # the same script, tiny sizes, on a CPU
#
# Installs nothing from the network. Here, where the registry is reachable, `bash bench/gpu/prepare.sh`
# first gathers what it needs: the cp312 wheels the GPU machine lacks (pydantic, pydantic-core,
# annotated-types, typing-inspection, diffusers, regex, importlib_metadata, zipp, torchattacks,
# onnx2torch, tritonclient, python-rapidjson, grpcio-health-checking, grpcio-reflection, uvloop, and for
# the tests pytest, pluggy, iniconfig, pygments, packaging, pytest-timeout) in .whl/, Fashion-MNIST in
# .gpu-data/ (training images as .xz, 40,000 of them, to fit the 64 MiB a call carries), and prints the
# one device call: carry .whl and .gpu-data; it installs the wheels (pip install --no-index --no-deps
# --target /tmp/site, on PYTHONPATH), re-gzips the training images and runs this script. Pass
# ROBUSTGATE_REVISION=<rev>: the device's copy of the tree may carry another commit's .git. The run of
# record (bench/results/gpu.check.md, 2026-12-04) was the same call by hand, with all 60,000 training
# images and no uvloop. When pytest is not importable this script installs .whl/pytest* and their
# dependencies from .whl the same way. Fashion-MNIST: /usr/share/datasets/fashion-mnist, else the
# carried .gpu-data/fashion-mnist (bench/gpu/pack_data.py), linked there (root on the GPU machine).
#
# Parts, in this order, each under its own `timeout` and within a total budget (CHECK_BUDGET_S,
# default 520 s on cuda so the script ends inside 9 minutes even if a part hangs); a part's failure
# or timeout is recorded, never fatal to the rest:
#   info            nvidia-smi, versions, providers
#   tests           the CUDA tests (pytest -k cuda: tests/proxy/test_torch_backend.py, test_assembly.py,
#                   tests/defenses/test_fit_cli.py: robustgate fit --device cuda for every defense that trains)
#   serve_default   deploy/default.yaml's stages (MagNet, runtime torch) through the proxy, torch backend
#                   on the device, requests of 64: max throughput, p99 at half that load (serve_load.py)
#   serve_diffusion the bundle's diffusion purifier (runtime torch) through the proxy, requests of 64
#   eval_pgd        robustgate eval --device DEVICE, n = 10,000, PGD-20, backbone and default pipeline, timed
#   precision       backbone clean accuracy float32 / bf16 / fp16 on the test set (precision.py)
#   eval_autoattack robustgate eval --attacks autoattack on CHECK_AA_N images (default 1,000; the
#                   10,000-image time is extrapolated linearly and labelled so), backbone and pipeline
#   train           torchrun --nproc_per_node 1: one epoch of the default bundle's recipe (fast-AT CNN)
#   ddp             torchrun --nproc_per_node 1 with an NCCL process group and DDP (ddp_smoke.py)
#   serving_workers issue 25 on the machine's cores (no GPU): bench/serving/workers.py, batch-1 calls from
#                   several client processes to server.workers 1, 4, 8 (CPU ONNX Runtime), items/s against
#                   the raw ONNX Runtime ceiling of the same cores
# Results: $OUT/gpu.check.{json,md} and check.log (what the device tool brings back), and the same
# under bench/results/ as gpu.check.* (cuda) or gpu.check.cpu_small.* (CHECK_DEVICE=cpu).
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
DEVICE=${CHECK_DEVICE:-cuda}
SMALL=${CHECK_SMALL:-0}
PY=${PYTHON:-python3}
if [ "$DEVICE" = cuda ]; then BUDGET=${CHECK_BUDGET_S:-520}; else BUDGET=${CHECK_BUDGET_S:-1500}; fi
T0=$(date +%s)
export CHECK_STARTED_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ) CHECK_DEVICE=${CHECK_DEVICE:-cuda}
export CHECK_COMMAND="${CHECK_COMMAND:-CHECK_DEVICE=${CHECK_DEVICE:-cuda} CHECK_SMALL=${CHECK_SMALL:-0} bash bench/gpu/check.sh}"
WORK=$(mktemp -d /tmp/robustgate-check.XXXXXX)
mkdir -p "$WORK/parts" "$WORK/res" "$WORK/pkg"
NAME=gpu.check; [ "$DEVICE" = cpu ] && NAME=gpu.check.cpu_small; [ "$DEVICE" = cpu ] && [ "$SMALL" != 1 ] && NAME=gpu.check.cpu
DEST=${OUT:-$WORK/out}
mkdir -p "$DEST"
exec > >(tee -a "$WORK/check.log") 2>&1
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
# the repository root is the `robustgate` package: make it importable whatever the folder's name
ln -s "$REPO" "$WORK/pkg/robustgate"
export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
export ROBUSTGATE_CACHE="$WORK/cache"
export ROBUSTGATE_REVISION="${ROBUSTGATE_REVISION:-$(git rev-parse --short HEAD 2>/dev/null)}"  # see the header
echo "check.sh: device $DEVICE, small $SMALL, budget ${BUDGET}s, work $WORK, results $DEST"

# ---- Fashion-MNIST ----------------------------------------------------------------------------------
FM=/usr/share/datasets/fashion-mnist
if [ ! -f "$FM/t10k-images-idx3-ubyte.gz" ]; then
  if [ -f "$REPO/.gpu-data/fashion-mnist/t10k-images-idx3-ubyte.gz" ]; then
    mkdir -p "$(dirname "$FM")" && ln -sfn "$REPO/.gpu-data/fashion-mnist" "$FM" \
      && echo "data: linked $FM -> .gpu-data/fashion-mnist" || echo "data: cannot link $FM (not root?)"
  else
    echo "data: NO Fashion-MNIST at $FM nor .gpu-data/fashion-mnist: parts that need it will fail"
  fi
fi

# ---- pytest, from the carried wheels when absent --------------------------------------------------
if ! "$PY" -c "import pytest" 2>/dev/null; then
  if ls "$REPO"/.whl/pytest-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site-test" \
      "$REPO"/.whl/{pytest,pluggy,iniconfig,pygments,packaging,pytest_timeout}-*.whl 2>&1 | tail -2
    export PYTHONPATH="$PYTHONPATH:$WORK/site-test"
  fi
fi

# ---- parts --------------------------------------------------------------------------------------------
# part NAME LIMIT_S CMD...: runs CMD under `timeout` (its process group is killed on expiry), logs to
# parts/NAME.log and the main log, appends its status to parts.jsonl
part() {
  local name=$1 limit=$2; shift 2
  local now left lim start rc
  now=$(date +%s); left=$(( BUDGET - (now - T0) - 10 ))
  lim=$limit; [ "$left" -lt "$lim" ] && lim=$left
  if [ "$lim" -lt 15 ]; then
    echo "=== $name: SKIPPED, ${left}s of the budget left"
    echo "{\"name\": \"$name\", \"rc\": null, \"seconds\": 0, \"limit\": $lim, \"skipped\": true}" >> "$WORK/parts.jsonl"
    return
  fi
  echo "=== $name (limit ${lim}s) $(date -u +%T)"
  start=$(date +%s.%N)
  timeout --kill-after=5 "$lim" "$@" > >(tee "$WORK/parts/$name.log") 2>&1
  rc=$?
  sleep 0.2
  local secs; secs=$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $start}")
  echo "=== $name: rc $rc in ${secs}s"
  echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $secs, \"limit\": $lim, \"skipped\": false}" >> "$WORK/parts.jsonl"
}

info() {
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" - <<'PYEOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for m in ("onnxruntime", "onnx", "grpc", "google.protobuf", "prometheus_client", "pydantic", "diffusers", "torchattacks",
          "onnx2torch", "tritonclient", "numpy", "sklearn", "pytest"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as exc:
        print(f"{m}: NOT importable ({type(exc).__name__}: {exc})")
import onnxruntime
print("onnxruntime providers:", onnxruntime.get_available_providers())
import robustgate
print("robustgate from", robustgate.__file__)
PYEOF
}

if [ "$SMALL" = 1 ]; then
  N_EVAL=8; AA_N=${CHECK_AA_N:-8}; N_PREC=500; EVAL_EXTRA="--steps 5"; EVAL_BATCH=8; THREADS=""
  LOAD="--concurrency 2 --procs 1 --duration 3 --warmup 0.5"; LOAD_DIFF="--batch 8 --concurrency 1 --procs 1 --duration 6 --warmup 1"
  TRAIN_EXTRA="--train-items 512 --max-steps-per-epoch 4 --val-items 32 --test-items 32 --batch-size 64"; DDP_STEPS=4
  WORKERS="--workers 1,2 --procs 2 --channels 4 --calls 600 --concurrency 16"
else
  N_EVAL=10000; AA_N=${CHECK_AA_N:-1000}; N_PREC=10000; EVAL_EXTRA=""; EVAL_BATCH=1000; THREADS="--threads 8"
  LOAD="--concurrency 32,128 --procs 8 --duration 5 --warmup 1"; LOAD_DIFF="--concurrency 32,128 --procs 8 --duration 5 --warmup 1"
  TRAIN_EXTRA="--val-items 1000 --test-items 1000"; DDP_STEPS=20
  WORKERS="--workers 1,4,8 --procs 6 --channels 24 --calls 12000 --concurrency 64"
fi

export -f info
export PY
part info 30 bash -c info
part tests 100 "$PY" -m pytest tests/proxy/test_torch_backend.py tests/proxy/test_assembly.py \
  tests/defenses/test_fit_cli.py -k cuda -q -rs \
  -p no:cacheprovider -o timeout=90
part serve_default 80 "$PY" bench/gpu/serve_load.py --preset default --device "$DEVICE" $LOAD --out "$WORK/res/serve_default"
part serve_diffusion 75 "$PY" bench/gpu/serve_load.py --preset diffusion --device "$DEVICE" $LOAD_DIFF --out "$WORK/res/serve_diffusion"
part eval_pgd 60 "$PY" -m robustgate.proxy.cli eval --bundle bundles/default --pipeline deploy/default.yaml --attacks pgd \
  --n "$N_EVAL" --device "$DEVICE" --batch-size "$EVAL_BATCH" $EVAL_EXTRA $THREADS --no-progress --out "$WORK/eval_pgd"
part precision 40 "$PY" bench/gpu/precision.py --device "$DEVICE" --n "$N_PREC" --out "$WORK/res/precision"
part eval_autoattack 90 "$PY" -m robustgate.proxy.cli eval --bundle bundles/default --pipeline deploy/default.yaml \
  --attacks autoattack --n "$AA_N" --device "$DEVICE" --batch-size "$EVAL_BATCH" $THREADS --no-progress --out "$WORK/eval_autoattack"
part train 50 "$PY" -m torch.distributed.run --nproc_per_node 1 -m robustgate.proxy.cli train --dataset fashion-mnist \
  --arch cnn --arch-kwargs '{"width": 16, "hidden": 256}' --method fast-at --eps 0.1 --epochs 1 --optimizer adam \
  --lr 0.002 --weight-decay 0 --schedule onecycle --seed 0 $TRAIN_EXTRA --no-progress --out "$WORK/train_bundle"
part ddp 30 "$PY" -m torch.distributed.run --nproc_per_node 1 bench/gpu/ddp_smoke.py --steps "$DDP_STEPS" --out "$WORK/res/ddp"
part serving_workers 120 "$PY" bench/serving/workers.py $WORKERS --pipelines onnx,default --out serving_workers \
  --out-dir "$WORK/res"

# ---- results --------------------------------------------------------------------------------------------
echo "=== summary $(date -u +%T), $(( $(date +%s) - T0 ))s in all"
"$PY" bench/gpu/summarize.py "$WORK" "$DEST/$NAME" || echo "summarize failed"
cp "$WORK/check.log" "$DEST/check.log" 2>/dev/null
for f in "$WORK"/res/serve_default.server.log; do [ -f "$f" ] && tail -c 2000000 "$f" > "$DEST/serve_default.server.log"; done
mkdir -p "$REPO/bench/results"
cp "$DEST/$NAME.json" "$DEST/$NAME.md" "$REPO/bench/results/" 2>/dev/null && echo "results: $DEST/$NAME.{json,md} and bench/results/$NAME.{json,md}"
echo "check.sh done in $(( $(date +%s) - T0 ))s"
