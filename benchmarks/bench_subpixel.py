"""Stride-2 transposed convolutions vs their sub-pixel form (pixelseg.runtime.SubPixelConvTranspose2d).

Per layer of the tutorial U-Net's decoder (BatchNorm folded, inference, channels_last, fp32 and
bf16) and for the whole model at batch 64 and batch 1: the two forms are timed alternately in one
process (A, B, A, B, ...), median of the rounds, so a busy machine slows both alike.

    python benchmarks/bench_subpixel.py                 # 128x128, batch 64 and 1
    python benchmarks/bench_subpixel.py --size 256 --rounds 5
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixelseg import runtime  # noqa: E402
from pixelseg.models import create_model  # noqa: E402


def _time(fn, x, iters):
    with torch.inference_mode():
        fn(x)
        t = time.perf_counter()
        for _ in range(iters):
            fn(x)
        return (time.perf_counter() - t) / iters


def ab(fa, fb, x, iters, rounds, dtype):
    ta, tb = [], []
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        for _ in range(rounds):
            ta.append(_time(fa, x, iters))
            tb.append(_time(fb, x, iters))
    return statistics.median(ta), statistics.median(tb)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batches", default="64,1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = create_model("unet", "mobilenet_v2", num_classes=3).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}")
    for name in args.dtypes.split(","):
        dtype = {"fp32": None, "bf16": torch.bfloat16}[name]
        runtime.SUBPIXEL_CONV_TRANSPOSE = False
        plain = runtime.prepare_for_inference(copy.deepcopy(base), dtype)
        runtime.SUBPIXEL_CONV_TRANSPOSE = True
        fast = runtime.prepare_for_inference(copy.deepcopy(base), dtype)
        for batch in map(int, args.batches.split(",")):
            x = torch.rand(batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
            iters = 2 if batch > 8 else 20
            # per layer: capture each transposed conv's input once
            inputs = {}
            hooks = [m.register_forward_hook(lambda m, i, o, n=n: inputs.update({n: i[0]}))
                     for n, m in plain.named_modules() if isinstance(m, torch.nn.ConvTranspose2d)]
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                plain(x)
            for h in hooks:
                h.remove()
            for n, xin in inputs.items():
                ta, tb = ab(plain.get_submodule(n), fast.get_submodule(n), xin, iters, args.rounds, dtype)
                print(f"{name} batch {batch:>3} layer {n:<14} {tuple(xin.shape[1:])}: transposed {ta * 1e3:7.2f} ms"
                      f"  sub-pixel {tb * 1e3:7.2f} ms  ({ta / tb:.2f}x)")
            ta, tb = ab(plain, fast, x, iters, args.rounds, dtype)
            print(f"{name} batch {batch:>3} whole model: transposed {ta * 1e3:7.2f} ms ({batch / ta:7.1f} img/s)  "
                  f"sub-pixel {tb * 1e3:7.2f} ms ({batch / tb:7.1f} img/s)  ({ta / tb:.2f}x)")
            with torch.inference_mode():
                diff = (plain(x[:2].float()) - fast(x[:2].float())).abs().max().item() if dtype is None else float("nan")
            if dtype is None:
                print(f"fp32 max |logit difference| plain vs sub-pixel: {diff:.2e}")


if __name__ == "__main__":
    main()
