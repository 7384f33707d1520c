"""Measured matrix-multiply peak of this machine, the ceiling that model GFLOP/s are compared against.

A large square GEMM is the most efficient thing the BLAS/oneDNN (CPU) or cuBLAS (GPU) kernels do,
so its rate is a practical peak for the same threads and dtype, far more honest than a datasheet.

    python benchmarks/speed/gemm_peak.py [--dtypes fp32,bf16] [--n 4096] [--repeats 5]

Prints one JSON line per dtype. On CUDA, "fp32" means true fp32 (TF32 off) and "tf32" is available.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gemm_peak(dtype: str = "fp32", n: int | None = None, repeats: int = 5, device: str | torch.device | None = None) -> dict:
    """Best GFLOP/s of ``repeats`` n×n @ n×n products (2n³ FLOPs each) after one warm-up."""
    dev = _common.device(device)
    n = n or (8192 if dev.type == "cuda" else 4096)
    if dev.type == "cuda":
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    a = torch.randn(n, n, device=dev).to(DTYPES[dtype])
    b = torch.randn(n, n, device=dev).to(DTYPES[dtype])
    c = torch.empty(n, n, device=dev, dtype=DTYPES[dtype])
    inner = 10 if dev.type == "cuda" else 1  # GPU products take milliseconds; time several per sample
    best = float("inf")
    try:
        for i in range(repeats + 1):
            _common.sync(dev)
            t = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b, out=c)
            _common.sync(dev)
            if i:  # the first product is the warm-up (kernel selection, page faults)
                best = min(best, (time.perf_counter() - t) / inner)
    finally:
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = prev
    return {"dtype": dtype, "n": n, "device": str(dev), "threads": torch.get_num_threads(),
            "gflops": 2 * n**3 / best / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, tf32 (CUDA), fp16 (CUDA)")
    p.add_argument("--n", type=int, default=None, help="matrix side (default 4096 on CPU, 8192 on CUDA)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    for d in args.dtypes.split(","):
        print(json.dumps(gemm_peak(d.strip(), args.n, args.repeats, args.device)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
