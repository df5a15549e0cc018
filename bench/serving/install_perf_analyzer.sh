#!/usr/bin/env bash
# Installs Triton's perf_analyzer (CPU use) for bench/serving/run.py, outside the project venv.
#
# - tritonclient >= 2.6x no longer ships the binary, and the wheels of 2.53-2.60 are built against
#   glibc 2.38 (Debian 12 has 2.36): tritonclient 2.45.0's bin/perf_analyzer is the one that runs here;
# - it links libb64.so.0d (Debian: libb64-0d) and libcudart.so.12 even on the CPU
#   (pip: nvidia-cuda-runtime-cu12; run.py puts its lib folder on LD_LIBRARY_PATH).
# --no-deps --target keeps the project's venv (tritonclient 2.73) untouched.
set -euo pipefail
DEST="${1:-$HOME/.cache/robustgate/perf_analyzer}"
PY="${PYTHON:-$(dirname "$0")/../../.venv/bin/python}"
if ! ldconfig -p | grep -q libb64.so.0d; then
  apt-get install -y libb64-0d
fi
"$PY" -m pip install --quiet --no-deps --no-compile --target "$DEST" tritonclient==2.45.0 nvidia-cuda-runtime-cu12
chmod +x "$DEST/bin/perf_analyzer"
LD_LIBRARY_PATH="$DEST/nvidia/cuda_runtime/lib" "$DEST/bin/perf_analyzer" --version
echo "perf_analyzer installed in $DEST/bin (run.py finds it there)"
