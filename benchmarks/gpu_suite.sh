#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md: stock supervised step vs pgl_pretrain step at real plan sizes, plain and ResEnc
# (nnU-Net's ResEnc M/L/XL share one topology rule; L differs by its memory target, i.e. its patch), with the data
# path and a short real run each. Usage: bash benchmarks/gpu_suite.sh OUT_DIR   (prints the tables, writes JSON)
set -euo pipefail
out=${1:?give an output folder}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
iso="$out/work_iso"; aniso="$out/work_aniso"
$py benchmarks/pretrain_speed.py --patch 128 128 128 --arch plain --workdir "$iso" --json "$out/iso_plain.json"
$py benchmarks/pretrain_speed.py --patch 128 128 128 --arch resenc --workdir "$iso" --json "$out/iso_resenc.json" --no-run
$py benchmarks/pretrain_speed.py --patch 80 192 160 --spacing 2.0 0.8 0.8 --arch plain --workdir "$aniso" \
    --json "$out/aniso_plain.json"
$py benchmarks/pretrain_speed.py --patch 80 192 160 --spacing 2.0 0.8 0.8 --arch resenc --workdir "$aniso" \
    --json "$out/aniso_resenc.json" --no-run
rm -rf "$iso" "$aniso"
