"""Every architecture of the zoo with its default backbone, at 128×128 and at 360×480 (CamVid size):
training and inference images/s, FLOPs per image and peak memory, all with the same flags.

Same flags means pixelseg's defaults for everyone (device auto, precision auto = bf16 autocast on CUDA
and on CPUs with native bf16, channels_last, random weights, all layers trained, Adam, cross-entropy)
and the same batch size per resolution. Each (model, size) runs in a fresh process so that peak
memory is its own. Inference is one deterministic forward pass in eval mode (Bayesian SegNet's
Monte-Carlo sampling multiplies its cost by the number of samples).

    python benchmarks/speed/bench_zoo.py                                   # all models, both sizes
    python benchmarks/speed/bench_zoo.py --models unet,segnet --sizes 128x128@8 --steps 2
    python benchmarks/speed/bench_zoo.py --models deeplabv3/mobilenet_v1,upernet/timm:convnext_tiny  # ARCH/BACKBONE
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)


def parse_size(spec: str) -> tuple[int, int, int]:
    """'360x480@8' -> (360, 480, batch 8)."""
    dims, _, batch = spec.partition("@")
    h, _, w = dims.partition("x")
    return int(h), int(w or h), int(batch or 8)


def split_spec(spec: str) -> tuple[str, str | None]:
    """'upernet/timm:convnext_tiny' -> ('upernet', 'timm:convnext_tiny'); 'unet' -> ('unet', None)."""
    arch, _, backbone = spec.partition("/")
    return arch, backbone or None


def forward_flops(spec: str, h: int, w: int) -> float:
    """FLOPs (2 × multiply-adds) of one forward pass of one image, counted on the meta device (no
    memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pixelseg.models import create_model

    arch, backbone = split_spec(spec)
    with torch.device("meta"):
        model = create_model(arch, backbone=backbone, num_classes=3).eval()
        x = torch.empty(1, 3, h, w)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops()


def worker(spec: str, h: int, w: int, batch: int, args) -> dict:
    from pixelseg.training.loop import RunContext, train_step as loop_train_step
    from pixelseg.training.losses import build_loss
    from pixelseg.models import create_model
    from pixelseg.training.optim import build_optimizer
    from pixelseg.core.runtime import autocast, resolve_precision, select_device, to_model_input
    from pixelseg.models.rewrites import optimize_for_training, prepare_for_inference

    dev = select_device(args.device)
    amp = resolve_precision(args.precision, dev)
    torch.manual_seed(0)
    arch, backbone = split_spec(spec)
    model = create_model(arch, backbone=backbone, num_classes=3, weights=None).to(dev)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    optimize_for_training(model, dev, amp)  # what `pixelseg train` does
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=gen)
    masks = torch.randint(0, 3, (batch, h, w), dtype=torch.uint8, generator=gen).long()
    loss_fn = build_loss("ce", 3)
    opt = build_optimizer(model, "adam", 1e-3)

    ctx = RunContext(dev, amp, args.channels_last)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)  # as train.py: only for fp16

    def train_step():  # the trainer's own step
        loop_train_step(model, loss_fn, opt, scaler, ctx.to_input(images), ctx.to_target(masks), ctx)

    infer_model = None  # built after training: what evaluate/predict run (folded BatchNorm etc.)

    @torch.no_grad()
    def infer_step():
        with autocast(dev, amp):
            infer_model(to_model_input(images, dev, args.channels_last)).float()

    res = {"arch": arch, "backbone": model.backbone, "params": sum(p.numel() for p in model.parameters()),
           "size": f"{h}x{w}", "batch": batch, "device": str(dev), "precision": str(amp or torch.float32)}
    for name, step, mode in (("train", train_step, True), ("infer", infer_step, False)):
        model.train(mode)
        if not mode:
            opt.zero_grad(set_to_none=True)
            infer_model = prepare_for_inference(model, amp, args.channels_last)
        for _ in range(args.warmup):
            step()
        _common.sync(dev)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            _common.sync(dev)
            times.append(time.perf_counter() - t)
        res[f"{name}_images_per_s"] = batch / statistics.median(times)
    res["peak_rss_bytes"] = _common.peak_rss_bytes()
    if dev.type == "cuda":
        res["peak_device_mem_bytes"] = _common.peak_device_memory(dev)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", default="all", help="comma list of ARCH or ARCH/BACKBONE (default: every "
                   "architecture with its default backbone)")
    p.add_argument("--sizes", default="128x128@16,360x480@4", help="HxW@batch list; the same batch for every model")
    p.add_argument("--steps", type=int, default=3, help="timed steps per phase (median step time is used)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="as `pixelseg train --precision`")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help="JSON results (default benchmarks/out/zoo-<time>.json)")
    args = p.parse_args(argv)

    if args.worker:
        arch, size = args.worker.rsplit("|", 1)
        h, w, batch = parse_size(size)
        print(json.dumps(worker(arch, h, w, batch, args)), flush=True)
        return 0

    from pixelseg.models import ARCHITECTURES

    archs = list(ARCHITECTURES) if args.models == "all" else [m.strip() for m in args.models.split(",")]
    bad = [a for a in archs if split_spec(a)[0] not in ARCHITECTURES]
    if bad:
        p.error(f"--models: unknown {', '.join(bad)}; choose from {', '.join(ARCHITECTURES)}")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "--precision",
             args.precision, "--channels-last" if args.channels_last else "--no-channels-last"]
    rows = []
    for size in sizes:
        h, w, batch = parse_size(size)
        for arch in archs:
            t = time.time()
            r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", f"{arch}|{size}", *flags],
                               capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if r.returncode or not lines:
                row = {"arch": arch, "size": f"{h}x{w}", "batch": batch, "error": (r.stderr or r.stdout).strip()[-600:]}
            else:
                row = json.loads(lines[-1])
                row["gflops_per_image"] = forward_flops(arch, h, w) / 1e9
            rows.append(row)
            print(f"[zoo] {arch} {h}x{w} b{batch}: " + (row.get("error") or
                  f"train {row['train_images_per_s']:.2f} img/s, infer {row['infer_images_per_s']:.2f} img/s, "
                  f"{row['gflops_per_image']:.1f} GFLOP/img") + f" ({time.time() - t:.0f} s)", flush=True)

    gpu = any("peak_device_mem_bytes" in r for r in rows)
    lines = [f"| arch | backbone | params | size | batch | forward GFLOP/img | train img/s | inference img/s | "
             f"{'peak GPU mem' if gpu else 'peak RSS'} GB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | — | — | {r['size']} | {r['batch']} | — | error | error | — |")
            continue
        mem = r.get("peak_device_mem_bytes", r["peak_rss_bytes"]) / 1e9
        lines.append(f"| {r['arch']} | {r['backbone']} | {r['params'] / 1e6:.1f}M | {r['size']} | {r['batch']} | "
                     f"{r['gflops_per_image']:.1f} | {r['train_images_per_s']:.2f} | {r['infer_images_per_s']:.2f} | "
                     f"{mem:.2f} |")
    table = "\n".join(lines)
    print()
    print(f"flags: device {args.device}, precision {args.precision}, channels_last {args.channels_last}, random weights, "
          f"all layers trained; median of {args.steps} steps after {args.warmup} warm-up")
    print(table)
    out = args.out or _common.out_path("zoo", stamped=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "table": table, "args": {k: str(v) for k, v in vars(args).items()}},
                              indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
