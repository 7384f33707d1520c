"""GPU correctness, run on a CUDA machine (never in CI): every architecture (default backbone) on CUDA
agrees with the CPU in fp32, trains a step under bf16 autocast + channels_last with finite gradients,
Bayesian SegNet's Monte-Carlo sampling runs on the GPU, the inference rewrites
(``rewrites.prepare_for_inference``: folded BatchNorm) keep fp32 outputs, and the training-time
decoder (grad enabled: U-Net's split skip convs) computes the same function as inference's.

    python benchmarks/gpu/gpu_check.py            # prints one line per model and exits non-zero on failure
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (puts this checkout's pixelseg first on sys.path)
from pixelseg.models import ARCHITECTURES, create_model, mc_predict  # noqa: E402
from pixelseg.models.rewrites import prepare_for_inference  # noqa: E402


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
        gpu_model.eval().float()
        with torch.no_grad():
            plain = gpu_model(xb)
        with torch.enable_grad():
            train_path = gpu_model(xb).detach()  # eval BN, grad on: the training-time decoder path
        folded = copy.deepcopy(gpu_model)
        prepare_for_inference(folded, None, True)
        with torch.no_grad():
            fold_out = folded(xb)
        scale = plain.abs().max().clamp(min=1e-6)
        fold_diff = float((fold_out - plain).abs().max() / scale)
        path_diff = float((train_path - plain).abs().max() / scale)
        ok &= fold_diff < 1e-3 and path_diff < 1e-3
        extra = f" | folded-BN rel diff {fold_diff:.1e}, train-path rel diff {path_diff:.1e}"
        if arch == "bayesian_segnet":
            r = mc_predict(gpu_model, xb, 8)
            ok &= r["entropy"].shape == (4, 128, 128) and bool(torch.isfinite(r["entropy"]).all())
            extra += f" | mc entropy mean {float(r['entropy'].mean()):.3f}"
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {arch:<16} {model.backbone:<12} cuda-vs-cpu fp32 rel diff {diff:.2e}, "
              f"argmax agreement {agree:.4f} | bf16 train step loss {float(loss):.3f}, grads finite {grads_ok}"
              f"{extra} | {time.time() - t0:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
