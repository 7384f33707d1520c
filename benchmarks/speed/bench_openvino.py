"""Inference speed: pixelseg's PyTorch path against OpenVINO fp32 and int8 exports, side by side in one run.

Each round times every backend once (interleaved, so a busy machine slows all alike), at batch 64 and at
batch 1, on the training size; the median over rounds is reported with the ratio to PyTorch. PyTorch is
what `predict` and `evaluate` run (`load_model` fast path: folded BatchNorm, channels_last, the default
precision). Inputs are the run's real validation images.

    python benchmarks/speed/bench_openvino.py runs/pets --xml pets.xml --xml pets_int8.xml
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--xml", action="append", default=[], help="an OpenVINO export (repeat)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", default="64,1")
    ap.add_argument("--out", default=str(_common.OUT / "bench_openvino.json"))
    args = ap.parse_args()

    import torch

    from pixelseg.core.checkpoint import load_checkpoint
    from pixelseg.inference.loading import load_model
    from pixelseg.inference.openvino import OpenVinoModel, split_arrays
    from pixelseg.core.runtime import resolve_precision
    from pixelseg.inference.tiling import torch_logits_fn
    ckpt = load_checkpoint(args.run)
    images, _, _ = split_arrays(ckpt, ckpt["config"]["val_split"], 64, "benchmark")
    dev = torch.device("cpu")
    amp = resolve_precision("auto", dev)
    fns = {f"pytorch ({str(amp).replace('torch.', '') if amp else 'fp32'})":
           torch_logits_fn(load_model(ckpt, dev, amp), dev, amp, True)}
    for xml in args.xml:
        model = OpenVinoModel(xml)
        fns[f"openvino {Path(xml).name} ({model.backend})"] = model
    times = {(name, b): [] for name in fns for b in args.batch.split(",")}
    for b in args.batch.split(","):
        x = images[: int(b)].contiguous()
        for fn in fns.values():  # warm-up
            fn(x)
    for _ in range(args.rounds):
        for b in args.batch.split(","):
            x = images[: int(b)].contiguous()
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[(name, b)].append(time.perf_counter() - t0)
    rows = []
    for b in args.batch.split(","):
        base = statistics.median(times[(next(iter(fns)), b)])
        for name in fns:
            med = statistics.median(times[(name, b)])
            rows.append({"backend": name, "batch": int(b), "median_ms": 1000 * med, "img_per_s": int(b) / med,
                         "speedup_vs_pytorch": base / med})
            print(f"batch {b:>3}  {name:<48} {1000 * med:9.1f} ms  {int(b) / med:8.1f} img/s  {base / med:5.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "rounds": args.rounds}, indent=1))


if __name__ == "__main__":
    main()
