#!/usr/bin/env bash
# The GPU rows of docs/results.md as one prepared script: CamVid at 360x480 from scratch for SegNet,
# Bayesian SegNet and DeepLabV3-ResNet-50 (median-frequency weights, Adam 1e-3 + poly, as the CPU rows),
# each time-boxed, then scored with the uncertainty report. Fits one 10-minute device command.
#   bash benchmarks/gpu/gpu_results.sh OUT_DIR CAMVID_ROOT [TOTAL_SECONDS]
# CAMVID_ROOT is the SegNet layout (122 MB as published; the device's 64 MB carry limit needs a compact
# copy: `python benchmarks/gpu/camvid_compact.py /work/shared/data/camvid shared/camvid` writes one with
# JPEG-95 images and the original PNG labels, 37 MB).
set -uo pipefail
OUTDIR=${1:?out dir}; CAMVID=${2:?camvid root}; TOTAL=${3:-560}
W=/tmp/gpu12; mkdir -p "$W/runs" "$OUTDIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PIXELSEG_CACHE=$W/cache
T0=$(date +%s)
step() { local t=$1; shift; echo "=== [$(date +%T) +$(( $(date +%s) - T0 ))s] $* (limit ${t}s)"; local s=$(date +%s)
         timeout "$t" "$@"; echo "=== rc=$? in $(( $(date +%s) - s ))s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
COMMON="--dataset camvid --data-root $CAMVID --image-size 360x480 --weights none --batch-size 12 --optimizer adam
        --lr 1e-3 --schedule poly --class-weighting median --workers 8 --figure-samples 3"
step 165 python -m pixelseg train $COMMON --model segnet --backbone vgg16 --epochs 40 --run-dir $W/runs/segnet
step 165 python -m pixelseg train $COMMON --model bayesian_segnet --backbone vgg16 --epochs 40 --run-dir $W/runs/bayesian_segnet
step 130 python -m pixelseg train $COMMON --model deeplabv3 --backbone resnet50 --epochs 30 --run-dir $W/runs/deeplabv3
for r in segnet deeplabv3; do step 25 python -m pixelseg evaluate $W/runs/$r --uncertainty; done
step 40 python -m pixelseg evaluate $W/runs/bayesian_segnet --mc-samples 8
tar czf "$OUTDIR/gpu_results12.tgz" --exclude='*.pt' --exclude=cache -C /tmp gpu12
echo "=== done $(date +%T) +$(( $(date +%s) - T0 ))s"
