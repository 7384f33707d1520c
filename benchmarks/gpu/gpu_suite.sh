#!/usr/bin/env bash
# The whole GPU session as one prepared script (device time is scarce): correctness, the GPU defaults
# (AMP dtype, channels_last, compile, batch size, DataLoader workers) from measurements, the model rewrites'
# effect on GPU, DDP over NCCL, SMP side by side, and SegNet on CamVid with whatever time is left.
#   bash benchmarks/gpu/gpu_suite.sh OUT_DIR PETS_ROOT CAMVID_ROOT [TOTAL_SECONDS]
# Every step is time-boxed so the archive at the end is always written.
set -uo pipefail
OUTDIR=${1:?out dir}; PETS=${2:?pets root}; CAMVID=${3:?camvid root}; TOTAL=${4:-560}
W=/tmp/gpu; mkdir -p "$W/runs" "$OUTDIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PIXELSEG_CACHE=$W/cache
T0=$(date +%s)
step() { local t=$1; shift; echo "=== [$(date +%T) +$(( $(date +%s) - T0 ))s] $* (limit ${t}s)"; local s=$(date +%s)
         timeout "$t" "$@"; echo "=== rc=$? in $(( $(date +%s) - s ))s"; }
TP="python benchmarks/speed/bench_throughput.py --device cuda --repeats 1 --steps 10 --warmup 3 --gemm-repeats 3"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch,torchvision,timm;print('torch',torch.__version__,'torchvision',torchvision.__version__,'timm',timm.__version__)"
step 60  python benchmarks/gpu/gpu_check.py
# AMP dtype x layout at the tutorial's batch 64, then batch 256 for the two candidates
step 120 $TP --configs fp32,channels_last,bf16,bf16_cl,fp16_cl --tasks train_frozen,train_full,infer,latency --out $W/tp_b64.json
step 45  env PIXELSEG_BENCH_PLAIN=1 $TP --configs bf16_cl --tasks train_frozen,train_full,infer --out $W/tp_b64_plain.json
step 45  $TP --configs fp32,bf16_cl --tasks train_full,infer --batch 256 --out $W/tp_b256.json
step 70  $TP --configs bf16_cl_compile --tasks train_full,infer --out $W/tp_compile.json
# end to end: DataLoader workers (pinned memory is always on for CUDA)
step 45  python -m pixelseg train --data-root "$PETS" --weights none --epochs 4 --run-dir $W/runs/pets_w0
step 45  python -m pixelseg train --data-root "$PETS" --weights none --epochs 4 --workers 4 --run-dir $W/runs/pets_w4
step 40  torchrun --standalone --nproc_per_node=1 -m pixelseg train --data-root "$PETS" --weights none --epochs 2 --run-dir $W/runs/pets_torchrun
step 45  python benchmarks/compare/run.py --runners smp,pixelseg --no-quality --repeats 1 --out $W/compare.json
LEFT=$(( TOTAL - ($(date +%s) - T0) - 25 ))
if [ "$LEFT" -gt 60 ]; then
  step "$LEFT" python -m pixelseg train --dataset camvid --data-root "$CAMVID" --model segnet --image-size 360x480 \
       --batch-size 12 --epochs 40 --lr 1e-3 --schedule poly --class-weighting median --scale-range 0.75,1.5 --crop \
       --workers 10 --weights none --figure-samples 3 --run-dir $W/runs/camvid_segnet
fi
tar czf "$OUTDIR/gpu_results.tgz" --exclude='*.pt' --exclude=cache -C /tmp gpu
echo "=== done $(date +%T) +$(( $(date +%s) - T0 ))s"
