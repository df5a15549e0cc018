#!/usr/bin/env bash
# Installs everything robustgate needs on a fresh Debian/Ubuntu machine:
# system packages (dataset, Prometheus, perf_analyzer's libb64) and a virtualenv at .venv
# holding the project with its dev extras. Idempotent: re-running only fills in what is missing.
#
# Environment switches (the container image uses them; README's commands need none):
#   ROBUSTGATE_SKIP_APT=1   skip the system packages (they serve the tests and the dataset)
#   ROBUSTGATE_EXTRAS=...   pip extras to install (default: cpu,dev). Exactly one of `cpu` / `gpu`
#                           picks the ONNX Runtime build (pyproject.toml); `cpu` alone = serve only
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

apt_pkgs=(dataset-fashion-mnist prometheus libb64-0d haproxy redis-server)  # haproxy: the native front (deploy/haproxy); redis-server: the stateful detector's shared-store tests
missing=()
[ "${ROBUSTGATE_SKIP_APT:-0}" = 1 ] && apt_pkgs=()
for p in ${apt_pkgs[@]+"${apt_pkgs[@]}"}; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[install] apt: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch/torchvision first, pinned to the builds this machine serves from disk.
python -m pip install -q torch==2.14.1 torchvision==0.29.1
extras=${ROBUSTGATE_EXTRAS-cpu,dev}
case ",$extras," in
  *,gpu,*) # onnxruntime-gpu replaces the CPU build (both install the `onnxruntime` module)
    if python -m pip show -q onnxruntime >/dev/null 2>&1; then python -m pip uninstall -q -y onnxruntime; fi ;;
esac
python -m pip install -q -e ".${extras:+[$extras]}"
# torchattacks (red team, `fit`, `probe`; not needed to serve): 3.5.1 declares requests~=2.25.1
# (urllib3 < 1.27) but never imports requests; tritonclient needs urllib3 >= 2.0.7, so it is
# installed without its declared deps (its real ones, torch, torchvision, scipy, tqdm and numpy,
# are core dependencies in pyproject.toml). Skipped for a serve-only install (no `dev`/`attack`/`fit`).
case ",$extras," in
  *,dev,*|*,attack,*|*,fit,*) python -m pip install -q --no-deps torchattacks==3.5.1 ;;
esac
echo "[install] done: $(python -c 'import torch, onnxruntime, grpc; print("torch", torch.__version__, "onnxruntime", onnxruntime.__version__, "grpcio", grpc.__version__)')"
