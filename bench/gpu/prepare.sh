#!/usr/bin/env bash
# bench/gpu/prepare.sh -- what bench/gpu/check.sh needs on the GPU machine, gathered here, where the
# package registry is reachable: the cp312 wheels that machine lacks (versions from
# deploy/docker/constraints.txt, the ones the test suite runs with) in .whl/, and Fashion-MNIST in
# .gpu-data/ (its training images as .xz, so that everything fits the 64 MiB a device call carries).
#
#   bash bench/gpu/prepare.sh          # from the repository root, on this machine; then the one device call:
#
# run(carry=[".whl", ".gpu-data"], timeout_s=600, command=<the line this script prints last>)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
PY=${PYTHON:-.venv/bin/python}
# what the GPU machine's python3 (3.12) lacks (ENVIRONMENT.md; bench/gpu/check.sh's header)
PACKAGES="pydantic pydantic_core annotated-types typing-inspection diffusers regex importlib_metadata zipp
torchattacks onnx2torch tritonclient python-rapidjson grpcio-health-checking grpcio-reflection uvloop
pytest pluggy iniconfig Pygments packaging pytest-timeout"
rm -rf .whl && mkdir -p .whl
pins=()
for p in $PACKAGES; do
  pin=$(grep -i -E "^${p//[-_]/[-_]}==" deploy/docker/constraints.txt | head -1 || true)
  [ -n "$pin" ] || { echo "prepare.sh: $p is not pinned in deploy/docker/constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl "${pins[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
if [ "$(ls .whl/*.whl | wc -l)" -ne "${#pins[@]}" ]; then
  echo "prepare.sh: not every wheel came" >&2; ls .whl >&2; exit 1
fi
rm -rf .gpu-data
# the first TRAIN_ITEMS training images (bench/gpu/pack_data.py; default 40,000: the whole set, with the
# wheels and the tracked tree, is more than a call carries): check.sh's `train` part times one epoch of
# them (less the 5,000 validation images); TRAIN_ITEMS=60000 carries all, for a call that trains for real
# with fewer wheels
"$PY" bench/gpu/pack_data.py --out .gpu-data/fashion-mnist --train-items "${TRAIN_ITEMS:-40000}"
"$PY" - <<'EOF'
import gzip, lzma, shutil
from pathlib import Path
src = Path(".gpu-data/fashion-mnist/train-images-idx3-ubyte.gz")
with gzip.open(src) as fin, lzma.open(src.with_suffix(".xz"), "wb", preset=6) as fout:
    shutil.copyfileobj(fin, fout)
src.unlink()
EOF
mib() { find "$@" -type f -print0 | xargs -0 stat -c %s | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
tree=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {printf "%.1f", s / 1048576}')
total=$(awk "BEGIN {print $(mib .whl) + $(mib .gpu-data) + $tree}")
echo "prepare.sh: $(mib .whl) MiB of wheels (${#pins[@]}), $(mib .gpu-data) MiB of data, the tracked tree $tree MiB:" \
  "$total MiB with untracked files left out (a device call carries 64 MiB in all)"
if awk "BEGIN {exit !($total > 62)}"; then
  echo "prepare.sh: WARNING: under 2 MiB to spare; a smaller TRAIN_ITEMS frees some" >&2
fi
cat <<'EOF'
device command (bench/gpu/check.sh's header; ROBUSTGATE_REVISION names the commit measured):
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && python3 -c "import lzma,gzip,shutil; shutil.copyfileobj(lzma.open('.gpu-data/fashion-mnist/train-images-idx3-ubyte.xz'), gzip.open('.gpu-data/fashion-mnist/train-images-idx3-ubyte.gz','wb',compresslevel=1))" && ROBUSTGATE_REVISION=REV bash bench/gpu/check.sh
EOF
