"""Ways to run the tutorial U-Net's inference on CPU, timed in one process each: the default eager path,
TorchScript trace + freeze, torch.compile (inductor with weight freezing) and the sub-pixel rewrite of
the transposed convolutions. It answers "would another execution path reach 2x TensorFlow?" and
prints a per-op profile of the default path (--profile).

    python benchmarks/speed/bench_infer_variants.py                    # every variant, a fresh process each
    python benchmarks/speed/bench_infer_variants.py --variants eager --profile
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (puts this checkout's pixelseg first on sys.path)
VARIANTS = ("eager", "jit", "inductor")


def worker(variant: str, args) -> dict:
    from pixelseg.models import create_model
    from pixelseg.core.runtime import autocast, resolve_precision, to_model_input
    from pixelseg.models.rewrites import prepare_for_inference

    torch.manual_seed(0)
    dev = torch.device("cpu")
    amp = resolve_precision(args.precision, dev)
    reference = create_model("unet", backbone="mobilenet_v2", num_classes=3, weights=None)
    model = create_model("unet", backbone="mobilenet_v2", num_classes=3, weights=None)
    model.load_state_dict(reference.state_dict())
    prepare_for_inference(reference, amp, channels_last=True)  # what evaluate/predict run
    prepare_for_inference(model, amp, channels_last=True)
    xb = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8,
                       generator=torch.Generator().manual_seed(0))
    x1 = xb[:1].clone()
    with torch.no_grad(), autocast(dev, amp):
        ref = reference(to_model_input(xb, dev, True)).float()
    fwd = model
    if variant == "jit":
        with torch.no_grad(), autocast(dev, amp):
            fwd = torch.jit.freeze(torch.jit.trace(model, to_model_input(xb, dev, True)))
    elif variant == "inductor":
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
        fwd = torch.compile(model)

    @torch.no_grad()
    def run(x):
        with autocast(dev, amp):
            return fwd(to_model_input(x, dev, True)).float()

    t = time.perf_counter()
    out = run(xb)
    run(x1)
    first_s = time.perf_counter() - t
    for _ in range(2):
        run(xb)
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        run(xb)
        times.append(time.perf_counter() - t)
    lat = []
    for _ in range(args.latency_iters):
        t = time.perf_counter()
        run(x1)
        lat.append(time.perf_counter() - t)
    res = {"variant": variant, "first_call_s": first_s, "images_per_s": args.batch / sorted(times)[len(times) // 2],
           "latency_b1_ms": 1000 * sorted(lat)[len(lat) // 2],
           "max_abs_diff_vs_eager": (out - ref).abs().max().item(),
           "argmax_agreement": (out.argmax(1) == ref.argmax(1)).float().mean().item()}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run(xb)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), file=sys.stderr)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--latency-iters", type=int, default=30)
    p.add_argument("--precision", default="auto", help="as `pixelseg train --precision`")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler op table per variant")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        p.error(f"--variants: unknown {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    flags = ["--batch", str(args.batch), "--size", str(args.size), "--iters", str(args.iters),
             "--latency-iters", str(args.latency_iters), "--precision", args.precision] + (["--profile"] * args.profile)
    print("| variant | first call s | b%d img/s | b1 ms | max abs diff vs eager | argmax agreement |" % args.batch)
    print("|---|---|---|---|---|---|")
    for v in variants:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", v, *flags],
                           capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode or not lines:
            print(f"| {v} | error: {(r.stderr or r.stdout).strip()[-300:]} |")
            continue
        if args.profile:
            print(r.stderr, file=sys.stderr)
        x = json.loads(lines[-1])
        print(f"| {v} | {x['first_call_s']:.1f} | {x['images_per_s']:.1f} | {x['latency_b1_ms']:.2f} | "
              f"{x['max_abs_diff_vs_eager']:.2g} | {x['argmax_agreement']:.6f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
