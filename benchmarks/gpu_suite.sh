#!/usr/bin/env bash
# The whole GPU session as one prepared script (device time is scarce): correctness, the tutorial run,
# DDP over NCCL, throughput vs the card's peak, the zoo, SMP side by side, and SegNet on CamVid.
#   bash benchmarks/gpu_suite.sh OUT_DIR PETS_ROOT CAMVID_ROOT
# Every step is time-boxed so the archive at the end is always written.
set -uo pipefail
OUTDIR=${1:?out dir}; PETS=${2:?pets root}; CAMVID=${3:?camvid root}
W=/tmp/gpu; mkdir -p "$W/runs" "$OUTDIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PIXELSEG_CACHE=$W/cache
step() { local t=$1; shift; echo "=== [$(date +%T)] $* (limit ${t}s)"; local s=$(date +%s)
         timeout "$t" "$@"; echo "=== rc=$? in $(( $(date +%s) - s ))s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch,torchvision,timm;print('torch',torch.__version__,'torchvision',torchvision.__version__,'timm',timm.__version__)"
step 45  python benchmarks/gpu_check.py
step 70  python -m pixelseg train --data-root "$PETS" --weights none --run-dir $W/runs/pets
step 20  python -m pixelseg evaluate $W/runs/pets --split test
step 75  python benchmarks/bench_throughput.py --device cuda --configs fp32,bf16_cl --tasks train_frozen,train_full,infer,latency --repeats 1 --out $W/throughput.json
step 130 python -m pixelseg train --dataset camvid --data-root "$CAMVID" --model segnet --image-size 360x480 \
         --batch-size 12 --epochs 60 --lr 1e-3 --schedule poly --class-weighting median --scale-range 0.75,1.5 --crop \
         --color-jitter 0.1 --workers 10 --weights none --figure-samples 3 --run-dir $W/runs/camvid_segnet
step 20  python -m pixelseg evaluate $W/runs/camvid_segnet --split val --batch-size 8
step 70  python benchmarks/bench_zoo.py --device cuda --out $W/zoo.json
step 35  torchrun --standalone --nproc_per_node=1 -m pixelseg train --data-root "$PETS" --weights none --epochs 2 --run-dir $W/runs/pets_torchrun
step 40  python benchmarks/compare.py --runners smp,pixelseg --no-quality --repeats 1 --out $W/compare.json
step 50  python benchmarks/bench_throughput.py --device cuda --configs bf16_cl_compile --tasks train_full,infer --batch 64 --repeats 1 --out $W/throughput_compile.json
tar czf "$OUTDIR/gpu_results.tgz" --exclude='*.pt' --exclude=cache -C /tmp gpu
echo "=== done $(date +%T)"
