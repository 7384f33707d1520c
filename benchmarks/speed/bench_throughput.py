"""pixelseg's tutorial model (U-Net/MobileNetV2, 128×128, random weights): how fast, how big, how close to peak.

For each configuration of the matrix (fp32 eager / channels_last / torch.compile / bf16 autocast +
channels_last ...) and each task (train step with the encoder frozen, with all layers, inference at
batch 64, latency at batch 1) a *fresh* process builds the model and reports images/s and its peak
memory (``resource.getrusage`` RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), so one
configuration's allocator state never leaks into the next. Achieved GFLOP/s = FLOPs per image
(``torch.utils.flop_counter.FlopCounterMode``) × images/s, set against a GEMM peak measured here.

The training step is train.py's own (``pixelseg.training.loop.train_step``): uint8 batch -> to_model_input ->
autocast forward -> fp32 loss -> backward -> Adam (pixelseg.training.optim / pixelseg.training.losses), on in-memory
random data: this is the model and optimiser cost alone; compare/run.py measures the whole
`pixelseg train` loop with its data pipeline.

    python benchmarks/speed/bench_throughput.py                                  # full matrix, 3 repeats
    python benchmarks/speed/bench_throughput.py --configs bf16_cl --tasks train_frozen --steps 3 --repeats 1
    python benchmarks/speed/bench_throughput.py --profile bf16_cl:train_full     # torch.profiler top ops
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)

# name -> (precision for pixelseg.core.runtime.resolve_precision, channels_last, compile)
CONFIGS = {
    "fp32": ("fp32", False, False),
    "channels_last": ("fp32", True, False),
    "compile": ("fp32", True, True),
    "bf16": ("bf16", False, False),
    "bf16_cl": ("bf16", True, False),
    "fp16_cl": ("fp16", True, False),
    "bf16_cl_compile": ("bf16", True, True),
    "default": ("auto", True, False),  # what `pixelseg train` does with no flags
}
TASKS = ("train_frozen", "train_full", "infer", "latency")


# ---- worker: one (config, task) in a fresh process --------------------------------------------

def build(config: str, frozen: bool, dev, training: bool = True):
    from pixelseg.models import create_model
    from pixelseg.core.runtime import resolve_precision
    from pixelseg.models.rewrites import optimize_for_training, prepare_for_inference

    precision, channels_last, compile_ = CONFIGS[config]
    model = create_model("unet", backbone="mobilenet_v2", num_classes=3, weights=None)
    model.set_encoder_frozen(frozen)
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if os.environ.get("PIXELSEG_BENCH_PLAIN") == "1":  # without runtime's rewrites, to measure what they buy
        pass
    else:
        if training:
            optimize_for_training(model, dev, resolve_precision(precision, dev))
        else:
            prepare_for_inference(model, resolve_precision(precision, dev), channels_last)
    fwd = torch.compile(model) if compile_ else model
    return model, fwd


def worker(config: str, task: str, args) -> dict:
    from pixelseg.training.loop import RunContext, train_step
    from pixelseg.training.losses import build_loss
    from pixelseg.training.optim import build_optimizer
    from pixelseg.core.runtime import autocast, resolve_precision, select_device, to_model_input, tune_malloc

    tune_malloc()  # what every pixelseg command does first
    dev = select_device(args.device)
    precision, channels_last, _ = CONFIGS[config]
    amp = resolve_precision(precision, dev)
    torch.manual_seed(0)
    batch = 1 if task == "latency" else args.batch
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, args.size, args.size), dtype=torch.uint8, generator=gen)
    masks = torch.randint(0, 3, (batch, args.size, args.size), dtype=torch.uint8, generator=gen)
    model, fwd = build(config, task == "train_frozen", dev, task.startswith("train"))

    if task.startswith("train"):
        model.train()
        loss_fn = build_loss("ce", 3)
        opt = build_optimizer(model, "adam", 1e-3)
        scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)

        ctx = RunContext(dev, amp, channels_last)
        targets = masks.long()

        def step():  # the trainer's own step (loop.train_step; a GradScaler only for fp16, as train.py)
            return train_step(fwd, loss_fn, opt, scaler, ctx.to_input(images), ctx.to_target(targets), ctx)[1]
    else:
        model.eval()

        @torch.no_grad()
        def step():
            with autocast(dev, amp):
                return fwd(to_model_input(images, dev, channels_last)).float()

    t_warm = time.perf_counter()
    for _ in range(args.warmup):
        step()
    _common.sync(dev)
    warmup_s = time.perf_counter() - t_warm
    n_steps = args.latency_iters if task == "latency" else args.steps
    times = []
    for _ in range(n_steps):
        t = time.perf_counter()
        out = step()
        if task == "latency":
            out.cpu()
        _common.sync(dev)
        times.append(time.perf_counter() - t)
    if args.profile:
        return profile(step, dev, args)
    med = statistics.median(times)
    res = {"config": config, "task": task, "device": str(dev), "precision": str(amp or torch.float32),
           "threads": torch.get_num_threads(), "batch": batch, "steps": n_steps, "warmup_s": warmup_s,
           "images_per_s": batch / med, "step_ms": 1000 * med, "images_per_s_best": batch / min(times),
           "peak_rss_bytes": _common.peak_rss_bytes()}
    if dev.type == "cuda":
        res["peak_device_mem_bytes"] = _common.peak_device_memory(dev)
    return res


def profile(step, dev, args) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=acts, record_shapes=args.profile_shapes) as prof:
        for _ in range(args.steps):
            step()
        _common.sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=args.profile_shapes).table(
        sort_by=key, row_limit=args.profile_rows, max_name_column_width=40, max_shapes_column_width=70)
    return {"profile": table}


# ---- FLOPs and peak, measured in the parent --------------------------------------------------

def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **_):
    """Each requested gradient of a convolution (input, weight) costs what its forward costs.

    Hand-written because torch's own formula for aten.convolution_backward ignores ``groups`` for the
    input gradient (torch 2.14): MobileNetV2's depthwise convolutions come out ~C times too expensive
    and a full training step reads 6.9 instead of 3.5 GFLOP per image. The forward formula is right.
    """
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def flops_per_image(size: int, batch: int = 2) -> dict:
    """FLOPs (2 × multiply-adds, the GEMM's 2n³ convention) per image of a forward pass and of a
    training step (forward + backward, encoder frozen and not), on the fp32 eager model; convolution
    FLOPs are linear in the batch, so a batch of 2 is enough."""
    from torch.utils.flop_counter import FlopCounterMode

    from pixelseg.models import create_model

    out = {}
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, 3, (batch, size, size))
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    for task in ("infer", "train_frozen", "train_full"):
        torch.manual_seed(0)
        model = create_model("unet", backbone="mobilenet_v2", num_classes=3, weights=None)
        model.set_encoder_frozen(task == "train_frozen")
        with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
            if task == "infer":
                with torch.no_grad():
                    model.eval()(x)
            else:
                torch.nn.functional.cross_entropy(model.train()(x), y).backward()
        out[task] = fc.get_total_flops() / batch
        if task == "infer":  # the per-module split shows where the work is
            enc = fc.get_flop_counts().get(f"{type(model).__name__}.encoder", {})
            out["infer_encoder"] = sum(enc.values()) / batch
    out["latency"] = out["infer"]
    return out


def measure_peaks(args) -> dict:
    """GEMM peaks per dtype, each in its own process. On CUDA, fp32 convolutions run on TF32 tensor cores
    by default (torch.backends.cudnn.allow_tf32), so the fp32 configurations are held against the TF32
    peak there, not against the ~8× lower true-fp32 one."""
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    peaks = {}
    for dtype in ("fp32", "bf16") + (("tf32",) if cuda else ()):
        r = subprocess.run([sys.executable, str(_common.BENCH / "speed" / "gemm_peak.py"), "--dtypes", dtype, "--repeats",
                            str(args.gemm_repeats)] + (["--device", args.device] if args.device != "auto" else []),
                           capture_output=True, text=True)
        peaks[dtype] = json.loads(r.stdout.strip().splitlines()[-1])["gflops"] if r.returncode == 0 else None
    peaks["fp32_configs"] = peaks["tf32"] if cuda and torch.backends.cudnn.allow_tf32 else peaks["fp32"]
    return peaks


# ---- driver ------------------------------------------------------------------------------------

def run_worker(config, task, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{config}:{task}", "--batch", str(args.batch),
           "--size", str(args.size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--latency-iters", str(args.latency_iters), "--device", args.device]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"config": config, "task": task, "error": (r.stderr or r.stdout).strip()[-800:]}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--configs", default="fp32,channels_last,compile,bf16_cl", help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (median step time is used)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (torch.compile compiles here)")
    p.add_argument("--latency-iters", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per (config, task); median reported")
    p.add_argument("--gemm-repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--profile", metavar="CONFIG:TASK", help="print torch.profiler's top ops for one pair and exit")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--profile-shapes", action="store_true", help="split the profile by input shapes (which layer)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help="JSON results (default benchmarks/out/throughput-<time>.json)")
    args = p.parse_args(argv)

    if args.worker or args.profile:
        config, task = (args.worker or args.profile).split(":")
        if config not in CONFIGS or task not in TASKS:
            p.error(f"expected CONFIG:TASK with CONFIG in {', '.join(CONFIGS)} and TASK in {', '.join(TASKS)}")
        res = worker(config, task, args)
        if "profile" in res:
            print(f"torch.profiler, {config}:{task}, {args.steps} steps after {args.warmup} warm-up:")
            print(res["profile"])
        else:
            print(json.dumps(res), flush=True)
        return 0

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [c for c in configs if c not in CONFIGS] + [t for t in tasks if t not in TASKS]
    if bad:
        p.error(f"unknown config/task: {', '.join(bad)}")
    peaks = measure_peaks(args)
    flops = flops_per_image(args.size)
    print("GEMM peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items() if v and k != "fp32_configs")
          + f" (fp32 configs held against {peaks['fp32_configs']:.0f}); "
          f"GFLOP/image: forward {flops['infer'] / 1e9:.2f} (encoder {flops['infer_encoder'] / 1e9:.2f}), "
          f"train step frozen {flops['train_frozen'] / 1e9:.2f}, full {flops['train_full'] / 1e9:.2f}", flush=True)

    results = {}
    for rep in range(args.repeats):
        for config in configs:
            for task in tasks:
                r = run_worker(config, task, args)
                results.setdefault((config, task), []).append(r)
                print(f"[throughput] {rep + 1}/{args.repeats} {config} {task}: "
                      + (r.get("error") or f"{r['images_per_s']:.1f} img/s, {r['step_ms']:.1f} ms/step, "
                         f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB"), flush=True)

    rows = []
    for config in configs:
        row = {"config": config}
        for task in tasks:
            ok = [r for r in results[(config, task)] if "error" not in r]
            if not ok:
                row[task] = None
                continue
            ips = statistics.median(r["images_per_s"] for r in ok)
            mem = statistics.median(r.get("peak_device_mem_bytes", r["peak_rss_bytes"]) for r in ok)
            # bf16 and fp16 configs against the bf16 GEMM peak (the same tensor-core/AMX rate); the precision
            # field reads "torch.bfloat16"/"torch.float16"/"torch.float32"
            peak = peaks["bf16" if ok[0]["precision"] in ("torch.bfloat16", "torch.float16") else "fp32_configs"]
            gflops = flops[task] * ips / 1e9
            row[task] = {"images_per_s": ips, "ms": 1000 / ips if task == "latency" else None, "mem_bytes": mem,
                         "gflops": gflops, "pct_peak": 100 * gflops / peak if peak else None,
                         "precision": ok[0]["precision"], "device": ok[0]["device"]}
        rows.append(row)

    on_gpu = any(r.get("peak_device_mem_bytes") for rs in results.values() for r in rs)
    mem_label = "peak GPU mem" if on_gpu else "peak RSS"
    head = ["config"]
    for t in tasks:
        head += [f"{t} img/s" if t != "latency" else "latency b1 ms", f"{t} GFLOP/s (% peak)", f"{t} {mem_label} GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["config"]]
        for t in tasks:
            v = row.get(t)
            if v is None:
                cells += ["—"] * 3
                continue
            cells.append(f"{v['ms']:.1f}" if t == "latency" else f"{v['images_per_s']:.1f}")
            cells.append(f"{v['gflops']:.0f} ({v['pct_peak']:.0f}%)" if v["pct_peak"] is not None else f"{v['gflops']:.0f}")
            cells.append(f"{v['mem_bytes'] / 1e9:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print()
    print(f"U-Net/MobileNetV2 {args.size}×{args.size}, batch {args.batch}, random weights; median of {args.repeats} "
          f"fresh processes × {args.steps} steps; % of the GEMM peak of the config's dtype (fp32 configs: "
          f"{peaks['fp32_configs']:.0f} GFLOP/s, bf16: {peaks['bf16'] or float('nan'):.0f} GFLOP/s)")
    print(table)
    out = args.out or _common.out_path("throughput", stamped=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"peaks_gflops": peaks, "flops_per_image": flops, "rows": rows, "table": table,
                               "raw": {f"{c}:{t}": v for (c, t), v in results.items()},
                               "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
