"""Depthwise 3x3 convolutions on CPU: fwd+bwd and fwd-only time, fp32 vs bf16, channels_last vs NCHW.

Why pixelseg runs MobileNetV2's *strided* depthwise convs in fp32 under CPU bf16 autocast
(``pixelseg.models.rewrites.optimize_for_training``): on torch 2.14 / oneDNN with AVX-512-BF16 their bf16
backward is several times slower than fp32 (e.g. 576 channels at 8x8, stride 2: 60 ms vs 1.4 ms),
while stride-1 depthwise convs are faster in bf16. Shapes are the tutorial model's at batch 64, 128x128.

    python benchmarks/speed/bench_dwconv.py
"""
from __future__ import annotations

import time

import torch

SHAPES = [(96, 64, 2), (144, 32, 2), (192, 16, 2), (576, 8, 2), (32, 64, 1), (144, 32, 1), (384, 8, 1), (960, 4, 1)]


def bench(channels: int, size: int, stride: int, dtype, channels_last: bool, batch: int = 64, iters: int = 6):
    x = torch.randn(batch, channels, size, size, dtype=dtype)
    conv = torch.nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    fb = []
    for _ in range(iters):
        t = time.perf_counter()
        y = conv(x)
        y.backward(torch.ones_like(y))
        fb.append(time.perf_counter() - t)
    fwd = []
    with torch.no_grad():
        for _ in range(iters):
            t = time.perf_counter()
            conv(x)
            fwd.append(time.perf_counter() - t)
    return 1000 * sorted(fb)[iters // 2], 1000 * sorted(fwd)[iters // 2]


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms, fwd+bwd / fwd")
    print("| channels | size | stride | fp32 NHWC | fp32 NCHW | bf16 NHWC | bf16 NCHW |")
    print("|---|---|---|---|---|---|---|")
    for c, s, st in SHAPES:
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            for cl in (True, False):
                fb, f = bench(c, s, st, dtype, cl)
                cells.append(f"{fb:.1f} / {f:.1f}")
        print(f"| {c} | {s}×{s} | {st} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
