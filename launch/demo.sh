#!/usr/bin/env bash
# The main job on the built-in toy data, CPU only: toy COCO 2014 -> webdataset shards -> episodes as pictures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
jc2a toy --out runs/toy/coco --train-images 240 --val-images 240
jc2a shards coco --root runs/toy/coco --out runs/toy/shards
jc2a preview --config configs/toy.yaml --episodes 4
jc2a summary
echo "demo done: episode pictures in runs/toy/preview/"
