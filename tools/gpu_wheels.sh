#!/usr/bin/env bash
# The wheels the GPU machine lacks (it has PyTorch, numpy, timm, safetensors; not these), for
# its CPython 3.12, into .whl/ (ignored by git through .git/info/exclude). The device call then
# carries .whl and installs them with `pip install --no-index --no-deps --target /tmp/site`.
# Versions: the ones requirements.txt pins where it pins them.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pin() { grep -i -E "^$1==" requirements.txt | head -1 || true; }
want=()
for name in segmentation-models-pytorch rasterio affine cligj click-plugins shapely; do
  p=$(pin "$name"); want+=("${p:-$name}")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${want[@]}"
du -sh .whl
