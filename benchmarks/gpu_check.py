"""GPU correctness, run on a CUDA machine (never in CI): every architecture (default backbone) on CUDA
agrees with the CPU in fp32, trains a step under bf16 autocast + channels_last with finite gradients,
and Bayesian SegNet's Monte-Carlo sampling runs on the GPU.

    python benchmarks/gpu_check.py            # prints one line per model and exits non-zero on failure
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from pixelseg.models import ARCHITECTURES, create_model, mc_predict


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}")
    failures = 0
    for arch in ARCHITECTURES:
        t0 = time.time()
        torch.manual_seed(0)
        model = create_model(arch, num_classes=5, weights=None).eval()
        x = torch.rand(2, 3, 100, 150)
        with torch.no_grad():
            ref = model(x)
            gpu_model = model.to(dev)
            out = gpu_model(x.to(dev)).cpu()
        diff = float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
        agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
        gpu_model.train().to(memory_format=torch.channels_last)
        xb = torch.rand(4, 3, 128, 128, device=dev).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 5, (4, 128, 128), device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = gpu_model(xb)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        grads_ok = all(torch.isfinite(p.grad).all() for p in gpu_model.parameters() if p.grad is not None)
        ok = diff < 1e-3 and agree > 0.999 and logits.shape == (4, 5, 128, 128) and bool(torch.isfinite(loss)) and grads_ok
        extra = ""
        if arch == "bayesian_segnet":
            r = mc_predict(gpu_model, xb, 8)
            ok &= r["entropy"].shape == (4, 128, 128) and bool(torch.isfinite(r["entropy"]).all())
            extra = f" | mc entropy mean {float(r['entropy'].mean()):.3f}"
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {arch:<16} {model.backbone:<12} cuda-vs-cpu fp32 rel diff {diff:.2e}, "
              f"argmax agreement {agree:.4f} | bf16 train step loss {float(loss):.3f}, grads finite {grads_ok}"
              f"{extra} | {time.time() - t0:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
